#!/usr/bin/env bash
# All GPU kernel checks and benchmarks in one command, for when a GPU is lent:
#
#     bash bench/run_gpu.sh            # GPU parity tests, then every benchmark
#     bash bench/run_gpu.sh --quick    # smaller sizes (extra arguments go to each benchmark)
#
# Needs a CUDA build of torch and triton; verl rows appear where verl is importable. The
# C++/CUDA extension is JIT-built (nvcc) on first use unless it was prebuilt with
# `pip install --no-build-isolation -e .`. Rows are appended to bench/data/results.csv
# (or $LIGHTNING_BENCH_CSV) with the GPU name and git SHA.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/run_gpu.sh needs a CUDA device (torch.cuda.is_available() is False)"
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
PY

# Parity first: numbers from kernels that disagree with the reference are worthless.
python -m pytest tests/kernels -q -p no:cacheprovider -m gpu

for bench in bench_gae bench_group_stats bench_logprobs; do
    python -m "bench.${bench}" --device cuda "$@"
done
