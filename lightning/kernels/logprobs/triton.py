"""Log-prob batching in Triton.

Two row kernels, one program per token row, looping over the vocabulary in ``BLOCK_V``
tiles (so any vocabulary size fits in registers):

- ``_lp_fwd_kernel``: online softmax (running max ``m``, ``s = sum exp(z - m)``,
  ``t = sum exp(z - m) * z`` for the entropy) -> logprob, logsumexp, entropy.
- ``_lp_bwd_kernel``: ``dz = g * (onehot - p) - h * p * (log p + H)`` written tile by
  tile, in the logits' dtype; it may overwrite its input in place.

From logits, the backward writes ``dlogits`` directly: nothing of size ``[N, V]`` in fp32
is ever allocated. From hidden states (Liger's fused-linear-cross-entropy layout), the host
walks the tokens in chunks: ``logits_chunk = hidden_chunk @ weight.T`` in the input dtype
(``[chunk, V]``, never ``[N, V]``), the forward kernel reduces it; the backward recomputes
it, turns it in place into ``dlogits_chunk`` and accumulates
``dhidden_chunk = dlogits_chunk @ weight`` and ``dweight += dlogits_chunk.T @ hidden_chunk``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning.kernels._dispatch import triton_interpreting


@triton.jit
def _lp_fwd_kernel(x_ptr, stride_x, ids_ptr, lp_ptr, lse_ptr, ent_ptr, V, inv_t,
                   HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    t = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
        e = tl.exp(z - m_ref)  # [BLOCK_V], 0 where z = -inf
        scale = tl.exp(m - m_ref)
        s = s * scale + tl.sum(e, 0)
        if HAS_ENT:
            t = t * scale + tl.sum(e * tl.where(e > 0.0, z, 0.0), 0)  # 0 * -inf would be nan
        m = m_new
    lse = m + tl.log(s)
    y = tl.load(ids_ptr + row).to(tl.int64)
    zy = tl.load(x_row + y).to(tl.float32) * inv_t
    tl.store(lp_ptr + row, zy - lse)
    tl.store(lse_ptr + row, lse)
    if HAS_ENT:
        tl.store(ent_ptr + row, lse - t / s)


@triton.jit
def _lp_bwd_kernel(x_ptr, stride_x, dx_ptr, stride_dx, ids_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, inv_t,
                   HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    lse = tl.load(lse_ptr + row)
    y = tl.load(ids_ptr + row).to(tl.int64)
    glp = tl.load(glp_ptr + row) if HAS_GLP else 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # [BLOCK_V]
        ok = cols < V
        z = tl.load(x_row + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(z - lse)  # [BLOCK_V]
        dz = -p * glp
        if HAS_GENT:
            gent = tl.load(gent_ptr + row)
            ent = tl.load(ent_ptr + row)
            log_p = tl.where(p > 0.0, z - lse, 0.0)  # avoids 0 * -inf where z = -inf
            dz -= gent * p * (log_p + ent)
        dz += tl.where(cols == y, glp, 0.0)
        tl.store(dx_row + cols, (dz * inv_t).to(dx_ptr.dtype.element_ty), mask=ok)


def _block_v(V: int) -> int:
    cap = 1024 if triton_interpreting() else 4096
    return max(16, min(cap, triton.next_power_of_2(V)))


def _fwd_rows(x: torch.Tensor, token_ids: torch.Tensor, temperature: float, want_entropy: bool,
              lp: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor) -> None:
    n, V = x.shape  # x: [n, V] unit stride along V; outputs: [n] fp32 views
    if n == 0:
        return
    _lp_fwd_kernel[(n,)](x, x.stride(0), token_ids, lp, lse, ent, V, 1.0 / temperature,
                         HAS_ENT=want_entropy, BLOCK_V=_block_v(V))


def _bwd_rows(x: torch.Tensor, dx: torch.Tensor, token_ids: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor,
              g_lp: torch.Tensor | None, g_ent: torch.Tensor | None, temperature: float) -> None:
    n, V = x.shape  # x, dx: [n, V]; others [n]
    if n == 0:
        return
    _lp_bwd_kernel[(n,)](x, x.stride(0), dx, dx.stride(0), token_ids, lse, ent,
                         g_lp if g_lp is not None else lse, g_ent if g_ent is not None else lse, V,
                         1.0 / temperature, HAS_GLP=g_lp is not None, HAS_GENT=g_ent is not None,
                         BLOCK_V=_block_v(V))


def _as_f32(g: torch.Tensor | None) -> torch.Tensor | None:
    return None if g is None else g.float().contiguous()


def _outputs(N: int, want_entropy: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = torch.empty(N, dtype=torch.float32, device=device)  # [N]
    lse = torch.empty(N, dtype=torch.float32, device=device)  # [N]
    ent = torch.empty(N if want_entropy else 0, dtype=torch.float32, device=device)  # [N] or [0]
    return lp, lse, ent


class _FromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_ids, temperature, want_entropy):
        lp, lse, ent = _outputs(logits.shape[0], want_entropy, logits.device)
        _fwd_rows(logits, token_ids, temperature, want_entropy, lp, lse, ent if want_entropy else lse)
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
        dlogits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # [N, V]
        _bwd_rows(logits, dlogits, token_ids, lse, ent, _as_f32(g_lp), _as_f32(g_ent), ctx.temperature)
        return dlogits, None, None, None


def _chunk_tokens(V: int, itemsize: int) -> int:
    # One [chunk, V] logits buffer in the input dtype: <= 256 MiB on GPU, 8 MiB interpreting.
    budget = (8 << 20) if triton_interpreting() else (256 << 20)
    return max(1, budget // max(1, V * itemsize))


class _FromHidden(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, token_ids, temperature, want_entropy, chunk_tokens):
        N = hidden.shape[0]
        lp, lse, ent = _outputs(N, want_entropy, hidden.device)
        for n0 in range(0, N, chunk_tokens):
            n1 = min(N, n0 + chunk_tokens)
            logits = hidden[n0:n1] @ weight.T  # [n, V] input dtype
            _fwd_rows(logits, token_ids[n0:n1], temperature, want_entropy, lp[n0:n1], lse[n0:n1],
                      ent[n0:n1] if want_entropy else lse[n0:n1])
            del logits
        ctx.save_for_backward(hidden, weight, token_ids, lse, ent)
        ctx.args = (temperature, chunk_tokens)
        ctx.set_materialize_grads(False)
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, token_ids, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w) or (g_lp is None and g_ent is None):
            return None, None, None, None, None, None
        if ent.numel() == 0:
            g_ent = None
        temperature, chunk_tokens = ctx.args
        g_lp, g_ent = _as_f32(g_lp), _as_f32(g_ent)
        N = hidden.shape[0]
        dh = torch.empty_like(hidden) if need_h else None  # [N, H]
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # [V, H] fp32
        for n0 in range(0, N, chunk_tokens):
            n1 = min(N, n0 + chunk_tokens)
            h = hidden[n0:n1]  # [n, H]
            dl = h @ weight.T  # [n, V]: logits, turned into dlogits in place
            _bwd_rows(dl, dl, token_ids[n0:n1], lse[n0:n1], ent[n0:n1] if g_ent is not None else ent,
                      None if g_lp is None else g_lp[n0:n1], None if g_ent is None else g_ent[n0:n1], temperature)
            if need_h:
                torch.mm(dl, weight, out=dh[n0:n1])  # [n, H]
            if need_w:
                if dl.dtype == torch.float32:
                    dw.addmm_(dl.T, h)  # [V, H]
                else:
                    dw.add_(dl.T @ h)  # [V, H]
            del dl
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None, None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = chunk_tokens or _chunk_tokens(weight.shape[0], weight.element_size())
    return _FromHidden.apply(hidden, weight, token_ids, temperature, want_entropy, chunk)  # [N], [N] or [0]
