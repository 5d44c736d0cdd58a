"""Log-prob batching: log-softmax of the sampled tokens (with temperature) and the entropy,
from logits or from hidden states and the LM-head weight, differentiable.

The specification is :mod:`lightning.kernels.logprobs.reference`. Implementations:
``reference`` (materialises [N, V] fp32), ``cpp`` (CPU, chunked), ``triton`` (GPU, or CPU
under ``TRITON_INTERPRET=1``; chunked).
"""

from __future__ import annotations

import torch

from lightning.kernels import _dispatch
from lightning.kernels.logprobs import reference
from lightning.kernels.logprobs.reference import LogProbs

__all__ = ["IMPLS", "LogProbs", "logprobs_from_hidden", "logprobs_from_logits"]

IMPLS = ("reference", "cpp", "triton")


def logprobs_from_logits(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str | None = None,
) -> LogProbs:
    """``log_softmax(logits / temperature)[token_ids]`` and optionally the entropy.

    Args:
        logits: ``[N, V]`` float32/float16/bfloat16; never copied or upcast as a whole.
        token_ids: ``[N]`` int32/int64 in ``[0, V)``.
        temperature: > 0; logits are divided by it.
        return_entropy: also return the entropy of ``softmax(logits / temperature)``.
        impl: None (fastest available) or ``reference``, ``cpp``, ``triton``.

    Returns:
        ``LogProbs(logprobs, entropy)``: float32 ``[N]`` each (entropy None unless asked);
        differentiable with respect to ``logits``.

    Raises:
        ValueError: a bad argument (named in the message).
        KernelUnavailableError: ``impl`` was given and cannot run on these tensors.
    """
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
    temperature: float = 1.0,
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
