"""lightning.algorithms against verl's ``core_algos`` on the same inputs (skipped without verl).

Run with ``/work/venv-verl/bin/python -m pytest tests/algorithms -q`` (verl 0.9.1). Layout:
verl takes padded ``[B, L]`` tensors with a ``response_mask``; we take the packed ``[T]``
tokens of the same rows (``x[valid]``, ``cu_seqlens`` from the row lengths) with the action
mask. Masked tokens inside a row (tool output) are kept in both, padding only in verl's.

Tolerances (float32 inputs): advantages and losses ``atol = rtol = 1e-5``; anything whitened
(REINFORCE++, GAE) ``1e-4`` (we accumulate the statistics in float64, verl in float32).
By-design differences, so avoided here: verl gives groups of one the raw score (we give 0),
so groups have >= 2 samples; verl writes values on masked tokens where we write 0, so
token outputs are compared on action tokens.
"""

from __future__ import annotations

import types
import warnings

import numpy as np
import pytest
import torch

from lightning.algorithms.aggregate import AGGREGATORS
from lightning.algorithms.cispo import cispo_loss
from lightning.algorithms.gae import gae_advantages
from lightning.algorithms.grpo import grpo_advantages, grpo_advantages_no_std
from lightning.algorithms.kl import kl_k1, kl_k2, kl_k3
from lightning.algorithms.ppo import ppo_clip_loss
from lightning.algorithms.reinforce_pp import reinforce_pp_token_advantages
from lightning.algorithms.rloo import rloo_advantages
from lightning.algorithms.tokens import broadcast_to_tokens, place_at_last_action

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # verl's import chain (ray, transformers) warns freely
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

TIGHT = {"atol": 1e-5, "rtol": 1e-5}
WHITENED = {"atol": 1e-4, "rtol": 1e-4}


def call_verl(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the verl API
        return fn(*args, **kwargs)


def padded(B: int, L: int, seed: int):
    """A verl-style padded batch, plus the packed view of it."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (B,), generator=g)  # [B]
    lengths[0] = L
    valid = torch.arange(L)[None, :] < lengths[:, None]  # [B, L]
    action = valid & (torch.rand(B, L, generator=g) > 0.3)  # [B, L]: tool tokens masked
    action[:, 0] = True
    if B > 2:
        action[2, :] = False  # a row without action tokens
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])  # [B + 1]
    return g, valid, action, cu


def outcome_rewards(scores: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """verl's token_level_rewards: the score on each row's last action token."""
    L = action.shape[1]
    last = torch.where(action, torch.arange(L), -1).amax(dim=1)  # [B]
    out = torch.zeros(action.shape)  # [B, L]
    has = last >= 0
    out[has.nonzero().squeeze(1), last[has]] = scores[has]
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grpo(norm):
    g = torch.Generator().manual_seed(1)
    N, L = 24, 6
    ids = torch.randperm(N, generator=g) % 6  # 6 groups of 4
    ids[ids == 5] = torch.tensor([5, 5, 4, 4])  # uneven: groups of 2 and 6
    scores = torch.randn(N, generator=g)  # [N]
    mask = torch.ones(N, L)
    v_adv, _ = call_verl(
        core_algos.compute_grpo_outcome_advantage,
        outcome_rewards(scores, mask.bool()),
        mask,
        ids.numpy(),
        norm_adv_by_std_in_grpo=norm,
    )
    ours = grpo_advantages(scores, ids) if norm else grpo_advantages_no_std(scores, ids)  # [N]
    torch.testing.assert_close(ours, v_adv[:, 0], **TIGHT)
    cu = torch.arange(0, N * L + 1, L)
    torch.testing.assert_close(
        broadcast_to_tokens(ours, cu, mask.flatten().bool()), v_adv.flatten(), **TIGHT
    )


def test_rloo():
    g = torch.Generator().manual_seed(2)
    ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3])
    scores = torch.randn(len(ids), generator=g)
    mask = torch.ones(len(ids), 3)
    v_adv, _ = call_verl(
        core_algos.compute_rloo_outcome_advantage, outcome_rewards(scores, mask.bool()), mask, ids
    )
    torch.testing.assert_close(rloo_advantages(scores, torch.from_numpy(ids)), v_adv[:, 0], **TIGHT)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus(gamma):
    g, valid, action, cu = padded(8, 20, seed=3)
    scores = torch.randn(8, generator=g)
    v_adv, v_ret = call_verl(
        core_algos.compute_reinforce_plus_plus_outcome_advantage,
        outcome_rewards(scores, action),
        action.float(),
        config=types.SimpleNamespace(gamma=gamma),
    )
    mask = action[valid]  # [T]
    rewards = place_at_last_action(scores, cu, mask)  # [T]
    adv, ret = reinforce_pp_token_advantages(rewards, mask, cu, gamma=gamma)
    torch.testing.assert_close(ret[mask], v_ret[action], **TIGHT)
    torch.testing.assert_close(adv[mask], v_adv[action], **WHITENED)


def test_gae():
    g, valid, action, cu = padded(8, 30, seed=4)
    rewards = torch.randn(action.shape, generator=g) * action  # [B, L]
    values = torch.randn(action.shape, generator=g)  # [B, L]
    v_adv, v_ret = call_verl(
        core_algos.compute_gae_advantage_return, rewards, values, action.float(), 0.99, 0.95
    )
    mask = action[valid]
    adv, ret = gae_advantages(rewards[valid], values[valid], mask, cu, gamma=0.99, lam=0.95)
    torch.testing.assert_close(ret[mask], v_ret[action], **TIGHT)
    torch.testing.assert_close(adv[mask], v_adv[action], **WHITENED)


@pytest.mark.parametrize("agg", sorted(AGGREGATORS))
def test_agg_loss(agg):
    g, valid, action, cu = padded(7, 25, seed=5)
    loss_mat = torch.randn(action.shape, generator=g)  # [B, L]
    want = call_verl(core_algos.agg_loss, loss_mat, action.float(), agg)
    got = AGGREGATORS[agg](loss_mat[valid], action[valid], cu)
    torch.testing.assert_close(got, want, **TIGHT)


def policy_inputs(seed: int):
    g, valid, action, cu = padded(6, 40, seed=seed)
    old = -torch.rand(action.shape, generator=g) * 4  # [B, L]
    # ratios well outside the clip range
    logp = old + torch.randn(action.shape, generator=g) * 0.4  # [B, L]
    adv = torch.randn(action.shape, generator=g) * 2  # [B, L]
    isw = torch.rand(action.shape, generator=g) * 2  # [B, L]
    logp[:2, 0] = old[:2, 0] + 1.5  # ratio e^1.5 > clip_ratio_c ...
    adv[:2, 0] = -1.0  # ... on negative advantages: the dual clip binds
    return valid, action, cu, old, logp, adv, isw


def actor_config(low: float, high: float, c: float = 3.0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ActorConfig(
            strategy="fsdp",
            rollout_n=1,
            clip_ratio=0.2,
            clip_ratio_low=low,
            clip_ratio_high=high,
            clip_ratio_c=c,
            ppo_mini_batch_size=1,
            ppo_micro_batch_size_per_gpu=1,
        )


@pytest.mark.parametrize("agg", sorted(AGGREGATORS))
@pytest.mark.parametrize(("low", "high", "weighted"), [(0.2, 0.2, False), (0.2, 0.28, True)])
def test_ppo_clip_loss_and_gradients(agg, low, high, weighted):
    valid, action, cu, old, logp, adv, isw = policy_inputs(seed=6)
    v_logp = logp.clone().requires_grad_()
    v_loss, metrics = call_verl(
        core_algos.compute_policy_loss_vanilla,
        old,
        v_logp,
        adv,
        action.float(),
        agg,
        config=actor_config(low, high),
        rollout_is_weights=isw if weighted else None,
    )
    v_loss.backward()
    p_logp = logp[valid].clone().requires_grad_()
    loss, st = ppo_clip_loss(
        p_logp,
        old[valid],
        adv[valid],
        action[valid],
        cu,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=3.0,
        is_weights=isw[valid] if weighted else None,
        agg=agg,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), v_loss.detach(), **TIGHT)
    torch.testing.assert_close(p_logp.grad, v_logp.grad[valid], **TIGHT)
    assert float(st.clip_frac) == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert float(st.clip_frac_lower) == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)
    assert float(st.approx_kl) == pytest.approx(metrics["actor/ppo_kl"], abs=1e-5)
    assert float(st.clip_frac) > 0 and float(st.clip_frac_lower) > 0  # both clips exercised


def test_ppo_matches_deprecated_compute_policy_loss():
    valid, action, cu, old, logp, adv, _ = policy_inputs(seed=7)
    v_loss, v_clip, v_kl, v_lower = call_verl(
        core_algos.compute_policy_loss,
        old,
        logp,
        adv,
        action.float(),
        cliprange=0.2,
        clip_ratio_c=2.5,
        loss_agg_mode="token-mean",
    )
    loss, st = ppo_clip_loss(
        logp[valid], old[valid], adv[valid], action[valid], cu, clip_ratio_c=2.5
    )
    torch.testing.assert_close(loss, v_loss, **TIGHT)
    torch.testing.assert_close(st.clip_frac, v_clip, **TIGHT)
    torch.testing.assert_close(st.clip_frac_lower, v_lower, **TIGHT)
    torch.testing.assert_close(st.approx_kl, v_kl, **TIGHT)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_cispo_loss_and_gradients(agg):
    valid, action, cu, old, logp, adv, isw = policy_inputs(seed=8)
    v_logp = logp.clone().requires_grad_()
    v_loss, metrics = call_verl(
        core_algos.compute_policy_loss_cispo,
        old,
        v_logp,
        adv,
        action.float(),
        agg,
        config=actor_config(0.2, 0.28),
        rollout_is_weights=isw,
    )
    v_loss.backward()
    p_logp = logp[valid].clone().requires_grad_()
    loss, st = cispo_loss(
        p_logp,
        old[valid],
        adv[valid],
        action[valid],
        cu,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        is_weights=isw[valid],
        agg=agg,
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), v_loss.detach(), **TIGHT)
    torch.testing.assert_close(p_logp.grad, v_logp.grad[valid], **TIGHT)
    assert float(st.clip_frac) == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)


@pytest.mark.parametrize(("ours", "name"), [(kl_k1, "k1"), (kl_k2, "mse"), (kl_k3, "low_var_kl")])
def test_kl_penalty(ours, name):
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(4, 50, generator=g) * 5
    ref = logp + torch.randn(4, 50, generator=g) * 2
    ref[0, :3] = torch.tensor([-60.0, 30.0, 0.0])  # hits the k3 clamps
    want = call_verl(core_algos.kl_penalty, logp, ref, name)
    torch.testing.assert_close(ours(logp.flatten(), ref.flatten()), want.flatten(), **TIGHT)
