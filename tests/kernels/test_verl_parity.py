"""Our kernels against verl's implementations, where verl is installed (skipped otherwise).

Differences that are by design (see the reference docstrings): verl whitens GAE
advantages inside ``compute_gae_advantage_return`` and writes values on masked positions;
GRPO groups of one get advantage = raw score in verl and 0 here. So we compare on action
tokens, whiten ours, and use groups of two or more.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning.kernels import gae, grpo_advantage, logprobs_from_logits, masked_whiten

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # verl's import chain (ray, transformers) warns freely
    try:
        from verl.trainer.ppo import core_algos as verl_algos
        from verl.utils import torch_functional as verl_F
    except ImportError:
        pytest.skip("verl is not installed", allow_module_level=True)


def padded_batch(B: int, L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)  # [B]
    valid = torch.arange(L)[None, :] < lengths[:, None]  # [B, L]
    action = valid & (torch.rand(B, L, generator=g) > 0.3)  # [B, L]: tool tokens masked
    action[:, 0] = True
    rewards = torch.randn(B, L, generator=g) * action  # [B, L]
    values = torch.randn(B, L, generator=g)  # [B, L]
    return lengths, valid, action, rewards, values


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_gae_matches_verl_on_action_tokens(impl):
    lengths, valid, action, rewards, values = padded_batch(8, 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v_adv, v_ret = verl_algos.compute_gae_advantage_return(rewards, values, action.float(), 0.99, 0.95)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # [B + 1]
    adv, ret = gae(rewards[valid], values[valid], action[valid], cu, gamma=0.99, lam=0.95, impl=impl)  # [T]
    keep = action[valid]  # [T]
    torch.testing.assert_close(ret[keep], v_ret[action], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_whiten(adv, keep, impl=impl)[keep], v_adv[action], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_verl(impl, norm):
    g = torch.Generator().manual_seed(1)
    N = 48
    ids = torch.randperm(N, generator=g) % 12  # 12 groups of 4
    scores = torch.randn(N, generator=g)
    token_rewards = torch.zeros(N, 5)
    token_rewards[:, -1] = scores
    v_adv, _ = verl_algos.compute_grpo_outcome_advantage(
        token_rewards, torch.ones(N, 5), np.array(ids.tolist()), norm_adv_by_std_in_grpo=norm
    )
    ours = grpo_advantage(scores, ids, norm_by_std=norm, impl=impl)
    torch.testing.assert_close(ours, v_adv[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_logprobs_match_verl(impl):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(33, 3001, generator=g) * 4
    ids = torch.randint(0, 3001, (33,), generator=g)
    theirs = verl_F.logprobs_from_logits(logits, ids)
    torch.testing.assert_close(logprobs_from_logits(logits, ids, impl=impl).logprobs, theirs, atol=2e-5, rtol=2e-5)
