#!/usr/bin/env bash
# Every method's main fixed-budget setting on a GPU, next to the unreduced model measured in the same run:
# clips/s, speed-up, efficiency (speed-up / GFLOPs ratio), the reducers' share, peak memory per clip for
# inference and for a training step. One command on a machine with a CUDA GPU and tokensieve installed:
#
#     bash benchmarks/gpu.sh                 # videomae-s and videomae-b, about 20 minutes on one GPU
#     MODELS=videomae-b BATCHES="8 32" bash benchmarks/gpu.sh
#
# What it runs (`tokensieve bench`, see its --help): for each model, in float16 and in bfloat16 (each as
# autocast or converted weights, whichever is faster: the title says which), at batch 1, 8 and 32, eager and
# compiled (`--compile`: one torch.compile per plan, compiled in the warm-up); then, at batch 8 in float16,
# each fused attention kernel on its own (`--sdpa`). Timing uses CUDA events after the warm-up; the reducers
# are timed by events in the stream, so nothing synchronises inside a forward (a fixed-budget plan issues no
# host synchronisation: tests/test_reducers.py). Tables go to the terminal and to $OUT/<model>.txt, the same
# results as JSON to $OUT/<model>-<dtype>[-compiled|-<kernel>].json.
#
# The environment variables below change what runs; tests/test_benchmarks.py runs this script on the CPU
# with a tiny model (DEVICE=cpu) to keep it working where no GPU is.
set -euo pipefail

MODELS=${MODELS:-"videomae-s videomae-b"}
DTYPES=${DTYPES:-"float16 bfloat16"}
BATCHES=${BATCHES:-"1 8 32"}
SDPAS=${SDPAS:-"flash efficient cudnn math"}
SDPA_BATCH=${SDPA_BATCH:-8}
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-20}
WARMUP=${WARMUP:-5}
COMPILE=${COMPILE:-1}
OUT=${OUT:-gpu-bench}
PLANS=${PLANS:-}  # empty: every method's main setting (--methods); else plan specs separated by spaces

if [[ $DEVICE == cuda* ]]; then
    python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
        'benchmarks/gpu.sh needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False); '
        'DEVICE=cpu runs it here')"
    python -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
fi
mkdir -p "$OUT"
batches=()
for b in $BATCHES; do batches+=(-b "$b"); done
plans=(--methods)
if [[ -n $PLANS ]]; then
    plans=()
    for p in $PLANS; do plans+=(-p "$p"); done
fi

bench() {  # <model> <json name> <bench options...>: the table on the terminal and in the log, the JSON beside
    local model=$1 name=$2
    shift 2
    tokensieve bench --model "$model" --device "$DEVICE" "${plans[@]}" --warmup "$WARMUP" --repeats "$REPEATS" "$@" \
        --save "$OUT/$name.json" | tee -a "$OUT/$model.txt"
}

for model in $MODELS; do
    : > "$OUT/$model.txt"
    for dtype in $DTYPES; do
        bench "$model" "$model-$dtype" --dtype "$dtype" "${batches[@]}" --train-memory
        if [[ $COMPILE == 1 ]]; then
            bench "$model" "$model-$dtype-compiled" --dtype "$dtype" "${batches[@]}" --compile --no-memory
        fi
    done
    first=${DTYPES%% *}
    for kernel in $SDPAS; do
        bench "$model" "$model-$first-$kernel" --dtype "$first" -b "$SDPA_BATCH" --sdpa "$kernel" --no-memory \
            || echo "($kernel attention cannot run these inputs here: skipped)" | tee -a "$OUT/$model.txt"
    done
done
echo "tables in $OUT/*.txt, results in $OUT/*.json"
