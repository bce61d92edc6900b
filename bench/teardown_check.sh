#!/usr/bin/env bash
# Teardown check: a 2-process tensor-parallel launch that did its work must exit 0, every time.
#
# Runs the reference's launcher command (issue 12, item 5) N times in a row on the demo's tiny GLM:
#   python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py ... \
#       --tensor_parallel_degree 2 --do_train --do_eval --recompute --device cpu
# prints each launch's exit code, then `N launches: K exit 0, M failed`, and exits 1 if any failed.
# A worker that aborts at process exit (SIGABRT, launcher exit code -6 / 250) counts as a failure; the
# logs of failed launches are kept (their directory is printed), those of good ones removed. The cause of that abort
# and its fix: paddle_glm/exit_order.py.
#
#   bench/teardown_check.sh                 # 30 launches (~15-30 s each on 2 CPU cores)
#   N=60 bench/teardown_check.sh            # more launches
#   LOAD=1 bench/teardown_check.sh          # one busy-loop process beside the job while it runs: a
#                                           # loaded machine made the abort more frequent
#   WORK=/tmp/tc bench/teardown_check.sh    # keep the tiny model and data there (else a temp dir, removed
#                                           # at the end unless a launch failed)
#   PYTHON=... bench/teardown_check.sh      # interpreter (default: the checkout's .venv)
# The launches run in WORK, so `ulimit -c unlimited` beforehand leaves an aborting worker's core file there.
set -u

N=${N:-30}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/teardown_check.XXXXXX")
    TEMPORARY=1  # removed at the end unless a launch failed
fi
mkdir -p "$WORK"
cd "$WORK"  # the workers' working directory: anything they leave (a core file) stays out of the checkout
export PYTHONFAULTHANDLER=1  # a worker killed by a signal prints every Python thread's stack in its workerlog

if [ ! -f "$WORK/model/config.json" ]; then
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "from paddle_glm.demo import prepare_demo
prepare_demo('$WORK/model', '$WORK/data/train.json', '$WORK/data/dev.json')" > "$WORK/prepare.log" 2>&1 \
        || { echo "building the demo model failed: $WORK/prepare.log"; exit 2; }
fi

LOAD_PID=
if [ "${LOAD:-0}" = 1 ]; then
    # Bounded in time (1 h) even if this script is killed before it can stop it.
    timeout 3600 "$PYTHON" -c "while True: pass" &
    LOAD_PID=$!
    trap '[ -n "$LOAD_PID" ] && kill "$LOAD_PID" 2>/dev/null' EXIT
fi

ok=0
failed=0
for i in $(seq 1 "$N"); do
    log="$WORK/log.$i"
    rm -rf "$log" "$WORK/out"
    start=$SECONDS
    "$PYTHON" -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$log" "$ROOT/finetune_generation.py" \
        --model_name_or_path "$WORK/model" --train_file "$WORK/data/train.json" --dev_file "$WORK/data/dev.json" \
        --output_dir "$WORK/out" --overwrite_output_dir --max_steps 4 --per_device_train_batch_size 4 \
        --src_length 64 --tgt_length 16 --min_tgt_length 1 --num_beams 2 --max_eval_samples 4 \
        --tensor_parallel_degree 2 --do_train --do_eval --recompute --device cpu > "$log.launcher" 2>&1
    rc=$?
    if [ "$rc" = 0 ]; then
        ok=$((ok + 1))
        echo "launch $i: exit 0 ($((SECONDS - start)) s)"
        rm -rf "$log" "$log.launcher"
    else
        failed=$((failed + 1))
        echo "launch $i: exit $rc ($((SECONDS - start)) s), logs kept in $log"
        mv "$WORK"/core* "$log"/ 2>/dev/null
        for worker in "$log"/workerlog.*; do  # an abort at exit prints nothing: the last lines show how far it got
            echo "    $(basename "$worker"): $(tail -n 1 "$worker" | cut -c1-150)"
        done
    fi
done

echo "$N launches: $ok exit 0, $failed failed"
[ "$failed" = 0 ] && [ -n "${TEMPORARY:-}" ] && rm -rf "$WORK"
[ "$failed" = 0 ]
