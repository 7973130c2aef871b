#!/usr/bin/env bash
# A better teacher from what you already have: train K seeds of one fit config, then cache the logit mean
# of the K checkpoints over the 8 D4 views (the `checkpoint` teacher) for students to distil from.
#   bash scripts/train_ensemble.sh CONFIG K NAME [extra distill.fit arguments...]
#   bash scripts/train_ensemble.sh configs/fit/unet_r34_gt.yaml 3 r34_ens --trainer.max_epochs=200
# -> runs $RUNS/NAME-seed0 .. NAME-seed{K-1} (seed_everything 0..K-1; a finished run is kept, not retrained)
#    and the cache $CACHES/NAME; then train students with --data.cache_dir=$CACHES/NAME.
# Env: PY (default .venv/bin/python), RUNS (students), CACHES (teacher_cache), VIEWS (d4: all 8; or e.g.
# identity,hflip), BATCH (teacher batch size, 8). Data format and root come from the first run's config.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,10p' "$0" >&2
    exit 2
fi
CONFIG=$1 K=$2 NAME=$3
shift 3
PY="${PY:-.venv/bin/python}" RUNS="${RUNS:-students}" CACHES="${CACHES:-teacher_cache}" VIEWS="${VIEWS:-d4}"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE="${WANDB_MODE:-offline}" WANDB_SILENT="${WANDB_SILENT:-true}"

checkpoints=()
for ((seed = 0; seed < K; seed++)); do
    run="$NAME-seed$seed"
    if [ ! -f "$RUNS/$run/metrics_test.json" ]; then
        # an unfinished run is cleared and trained again (fit refuses a run directory that holds files)
        "$PY" -m distill.fit --config "$CONFIG" --seed_everything="$seed" --run_name="$run" --runs_dir="$RUNS" \
            --overwrite=true "$@"
    fi
    checkpoints+=("$RUNS/$run/checkpoints/best.ckpt")
done

read -r FORMAT ROOT < <("$PY" -c 'import sys, yaml
data = yaml.safe_load(open(sys.argv[1]))["data"]
print(data["data_format"], data["data_root"])' "$RUNS/$NAME-seed0/config.yaml")
list=$(IFS=,; echo "[${checkpoints[*]}]")
"$PY" -m distill.cache_teacher --teacher checkpoint --data-format "$FORMAT" --data-root "$ROOT" \
    --out "$CACHES/$NAME" --batch-size "${BATCH:-8}" \
    --teacher-option "checkpoints=$list" --teacher-option "tta=$VIEWS"
echo "ensemble teacher of $K checkpoints x views $VIEWS cached in $CACHES/$NAME"
