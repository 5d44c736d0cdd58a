"""RLOO: REINFORCE with a leave-one-out baseline.

``A_i = R_i - mean_{j in g, j != i} R_j = n / (n - 1) * (R_i - mean_g)`` for a group of
``n >= 2`` samples; groups of one get 0. Via :func:`lightning.kernels.group_stats`.
"""

from __future__ import annotations

import torch

from lightning.kernels import group_stats

__all__ = ["rloo_advantages"]


def rloo_advantages(
    returns: torch.Tensor, group_ids: torch.Tensor, *, impl: str | None = None
) -> torch.Tensor:
    """Leave-one-out advantages, float32 ``[N]`` (``returns[N]``, ``group_ids[N]``)."""
    st = group_stats(returns, group_ids, impl=impl)  # mean/std/count [N]
    n = st.count.float()  # [N]
    adv = n / (n - 1).clamp(min=1) * (returns.float() - st.mean)  # [N]
    return torch.where(st.count > 1, adv, 0.0)  # [N]
