#!/usr/bin/env bash
# Every GPU path of the project in one short run (about 5 minutes on one H200; under 8):
#
#     bash bench/fetch_gpu_wheels.sh                      # here, once: wheels into .gpu-wheels/
#     LIGHTNING_GIT_SHA=<sha> bash bench/run_gpu.sh OUTDIR  # there (carry .gpu-wheels)
#     bash bench/run_gpu.sh OUTDIR --dry-run              # CPU, tiny sizes (the test suite runs it)
#     bash bench/run_gpu.sh OUTDIR --only parity,kernels  # a subset of the steps
#
# Steps (bench/gpu_check.py, which holds the logic): env (versions, copy bandwidth, matmul
# rate), ext (build lightning/_ext with its CUDA GAE kernel), parity (every Triton kernel and
# the CUDA GAE kernel against the torch reference, fp32 and bf16), kernels (GAE, group stats
# and chunked log-probs timed against the naive torch version and the bandwidth or matmul
# bound), train (a torch-backend bf16 step of a random Qwen2-0.5B on a packed batch),
# engine (the torch engine at batch 1, 16, 64 and a weight update with its landing check).
# A failing step is recorded and the others still run; the exit status is non-zero if any
# failed. OUTDIR gets results.md (the table), results.csv (rows in bench/data/results.csv's
# format: append them there with `tail -n +2 OUTDIR/results.csv >> bench/data/results.csv`)
# and log.txt (everything printed).
#
# Self-contained for a machine without network: wheels in $LIGHTNING_GPU_WHEELS (default
# .gpu-wheels/) are installed with `pip install --no-index` into a private folder; the
# checkout goes first on PYTHONPATH (that machine has PyTorch Lightning installed as
# `lightning`) and `lightning_backends` (the import name of backends/) is a symlink there.
# The checkout there has no .git: pass the SHA in LIGHTNING_GIT_SHA.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash bench/run_gpu.sh OUTDIR [--dry-run] [--only STEP,...] [--budget-s S]" >&2
    exit 2
fi
OUT=$1
shift
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WHEELS=${LIGHTNING_GPU_WHEELS:-$ROOT/.gpu-wheels}

main() {
    local site
    site=$(mktemp -d "${TMPDIR:-/tmp}/lightning-gpu-site.XXXXXX") || return 2
    ln -s "$ROOT/backends" "$site/lightning_backends" || return 2
    if [[ " $* " == *" --dry-run "* ]]; then
        echo "run_gpu: dry run: the wheels are for the GPU machine's Python 3.12; using what is installed"
    elif compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "run_gpu: installing $(cd "$WHEELS" && echo *.whl) into $site"
        "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --find-links "$WHEELS" --target "$site" "$WHEELS"/*.whl || return 2
    else
        echo "run_gpu: no wheels in $WHEELS (bash bench/fetch_gpu_wheels.sh fetches them); using what is installed"
    fi
    export PYTHONPATH="$ROOT:$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    "$PY" -m bench.gpu_check --out "$OUT" "$@"
    local rc=$?
    rm -rf "$site"
    return $rc
}

cd "$ROOT" || exit 2
main "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
