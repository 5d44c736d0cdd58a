"""Log-prob batching on CPU: autograd wrappers over the C++ ops
``lightning_rl::logprobs_{logits,hidden}_{fwd,bwd}`` (``lightning/_ext/csrc/logprobs_cpu.cpp``)."""

from __future__ import annotations

import torch

#: Default tile of the from-hidden path: [CHUNK_TOKENS x CHUNK_VOCAB] fp32 = 16 MiB.
CHUNK_TOKENS = 512
CHUNK_VOCAB = 8192


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, temperature, want_entropy):
        lp, lse, ent = torch.ops.lightning_rl.logprobs_logits_fwd(logits, token_ids, temperature, want_entropy)  # [N] x 3
        ctx.save_for_backward(logits, token_ids, lse, ent)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, token_ids, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (g_lp is None and g_ent is None):
            return None, None, None, None
        if ent.numel() == 0:
            g_ent = None
        dlogits = torch.ops.lightning_rl.logprobs_logits_bwd(
            logits, token_ids, lse, ent, g_lp, g_ent, ctx.temperature
        )  # [N, V] logits.dtype
        return dlogits, None, None, None


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, want_entropy, chunk_tokens, chunk_vocab):
        lp, lse, ent = torch.ops.lightning_rl.logprobs_hidden_fwd(
            hidden, weight, token_ids, temperature, want_entropy, chunk_tokens, chunk_vocab
        )  # [N] x 3
        ctx.save_for_backward(hidden, weight, token_ids, lse, ent)
        ctx.args = (temperature, chunk_tokens, chunk_vocab)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, token_ids, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w) or (g_lp is None and g_ent is None):
            return None, None, None, None, None, None, None
        if ent.numel() == 0:
            g_ent = None
        temperature, chunk_tokens, chunk_vocab = ctx.args
        dh, dw = torch.ops.lightning_rl.logprobs_hidden_bwd(
            hidden, weight, token_ids, lse, ent, g_lp, g_ent, temperature, chunk_tokens, chunk_vocab, need_h, need_w
        )  # [N, H], [V, H]
        return (dh if need_h else None), (dw if need_w else None), None, None, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,  # [N, V], unit stride along V
    token_ids: torch.Tensor,  # [N]
    temperature: float,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FromLogits.apply(logits, token_ids, temperature, want_entropy)  # [N], [N] or [0]


def logprobs_from_hidden(
    hidden: torch.Tensor,  # [N, H], contiguous
    weight: torch.Tensor,  # [V, H], contiguous
    token_ids: torch.Tensor,  # [N]
    temperature: float,
    want_entropy: bool,
    chunk_tokens: int | None,
    chunk_vocab: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _FromHidden.apply(
        hidden, weight, token_ids, temperature, want_entropy, chunk_tokens or CHUNK_TOKENS, chunk_vocab or CHUNK_VOCAB
    )  # [N], [N] or [0]
