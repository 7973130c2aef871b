#!/usr/bin/env bash
# Teacher-side GPU figures for BENCHMARKS.md, in one call on a machine with 1 or 2 GPUs:
#   1. the sa2va adapter on a random-weight stand-in of Sa2VA-8B's size (1 GPU; 2 GPUs at 22 GiB each)
#   2. python -m distill.cache_teacher with that teacher on a synthetic set: data parallel over the
#      GPUs (--gpus-per-model 1) and sharded (--gpus-per-model 2 --max-memory 22GiB), with --verify
# Usage: bash scripts/gpu_teacher_bench.sh OUT_DIR [N_IMAGES]
set -euo pipefail
out=${1:?output folder}; n=${2:-128}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
gpus=$($py -c 'import torch; print(torch.cuda.device_count())')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$py scripts/bench_sa2va_standin.py --out "$out/sa2va_adapter.json" --images "$n" 2>&1 | grep -v "it/s]" | tail -25
data=/tmp/bench_data
[ -f $data/annotations.json ] || $py -m distill.synth --out $data --count "$n" --size 512 --seed 0
model=/tmp/sa2va_standin_8b
run_cache() {  # name, extra flags...
  local name=$1; shift
  rm -rf "/tmp/cache_$name"
  $py -m distill.cache_teacher --teacher sa2va --model-path $model --trust-remote-code --data-format merged \
    --data-root $data --out "/tmp/cache_$name" --summary-json "$out/cache_$name.json" "$@" 2>&1 | grep -v "it/s]\|img/s]" | tail -8
  $py -m distill.cache_teacher --verify "/tmp/cache_$name" 2>&1 | tail -1
}
run_cache dp_gpus --gpus-per-model 1
if [ "$gpus" -ge 2 ]; then
  run_cache sharded_2x22 --gpus-per-model 2 --max-memory 22GiB
fi
$py - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("cache_*.json")):
    s = json.loads(f.read_text())
    print(f.stem, {k: s.get(k) for k in ("done", "no_mask", "images_per_s", "overhead_pct", "peak_memory_gib", "workers")})
PY
