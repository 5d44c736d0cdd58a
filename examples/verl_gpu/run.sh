#!/usr/bin/env bash
# One command, one NVIDIA GPU: GRPO on additions with the verl backend (verl 0.9 FSDP2
# TrainingWorker, bf16) and vLLM rollouts in the same process, Qwen2.5-0.5B-Instruct.
#
#   bash examples/verl_gpu/run.sh                    # 30 steps x 32 tasks x 8 samples
#   bash examples/verl_gpu/run.sh --steps 5 --tasks 8 --csv /tmp/quick.csv
#
# Needs a CUDA 12.x driver, ~20 GB of GPU memory (vLLM takes --gpu-memory-utilization of it,
# 0.35 by default; FSDP with AdamW ~8 GB for 0.5B), network access to PyPI and the Hugging
# Face hub. Writes one CSV row per step (verl_gpu_results.csv): reward, losses, grad norm,
# logprob_gap (vLLM bf16 sampler vs trainer), step and rollout seconds.
#
# Install order: vLLM first (it pins its CUDA torch build: vllm 0.24.0 is the release
# verl 0.9.1's own [vllm] extra pins), then verl WITHOUT extras (they would re-pin torch),
# then our package. The venv is created once (LIGHTNING_VERL_GPU_VENV, default
# .venv-verl-gpu in the repository) and reused.
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV="${LIGHTNING_VERL_GPU_VENV:-.venv-verl-gpu}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

pip_q "vllm==0.24.0"
pip_q "verl==0.9.1" fastapi uvicorn huggingface_hub
pip_q -e ".[daemon]"
# flash-attn enables verl's packed (remove-padding) path; without it the backend falls
# back to sdpa over padded micro-batches (same update, more padding). Optional: it compiles.
if [ "${LIGHTNING_FLASH_ATTN:-0}" = "1" ]; then
    pip_q flash-attn --no-build-isolation || echo "flash-attn did not install: using sdpa"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, vllm, verl; print('torch', torch.__version__, 'vllm', vllm.__version__, 'verl', verl.__version__, 'cuda', torch.cuda.is_available())"

export VLLM_ENABLE_V1_MULTIPROCESSING=0  # weights pass to vLLM as tensors, in process
export TOKENIZERS_PARALLELISM=false
exec "$PY" examples/verl_gpu/train.py "$@"
