"""Segmented group statistics for GRPO / RLOO, and masked whitening: the specification.

Group statistics
    scores[N]       float32/float16/bfloat16, one scalar per sample (e.g. outcome reward).
    group_ids[N]    int32/int64 labels. Two modes:
                    - ``num_groups=None``: arbitrary labels (any values, any order); samples
                      with equal labels form a group. They are mapped to dense ids with
                      ``torch.unique(return_inverse=True)`` (a sort) first.
                    - ``num_groups=G``: the ids are already dense in ``[0, G)`` (checked on
                      CPU); no sort. Empty groups are allowed.

    Per sample ``i`` in group ``g`` (all float32 except count):
        count[i] = |g|                                   (int64)
        mean[i]  = sum_{j in g} s_j / |g|
        std[i]   = sqrt(sum_{j in g} (s_j - mean)^2 / (|g| - 1))   unbiased (Bessel), like
                   ``torch.std``'s default; defined as 0 for groups of one (torch gives nan).

Advantages built on them (``N`` float32 values):
    GRPO:  (s - mean) / (std + eps)        ``norm_by_std=True``  (the original GRPO)
           s - mean                        ``norm_by_std=False`` (Dr. GRPO)
    RLOO:  s - mean_{j != i} s_j = |g| / (|g| - 1) * (s - mean)
    Groups of one have advantage 0 in all three (there is no baseline to compare with).
    verl's ``compute_grpo_outcome_advantage`` instead uses mean 0 and std 1 for groups of
    one (the advantage is the raw score); for groups of two or more the two agree.

Masked whitening
    x[T] float, mask[T] bool/0-1 or None (all 1). Over the kept elements:
        mean = sum(x) / n,  var = sum((x - mean)^2) / (n - 1)  (unbiased; 0 when n < 2)
        out  = (x - mean) / sqrt(var + eps)   (+ mean when ``shift_mean=False``)
    and ``out = 0`` where the mask is 0. float32 output. This matches verl's
    ``masked_whiten`` (unbiased variance, ``eps=1e-8``) on kept positions; verl raises for
    n < 2 and leaves masked positions at their whitened value.
"""

from __future__ import annotations

import typing

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class GroupStats(typing.NamedTuple):
    mean: torch.Tensor  # [N] float32
    std: torch.Tensor  # [N] float32
    count: torch.Tensor  # [N] int64


def check_group_inputs(scores: torch.Tensor, group_ids: torch.Tensor, num_groups: int | None) -> None:
    """Raise ``ValueError`` naming the bad argument (id range checked on CPU only)."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(f"scores must be float32, float16 or bfloat16, got {scores.dtype}")
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids must have shape {tuple(scores.shape)}, got {tuple(group_ids.shape)}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_ids must be int32 or int64, got {group_ids.dtype}")
    if group_ids.device != scores.device:
        raise ValueError(f"group_ids must be on {scores.device}, got {group_ids.device}")
    if num_groups is not None:
        if num_groups < 0 or (num_groups == 0 and scores.numel() > 0):
            raise ValueError(f"num_groups must be > 0 (or None for arbitrary labels), got {num_groups}")
        if group_ids.device.type == "cpu" and group_ids.numel() > 0:
            lo, hi = int(group_ids.min()), int(group_ids.max())
            if lo < 0 or hi >= num_groups:
                raise ValueError(
                    f"group_ids must lie in [0, num_groups={num_groups}) when num_groups is given, "
                    f"got [{lo}, {hi}]; pass num_groups=None for arbitrary labels"
                )


def check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (constant groups have std 0), got {eps}")


def check_whiten_inputs(x: torch.Tensor, mask: torch.Tensor | None, eps: float) -> None:
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D [T], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if mask is not None:
        if mask.shape != x.shape:
            raise ValueError(f"mask must have shape {tuple(x.shape)}, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on {x.device}, got {mask.device}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"mask must be bool or integer 0/1, got {mask.dtype}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def dense_group_ids(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Arbitrary labels -> (dense ids in [0, G) as int64 [N], G)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)  # [G], [N]
    return inverse, uniq.numel()


def group_stats(scores: torch.Tensor, group_ids: torch.Tensor, *, num_groups: int | None = None) -> GroupStats:
    """Per-sample group mean, std (unbiased, 0 for singletons) and count."""
    check_group_inputs(scores, group_ids, num_groups)
    if num_groups is None:
        ids, G = dense_group_ids(group_ids)  # [N], G
    else:
        ids, G = group_ids.long(), num_groups  # [N]
    s = scores.double()  # [N] float64 accumulation
    count = torch.zeros(G, dtype=torch.int64, device=s.device).index_add_(0, ids, torch.ones_like(ids))  # [G]
    total = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, ids, s)  # [G]
    mean = total / count.clamp(min=1)  # [G]
    m2 = torch.zeros(G, dtype=torch.float64, device=s.device).index_add_(0, ids, (s - mean[ids]) ** 2)  # [G]
    std = torch.where(count > 1, (m2 / (count - 1).clamp(min=1)).sqrt(), 0.0)  # [G]
    return GroupStats(mean=mean[ids].float(), std=std[ids].float(), count=count[ids])


def grpo_advantage(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    num_groups: int | None = None,
) -> torch.Tensor:
    """GRPO advantage per sample, float32 ``[N]``."""
    check_eps(eps)
    st = group_stats(scores, group_ids, num_groups=num_groups)
    adv = scores.float() - st.mean  # [N]
    return adv / (st.std + eps) if norm_by_std else adv


def rloo_advantage(
    scores: torch.Tensor, group_ids: torch.Tensor, *, num_groups: int | None = None
) -> torch.Tensor:
    """RLOO (leave-one-out baseline) advantage per sample, float32 ``[N]``."""
    st = group_stats(scores, group_ids, num_groups=num_groups)
    n = st.count.float()  # [N]
    return torch.where(st.count > 1, n / (n - 1).clamp(min=1) * (scores.float() - st.mean), 0.0)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean and unbiased variance of the kept elements; 0 elsewhere."""
    check_whiten_inputs(x, mask, eps)
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()  # [T]
    xd = x.double()  # [T]
    n = int(keep.sum())
    mean = xd[keep].sum() / max(n, 1)  # []
    var = ((xd[keep] - mean) ** 2).sum() / (n - 1) if n > 1 else xd.new_zeros(())  # []
    out = (xd - mean) * torch.rsqrt(var + eps)  # [T]
    if not shift_mean:
        out = out + mean
    return torch.where(keep, out, 0.0).float()
