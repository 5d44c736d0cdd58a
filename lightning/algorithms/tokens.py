"""Packed token layout helpers: per-sample values -> tokens, packed <-> padded.

Layout (as in :mod:`lightning.kernels.gae.reference`): ``B`` sequences concatenated into
1-D tensors of ``T`` tokens; sequence ``b`` covers ``cu_seqlens[b]:cu_seqlens[b + 1]``.
``mask[T]`` is the action mask (1 = a token the policy sampled, it gets a loss).
verl and most trainers use a padded ``[B, L]`` layout with a ``response_mask`` instead;
:func:`to_padded` / :func:`from_padded` convert between the two.
"""

from __future__ import annotations

import torch

__all__ = ["broadcast_to_tokens", "from_padded", "place_at_last_action", "seq_ids", "to_padded"]


def seq_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence index of every token, int64 ``[T]``."""
    cu = cu_seqlens.long()  # [B + 1]
    lengths = cu[1:] - cu[:-1]  # [B]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)  # [T]


def broadcast_to_tokens(
    values: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample ``values[B]`` copied onto every token of its sequence, 0 on masked tokens.

    Returns float32 ``[T]`` (how sequence-level advantages become token-level ones).
    """
    if values.dim() != 1 or values.numel() != cu_seqlens.numel() - 1:
        raise ValueError(
            f"values must be [B={cu_seqlens.numel() - 1}], got shape {tuple(values.shape)}"
        )
    out = values.float()[seq_ids(cu_seqlens)]  # [T]
    if mask is not None:
        out = torch.where(mask.bool(), out, 0.0)  # [T]
    return out


def place_at_last_action(
    values: torch.Tensor, cu_seqlens: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Token-level rewards: ``values[b]`` on the last action token of sequence ``b``, 0 elsewhere.

    Float32 ``[T]``; a sequence without action tokens drops its value (nothing to credit).
    This is the outcome-reward layout GAE and REINFORCE++ take.
    """
    T = mask.numel()
    m = mask.bool()  # [T]
    sid = seq_ids(cu_seqlens)  # [T]
    pos = torch.arange(T, device=mask.device)  # [T]
    last = torch.full((cu_seqlens.numel() - 1,), -1, dtype=torch.long, device=mask.device)  # [B]
    last = last.scatter_reduce(0, sid[m], pos[m], reduce="amax")  # [B]; -1 = no action token
    out = torch.zeros(T, device=mask.device)  # [T]
    has = last >= 0  # [B]
    out[last[has]] = values.float()[has]  # [T]: one value per sequence with an action
    return out


def to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, *, pad: float = 0.0) -> torch.Tensor:
    """Packed ``x[T]`` -> right-padded ``[B, L]`` (``L`` = longest sequence)."""
    cu = cu_seqlens.long()  # [B + 1]
    lengths = cu[1:] - cu[:-1]  # [B]
    B, L = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    sid = seq_ids(cu)  # [T]
    pos = torch.arange(x.numel(), device=x.device) - cu[sid]  # [T]
    out = torch.full((B, L), pad, dtype=x.dtype, device=x.device)  # [B, L]
    out[sid, pos] = x  # [B, L]
    return out


def from_padded(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Right-padded ``x[B, L]`` -> packed ``[T]`` (inverse of :func:`to_padded`)."""
    cu = cu_seqlens.long()  # [B + 1]
    sid = seq_ids(cu)  # [T]
    pos = torch.arange(sid.numel(), device=x.device) - cu[sid]  # [T]
    return x[sid, pos]  # [T]
