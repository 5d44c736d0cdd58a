"""Log-prob batching: log-softmax of the sampled tokens (with temperature) and the entropy,
from logits or from hidden states and the LM-head weight, differentiable.

Per-row temperature: ``temperature`` may be a float ``[N]`` tensor (one per token, as a
trainer scoring sequences sampled at different temperatures needs). The rows are grouped
by distinct temperature and each group runs the implementation with that scalar, so
every implementation supports it with the same numbers as a scalar call; a batch
usually holds a handful of distinct temperatures. :func:`processed_logprobs_from_hidden`
adds the samplers' top-k / top-p truncation (see :mod:`.reference`).

The specification is :mod:`lightning.kernels.logprobs.reference`. Implementations:
``reference`` (materialises [N, V] fp32), ``cpp`` (CPU, chunked), ``triton`` (GPU, or CPU
under ``TRITON_INTERPRET=1``; chunked).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning.kernels import _dispatch
from lightning.kernels.logprobs import reference
from lightning.kernels.logprobs.reference import LogProbs

__all__ = [
    "IMPLS",
    "LogProbs",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "processed_logprobs_from_hidden",
]

IMPLS = ("reference", "cpp", "triton")


Temperature = float | torch.Tensor


def _row_temperatures(temperature: torch.Tensor, n: int) -> list[float]:
    """The distinct values of a per-row ``temperature`` [N]; ValueError naming it if odd."""
    if temperature.shape != (n,):
        raise ValueError(f"temperature must be a float or shape ({n},), got {tuple(temperature.shape)}")
    if not temperature.dtype.is_floating_point:
        raise ValueError(f"a temperature tensor must be floating point, got {temperature.dtype}")
    t = temperature.detach().float().cpu()
    if n and not bool(((t > 0) & torch.isfinite(t)).all()):
        raise ValueError(f"temperature must be > 0 and finite in every row, got min {float(t.min())}")
    return torch.unique(t).tolist()


def _by_temperature(
    temperature: torch.Tensor, n: int, device: torch.device, want_entropy: bool, run: Any
) -> LogProbs:
    """``run(rows, t)`` (a LogProbs of those rows at scalar ``t``; ``rows`` None = all) per
    distinct temperature, scattered back into ``[N]`` (differentiably)."""
    values = _row_temperatures(temperature, n)
    if len(values) <= 1:
        return run(None, values[0] if values else 1.0)
    t = temperature.detach().to(device=device, dtype=torch.float32)  # [N]
    lp = torch.zeros(n, dtype=torch.float32, device=device)  # [N]
    ent = torch.zeros(n, dtype=torch.float32, device=device) if want_entropy else None  # [N]
    for v in values:
        rows = (t == v).nonzero().squeeze(-1)  # [n_v]
        part = run(rows, v)
        lp = lp.index_put((rows,), part.logprobs)  # [N]
        if ent is not None:
            ent = ent.index_put((rows,), part.entropy)  # [N]
    return LogProbs(lp, ent)


def logprobs_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    return_entropy: bool = False,
    impl: str | None = None,
) -> LogProbs:
    """``log_softmax(logits / temperature)[token_ids]`` and optionally the entropy.

    Args:
        logits: ``[N, V]`` float32/float16/bfloat16; never copied or upcast as a whole.
        token_ids: ``[N]`` int32/int64 in ``[0, V)``.
        temperature: > 0; logits are divided by it. A float, or float ``[N]`` per row.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``.
        impl: None (fastest available) or ``reference``, ``cpp``, ``triton``.

    Returns:
        ``LogProbs(logprobs, entropy)``: float32 ``[N]`` each (entropy None unless asked);
        differentiable with respect to ``logits``.

    Raises:
        ValueError: a bad argument (named in the message).
        KernelUnavailableError: ``impl`` was given and cannot run on these tensors.
    """
    if isinstance(temperature, torch.Tensor):
        reference.check_logits_inputs(logits, token_ids, 1.0)
        return _by_temperature(
            temperature, logits.shape[0], logits.device, return_entropy,
            lambda rows, t: logprobs_from_logits(
                logits if rows is None else logits.index_select(0, rows),
                token_ids if rows is None else token_ids.index_select(0, rows),
                temperature=t, return_entropy=return_entropy, impl=impl),
        )
    reference.check_logits_inputs(logits, token_ids, temperature)
    which = _dispatch.select("logprobs_from_logits", logits.device, impl, IMPLS, ext_op="logprobs_logits_fwd")
    if which == "reference":
        return reference.logprobs_from_logits(logits, token_ids, temperature=temperature, return_entropy=return_entropy)
    if logits.shape[1] > 0 and logits.stride(1) != 1:
        logits = logits.contiguous()
    token_ids = token_ids.contiguous()
    if which == "cpp":
        from lightning.kernels.logprobs import cpu as backend
    else:
        from lightning.kernels.logprobs import triton as backend
    lp, ent = backend.logprobs_from_logits(logits, token_ids, float(temperature), return_entropy)  # [N], [N]|[0]
    return LogProbs(lp, ent if return_entropy else None)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: Temperature = 1.0,
    return_entropy: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    impl: str | None = None,
) -> LogProbs:
    """Same as :func:`logprobs_from_logits` with ``logits = hidden @ weight.T``, computed in
    chunks so the ``[N, V]`` logits are never materialised in fp32.

    Args:
        hidden: ``[N, H]`` float32/float16/bfloat16 (last hidden states, one per token).
        weight: ``[V, H]`` LM-head weight, same dtype.
        token_ids: ``[N]`` int32/int64 in ``[0, V)``.
        chunk_tokens, chunk_vocab: tile sizes (None = defaults: ``cpp`` 512 x 8192;
            ``triton`` tiles the vocabulary in-kernel and takes ``chunk_tokens`` so that
            one ``[chunk, V]`` buffer in the input dtype is <= 256 MiB).
        impl: None (fastest available) or ``reference``, ``cpp``, ``triton``.

    Returns:
        ``LogProbs(logprobs, entropy)``, float32 ``[N]``; differentiable with respect to
        ``hidden`` and ``weight``.

    Raises:
        ValueError: a bad argument (named in the message).
        KernelUnavailableError: ``impl`` was given and cannot run on these tensors.
    """
    if isinstance(temperature, torch.Tensor):
        reference.check_hidden_inputs(hidden, weight, token_ids, 1.0)
        return _by_temperature(
            temperature, hidden.shape[0], hidden.device, return_entropy,
            lambda rows, t: logprobs_from_hidden(
                hidden if rows is None else hidden.index_select(0, rows), weight,
                token_ids if rows is None else token_ids.index_select(0, rows),
                temperature=t, return_entropy=return_entropy, chunk_tokens=chunk_tokens,
                chunk_vocab=chunk_vocab, impl=impl),
        )
    reference.check_hidden_inputs(hidden, weight, token_ids, temperature)
    for name, val in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if val is not None and val <= 0:
            raise ValueError(f"{name} must be > 0, got {val}")
    which = _dispatch.select("logprobs_from_hidden", hidden.device, impl, IMPLS, ext_op="logprobs_hidden_fwd")
    if which == "reference":
        return reference.logprobs_from_hidden(
            hidden, weight, token_ids, temperature=temperature, return_entropy=return_entropy
        )
    hidden, weight, token_ids = hidden.contiguous(), weight.contiguous(), token_ids.contiguous()
    if which == "cpp":
        from lightning.kernels.logprobs import cpu

        lp, ent = cpu.logprobs_from_hidden(
            hidden, weight, token_ids, float(temperature), return_entropy, chunk_tokens, chunk_vocab
        )  # [N], [N]|[0]
    else:
        from lightning.kernels.logprobs import triton as logprobs_triton

        lp, ent = logprobs_triton.logprobs_from_hidden(
            hidden, weight, token_ids, float(temperature), return_entropy, chunk_tokens
        )  # [N], [N]|[0]
    return LogProbs(lp, ent if return_entropy else None)


def processed_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: Temperature,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    return_entropy: bool = False,
    impl: str | None = None,
    chunk_bytes: int = 64 << 20,
) -> LogProbs:
    """Log-probs (and entropy) of the sampled tokens under the *processed* distribution the
    samplers draw from: temperature, then top-k, then top-p (:mod:`.reference`), per row.

    Rows without truncation go through :func:`logprobs_from_hidden` (chunked, never the
    ``[N, V]`` logits). A truncated row needs its whole row sorted: those rows are scored
    ``chunk_bytes`` of fp32 logits at a time (``hidden @ weight.T`` in the input dtype, as
    the engine's LM head computes it, then fp32), masked with
    :func:`.reference.processed_logits` (the sampled token always kept) and passed to
    :func:`logprobs_from_logits`. So truncation costs one sort of ``V`` per truncated row.

    Args:
        temperature: float or float ``[N]``, > 0 (greedy rows: pass 1, the engines'
            convention for their log-probs).
        top_k: int ``[N]``, ``<= 0`` or ``>= V`` = off; None = off everywhere.
        top_p: float ``[N]`` in (0, 1], 1 = off; None = off everywhere.

    Raises:
        ValueError: a bad argument (named in the message).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    k = torch.zeros(n, dtype=torch.int64, device=dev) if top_k is None else top_k.to(dev).long()
    p = torch.ones(n, dtype=torch.float32, device=dev) if top_p is None else top_p.to(dev).float()
    if k.shape != (n,) or p.shape != (n,):
        raise ValueError(f"top_k and top_p must have shape ({n},), got {tuple(k.shape)}, {tuple(p.shape)}")
    if n and not bool(((p > 0) & (p <= 1)).all()):
        raise ValueError("top_p must be in (0, 1] in every row")
    t = temperature if isinstance(temperature, torch.Tensor) else torch.full((n,), float(temperature))
    t = t.to(device=dev, dtype=torch.float32)  # [N]
    cut = ((k > 0) & (k < vocab)) | (p < 1.0)  # [N]
    if not bool(cut.any()):
        return logprobs_from_hidden(hidden, weight, token_ids, temperature=t,
                                    return_entropy=return_entropy, impl=impl)
    _row_temperatures(t, n)  # checks every row
    lp = torch.zeros(n, dtype=torch.float32, device=dev)  # [N]
    ent = torch.zeros(n, dtype=torch.float32, device=dev) if return_entropy else None  # [N]
    plain = (~cut).nonzero().squeeze(-1)  # [n_plain]
    if plain.numel():
        part = logprobs_from_hidden(hidden.index_select(0, plain), weight,
                                    token_ids.index_select(0, plain), temperature=t[plain],
                                    return_entropy=return_entropy, impl=impl)
        lp = lp.index_put((plain,), part.logprobs)
        if ent is not None:
            ent = ent.index_put((plain,), part.entropy)
    rows_all = cut.nonzero().squeeze(-1)  # [n_cut]
    step = max(1, chunk_bytes // (4 * max(vocab, 1)))
    for rows in rows_all.split(step):
        z = (hidden.index_select(0, rows) @ weight.T).float() / t[rows, None]  # [r, V] fp32
        ids = token_ids.index_select(0, rows)  # [r]
        masked = reference.processed_logits(z, k[rows], p[rows], keep=ids)  # [r, V]
        part = logprobs_from_logits(masked, ids, return_entropy=return_entropy, impl=impl)
        lp = lp.index_put((rows,), part.logprobs)
        if ent is not None:
            ent = ent.index_put((rows,), part.entropy)
    return LogProbs(lp, ent)
