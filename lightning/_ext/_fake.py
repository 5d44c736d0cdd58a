"""Shape functions (``torch.library.register_fake``) of the ``lightning_rl`` ops, so they
trace under ``torch.compile`` and with fake tensors. Registered by :func:`lightning._ext.load`."""

from __future__ import annotations

import torch


def register() -> None:
    lib = "lightning_rl::"

    @torch.library.register_fake(lib + "gae")
    def _gae(rewards, values, mask, cu_seqlens, gamma, lam):
        f32 = {"dtype": torch.float32, "device": rewards.device}
        return rewards.new_empty(rewards.shape, **f32), rewards.new_empty(rewards.shape, **f32)

    @torch.library.register_fake(lib + "group_stats")
    def _group_stats(scores, group_ids, num_groups):
        n = scores.shape
        return (
            scores.new_empty(n, dtype=torch.float32),
            scores.new_empty(n, dtype=torch.float32),
            scores.new_empty(n, dtype=torch.int64),
        )

    @torch.library.register_fake(lib + "masked_whiten")
    def _whiten(x, mask, shift_mean, eps):
        return x.new_empty(x.shape, dtype=torch.float32)

    def _rows(x, n, entropy):
        return (
            x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n if entropy else 0,), dtype=torch.float32),
        )

    @torch.library.register_fake(lib + "logprobs_logits_fwd")
    def _logits_fwd(logits, token_ids, temperature, entropy):
        return _rows(logits, logits.shape[0], entropy)

    @torch.library.register_fake(lib + "logprobs_logits_bwd")
    def _logits_bwd(logits, token_ids, lse, entropy, grad_logprobs, grad_entropy, temperature):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "logprobs_hidden_fwd")
    def _hidden_fwd(hidden, weight, token_ids, temperature, entropy, chunk_tokens, chunk_vocab):
        return _rows(hidden, hidden.shape[0], entropy)

    @torch.library.register_fake(lib + "logprobs_hidden_bwd")
    def _hidden_bwd(hidden, weight, token_ids, lse, entropy, grad_logprobs, grad_entropy, temperature,
                    chunk_tokens, chunk_vocab, need_hidden, need_weight):
        dh = hidden.new_empty(hidden.shape if need_hidden else (0,))
        dw = weight.new_empty(weight.shape if need_weight else (0,))
        return dh, dw
