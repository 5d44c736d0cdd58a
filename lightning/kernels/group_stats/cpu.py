"""Group statistics and whitening on CPU: the C++ ops ``lightning_rl::group_stats`` and
``lightning_rl::masked_whiten`` (``lightning/_ext/csrc/group_stats_cpu.cpp``)."""

from __future__ import annotations

import torch


def group_stats(
    scores: torch.Tensor,  # [N] float, contiguous
    group_ids: torch.Tensor,  # [N] int32/int64 dense in [0, G), contiguous
    num_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean, std, count = torch.ops.lightning_rl.group_stats(scores, group_ids, num_groups)  # [N] x 3
    return mean, std, count


def masked_whiten(
    x: torch.Tensor,  # [T] float, contiguous
    mask: torch.Tensor | None,  # [T] bool/uint8, contiguous
    shift_mean: bool,
    eps: float,
) -> torch.Tensor:
    return torch.ops.lightning_rl.masked_whiten(x, mask, shift_mean, eps)  # [T] fp32
