"""GAE and discounted returns over packed variable-length sequences: the specification.

Layout (no padding): ``B`` sequences are concatenated into 1-D tensors of ``T`` tokens;
sequence ``b`` covers tokens ``cu_seqlens[b]:cu_seqlens[b + 1]`` (``cu_seqlens[0] == 0``,
``cu_seqlens[B] == T``, non-decreasing; empty sequences allowed).

Inputs
    rewards[T]      float32/float16/bfloat16. A reward must sit on an action token: rewards
                    on masked tokens are ignored.
    values[T]       critic values, same dtype as rewards, or ``None`` (no critic).
    mask[T]         bool (or 0/1 integers): 1 = action token that counts (sampled by the
                    policy), 0 = masked token (prompt, tool output, padding). ``None`` = all 1.
    cu_seqlens[B+1] int32/int64.
    gamma, lam      floats in [0, 1].

Recursion, per sequence, backwards over its tokens, starting with ``A = 0`` and
``V_next = 0`` past the last token (the sequence end bootstraps with 0)::

    action token t:  delta_t = r_t + gamma * V_next - V_t
                     A_t     = delta_t + gamma * lam * A
                     A, V_next = A_t, V_t
                     advantages[t] = A_t,  returns[t] = A_t + V_t
    masked token t:  advantages[t] = returns[t] = 0, and (A, V_next) pass through unchanged.

So masked tokens carry the state through and discounting counts action tokens only: an
agent turn followed by 500 tokens of tool output is discounted by one step of ``gamma``,
not 501. ``values=None`` means ``V == 0`` everywhere and ``lam`` is ignored (taken as 1),
so ``advantages == returns`` == the discounted return-to-go over action tokens.

Outputs: ``advantages[T]``, ``returns[T]``, float32 (math is float32 for every input dtype).

Relation to verl's ``compute_gae_advantage_return`` (padded ``[bs, L]`` layout with a
``response_mask``): the recursion over action tokens is the same (observation tokens pass
``nextvalues`` and ``lastgaelam`` through), but verl writes the carried advantage on masked
positions instead of 0, computes returns on every position, and whitens the advantages
with the mask before returning them. On action tokens, ``masked_whiten(our advantages)``
equals verl's advantages and our returns equal verl's returns.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    gamma: float,
    lam: float,
) -> None:
    """Raise ``ValueError`` naming the bad argument. Contents of ``cu_seqlens`` are checked
    when it lives on the CPU (on an accelerator that would cost a synchronisation)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [T], got shape {tuple(rewards.shape)}")
    if rewards.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rewards must be float32, float16 or bfloat16, got {rewards.dtype}")
    T = rewards.numel()
    if values is not None:
        if values.shape != rewards.shape:
            raise ValueError(f"values must have shape {tuple(rewards.shape)}, got {tuple(values.shape)}")
        if values.dtype not in FLOAT_DTYPES:
            raise ValueError(f"values must be float32, float16 or bfloat16, got {values.dtype}")
        if values.device != rewards.device:
            raise ValueError(f"values must be on {rewards.device}, got {values.device}")
    if mask is not None:
        if mask.shape != rewards.shape:
            raise ValueError(f"mask must have shape {tuple(rewards.shape)}, got {tuple(mask.shape)}")
        if mask.device != rewards.device:
            raise ValueError(f"mask must be on {rewards.device}, got {mask.device}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise ValueError(f"mask must be bool or integer 0/1, got {mask.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != rewards.device:
        raise ValueError(f"cu_seqlens must be on {rewards.device}, got {cu_seqlens.device}")
    if cu_seqlens.device.type == "cpu":
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != T:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at T={T}, got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}"
            )
        if cu_seqlens.numel() > 1 and bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, float32 ``[T]`` each; see the module docstring."""
    check_inputs(rewards, values, mask, cu_seqlens, gamma, lam)
    device = rewards.device
    T = rewards.numel()
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()  # [B + 1]
    lengths = cu[1:] - cu[:-1]  # [B]
    L = int(lengths.max()) if B > 0 else 0
    if T == 0 or L == 0:
        return torch.zeros(T, device=device), torch.zeros(T, device=device)
    # Scatter the packed tokens into a padded [B, L] grid, scan the columns backwards.
    seq = torch.repeat_interleave(torch.arange(B, device=device), lengths)  # [T]
    pos = torch.arange(T, device=device) - cu[seq]  # [T]
    r = torch.zeros(B, L, device=device)  # [B, L]
    r[seq, pos] = rewards.float()
    v = torch.zeros(B, L, device=device)  # [B, L]
    if values is not None:
        v[seq, pos] = values.float()
    m = torch.zeros(B, L, dtype=torch.bool, device=device)  # [B, L]; padding counts as masked
    m[seq, pos] = True if mask is None else mask.bool()
    gl = gamma * lam if values is not None else gamma
    last_gae = torch.zeros(B, device=device)  # [B]
    next_value = torch.zeros(B, device=device)  # [B]
    adv = torch.zeros(B, L, device=device)  # [B, L]
    for t in reversed(range(L)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # [B]
        a_t = delta + gl * last_gae  # [B]
        last_gae = torch.where(m[:, t], a_t, last_gae)  # [B]
        next_value = torch.where(m[:, t], v[:, t], next_value)  # [B]
        adv[:, t] = torch.where(m[:, t], a_t, 0.0)
    ret = torch.where(m, adv + v, 0.0)  # [B, L]
    return adv[seq, pos], ret[seq, pos]


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor | None, cu_seqlens: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """Discounted return-to-go over action tokens, float32 ``[T]`` (0 on masked tokens)."""
    return gae(rewards, None, mask, cu_seqlens, gamma=gamma, lam=1.0)[1]
