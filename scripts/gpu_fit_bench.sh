#!/usr/bin/env bash
# The student-training figures of BENCHMARKS.md on a GPU machine; logs and JSON land in OUT.
#   bash scripts/gpu_fit_bench.sh OUT 1gpu      # pytest -m gpu; bare/pure/pipeline, 3 models x 2 regimes, --profile;
#                                               # worker vs GPU data path; the GPU path's stages alone
#   bash scripts/gpu_fit_bench.sh OUT 1gpu-256  # the first half of 1gpu (tests, 256x16), for a shorter time limit
#   bash scripts/gpu_fit_bench.sh OUT 1gpu-512  # the second half (512x32, the two data paths)
#   bash scripts/gpu_fit_bench.sh OUT 2gpu      # demo.yaml under DDP on 2 GPUs, the 2-GPU tests, pipeline scaling 1 -> 2 GPUs
#   bash scripts/gpu_fit_bench.sh OUT graphs    # CUDA graphs (reduce-overhead), 12 workers: bare vs pipeline, 3 models, 512x32
#   bash scripts/gpu_fit_bench.sh OUT 2gpu-graphs  # the same pipeline on 1 and 2 GPUs (DDP), UNet-R34 at 512x32
#   bash scripts/gpu_fit_bench.sh OUT 2gpu-diag    # 2gpu-graphs with each process's CPU use and allowed CPUs sampled
#   bash scripts/gpu_fit_bench.sh OUT workers   # the worker path's data side alone: one worker's ms per crop, the loader's img/s
#   bash scripts/gpu_fit_bench.sh OUT rows      # 1 GPU, graphs: bare + pipeline, profiled, one model and regime per run
#                                               # (REGIMES="512x32" MODELS="unet_r34" to choose)
#   bash scripts/gpu_fit_bench.sh OUT step      # 1 GPU: the 256x16 step's parts alone, then the loop figure's variants
#                                               # (MODELS="unet_mnv3" to choose)
#   bash scripts/gpu_fit_bench.sh OUT whole     # 1 GPU: the whole-step CUDA graph (model.cuda_graph): its GPU tests, then
#                                               # bare, bare_graphed and the graphed pipeline, profiled, one model and regime
#                                               # per run (REGIMES="256x16" MODELS="unet_mnv3" to choose)
#   bash scripts/gpu_fit_bench.sh OUT 2gpu-whole   # the whole-step CUDA graph under DDP: its 2-GPU tests, then pipeline
#                                               # scaling 1 -> 2 GPUs, profiled (REGIMES="256x16" MODELS="unet_r34" AUGMENT_ON="workers
#                                               # device" WARMUP=60 STEPS=200 to choose; TESTS=0 skips the tests)
#   AB_OLD=DIR bash scripts/gpu_fit_bench.sh OUT ab  # 1 GPU: the 256x16 pipeline figure of this tree and of DIR's distill/
#                                               # (e.g. `git archive REV distill | tar -x -C DIR`), alternating, twice:
#                                               # figures move between machines, so an A/B belongs in one call
# Each step runs even when an earlier one failed; its exit status and time go to OUT/steps.txt.
set -u
OUT="${1:?usage: gpu_fit_bench.sh OUT 1gpu|1gpu-256|1gpu-512|2gpu|graphs|2gpu-graphs|2gpu-diag|2gpu-whole|workers|rows|step|whole|ab}"
WHAT="${2:?usage: gpu_fit_bench.sh OUT 1gpu|1gpu-256|1gpu-512|2gpu|graphs|2gpu-graphs|2gpu-diag|2gpu-whole|workers|rows|step|whole|ab}"
PY="${PY:-python3}"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline WANDB_SILENT=true
mkdir -p "$OUT"

step() {  # step NAME COMMAND...: run it, output to OUT/NAME.txt, status and seconds to OUT/steps.txt
    local name="$1" start=$SECONDS
    shift
    echo "=== $name: $*"
    "$@" > "$OUT/$name.txt" 2>&1
    local status=$?
    echo "$name exit=$status seconds=$((SECONDS - start))" | tee -a "$OUT/steps.txt"
    tail -n 25 "$OUT/$name.txt"
    return $status
}

bench() { step "$1" "$PY" scripts/bench_fit.py --out "$OUT" "${@:2}"; }

one_gpu_256() {
    step pytest_gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
    bench bench_256 --compile --profile --regimes 256x16 --tag 256x16
}

one_gpu_512() {
    bench bench_512 --compile --profile --regimes 512x32 --tag 512x32
    bench bench_paths --compile --figures bare pipeline --augment-on workers device --num-workers 12 \
        --regimes 512x32 256x16 --models unet_r34 unet_mnv3 --tag paths
    step bench_augment "$PY" scripts/bench_device_augment.py --out "$OUT"
}

two_gpus() {
    step demo_data "$PY" -m distill.synth --out data/synthetic --count 96 --size 192 --style fundus --seed 0
    step demo_cache "$PY" -m distill.cache_teacher --config configs/teacher/frangi_synthetic.yaml
    local demo=("$PY" -m distill.fit --config configs/fit/demo.yaml --trainer.accelerator=gpu --trainer.devices=2
        --runs_dir "$OUT/students" --wandb=false)
    step demo_ddp "${demo[@]}" --trainer.strategy=ddp --run_name demo_ddp
    step pytest_gpu_ddp "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "ddp or stopped_rank"
    bench bench_ddp --regimes 512x32 --figures pipeline --devices 1 2 --models unet_r34 segformer_b0 --tag ddp
}

graphs_args=(--compile reduce-overhead --augment-on workers --num-workers 12 --images 192 --unique 8 --work /tmp/bench_fit)

graphs() {
    bench bench_graphs512 "${graphs_args[@]}" --regimes 512x32 --figures bare pipeline --tag graphs512
}

two_gpus_graphs() {
    bench bench_ddp_graphs "${graphs_args[@]}" --regimes 512x32 --figures pipeline --devices 1 2 \
        --models unet_r34 --tag ddp_graphs
}

watch_processes() {  # every 15 s into OUT/processes.txt: the busiest processes, and the CPUs each python may use
    while true; do
        { date +%T; top -b -n 1 -w 200 | sed -n 1,45p
          for pid in $(pgrep python); do
              echo "$pid $(grep Cpus_allowed_list "/proc/$pid/status" 2>/dev/null) $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-80)"
          done; } >> "$OUT/processes.txt"
        sleep 15
    done
}

two_gpus_diagnosed() {  # 2gpu-graphs, watched: are the ranks' workers busy, and on which CPUs may they run?
    watch_processes &
    local watcher=$!
    two_gpus_graphs
    kill "$watcher"
}

workers() {
    bench bench_loader "${graphs_args[@]}" --regimes 512x32 256x16 --models unet_r34 --figures loader --tag loader
    bench bench_sample "${graphs_args[@]}" --regimes 512x32 256x16 --models unet_r34 --figures sample \
        --warmup 2 --steps 10 --tag sample
}

rows() {
    local regime model
    for regime in ${REGIMES:-256x16 512x32}; do
        for model in ${MODELS:-unet_r34 unet_mnv3 segformer_b0}; do
            bench "bench_${model}_$regime" "${graphs_args[@]}" --regimes "$regime" --models "$model" \
                --figures bare pipeline --profile --tag "${model}_$regime"
        done
    done
}

whole() {
    local regime model
    step pytest_gpu_graph "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k "graph or never_wait"
    for regime in ${REGIMES:-256x16 512x32}; do
        for model in ${MODELS:-unet_mnv3 unet_r34 segformer_b0}; do
            bench "whole_${model}_$regime" "${graphs_args[@]}" --cuda-graph --regimes "$regime" --models "$model" \
                --figures bare bare_graphed pipeline --profile --tag "whole_${model}_$regime"
        done
    done
}

two_gpus_whole() {
    local regime model
    [ "${TESTS:-1}" = 1 ] && step pytest_gpu_ddp "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
        -k "ddp or stopped_rank"
    for regime in ${REGIMES:-256x16 512x32}; do
        for model in ${MODELS:-unet_r34}; do
            # shellcheck disable=SC2086  # AUGMENT_ON: one or both data paths
            bench "ddp_whole_${model}_$regime" "${graphs_args[@]}" --cuda-graph --regimes "$regime" --models "$model" \
                --augment-on ${AUGMENT_ON:-workers} --figures pipeline --devices 1 2 --warmup "${WARMUP:-60}" \
                --steps "${STEPS:-200}" --profile --tag "ddp_whole_${model}_$regime"
        done
    done
}

step_parts() {
    local model
    for model in ${MODELS:-unet_mnv3}; do
        step "step_parts_$model" "$PY" scripts/bench_step_parts.py --model "$model" --out "$OUT"
        step "loop_variants_$model" "$PY" scripts/bench_loop_variants.py --model "$model" --out "$OUT" \
            --variants as_is pure loss_only_noclip loss_only as_is pure loss_only_noclip loss_only --warmup 80 --steps 200
    done
}

ab() {
    local old="${AB_OLD:?set AB_OLD to a directory holding the distill/ of another commit}" round model
    for round in 1 2; do
        for model in ${MODELS:-unet_mnv3}; do
            bench "ab_new_${model}_$round" "${graphs_args[@]}" --regimes 256x16 --models "$model" \
                --figures pipeline --tag "ab_new_${model}_$round"
            (
                export PYTHONPATH="$old${PYTHONPATH:+:$PYTHONPATH}"
                bench "ab_old_${model}_$round" "${graphs_args[@]}" --regimes 256x16 --models "$model" \
                    --figures pipeline --tag "ab_old_${model}_$round"
            )
        done
    done
}

case "$WHAT" in
    1gpu) one_gpu_256; one_gpu_512 ;;
    1gpu-256) one_gpu_256 ;;
    1gpu-512) one_gpu_512 ;;
    2gpu) two_gpus ;;
    graphs) graphs ;;
    2gpu-graphs) two_gpus_graphs ;;
    2gpu-diag) two_gpus_diagnosed ;;
    2gpu-whole) two_gpus_whole ;;
    workers) workers ;;
    rows) rows ;;
    step) step_parts ;;
    whole) whole ;;
    ab) ab ;;
    *) echo "unknown part $WHAT: choose 1gpu, 1gpu-256, 1gpu-512, 2gpu, graphs, 2gpu-graphs, 2gpu-diag, 2gpu-whole, workers, rows, step, whole or ab" >&2; exit 2 ;;
esac
cat "$OUT/steps.txt"
