"""GAE and discounted returns over packed variable-length sequences.

The specification (semantics, shapes, dtypes) is :mod:`lightning.kernels.gae.reference`.
Implementations: ``reference``, ``cpp`` (CPU), ``triton`` (GPU, or CPU under
``TRITON_INTERPRET=1``), ``cuda`` (GPU, when ``lightning/_ext`` was built with CUDA).
"""

from __future__ import annotations

import torch

from lightning.kernels import _dispatch
from lightning.kernels.gae import reference

__all__ = ["IMPLS", "discounted_returns", "gae"]

IMPLS = ("reference", "cpp", "triton", "cuda")


def _prepare(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Contiguous inputs, values in the rewards' dtype (both fp32 when they differ), 1-byte mask."""
    if values is not None and values.dtype != rewards.dtype:
        rewards, values = rewards.float(), values.float()
    if mask is not None and mask.dtype not in (torch.bool, torch.uint8):
        mask = mask != 0  # [T] bool
    return (
        rewards.contiguous(),
        values.contiguous() if values is not None else None,
        mask.contiguous() if mask is not None else None,
    )


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns (float32 ``[T]`` each) over packed sequences.

    See :mod:`lightning.kernels.gae.reference` for the exact semantics (masked tokens
    carry the state through, discounting counts action tokens only, 0 past the end).

    Args:
        rewards: ``[T]`` float32/float16/bfloat16.
        values: ``[T]`` critic values, or None (no critic: returns are discounted returns).
        mask: ``[T]`` 1 = action token, 0 = masked token; None = all action tokens.
        cu_seqlens: ``[B + 1]`` int32/int64 sequence offsets.
        gamma, lam: discount and GAE lambda, in [0, 1].
        impl: None (fastest available) or one of ``reference``, ``cpp``, ``triton``, ``cuda``.

    Raises:
        ValueError: a bad argument (named in the message).
        KernelUnavailableError: ``impl`` was given and cannot run on these tensors.
    """
    reference.check_inputs(rewards, values, mask, cu_seqlens, gamma, lam)
    which = _dispatch.select("gae", rewards.device, impl, IMPLS, ext_op="gae")
    if which == "reference":
        return reference.gae(rewards, values, mask, cu_seqlens, gamma=gamma, lam=lam)
    rewards, values, mask = _prepare(rewards, values, mask)
    if which == "cpp":
        from lightning.kernels.gae import cpu

        return cpu.gae(rewards, values, mask, cu_seqlens, gamma, lam)
    if which == "cuda":
        from lightning.kernels.gae import cuda

        return cuda.gae(rewards, values, mask, cu_seqlens, gamma, lam)
    from lightning.kernels.gae import triton as gae_triton

    return gae_triton.gae(rewards, values, mask, cu_seqlens, gamma, lam)


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    impl: str | None = None,
) -> torch.Tensor:
    """Discounted return-to-go over action tokens, float32 ``[T]`` (0 on masked tokens)."""
    return gae(rewards, None, mask, cu_seqlens, gamma=gamma, lam=1.0, impl=impl)[1]
