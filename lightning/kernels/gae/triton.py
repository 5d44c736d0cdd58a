"""GAE in Triton: a reverse scan of affine maps over the packed token stream.

Walking a sequence backwards, the state ``s = (A, V_next)`` (running advantage, value of
the next action token) is updated by an affine map per token, ``s <- M_t s + c_t`` with
``M_t = [[a, b], [0, d]]`` upper triangular::

    action token:  A = (r - v) + gamma * V_next + gamma * lam * A,  V_next = v
                   a = gamma * lam, b = gamma, d = 0, c = (r - v, v)
    masked token:  identity (a = d = 1, b = 0, c = 0): the state passes through
    last token of a sequence: additionally M_t = 0 (the state past the end is 0)

Affine maps compose associatively, so the whole packed stream (all sequences at once:
the ``M_t = 0`` resets separate them) is one ``tl.associative_scan`` in reverse token
order, parallel over tokens whatever the sequence lengths (batch 1 with 32k tokens runs
as wide as 256 x 128). Three launches (reduce-then-scan):

1. ``_gae_chunk_total``: each program scans one chunk of ``BLOCK`` tokens and stores the
   chunk's composed map (5 floats).
2. ``_gae_chunk_carry``: one program scans the chunk maps and stores the state entering
   each chunk.
3. ``_gae_chunk_apply``: each program rescans its chunk from that state and writes
   ``advantages`` and ``returns`` (0 on masked tokens).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning.kernels._dispatch import triton_interpreting


@triton.jit
def _compose(a1, b1, d1, p1, q1, a2, b2, d2, p2, q2):
    # Map 1 then map 2 (2 is later in scan order, i.e. earlier in time): M2 (M1 s + c1) + c2.
    return a2 * a1, a2 * b1 + b2 * d1, d2 * d1, a2 * p1 + b2 * q1 + p2, d2 * q1 + q2


@triton.jit
def _token_maps(rewards_ptr, values_ptr, mask_ptr, seg_end_ptr, T, j, gamma, gl,
                HAS_VALUES: tl.constexpr, HAS_MASK: tl.constexpr):
    # j: [BLOCK] positions in reverse order; token t = T - 1 - j.
    valid = j < T
    t = T - 1 - j
    r = tl.load(rewards_ptr + t, mask=valid, other=0.0).to(tl.float32)
    if HAS_VALUES:
        v = tl.load(values_ptr + t, mask=valid, other=0.0).to(tl.float32)
    else:
        v = tl.zeros_like(r)
    if HAS_MASK:
        act = (tl.load(mask_ptr + t, mask=valid, other=0) != 0) & valid
    else:
        act = valid
    last = tl.load(seg_end_ptr + t + 1, mask=valid, other=0) != 0  # t ends its sequence
    keep = tl.where(last, 0.0, 1.0)  # zeroes M at a sequence end
    a = tl.where(act, gl, 1.0) * keep
    b = tl.where(act, gamma, 0.0) * keep
    d = tl.where(act, 0.0, 1.0) * keep
    p = tl.where(act, r - v, 0.0)
    q = tl.where(act, v, 0.0)
    return a, b, d, p, q, v, act, t, valid


@triton.jit
def _gae_chunk_total(rewards_ptr, values_ptr, mask_ptr, seg_end_ptr, total_ptr, T, gamma, gl,
                     HAS_VALUES: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    a, b, d, p, q, _v, _act, _t, _valid = _token_maps(rewards_ptr, values_ptr, mask_ptr, seg_end_ptr, T, j,
                                                  gamma, gl, HAS_VALUES, HAS_MASK)
    a, b, d, p, q = tl.associative_scan((a, b, d, p, q), 0, _compose)  # [BLOCK] each, inclusive
    is_last = tl.arange(0, BLOCK) == BLOCK - 1
    base = total_ptr + pid * 5
    tl.store(base + 0, tl.sum(tl.where(is_last, a, 0.0), 0))
    tl.store(base + 1, tl.sum(tl.where(is_last, b, 0.0), 0))
    tl.store(base + 2, tl.sum(tl.where(is_last, d, 0.0), 0))
    tl.store(base + 3, tl.sum(tl.where(is_last, p, 0.0), 0))
    tl.store(base + 4, tl.sum(tl.where(is_last, q, 0.0), 0))


@triton.jit
def _gae_chunk_carry(total_ptr, carry_ptr, n_chunks, BLOCK_C: tl.constexpr):
    # carry[k] = state (A, V_next) entering chunk k in scan order; carry[0] = (0, 0).
    x0 = tl.full([], 0.0, tl.float32)
    x1 = tl.full([], 0.0, tl.float32)
    for start in range(0, n_chunks, BLOCK_C):
        k = start + tl.arange(0, BLOCK_C)  # [BLOCK_C]
        ok = k < n_chunks
        a = tl.load(total_ptr + k * 5 + 0, mask=ok, other=1.0)
        b = tl.load(total_ptr + k * 5 + 1, mask=ok, other=0.0)
        d = tl.load(total_ptr + k * 5 + 2, mask=ok, other=1.0)
        p = tl.load(total_ptr + k * 5 + 3, mask=ok, other=0.0)
        q = tl.load(total_ptr + k * 5 + 4, mask=ok, other=0.0)
        a, b, d, p, q = tl.associative_scan((a, b, d, p, q), 0, _compose)
        s0 = a * x0 + b * x1 + p  # [BLOCK_C] state after chunk k
        s1 = d * x1 + q
        # state entering chunk k + 1
        tl.store(carry_ptr + (k + 1) * 2 + 0, s0, mask=ok)
        tl.store(carry_ptr + (k + 1) * 2 + 1, s1, mask=ok)
        is_last = tl.arange(0, BLOCK_C) == BLOCK_C - 1
        x0 = tl.sum(tl.where(is_last, s0, 0.0), 0)
        x1 = tl.sum(tl.where(is_last, s1, 0.0), 0)


@triton.jit
def _gae_chunk_apply(rewards_ptr, values_ptr, mask_ptr, seg_end_ptr, carry_ptr, adv_ptr, ret_ptr, T,
                     gamma, gl, HAS_VALUES: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    a, b, d, p, q, v, act, t, valid = _token_maps(rewards_ptr, values_ptr, mask_ptr, seg_end_ptr, T, j,
                                                  gamma, gl, HAS_VALUES, HAS_MASK)
    a, b, d, p, q = tl.associative_scan((a, b, d, p, q), 0, _compose)
    x0 = tl.load(carry_ptr + pid * 2 + 0)
    x1 = tl.load(carry_ptr + pid * 2 + 1)
    adv = a * x0 + b * x1 + p  # [BLOCK] A_t
    adv = tl.where(act, adv, 0.0)
    ret = tl.where(act, adv + v, 0.0)
    tl.store(adv_ptr + t, adv, mask=valid)
    tl.store(ret_ptr + t, ret, mask=valid)


def gae(
    rewards: torch.Tensor,  # [T] float, contiguous
    values: torch.Tensor | None,  # [T] rewards.dtype, contiguous
    mask: torch.Tensor | None,  # [T] bool/uint8, contiguous
    cu_seqlens: torch.Tensor,  # [B + 1] int32/int64
    gamma: float,
    lam: float,
    *,
    block: int | None = None,
    block_c: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``block``: tokens per program (default 1024; 2048 when interpreting, where the
    per-program overhead dominates); ``block_c``: chunk totals scanned per step of the
    carry pass. Both powers of two; exposed for tests."""
    T = rewards.numel()
    device = rewards.device
    adv = torch.empty(T, dtype=torch.float32, device=device)  # [T]
    ret = torch.empty(T, dtype=torch.float32, device=device)  # [T]
    if T == 0:
        return adv, ret
    # seg_end[t + 1] == 1 <=> token t is the last of its sequence (empty sequences mark a
    # position that already ends a sequence, or seg_end[0], which is never read).
    seg_end = torch.zeros(T + 1, dtype=torch.int8, device=device)  # [T + 1]
    seg_end[cu_seqlens[1:].long()] = 1
    if block is None:
        block = 2048 if triton_interpreting() else 1024
        block = max(16, min(block, triton.next_power_of_2(T)))
    n_chunks = triton.cdiv(T, block)
    totals = torch.empty(n_chunks, 5, dtype=torch.float32, device=device)  # [chunks, 5]
    carry = torch.zeros(n_chunks + 1, 2, dtype=torch.float32, device=device)  # [chunks + 1, 2]
    gl = gamma * lam if values is not None else gamma
    mask_u8 = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
    args = {"HAS_VALUES": values is not None, "HAS_MASK": mask is not None, "BLOCK": block}
    vals = values if values is not None else rewards  # placeholder pointer when absent
    msk = mask_u8 if mask_u8 is not None else seg_end
    _gae_chunk_total[(n_chunks,)](rewards, vals, msk, seg_end, totals, T, gamma, gl, **args)
    block_c = min(block_c, triton.next_power_of_2(n_chunks))
    _gae_chunk_carry[(1,)](totals, carry, n_chunks, BLOCK_C=block_c)
    _gae_chunk_apply[(n_chunks,)](rewards, vals, msk, seg_end, carry, adv, ret, T, gamma, gl, **args)
    return adv, ret
