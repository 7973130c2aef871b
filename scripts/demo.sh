#!/usr/bin/env bash
# `make demo`: synthetic vessels -> Frangi teacher cache -> a small UNet student distilled from it on CPU,
# then the side-by-side table and pictures in students/demo/. The data and cache steps are skipped when their
# output is there and sound; the student is trained afresh each time.
#   bash scripts/demo.sh .venv/bin/python
set -euo pipefail
PY="${1:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT="${WANDB_SILENT:-true}"
DATA=data/synthetic
CACHE=teacher_cache/frangi_synthetic  # the `out` of configs/teacher/frangi_synthetic.yaml

if [ ! -f "$DATA/annotations.json" ]; then
    "$PY" -m distill.synth --out "$DATA" --count 96 --size 192 --style fundus --seed 0 --preview "$DATA/preview.png"
fi
if ! "$PY" -m distill.cache_teacher --verify "$CACHE" >/dev/null 2>&1; then
    # Missing, or made for other data: a cache is only a cache, rebuild it.
    rm -rf "$CACHE"
    "$PY" -m distill.cache_teacher --config configs/teacher/frangi_synthetic.yaml
fi
"$PY" -m distill.fit --config configs/fit/demo.yaml --overwrite=true  # retrains every time, into a cleared students/demo
