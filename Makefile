# Two commands do all set-up on a fresh machine:
#   make demo   train the tiny GPT on a local Ray with a worker killed part-way
#   make test   run the test suite
# Both create .venv on first use and reuse it afterwards.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raypod-installed
# CPU machines get the CPU build of torch; on a GPU machine install your CUDA torch
# into $(VENV) first (or set TORCH_SPEC=) and this step keeps it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench-startup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { test -z "$(TORCH_SPEC)" || $(PY) -m pip install -q "$(TORCH_SPEC)"; }
	$(PY) -m pip install -q -e ".[test]"
	@# The MLflow UI browser test drives Debian's Chromium (never a downloaded browser).
	command -v chromium >/dev/null || { command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "chromium not installed: the browser test will be skipped"; }
	touch $(STAMP)

demo: setup
	@$(VENV)/bin/raypod run jobs/configs/tiny.yaml \
		--set name=tiny-demo-$$(date +%Y%m%d-%H%M%S) \
		--set 'fault.inject=[{step: 40, rank: 1, kind: kill}]'

test: setup
	$(PY) -m pytest -q -rf --durations=25 tests

lint: setup
	$(VENV)/bin/ruff check raypod jobs tests

bench-startup: setup
	$(VENV)/bin/raypod bench startup --trials 3

clean:
	rm -rf raypod_runs .pytest_cache
