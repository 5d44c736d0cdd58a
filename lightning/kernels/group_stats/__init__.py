"""Segmented group statistics (GRPO / RLOO advantages) and masked whitening.

The specification is :mod:`lightning.kernels.group_stats.reference`. Implementations:
``reference``, ``cpp`` (CPU), ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch

from lightning.kernels import _dispatch
from lightning.kernels.group_stats import reference
from lightning.kernels.group_stats.reference import GroupStats

__all__ = ["IMPLS", "GroupStats", "group_stats", "grpo_advantage", "masked_whiten", "rloo_advantage"]

IMPLS = ("reference", "cpp", "triton")


def group_stats(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int | None = None,
    impl: str | None = None,
) -> GroupStats:
    """Per-sample group ``mean``, ``std`` (unbiased; 0 for groups of one) and ``count``.

    Args:
        scores: ``[N]`` float32/float16/bfloat16.
        group_ids: ``[N]`` int32/int64: arbitrary labels when ``num_groups`` is None (mapped
            with ``torch.unique``, a sort), else dense ids in ``[0, num_groups)``.
        impl: None (fastest available) or ``reference``, ``cpp``, ``triton``.

    Raises:
        ValueError: a bad argument (named in the message).
        KernelUnavailableError: ``impl`` was given and cannot run on these tensors.
    """
    reference.check_group_inputs(scores, group_ids, num_groups)
    which = _dispatch.select("group_stats", scores.device, impl, IMPLS, ext_op="group_stats")
    if which == "reference":
        return reference.group_stats(scores, group_ids, num_groups=num_groups)
    if num_groups is None:
        group_ids, num_groups = reference.dense_group_ids(group_ids)  # [N] int64, G
    scores, group_ids = scores.contiguous(), group_ids.contiguous()
    if which == "cpp":
        from lightning.kernels.group_stats import cpu as backend
    else:
        from lightning.kernels.group_stats import triton as backend
    mean, std, count = backend.group_stats(scores, group_ids, num_groups)  # [N] x 3
    return GroupStats(mean=mean, std=std, count=count)


def grpo_advantage(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    num_groups: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """GRPO advantage ``(s - mean) / (std + eps)`` (or ``s - mean``), float32 ``[N]``; 0 for
    groups of one."""
    reference.check_eps(eps)
    st = group_stats(scores, group_ids, num_groups=num_groups, impl=impl)
    adv = scores.float() - st.mean  # [N]
    return adv / (st.std + eps) if norm_by_std else adv


def rloo_advantage(
    scores: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """RLOO advantage ``s - mean of the others`` = ``n / (n - 1) * (s - mean)``, float32
    ``[N]``; 0 for groups of one."""
    st = group_stats(scores, group_ids, num_groups=num_groups, impl=impl)
    n = st.count.float()  # [N]
    return torch.where(st.count > 1, n / (n - 1).clamp(min=1) * (scores.float() - st.mean), 0.0)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    impl: str | None = None,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the kept elements (unbiased var), 0 elsewhere;
    float32 ``[T]``."""
    reference.check_whiten_inputs(x, mask, eps)
    which = _dispatch.select("masked_whiten", x.device, impl, IMPLS, ext_op="masked_whiten")
    if which == "reference":
        return reference.masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)
    if mask is not None and mask.dtype not in (torch.bool, torch.uint8):
        mask = mask != 0  # [T] bool
    x = x.contiguous()
    mask = mask.contiguous() if mask is not None else None
    if which == "cpp":
        from lightning.kernels.group_stats import cpu as backend
    else:
        from lightning.kernels.group_stats import triton as backend
    return backend.masked_whiten(x, mask, shift_mean, eps)
