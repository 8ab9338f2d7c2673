#!/usr/bin/env bash
# The NCCL checks of raypod's abortable collectives, on whatever GPUs this machine has
# (see ../shared/GPU.md; the conventions of benchmarks/gpu_session.sh):
#   run (device tool, carry [".gpu_site.tar.xz"]): bash benchmarks/gpu_readiness.sh
# (a) one GPU:  GroupSession on NCCL at world size 1 in one process: configure, all-reduce,
#               abort, leave, configure again, all-reduce, each timed (raypod.bench.nccl_abort);
#               with >= 2 GPUs also rank 1 SIGSTOPped while rank 0 is in an all-reduce: rank 0's
#               abort must release it within 1 s, and it regroups.
# (b) one GPU:  a raypod job, 1 NCCL rank + a warm spare sharing the GPU (GPU: 0.5), rank 0
#               killed: the spare takes over (from the persistent checkpoint: no peer at world 1).
# (c) >= 2 GPUs: rank 1 killed and frozen mid-backward over NCCL, one GPU per rank; each run
#               must end on the fault-free run's final_state_sha256 (a raypod job per fault);
#               with >= 4 GPUs also tests/integration/test_collective_faults.py on GPU ranks
#               (RAYPOD_TEST_GPUS=1: 3 ranks + a spare, a GPU each).
# Results under $OUT; the exit status is the number of checks that failed.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # OUT, the slim Ray on PYTHONPATH, PY
RUNS=${RUNS:-/tmp/gpu_readiness_runs}
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
FAILED=()
step() { echo "=== $* ($(date +%T))"; }
verdict() { if [ "$2" -eq 0 ]; then echo "PASS $1"; else echo "FAIL $1 (exit $2)"; FAILED+=("$1"); fi; }

# job NAME STEPS [--set ...]: tiny.yaml on GPU ranks, MLflow off; its summary.json to $OUT/NAME.json.
job() {
  local name=$1 steps=$2
  shift 2
  rm -rf "$RUNS/$name"
  timeout "${JOB_TIMEOUT:-240}" $PY -m raypod.cli run jobs/configs/tiny.yaml --quiet \
    --set scaling.use_gpu=true --set mlflow.enabled=false --set checkpoint.storage="$RUNS" \
    --set name="$name" --set train.max_steps="$steps" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -3 "$OUT/$name.log"
  cp "$RUNS/$name/summary.json" "$OUT/$name.json" 2>/dev/null || echo "no summary.json for $name"
  return $rc
}

# summary NAME STEPS FAILURES [BASELINE]: raypod.bench.nccl_abort's check of a job's summary.json.
summary() {
  local base=()
  [ -n "${4:-}" ] && base=(--baseline "$OUT/$4.json")
  $PY -m raypod.bench.nccl_abort summary "$OUT/$1.json" --steps "$2" --failures "$3" "${base[@]}"
}

# A bin folder with python and a `ray` launcher for Ray from PYTHONPATH: the integration tests'
# cluster runs `<folder of sys.executable>/ray start`, and the machine's python has no `ray`.
test_bin() {
  local venv=/tmp/raypod_venv
  $PY -m venv --without-pip --system-site-packages "$venv" >/dev/null 2>&1 \
    || { mkdir -p "$venv/bin" && ln -sf "$(command -v "$PY")" "$venv/bin/python"; }
  printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n' \
    "$venv/bin/python" > "$venv/bin/ray"
  chmod +x "$venv/bin/ray"
  echo "$venv/bin"
}

step "versions: $GPUS GPU(s)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())" 2>&1 | tail -3

step "(a) GroupSession on NCCL: world-1 abort and re-form$([ "$GPUS" -ge 2 ] && echo ', two ranks: a stopped peer')"
timeout 300 $PY -m raypod.bench.nccl_abort --out "$OUT/nccl_abort.json" 2>&1 | tail -60
verdict "nccl_abort" "${PIPESTATUS[0]}"

step "(b) 1 NCCL rank + a warm spare on GPU: 0.5, rank 0 killed at step 30"
job nccl-spare 60 --set scaling.min_workers=1 --set scaling.max_workers=1 --set scaling.spares=1 \
  --set 'scaling.resources_per_worker={CPU: 2, GPU: 0.5}' \
  --set 'fault.inject=[{step: 30, rank: 0, kind: kill}]'
rc=$?
[ $rc -eq 0 ] && { summary nccl-spare 60 1; rc=$?; }
verdict "spare takes over (GPU: 0.5)" $rc

if [ "$GPUS" -ge 2 ]; then
  # One GPU per rank; a spare only where a GPU is left for it (else a new actor takes the rank).
  SPARES=$((GPUS >= 3 ? 1 : 0))
  TWO=(--set scaling.min_workers=2 --set scaling.max_workers=2 --set scaling.spares=$SPARES
       --set 'scaling.resources_per_worker={CPU: 1, GPU: 1}' --set checkpoint.memory_every_steps=1
       --set checkpoint.every_steps=5)
  step "(c) 2 NCCL ranks ($SPARES spare): fault-free, then rank 1 killed / frozen mid-backward"
  job nccl2-baseline 12 "${TWO[@]}"
  verdict "2 ranks fault-free" $?
  for kind in kill freeze; do
    job "nccl2-$kind" 12 "${TWO[@]}" --set "fault.inject=[{step: 6, rank: 1, kind: $kind, at: backward}]"
    rc=$?
    [ $rc -eq 0 ] && { summary "nccl2-$kind" 12 1 nccl2-baseline; rc=$?; }
    verdict "2 ranks, rank 1 $kind mid-backward, same final state" $rc
  done
  if [ "$GPUS" -ge 4 ]; then
    step "(c) tests/integration/test_collective_faults.py on GPU ranks (RAYPOD_TEST_GPUS=1)"
    BIN=$(test_bin)
    RAYPOD_TEST_GPUS=1 timeout "${TEST_TIMEOUT:-420}" "$BIN/python" -m pytest -q -s -p no:cacheprovider \
      tests/integration/test_collective_faults.py > "$OUT/test_collective_faults.log" 2>&1
    rc=$?
    grep -E "^(freeze|kill) at|passed|failed|error" "$OUT/test_collective_faults.log" | tail -12
    verdict "test_collective_faults on GPUs" $rc
  fi
else
  step "(c) skipped: multi-rank NCCL recovery needs >= 2 GPUs, this machine has $GPUS"
fi

step "done: ${#FAILED[@]} failed${FAILED[*]:+: ${FAILED[*]}}"
exit ${#FAILED[@]}
