"""GAE advantages (needs a critic's values) over packed sequences.

Via :func:`lightning.kernels.gae`: the recursion runs over action tokens only, masked
tokens (tool output, user turns) carry the state through, each sequence bootstraps with
0 past its end. By default the advantages are then whitened over the action tokens, as
PPO implementations (and verl's ``compute_gae_advantage_return``) do.
"""

from __future__ import annotations

import torch

from lightning.kernels import gae, masked_whiten

__all__ = ["gae_advantages"]


def gae_advantages(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten: bool = True,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages[T], returns[T])`` float32; returns are the critic's targets.

    Args:
        token_rewards: ``[T]`` rewards on action tokens (0 elsewhere).
        values: ``[T]`` critic values.
        mask: ``[T]`` action mask.
        cu_seqlens: ``[B + 1]`` sequence offsets.
        whiten: whiten the advantages over action tokens (0 on masked tokens either way).
    """
    out = gae(token_rewards, values, mask, cu_seqlens, gamma=gamma, lam=lam, impl=impl)  # [T] x 2
    adv, ret = out  # [T], [T]
    if whiten:
        adv = masked_whiten(adv, mask, impl=impl)  # [T]
    return adv, ret
