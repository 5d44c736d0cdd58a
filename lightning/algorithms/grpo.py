"""GRPO: group-normalised sequence-level advantages.

``A_i = (R_i - mean_g) / (std_g + eps)`` over the samples ``g`` sharing ``i``'s group id
(unbiased std), or ``R_i - mean_g`` without the division (Dr. GRPO,
:func:`grpo_advantages_no_std`). Groups of one get 0: there is nothing to compare with
(verl's ``compute_grpo_outcome_advantage`` gives them the raw return). Computed by
:func:`lightning.kernels.group_stats` (``impl=None`` dispatch); spread the result over
tokens with :func:`lightning.algorithms.tokens.broadcast_to_tokens`.
"""

from __future__ import annotations

import torch

from lightning.kernels import group_stats

__all__ = ["grpo_advantages", "grpo_advantages_no_std"]


def grpo_advantages(
    returns: torch.Tensor, group_ids: torch.Tensor, *, eps: float = 1e-6, impl: str | None = None
) -> torch.Tensor:
    """``(R - group mean) / (group std + eps)``, float32 ``[N]``.

    Args:
        returns: ``[N]`` one scalar return per sample.
        group_ids: ``[N]`` int32/int64 group labels (any values).
        impl: kernel implementation for :func:`lightning.kernels.group_stats`.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (constant groups have std 0), got {eps}")
    st = group_stats(returns, group_ids, impl=impl)  # mean/std/count [N]
    adv = (returns.float() - st.mean) / (st.std + eps)  # [N]
    return torch.where(st.count > 1, adv, 0.0)  # [N]


def grpo_advantages_no_std(
    returns: torch.Tensor, group_ids: torch.Tensor, *, impl: str | None = None
) -> torch.Tensor:
    """Dr. GRPO: ``R - group mean``, float32 ``[N]`` (no std division, no length bias)."""
    st = group_stats(returns, group_ids, impl=impl)  # mean/std/count [N]
    return torch.where(st.count > 1, returns.float() - st.mean, 0.0)  # [N]
