"""GAE on CPU: the C++ op ``lightning_rl::gae`` (``lightning/_ext/csrc/gae_cpu.cpp``)."""

from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,  # [T] float, contiguous
    values: torch.Tensor | None,  # [T] rewards.dtype, contiguous
    mask: torch.Tensor | None,  # [T] bool/uint8, contiguous
    cu_seqlens: torch.Tensor,  # [B + 1] int32/int64
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    adv, ret = torch.ops.lightning_rl.gae(rewards, values, mask, cu_seqlens, gamma, lam)  # [T], [T]
    return adv, ret
