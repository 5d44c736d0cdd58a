"""The packed training batch a backend's ``train_step`` takes, and how to build and split it.

Layout (as in :mod:`lightning.algorithms.tokens`): ``B`` sequences concatenated into 1-D
tensors of ``T`` tokens, no padding; sequence ``b`` covers ``cu_seqlens[b]:cu_seqlens[b+1]``.

Log-prob convention: the log-prob of token ``t`` comes from the logits at position ``t - 1``
of the same sequence. The first token of a sequence has no log-prob, so it is never an
action (:func:`pack_sequences` rejects a sequence whose first token is one).

Sampling: each action token carries the processing that sampled it (``temperature``,
``top_k``, ``top_p``); a backend scores it under that same processed distribution, so the
first on-policy step has ratio 1 whatever the agent's sampling parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from lightning._sequences import TokenSequence

__all__ = [
    "TrainBatch",
    "pack_sequences",
    "resolve_sampling",
    "select_sequences",
    "split_by_token_budget",
]


@dataclasses.dataclass
class TrainBatch:
    """``B`` packed sequences, ``T`` tokens in all. Every ``[T]`` tensor is 0 off actions."""

    input_ids: torch.Tensor
    """int64 ``[T]``: token ids, sequences back to back."""
    cu_seqlens: torch.Tensor
    """int32 ``[B + 1]``: sequence boundaries, ``cu_seqlens[0] == 0``, ``[-1] == T``."""
    position_ids: torch.Tensor
    """int64 ``[T]``: position of each token within its own sequence (0, 1, ...)."""
    action_mask: torch.Tensor
    """bool ``[T]``: token ``t`` was sampled by the policy (it gets a loss)."""
    old_logprobs: torch.Tensor
    """float32 ``[T]``: the sampler's log-prob of each action token, 0 elsewhere."""
    advantages: torch.Tensor
    """float32 ``[T]``: advantage of each action token, 0 elsewhere."""
    policy_versions: torch.Tensor
    """int64 ``[B]``: oldest policy version that sampled an action of each sequence (-1:
    none)."""
    is_weights: torch.Tensor | None = None
    """float32 ``[T]`` importance weights (e.g. TIS), or None."""
    ref_logprobs: torch.Tensor | None = None
    """float32 ``[T]`` reference-model log-probs for a KL penalty, or None."""
    temperature: torch.Tensor | None = None
    """float32 ``[T]``: the sampling temperature of each action token (0 = greedy, NaN =
    unknown; 1 off actions). None: every token unknown. See ``resolve_sampling``."""
    top_k: torch.Tensor | None = None
    """int32 ``[T]``: top-k of each action token (0 = off). None: off everywhere."""
    top_p: torch.Tensor | None = None
    """float32 ``[T]``: top-p of each action token (1 = off). None: off everywhere."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_action_tokens(self) -> int:
        return int(self.action_mask.sum())

    def to(self, device: torch.device | str) -> TrainBatch:
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(
            self,
            **{
                f.name: (
                    v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                )
                for f in dataclasses.fields(self)
            },
        )


def _seq_advantages(
    adv: float | Sequence[float], n: int, mask: torch.Tensor, b: int
) -> torch.Tensor:
    if isinstance(adv, (int, float)):
        out = torch.full((n,), float(adv), dtype=torch.float32)  # [n]
    else:
        out = torch.as_tensor(list(adv), dtype=torch.float32)  # [n]
        if out.shape != (n,):
            raise ValueError(
                f"advantages of sequence {b} must be a float or {n} per-token values, "
                f"got {tuple(out.shape)}"
            )
    return torch.where(mask, out, 0.0)  # [n]


def _per_token(
    name: str, values: Sequence[Sequence[float]] | None, lengths: list[int]
) -> torch.Tensor | None:
    if values is None:
        return None
    if len(values) != len(lengths):
        raise ValueError(
            f"{name} must have one entry per sequence ({len(lengths)}), got {len(values)}"
        )
    parts = []
    for b, (v, n) in enumerate(zip(values, lengths)):
        t = torch.as_tensor(list(v), dtype=torch.float32)  # [n]
        if t.shape != (n,):
            raise ValueError(f"{name}[{b}] must have {n} values, got {tuple(t.shape)}")
        parts.append(t)
    return torch.cat(parts)  # [T]


def _seq_sampling(s: TokenSequence, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token temperature (NaN unknown), top-k (0 off), top-p (1 off) of sequence ``s``."""
    temp = torch.full((n,), math.nan, dtype=torch.float32)  # [n]
    top_k = torch.zeros(n, dtype=torch.int32)  # [n]
    top_p = torch.ones(n, dtype=torch.float32)  # [n]
    for smp, (t0, t1) in zip(s.sampling, s.response_spans):
        if smp is None:
            continue
        if smp.temperature is not None:
            temp[t0:t1] = smp.temperature
        if smp.top_k is not None and smp.top_k > 0:
            top_k[t0:t1] = smp.top_k
        if smp.top_p is not None:
            top_p[t0:t1] = smp.top_p
    return temp, top_k, top_p


def pack_sequences(
    seqs: Sequence[TokenSequence],
    advantages: Sequence[float] | Sequence[Sequence[float]],
    *,
    is_weights: Sequence[Sequence[float]] | None = None,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
) -> TrainBatch:
    """Pack token sequences into a :class:`TrainBatch` (CPU tensors).

    Args:
        seqs: the sequences, in order; each needs at least one token.
        advantages: per sequence, a float (copied onto its action tokens) or one value per
            token (kept on action tokens only).
        is_weights, ref_logprobs: optional per-token values, one list per sequence.

    Raises:
        ValueError: empty input, mismatched lengths, or a sequence whose first token is
            marked as an action (it has no preceding logits to score it).
    """
    if not seqs:
        raise ValueError("pack_sequences needs at least one sequence")
    if len(advantages) != len(seqs):
        raise ValueError(
            f"advantages must have one entry per sequence ({len(seqs)}), got {len(advantages)}"
        )
    ids, masks, lps, advs, versions, lengths = [], [], [], [], [], []
    temps, top_ks, top_ps = [], [], []
    for b, (s, adv) in enumerate(zip(seqs, advantages)):
        n = len(s.token_ids)
        if n == 0:
            raise ValueError(f"sequence {b} is empty")
        if len(s.action_mask) != n or len(s.logprobs) != n or len(s.policy_versions) != n:
            raise ValueError(
                f"sequence {b}: token_ids, action_mask, logprobs and policy_versions differ in length"
            )
        if s.action_mask[0]:
            raise ValueError(
                f"sequence {b}: its first token is marked as an action, but the first token "
                "has no log-prob (nothing precedes it); start every sequence with its prompt"
            )
        # frombuffer shares the (writable) array memory; every use below copies it
        mask = torch.frombuffer(s.action_mask, dtype=torch.uint8).bool()  # [n]
        ids.append(torch.frombuffer(s.token_ids, dtype=torch.int32).long())  # [n]
        masks.append(mask)
        sampler_lp = torch.frombuffer(s.logprobs, dtype=torch.float32)  # [n]
        lps.append(torch.where(mask, sampler_lp, 0.0))  # [n]
        advs.append(_seq_advantages(adv, n, mask, b))  # [n]
        pv = torch.frombuffer(s.policy_versions, dtype=torch.int32)[mask]  # [n_actions]
        versions.append(int(pv.min()) if pv.numel() else -1)
        lengths.append(n)
        temp, top_k, top_p = _seq_sampling(s, n)
        temps.append(torch.where(mask, temp, 1.0))  # [n]
        top_ks.append(top_k)
        top_ps.append(top_p)
    lens = torch.tensor(lengths, dtype=torch.int32)  # [B]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)  # [B + 1]
    cu[1:] = torch.cumsum(lens, 0)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])  # [T]
    return TrainBatch(
        input_ids=torch.cat(ids),  # [T]
        cu_seqlens=cu,  # [B + 1]
        position_ids=positions,  # [T]
        action_mask=torch.cat(masks),  # [T]
        old_logprobs=torch.cat(lps),  # [T]
        advantages=torch.cat(advs),  # [T]
        policy_versions=torch.tensor(versions, dtype=torch.int64),  # [B]
        is_weights=_per_token("is_weights", is_weights, lengths),  # [T] | None
        ref_logprobs=_per_token("ref_logprobs", ref_logprobs, lengths),  # [T] | None
        temperature=torch.cat(temps),  # [T]
        top_k=torch.cat(top_ks),  # [T]
        top_p=torch.cat(top_ps),  # [T]
    )


def resolve_sampling(
    batch: TrainBatch, default_temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """Per-token ``(temperature, top_k, top_p)`` [T] a backend scores with, and counts.

    Rules (README "Sampling parameters"): an unknown temperature (NaN, or no
    ``batch.temperature``) is the backend's configured ``default_temperature``; a greedy
    token (temperature 0) is scored at temperature 1 over the full vocabulary, which is
    what the engines report as its log-prob (truncation never changes an argmax; the
    policy a greedy sample is trained toward is the temperature-1 policy, the sample
    itself is not drawn from it). The counts
    ``data/unknown_temperature_tokens`` and ``data/greedy_tokens`` are over action tokens.
    """
    n = batch.num_tokens
    dev = batch.input_ids.device
    act = batch.action_mask
    t = batch.temperature if batch.temperature is not None else torch.full((n,), math.nan)
    t = t.to(dev)  # [T]
    unknown = torch.isnan(t) & act  # [T]
    greedy = (t == 0) & act  # [T]
    t = torch.where(torch.isnan(t), default_temperature, t)  # [T]
    t = torch.where(t == 0, 1.0, t)  # [T]
    k = batch.top_k.to(dev) if batch.top_k is not None else torch.zeros(n, dtype=torch.int32, device=dev)
    p = batch.top_p.to(dev) if batch.top_p is not None else torch.ones(n, device=dev)
    k = torch.where(greedy, 0, k)  # [T]
    p = torch.where(greedy, 1.0, p)  # [T]
    counts = {"data/unknown_temperature_tokens": float(unknown.sum()),
              "data/greedy_tokens": float(greedy.sum())}
    return t, k, p, counts


def select_sequences(batch: TrainBatch, index: torch.Tensor) -> tuple[TrainBatch, torch.Tensor]:
    """Sequences ``index`` (int [B_sel], ascending) as a batch of their own, and the
    positions ``[T_sel]`` of their tokens in ``batch`` (to scatter results back)."""
    cu = batch.cu_seqlens.long()  # [B + 1]
    starts, ends = cu[index], cu[index + 1]  # [B_sel]
    lens = ends - starts  # [B_sel]
    pos = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends)]) if len(index) \
        else torch.zeros(0, dtype=torch.long)  # [T_sel]
    cu_sel = torch.zeros(len(index) + 1, dtype=torch.int32)  # [B_sel + 1]
    cu_sel[1:] = torch.cumsum(lens, 0)

    def tok(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[pos]  # [T_sel]

    sub = TrainBatch(
        input_ids=batch.input_ids[pos], cu_seqlens=cu_sel, position_ids=batch.position_ids[pos],
        action_mask=batch.action_mask[pos], old_logprobs=batch.old_logprobs[pos],
        advantages=batch.advantages[pos], policy_versions=batch.policy_versions[index],
        is_weights=tok(batch.is_weights), ref_logprobs=tok(batch.ref_logprobs),
        temperature=tok(batch.temperature), top_k=tok(batch.top_k), top_p=tok(batch.top_p),
    )
    return sub, pos


def _slice(batch: TrainBatch, b0: int, b1: int) -> TrainBatch:
    """Sequences ``[b0, b1)`` of ``batch`` as a batch of their own (views where possible)."""
    cu = batch.cu_seqlens
    t0, t1 = int(cu[b0]), int(cu[b1])

    def tok(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[t0:t1]  # [T_mb]

    return TrainBatch(
        input_ids=batch.input_ids[t0:t1],  # [T_mb]
        cu_seqlens=cu[b0 : b1 + 1] - cu[b0],  # [B_mb + 1]
        position_ids=batch.position_ids[t0:t1],  # [T_mb]
        action_mask=batch.action_mask[t0:t1],  # [T_mb]
        old_logprobs=batch.old_logprobs[t0:t1],  # [T_mb]
        advantages=batch.advantages[t0:t1],  # [T_mb]
        policy_versions=batch.policy_versions[b0:b1],  # [B_mb]
        is_weights=tok(batch.is_weights),  # [T_mb] | None
        ref_logprobs=tok(batch.ref_logprobs),  # [T_mb] | None
        temperature=tok(batch.temperature),  # [T_mb] | None
        top_k=tok(batch.top_k),  # [T_mb] | None
        top_p=tok(batch.top_p),  # [T_mb] | None
    )


def split_by_token_budget(batch: TrainBatch, max_tokens: int) -> list[TrainBatch]:
    """Consecutive whole sequences grouped into micro-batches of at most ``max_tokens``
    tokens each; a sequence longer than the budget gets a micro-batch of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()  # [B]
    out: list[TrainBatch] = []
    start, used = 0, 0
    for b, n in enumerate(lengths):
        if b > start and used + n > max_tokens:
            out.append(_slice(batch, start, b))
            start, used = b, 0
        used += n
    if lengths:
        out.append(_slice(batch, start, len(lengths)))
    return out
