"""RL algorithms as pure torch functions: credit assignment, AIR, advantages, losses.

Import explicitly (``import lightning.algorithms``); ``import lightning`` never imports
torch. One file per algorithm (credit assignment and AIR are pure Python):

- :mod:`.credit` trajectory rewards -> one return per transition (``final``,
  ``discounted``, ``returns_to_go``); :mod:`.air` spans/tool calls -> step rewards.
- :mod:`.grpo`, :mod:`.rloo`, :mod:`.reinforce_pp`, :mod:`.gae`: advantages;
  :mod:`.tokens`: per-sample -> packed tokens, packed <-> padded.
- :mod:`.ppo`, :mod:`.cispo`, :mod:`.kl`: losses returning ``(loss, Stats)``;
  :mod:`.aggregate`: token-mean / seq-mean-token-mean / seq-mean-token-sum.

Packed layout everywhere: 1-D ``[T]`` tensors, ``cu_seqlens[B + 1]`` offsets, action ``mask[T]``.

What production runs: the batcher's estimators (``grpo``, ``grpo_no_std``, ``rloo``,
``reinforce_pp``) call :mod:`.grpo`, :mod:`.rloo` and :mod:`.reinforce_pp` here, and the
trainer's stale-sequence weights call :mod:`.ppo`'s ``truncated_is_weights``, so the verl
parity tests cover what trains. Two functions are library API only, on purpose:
``gae_advantages`` needs a value model, which no backend trains (there is no critic), and
``reinforce_pp_token_advantages`` differs from the sequence-level estimator only when
per-token rewards (a KL-in-reward term) are given, which the batcher does not make (its KL
is a loss term). Both keep their verl-parity tests for users who bring a critic or token
rewards to their own loop.
"""

from lightning.algorithms.aggregate import (
    AGGREGATORS,
    get_aggregator,
    seq_mean_token_mean,
    seq_mean_token_sum,
    token_mean,
)
from lightning.algorithms.air import AIR, StepReward, final_answer_format
from lightning.algorithms.cispo import CISPOStats, cispo_loss
from lightning.algorithms.credit import CREDIT, assign_credit, get_credit
from lightning.algorithms.gae import gae_advantages
from lightning.algorithms.grpo import grpo_advantages, grpo_advantages_no_std
from lightning.algorithms.kl import KL_ESTIMATORS, KLStats, kl_k1, kl_k2, kl_k3, kl_penalty_loss
from lightning.algorithms.ppo import PPOStats, ppo_clip_loss, truncated_is_weights
from lightning.algorithms.reinforce_pp import reinforce_pp_advantages, reinforce_pp_token_advantages
from lightning.algorithms.rloo import rloo_advantages
from lightning.algorithms.tokens import (
    broadcast_to_tokens,
    from_padded,
    place_at_last_action,
    to_padded,
)

__all__ = [
    "AGGREGATORS",
    "AIR",
    "CREDIT",
    "KL_ESTIMATORS",
    "CISPOStats",
    "KLStats",
    "PPOStats",
    "StepReward",
    "assign_credit",
    "broadcast_to_tokens",
    "cispo_loss",
    "final_answer_format",
    "from_padded",
    "gae_advantages",
    "get_aggregator",
    "get_credit",
    "grpo_advantages",
    "grpo_advantages_no_std",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty_loss",
    "place_at_last_action",
    "ppo_clip_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_token_advantages",
    "rloo_advantages",
    "seq_mean_token_mean",
    "seq_mean_token_sum",
    "to_padded",
    "token_mean",
    "truncated_is_weights",
]
