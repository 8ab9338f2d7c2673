#!/usr/bin/env bash
# Builds .gpu_site.tar.xz (ignored through .git/info/exclude): Ray 2.60 for cp312, slimmed as
# ../shared/GPU.md says, plus the pure dependencies raypod needs that the GPU image lacks.
# Torch, numpy, pyarrow, rich, pyyaml, psutil, fsspec are the GPU machine's own.
#   bash benchmarks/make_gpu_site.sh   (here, with PyPI), then carry [".gpu_site.tar.xz"]
set -euo pipefail
WHL=$(mktemp -d) SITE=$(mktemp -d)
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform any
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$WHL" ray==2.60.0 pydantic==2.14.4 \
  pydantic-core==2.50.5 annotated-types typing-inspection jsonschema jsonschema-specifications \
  referencing rpds-py tensorboardX 2>&1 | grep -v "^WARNING" || true
for w in "$WHL"/*.whl; do unzip -qo "$w" -d "$SITE"; done
rm -rf "$SITE"/ray/{jars,rllib,serve,llm,dashboard/client} "$SITE"/*.dist-info/RECORD
echo "/.gpu_site.tar.xz" >> "$(git rev-parse --git-dir)/info/exclude"
tar cf - -C "$SITE" . | xz -6 -T2 > .gpu_site.tar.xz
rm -rf "$WHL" "$SITE"
ls -la .gpu_site.tar.xz
