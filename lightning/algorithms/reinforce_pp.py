"""REINFORCE++: batch-level baseline by whitening, for samples without groups.

Two forms:

- :func:`reinforce_pp_advantages`: sequence level, ``A_i = (R_i - mean) / sqrt(var + eps)``
  over the batch (unbiased var). Every sample weighs the same.
- :func:`reinforce_pp_token_advantages`: the REINFORCE++ paper / verl form. Token rewards
  (e.g. the outcome on each sequence's last action token, see
  :func:`lightning.algorithms.tokens.place_at_last_action`) -> discounted returns-to-go over
  action tokens (:func:`lightning.kernels.discounted_returns`) -> whitened over all action
  tokens of the batch (:func:`lightning.kernels.masked_whiten`). Long sequences weigh more
  in the statistics. Equals verl's ``compute_reinforce_plus_plus_outcome_advantage`` on
  action tokens.
"""

from __future__ import annotations

import torch

from lightning.kernels import discounted_returns, masked_whiten

__all__ = ["reinforce_pp_advantages", "reinforce_pp_token_advantages"]


def reinforce_pp_advantages(
    returns: torch.Tensor, *, eps: float = 1e-8, impl: str | None = None
) -> torch.Tensor:
    """Batch-whitened returns, float32 ``[N]`` (0 for a batch of one)."""
    return masked_whiten(returns, None, eps=eps, impl=impl)  # [N]


def reinforce_pp_token_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    gamma: float = 1.0,
    eps: float = 1e-8,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level REINFORCE++: ``(advantages[T], returns[T])``, float32, 0 on masked tokens."""
    returns = discounted_returns(token_rewards, mask, cu_seqlens, gamma=gamma, impl=impl)  # [T]
    adv = masked_whiten(returns, mask, eps=eps, impl=impl)  # [T]
    return adv, returns
