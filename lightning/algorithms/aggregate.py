"""Reduce a per-token loss ``[T]`` over a packed layout to a scalar.

Three modes, each over action tokens only (``mask == 1``), named as in verl's ``agg_loss``:

- ``token_mean``: sum over all action tokens / number of action tokens. Long sequences
  weigh more (DAPO's choice).
- ``seq_mean_token_mean``: per sequence, the mean over its action tokens; then the mean
  over sequences that have at least one action token (the original GRPO).
- ``seq_mean_token_sum``: per sequence, the sum over its action tokens; then the mean over
  sequences with at least one action token (Dr. GRPO without the constant).

An empty selection gives 0 (verl gives nan for ``token-mean`` with no tokens). On non-empty
inputs these equal verl's ``agg_loss`` with ``dp_size=1`` (``seq-mean-token-mean`` there
divides by ``count + 1e-8``, a relative difference below 1e-8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning.algorithms.tokens import seq_ids

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "get_aggregator",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "token_mean",
]

Aggregator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(loss_mat[T], mask[T], cu_seqlens[B + 1]) -> scalar``."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the tokens where ``mask`` is set (0 when none is)."""
    m = mask.to(x.dtype)  # [T]
    return (x * m).sum() / m.sum().clamp(min=1)  # []


def token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    return masked_mean(loss_mat, mask)  # []


def _per_seq(
    loss_mat: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence masked sums and action-token counts, ``[B]`` each."""
    B = cu_seqlens.numel() - 1
    sid = seq_ids(cu_seqlens)  # [T]
    m = mask.to(loss_mat.dtype)  # [T]
    zeros = loss_mat.new_zeros(B)  # [B]
    sums = zeros.index_add(0, sid, loss_mat * m)  # [B]
    counts = zeros.index_add(0, sid, m)  # [B]
    return sums, counts


def seq_mean_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    sums, counts = _per_seq(loss_mat, mask, cu_seqlens)  # [B], [B]
    has = counts > 0  # [B]
    seq_loss = sums / counts.clamp(min=1)  # [B]
    return (seq_loss * has).sum() / has.sum().clamp(min=1)  # []


def seq_mean_token_sum(
    loss_mat: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    sums, counts = _per_seq(loss_mat, mask, cu_seqlens)  # [B], [B]
    has = counts > 0  # [B]
    return (sums * has).sum() / has.sum().clamp(min=1)  # []


AGGREGATORS: dict[str, Aggregator] = {
    "token-mean": token_mean,
    "seq-mean-token-mean": seq_mean_token_mean,
    "seq-mean-token-sum": seq_mean_token_sum,
}


def get_aggregator(agg: str | Aggregator) -> Aggregator:
    """An aggregator by name (``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum``)
    or the callable itself."""
    if callable(agg):
        return agg
    try:
        return AGGREGATORS[agg]
    except KeyError:
        raise ValueError(
            f"unknown loss aggregation {agg!r}: choose one of {sorted(AGGREGATORS)}"
        ) from None
