"""CISPO: clipped IS-weight policy optimisation (MiniMax-M1, arXiv 2506.13585).

Instead of clipping the token update (PPO drops the gradient of clipped tokens), CISPO
clips the importance weight and stops its gradient, so every token keeps a REINFORCE
gradient, scaled by a bounded weight::

    ratio   = exp(clamp(logp - old_logp, -20, 20))
    w       = sg(clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
    l       = -w * A * logp         (* is_weight when given)

``d l / d logp = -w * A``. MiniMax-M1 imposes no lower bound in practice, hence the
default ``clip_ratio_low=1.0`` (ratios are positive, so ``1 - 1.0 = 0`` never binds).
Matches verl's ``compute_policy_loss_cispo``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lightning.algorithms.aggregate import Aggregator, get_aggregator, masked_mean

__all__ = ["CISPOStats", "cispo_loss"]


class CISPOStats(NamedTuple):
    """Detached scalars, averaged over action tokens."""

    clip_frac: torch.Tensor
    """Fraction of tokens whose IS weight was clipped."""
    approx_kl: torch.Tensor
    """Mean of ``old_logp - logp``."""
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    clip_ratio_low: float = 1.0,
    clip_ratio_high: float = 0.2,
    is_weights: torch.Tensor | None = None,
    agg: str | Aggregator = "token-mean",
) -> tuple[torch.Tensor, CISPOStats]:
    """``(loss, stats)``; every tensor input is ``[T]`` except ``cu_seqlens[B + 1]``."""
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(
            f"clip ratios must be >= 0, got low={clip_ratio_low}, high={clip_ratio_high}"
        )
    m = mask.to(logprobs.dtype)  # [T]
    neg_kl = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)  # [T]
    ratio = torch.exp(neg_kl)  # [T]
    w = torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high).detach()  # [T]
    loss_mat = -w * advantages * logprobs  # [T]
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()  # [T]
    loss = get_aggregator(agg)(loss_mat, mask, cu_seqlens)  # []
    with torch.no_grad():
        keep = mask.bool()  # [T]
        stats = CISPOStats(  # [] each
            clip_frac=masked_mean((ratio != w).to(m.dtype), m),
            approx_kl=masked_mean(-neg_kl, m),
            ratio_mean=masked_mean(ratio, m),
            ratio_max=ratio[keep].max() if bool(keep.any()) else ratio.new_zeros(()),
        )
    return loss, CISPOStats(*(s.detach() for s in stats))
