"""Hot numeric paths of RL training: advantages, credit and log-prob batching.

Import explicitly (``import lightning.kernels``); ``import lightning`` never imports torch.
Each op lives in its own folder with a pure-torch ``reference`` (the specification), a
Triton implementation and a C++ CPU implementation (``lightning/_ext``), behind one
function taking ``impl=None`` (fastest available for the tensors' device) or an explicit
``"reference" | "cpp" | "triton" | "cuda"``, which fails loudly when it cannot run.

- :func:`gae`, :func:`discounted_returns`: packed sequences (``cu_seqlens``), masked
  tokens carry the state through.
- :func:`group_stats`, :func:`grpo_advantage`, :func:`rloo_advantage`,
  :func:`masked_whiten`: per-group statistics and whitening.
- :func:`logprobs_from_logits`, :func:`logprobs_from_hidden`: chunked log-softmax of the
  sampled tokens with temperature and optional entropy, forward and backward.
"""

from lightning.kernels._dispatch import IMPLS, KernelUnavailableError
from lightning.kernels.gae import discounted_returns, gae
from lightning.kernels.group_stats import (
    GroupStats,
    group_stats,
    grpo_advantage,
    masked_whiten,
    rloo_advantage,
)
from lightning.kernels.logprobs import LogProbs, logprobs_from_hidden, logprobs_from_logits

__all__ = [
    "IMPLS",
    "GroupStats",
    "KernelUnavailableError",
    "LogProbs",
    "discounted_returns",
    "gae",
    "group_stats",
    "grpo_advantage",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "masked_whiten",
    "rloo_advantage",
]
