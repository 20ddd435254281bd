#!/usr/bin/env bash
# One GPU-machine call: set the project up and run the named steps, results under $OUT.
#
#   bash benchmarks/gpu_session.sh tests layers module      # first call (under 10 minutes)
#   bash benchmarks/gpu_session.sh solver tracker           # second call
#   bash benchmarks/gpu_session.sh reduced sweep validity   # third call
#
# Steps: `tests` (make test-gpu's pytest run), `validity` (the deep iid horizon sweep of
# recipes/deep_iid_horizon.yaml on the GPU, timed), or any benchmark name of `python -m benchmarks`.
# Missing packages (wandb, jsonargparse) travel as wheels in .whl/ (see docs/benchmarks.md, GPU).
set -uo pipefail
OUT="${OUT:-runs/gpu-session}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
for step in "$@"; do
    echo "=== $step ($(date -u +%H:%M:%S))"
    if [ "$step" = tests ]; then
        python3 -m pytest tests/gpu -m gpu -q -rs 2>&1 | tee "$OUT/tests-gpu.log" || status=1
    elif [ "$step" = validity ]; then
        { time python3 -m mflightning.cli sweep --config recipes/deep_iid_horizon.yaml \
            --trainer.accelerator=gpu --out "$OUT/validity" --wandb disabled; } 2>&1 \
            | tee "$OUT/validity.log" || status=1
    else
        python3 -m benchmarks "$step" --device cuda --json "$OUT/bench-cuda-$step.json" 2>&1 \
            | tee "$OUT/bench-cuda-$step.md" || status=1
    fi
done
exit "$status"
