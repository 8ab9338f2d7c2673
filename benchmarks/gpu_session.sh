#!/usr/bin/env bash
# What a session with a lent GPU runs (see ../shared/GPU.md and BENCHMARKS.md "GPU"):
#   run (device tool, carry [".gpu_site.tar.xz"]): bash benchmarks/gpu_session.sh
# .gpu_site.tar.xz is Ray 2.60 (cp312, slimmed as GPU.md says) plus raypod's pure
# dependencies, unpacked onto PYTHONPATH; torch/numpy/pyarrow are the machine's own.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"  # OUT, the slim Ray on PYTHONPATH, PY
step() { echo "=== $* ($(date +%T))"; }
step versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import ray, torch, pyarrow; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" 2>&1 | tail -3

step "unit: the CUDA snapshot path"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/unit/worker/test_snapshot_cuda.py tests/unit/policies/test_cadence.py 2>&1 | tail -5

step "NCCL: one rank on the GPU, killed at step 30, a warm spare takes over"
timeout 240 $PY -m raypod.cli run jobs/configs/tiny.yaml --quiet --set scaling.use_gpu=true \
  --set 'scaling.resources_per_worker={CPU: 2, GPU: 0.5}' --set scaling.min_workers=1 \
  --set scaling.max_workers=1 --set scaling.spares=1 --set mlflow.enabled=false \
  --set checkpoint.storage=/tmp/gpu_runs --set name=nccl-kill --set train.max_steps=60 \
  --set 'fault.inject=[{step: 30, rank: 0, kind: kill}]' > "$OUT/nccl_kill.log" 2>&1
echo "exit $?"; tail -3 "$OUT/nccl_kill.log"
cp /tmp/gpu_runs/nccl-kill/summary.json "$OUT/nccl_kill_summary.json" 2>/dev/null && \
  $PY -c "import json; d=json.load(open('$OUT/nccl_kill_summary.json')); print(d['status'], d['final_step'], d.get('memory_snapshots'), [(e['kind'], e['step'], e.get('restored_from'), round(e['resumed_s']-e['detected_s'],2) if e.get('resumed_s') else None) for e in d['events']])"

step "bench gpu: 350m bf16, raypod vs a plain loop"
timeout ${BENCH_TIMEOUT:-420} $PY -m raypod.bench.gpu --trials 1 --out "$OUT/results" 2>&1 | grep -v "^\s*$" | tail -25
step done
