#!/usr/bin/env bash
# The GPU check (issue 21): one script, under 8 minutes on one NVIDIA GPU, one table at the end.
#
#   (1) fused attention (--use_flash_attention) vs the plain path, bf16: logits within bf16 tolerance
#   (2) AMP O2 bf16 training of a 6-layer glm-large shape: 50-step loss curve within 2% of fp32; MFU of a
#       24-layer glm-large-chinese fine-tuning step (608+160, batch 8, recompute) against the card's bf16 peak
#   (3) bf16 export + the Paddle Inference GPU runner: tokens/s vs the HBM-bandwidth bound for glm-large and a
#       glm-10b-shaped model (random weights, batch 1 and 16), runner tokens = dynamic-graph tokens
#   (4) the same for weight_only_int8
# What each measures and how: bench/gpu_check.py. Each check runs in its own process under a time limit (a crash
# or a timeout is an ERROR row and keeps its log; the others still run), all within BUDGET seconds (default 460).
#
#   bench/gpu_check.sh                  # on a machine with a GPU and a CUDA build of Paddle
#   bench/gpu_check.sh --dry_run        # CPU, tiny shapes, float32: seconds (tests/test_bench.py runs it)
#   LAYERS_10B=48 BUDGET=1200 bench/gpu_check.sh     # the whole glm-10b depth (longer than 8 minutes)
#   PYTHON=... bench/gpu_check.sh       # interpreter (default: the checkout's .venv)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
DRY=
[ "${1:-}" = "--dry_run" ] && DRY=--dry_run
BUDGET=${BUDGET:-460}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
RESULTS="$WORK/rows.jsonl"
# seconds each check may take at most (the budget left caps them)
LIMITS="attention:60 amp:90 mfu:90 serve_large:120 serve_10b:150"

failed=0
cd "$ROOT"
if [ -n "$DRY" ]; then
    echo "dry run: CPU, tiny shapes, float32 (int8 by ONNX Runtime): the verdicts below mean nothing"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # Every check needs a CUDA build of Paddle: say so once instead of five tracebacks.
    if ! why=$("$PYTHON" -c "import paddle
assert paddle.is_compiled_with_cuda(), 'paddle ' + paddle.__version__ + ' is a CPU build'
assert paddle.device.cuda.device_count(), 'this CUDA build of Paddle sees no GPU'" 2>&1); then
        echo "gpu_check: no check run: $PYTHON has no usable CUDA build of Paddle (${why##*$'\n'});" \
             "install paddlepaddle-gpu for this machine's CUDA, or name another interpreter with PYTHON=..." >&2
        rm -rf "$WORK"; exit 2
    fi
fi
for entry in $LIMITS; do
    check=${entry%%:*}
    left=$((BUDGET - SECONDS))
    limit=${entry##*:}
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 5 ]; then
        echo "{\"check\": \"$check\", \"error\": \"not run: the ${BUDGET} s budget is spent\"}" >> "$RESULTS"
        continue
    fi
    start=$SECONDS
    timeout -k 5 "$limit" "$PYTHON" bench/gpu_check.py --check "$check" --results "$RESULTS" \
        --layers_10b "${LAYERS_10B:-12}" $DRY > "$WORK/$check.log" 2>&1
    rc=$?
    echo "$check: exit $rc ($((SECONDS - start)) s)"
    if [ "$rc" != 0 ]; then
        failed=$((failed + 1))
        reason="exit $rc"
        [ "$rc" = 124 ] && reason="timed out after $limit s"
        echo "{\"check\": \"$check\", \"error\": \"$reason, log: $WORK/$check.log\"}" >> "$RESULTS"
        tail -n 5 "$WORK/$check.log"
    fi
done
echo
"$PYTHON" bench/gpu_check.py --report "$RESULTS"
if [ "$failed" = 0 ]; then
    rm -rf "$WORK"
    echo "($SECONDS s in all)"
else
    echo "($SECONDS s in all; the failed checks' logs are in $WORK)"
fi
[ "$failed" = 0 ]
