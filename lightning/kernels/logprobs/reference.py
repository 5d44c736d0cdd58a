"""Log-prob batching: the specification.

For sampled tokens ``y[N]`` and logits ``x[N, V]`` (given, or ``x = hidden @ weight.T`` from
``hidden[N, H]`` and the LM-head ``weight[V, H]``), with ``z = float32(x) / temperature``::

    logprobs[i] = log_softmax(z[i])[y[i]] = z[i, y[i]] - logsumexp(z[i])
    entropy[i]  = -sum_j p_ij log p_ij,      p_i = softmax(z[i])     (optional)

Both outputs are float32 ``[N]``; the math is float32 whatever the input dtype (float32,
float16, bfloat16). ``y`` is int32/int64 in ``[0, V)``. Logits may contain ``-inf``
(masked vocabulary entries: probability 0, no contribution to the entropy) but every row
needs one finite logit. Gradients flow to ``logits`` (in its dtype), or to ``hidden`` and
``weight`` (in theirs), from either output:

    d/dz_ij (g_i * logprobs[i] + h_i * entropy[i])
        = g_i * (1[j == y_i] - p_ij) - h_i * p_ij * (log p_ij + entropy[i])

and d/dx = d/dz / temperature.

Sampling processing (:func:`processed_logits`): the distribution a sampler draws from is
``softmax(z)`` restricted to the ``top_k`` most likely tokens, then to the smallest prefix
(by probability) of those whose renormalised mass reaches ``top_p`` (ties with the last
kept logit are kept), renormalised. That is the *processed* distribution whose log-probs
the engines return (vLLM's ``processed_logprobs``); the trainer scores the same one.
:func:`truncation_threshold` is the single definition, shared with the torch engine's
sampler.

This reference materialises the full fp32 ``[N, V]`` logits and log-softmax (the "naive"
``log_softmax + gather`` baseline, ~2 x N x V x 4 bytes). The fast implementations compute
the same numbers chunk by chunk over tokens and vocabulary and never hold ``[N, V]`` in
fp32; the from-logits ones additionally never copy the given logits.
"""

from __future__ import annotations

import math
import typing

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LogProbs(typing.NamedTuple):
    logprobs: torch.Tensor  # [N] float32
    entropy: torch.Tensor | None  # [N] float32, or None when not asked for


def _check_ids_temperature(token_ids: torch.Tensor, N: int, V: int, device: torch.device, temperature: float) -> None:
    if token_ids.shape != (N,):
        raise ValueError(f"token_ids must have shape ({N},), got {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_ids must be int32 or int64, got {token_ids.dtype}")
    if token_ids.device != device:
        raise ValueError(f"token_ids must be on {device}, got {token_ids.device}")
    if token_ids.device.type == "cpu" and N > 0:
        lo, hi = int(token_ids.min()), int(token_ids.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token_ids must lie in [0, V={V}), got [{lo}, {hi}]")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_logits_inputs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> None:
    """Raise ``ValueError`` naming the bad argument (id range checked on CPU only)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    N, V = logits.shape
    if V == 0 and N > 0:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    _check_ids_temperature(token_ids, N, V, logits.device, temperature)


def check_hidden_inputs(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> None:
    """Raise ``ValueError`` naming the bad argument (id range checked on CPU only)."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[1]}], got shape {tuple(weight.shape)}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on {hidden.device}, got {weight.device}")
    if weight.shape[0] == 0 and hidden.shape[0] > 0:
        raise ValueError("weight must have at least one row (the vocabulary)")
    _check_ids_temperature(token_ids, hidden.shape[0], weight.shape[0], hidden.device, temperature)


def logprobs_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> LogProbs:
    """``log_softmax(logits / temperature)[token_ids]`` (and the entropy), float32 ``[N]``."""
    check_logits_inputs(logits, token_ids, temperature)
    z = logits.float()  # [N, V] fp32 (the input itself when it is fp32)
    if temperature != 1.0:
        z = z / temperature  # [N, V]
    logp = torch.log_softmax(z, dim=-1)  # [N, V] fp32
    lp = logp.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)  # [N]
    ent = None
    if return_entropy:
        p = logp.exp()  # [N, V]
        # 0 * log 0 = 0; masked_fill (not where) so the backward does not see 0 * -inf either
        ent = -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)  # [N]
    return LogProbs(lp, ent)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> LogProbs:
    """Same as :func:`logprobs_from_logits` with ``logits = hidden @ weight.T`` (in fp32)."""
    check_hidden_inputs(hidden, weight, token_ids, temperature)
    logits = hidden.float() @ weight.float().T  # [N, V] fp32
    return logprobs_from_logits(logits, token_ids, temperature=temperature, return_entropy=return_entropy)


def truncation_threshold(
    values: torch.Tensor, lse: torch.Tensor, ks: torch.Tensor, ps: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Smallest kept logit per row for top-k then top-p (top-p applies to the
    top-k-renormalised distribution).

    values: [F, K] scaled logits sorted descending (the K most likely tokens); lse: [F, 1]
    log-sum-exp of each full row; ks, ps: [F] top-k (``vocab`` when off) and top-p. The
    kept tokens are a prefix of ``values``; returns its last value, [F, 1]. Tokens tied
    with it are kept too.
    """
    remove = torch.arange(values.shape[1], device=values.device)[None, :] >= ks[:, None]  # [F, K]
    limited = values.masked_fill(remove, -math.inf)
    norm = torch.where(ks[:, None] < vocab, torch.logsumexp(limited, -1, keepdim=True), lse)
    probs = (limited - norm).exp()  # [F, K]
    before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
    remove |= before >= ps[:, None]
    remove[:, 0] = False
    kept = (~remove).sum(dim=-1, keepdim=True)  # [F, 1], a prefix
    return values.gather(1, kept - 1)


def processed_logits(
    z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``z`` [N, V] (fp32, already divided by the temperature) with the tokens outside each
    row's top-k / top-p set to ``-inf``; differentiable through the kept entries.

    ``top_k`` int [N] (``<= 0`` or ``>= V``: off), ``top_p`` float [N] (``1``: off). ``keep``
    [N] token ids that stay whatever the mask says: a trainer passes the sampled tokens,
    so a last-bit logit difference from the sampler at the boundary never scores a sampled
    token as impossible (it would be ``-inf``).
    """
    n, vocab = z.shape
    ks = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab).to(z.device)  # [N]
    ps = top_p.to(device=z.device, dtype=torch.float32)  # [N]
    with torch.no_grad():
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # [N, 1]
        values = z.sort(dim=-1, descending=True).values  # [N, V]
        drop = z < truncation_threshold(values, lse, ks, ps, vocab)  # [N, V]
        if keep is not None:
            drop[torch.arange(n, device=z.device), keep.long()] = False
    return z.masked_fill(drop, -math.inf)  # [N, V]
