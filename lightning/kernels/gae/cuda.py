"""GAE on CUDA: the ``lightning_rl::gae`` op's CUDA kernel (``lightning/_ext/csrc/cuda``),
present when ``lightning/_ext`` was built with nvcc and a CUDA torch (one warp per
sequence; see ``gae_kernel.cu``). Its shapes are registered with ``register_fake`` in
:mod:`lightning._ext._fake`, so it traces under ``torch.compile``."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,  # [T] float, contiguous, CUDA
    values: torch.Tensor | None,  # [T] rewards.dtype, contiguous
    mask: torch.Tensor | None,  # [T] bool/uint8, contiguous
    cu_seqlens: torch.Tensor,  # [B + 1] int32/int64, CUDA
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    adv, ret = torch.ops.lightning_rl.gae(rewards, values, mask, cu_seqlens.contiguous(), gamma, lam)  # [T], [T]
    return adv, ret
