"""Group statistics and masked whitening in Triton.

Both are two-pass reductions (sums, then centred sums of squares, so large offsets do not
cancel) accumulated with atomics, and a third elementwise pass writing the outputs:

- group stats: ``atomic_add`` of scores and counts into per-group buffers indexed by the
  dense group id, then of ``(s - mean_g)^2``; then per-sample mean, std (unbiased, 0 for
  groups of one) and count.
- whitening: per-program partial sums (``tl.sum``) added atomically into 3 scalars
  (sum, sum of squares about the mean, and an int32 count).

fp32 atomics make the low bits depend on the order programs finish in: results are
deterministic to ~1e-6 relative, not bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lightning.kernels._dispatch import triton_interpreting


@triton.jit
def _group_sum_kernel(scores_ptr, ids_ptr, sum_ptr, cnt_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < N
    s = tl.load(scores_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(ids_ptr + i, mask=ok, other=0)
    tl.atomic_add(sum_ptr + g, s, mask=ok)
    tl.atomic_add(cnt_ptr + g, tl.full([BLOCK], 1, tl.int32), mask=ok)


@triton.jit
def _group_m2_kernel(scores_ptr, ids_ptr, sum_ptr, cnt_ptr, m2_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < N
    s = tl.load(scores_ptr + i, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(ids_ptr + i, mask=ok, other=0)
    mean = tl.load(sum_ptr + g, mask=ok, other=0.0) / tl.load(cnt_ptr + g, mask=ok, other=1).to(tl.float32)
    dev = s - mean
    tl.atomic_add(m2_ptr + g, dev * dev, mask=ok)


@triton.jit
def _group_out_kernel(ids_ptr, sum_ptr, cnt_ptr, m2_ptr, mean_ptr, std_ptr, count_ptr, N,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < N
    g = tl.load(ids_ptr + i, mask=ok, other=0)
    n = tl.load(cnt_ptr + g, mask=ok, other=1)
    nf = n.to(tl.float32)
    mean = tl.load(sum_ptr + g, mask=ok, other=0.0) / nf
    m2 = tl.load(m2_ptr + g, mask=ok, other=0.0)
    std = tl.where(n > 1, tl.sqrt(m2 / tl.maximum(nf - 1.0, 1.0)), 0.0)
    tl.store(mean_ptr + i, mean, mask=ok)
    tl.store(std_ptr + i, std, mask=ok)
    tl.store(count_ptr + i, n.to(tl.int64), mask=ok)


def group_stats(
    scores: torch.Tensor,  # [N] float, contiguous
    group_ids: torch.Tensor,  # [N] int32/int64 dense in [0, G), contiguous
    num_groups: int,
    *,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N = scores.numel()
    dev = scores.device
    mean = torch.empty(N, dtype=torch.float32, device=dev)  # [N]
    std = torch.empty(N, dtype=torch.float32, device=dev)  # [N]
    count = torch.empty(N, dtype=torch.int64, device=dev)  # [N]
    if N == 0:
        return mean, std, count
    total = torch.zeros(num_groups, dtype=torch.float32, device=dev)  # [G]
    cnt = torch.zeros(num_groups, dtype=torch.int32, device=dev)  # [G]
    m2 = torch.zeros(num_groups, dtype=torch.float32, device=dev)  # [G]
    grid = (triton.cdiv(N, block),)
    _group_sum_kernel[grid](scores, group_ids, total, cnt, N, BLOCK=block)
    _group_m2_kernel[grid](scores, group_ids, total, cnt, m2, N, BLOCK=block)
    _group_out_kernel[grid](group_ids, total, cnt, m2, mean, std, count, N, BLOCK=block)
    return mean, std, count


@triton.jit
def _whiten_sum_kernel(x_ptr, mask_ptr, acc_ptr, cnt_ptr, T, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < T
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + i, mask=ok, other=0) != 0)
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.atomic_add(acc_ptr + 0, tl.sum(x, 0))
    tl.atomic_add(cnt_ptr, tl.sum(ok.to(tl.int32), 0))


@triton.jit
def _whiten_m2_kernel(x_ptr, mask_ptr, acc_ptr, cnt_ptr, T, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = i < T
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + i, mask=ok, other=0) != 0)
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(acc_ptr + 0) / tl.maximum(tl.load(cnt_ptr).to(tl.float32), 1.0)
    dev = tl.where(ok, x - mean, 0.0)
    tl.atomic_add(acc_ptr + 1, tl.sum(dev * dev, 0))


@triton.jit
def _whiten_out_kernel(x_ptr, mask_ptr, acc_ptr, cnt_ptr, out_ptr, T, eps, SHIFT_MEAN: tl.constexpr,
                       HAS_MASK: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    inb = i < T
    ok = inb
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + i, mask=inb, other=0) != 0)
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    n = tl.load(cnt_ptr).to(tl.float32)
    mean = tl.load(acc_ptr + 0) / tl.maximum(n, 1.0)
    var = tl.where(n > 1.0, tl.load(acc_ptr + 1) / tl.maximum(n - 1.0, 1.0), 0.0)
    y = (x - mean) * (1.0 / tl.sqrt(var + eps))
    if not SHIFT_MEAN:
        y = y + mean
    tl.store(out_ptr + i, tl.where(ok, y, 0.0), mask=inb)


def masked_whiten(
    x: torch.Tensor,  # [T] float, contiguous
    mask: torch.Tensor | None,  # [T] bool/uint8, contiguous
    shift_mean: bool,
    eps: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    T = x.numel()
    out = torch.empty(T, dtype=torch.float32, device=x.device)  # [T]
    if T == 0:
        return out
    if block is None:
        block = 1024 if triton_interpreting() else 4096
    acc = torch.zeros(2, dtype=torch.float32, device=x.device)  # [sum, m2]
    cnt = torch.zeros(1, dtype=torch.int32, device=x.device)  # [count]
    m = mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask
    msk = m if m is not None else cnt  # placeholder pointer when absent
    grid = (triton.cdiv(T, block),)
    kw = {"HAS_MASK": mask is not None, "BLOCK": block}
    _whiten_sum_kernel[grid](x, msk, acc, cnt, T, **kw)
    _whiten_m2_kernel[grid](x, msk, acc, cnt, T, **kw)
    _whiten_out_kernel[grid](x, msk, acc, cnt, out, T, eps, SHIFT_MEAN=shift_mean, **kw)
    return out
