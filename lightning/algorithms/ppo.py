"""PPO-clip policy loss with dual clip, over a packed layout.

Per action token, with ``ratio = exp(clamp(logp - old_logp, -20, 20))`` and advantage ``A``::

    l1 = -A * ratio
    l2 = -A * clamp(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    l  = max(l1, l2)                               (PPO clip, asymmetric like DAPO)
    l  = min(l, -A * clip_ratio_c)  where A < 0    (dual clip: bounds the loss of a
                                                    negative-advantage token whose ratio
                                                    exploded; ``clip_ratio_c=None`` = off)
    l  = l * is_weight                             (optional per-token weights, detached)

then reduced by an aggregator (:mod:`lightning.algorithms.aggregate`). The clamped
branches have zero gradient. ``is_weights`` corrects stale or off-engine samples, e.g.
:func:`truncated_is_weights` (TIS) between the trainer's old log-probs and the sampler's.
Matches verl's ``compute_policy_loss_vanilla`` (with ``rollout_is_weights``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lightning.algorithms.aggregate import Aggregator, get_aggregator, masked_mean

__all__ = ["PPOStats", "ppo_clip_loss", "truncated_is_weights"]


class PPOStats(NamedTuple):
    """Detached scalars, averaged over action tokens."""

    clip_frac: torch.Tensor
    """Fraction of tokens where the PPO clip was active (``l2 > l1``)."""
    clip_frac_lower: torch.Tensor
    """Fraction of tokens where the dual clip was active (``A < 0`` and ``l > -A c``)."""
    approx_kl: torch.Tensor
    """Mean of ``old_logp - logp`` (k1 estimate of KL(old || new); verl's ``ppo_kl``)."""
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = 3.0,
    is_weights: torch.Tensor | None = None,
    agg: str | Aggregator = "token-mean",
) -> tuple[torch.Tensor, PPOStats]:
    """``(loss, stats)``; every tensor input is ``[T]`` except ``cu_seqlens[B + 1]``.

    Raises:
        ValueError: ``clip_ratio_c <= 1`` or negative clip ratios.
    """
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(
            f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {clip_ratio_c}"
        )
    if clip_ratio_low < 0 or clip_ratio_high < 0:
        raise ValueError(
            f"clip ratios must be >= 0, got low={clip_ratio_low}, high={clip_ratio_high}"
        )
    m = mask.to(logprobs.dtype)  # [T]
    neg_kl = torch.clamp(logprobs - old_logprobs, -20.0, 20.0)  # [T]
    ratio = torch.exp(neg_kl)  # [T]
    l1 = -advantages * ratio  # [T]
    l2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)  # [T]
    clipped = torch.maximum(l1, l2)  # [T]
    if clip_ratio_c is not None:
        l3 = -advantages * clip_ratio_c  # [T]
        neg = advantages < 0  # [T]
        loss_mat = torch.where(neg, torch.minimum(clipped, l3), clipped)  # [T]
        lower = (neg & (clipped > l3)).to(m.dtype)  # [T]
    else:
        loss_mat, lower = clipped, torch.zeros_like(m)  # [T], [T]
    if is_weights is not None:
        loss_mat = loss_mat * is_weights.detach()  # [T]
    loss = get_aggregator(agg)(loss_mat, mask, cu_seqlens)  # []
    with torch.no_grad():
        keep = mask.bool()  # [T]
        stats = PPOStats(  # [] each
            clip_frac=masked_mean((l2 > l1).to(m.dtype), m),
            clip_frac_lower=masked_mean(lower, m),
            approx_kl=masked_mean(-neg_kl, m),
            ratio_mean=masked_mean(ratio, m),
            ratio_max=ratio[keep].max() if bool(keep.any()) else ratio.new_zeros(()),
        )
    return loss, PPOStats(*(s.detach() for s in stats))


def truncated_is_weights(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, *, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance weights ``min(exp(old - sampler), cap)``, detached ``[T]``.

    ``old_logprobs`` are the trainer's log-probs under the policy the batch is trained
    from; ``sampler_logprobs`` are the serving engine's (a stale policy version, or a
    different engine's numerics). Truncation bounds the variance (TIS).
    """
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        log_w = torch.clamp(old_logprobs - sampler_logprobs, max=20.0)  # [T]
        return torch.exp(log_w).clamp(max=cap)  # [T]
