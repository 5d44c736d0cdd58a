from __future__ import annotations

import math

import pytest
import torch
from algo_testutil import packed_batch

from lightning.algorithms.aggregate import (
    get_aggregator,
    seq_mean_token_mean,
    seq_mean_token_sum,
    token_mean,
)
from lightning.algorithms.cispo import cispo_loss
from lightning.algorithms.kl import kl_k1, kl_k2, kl_k3, kl_penalty_loss
from lightning.algorithms.ppo import ppo_clip_loss, truncated_is_weights

CU = torch.tensor([0, 2, 5])  # two sequences
MASK = torch.tensor([True, True, True, False, True])


def test_aggregators_hand_computed():
    x = torch.tensor([1.0, 3.0, 2.0, 100.0, 4.0])
    assert float(token_mean(x, MASK, CU)) == pytest.approx(10 / 4)
    assert float(seq_mean_token_mean(x, MASK, CU)) == pytest.approx((2 + 3) / 2)
    assert float(seq_mean_token_sum(x, MASK, CU)) == pytest.approx((4 + 6) / 2)
    # a fully masked sequence is left out of the sequence mean; nothing at all gives 0
    m = torch.tensor([False, False, True, False, True])
    assert float(seq_mean_token_mean(x, m, CU)) == pytest.approx(3.0)
    assert float(seq_mean_token_sum(x, m, CU)) == pytest.approx(6.0)
    none = torch.zeros(5, dtype=torch.bool)
    assert all(
        float(f(x, none, CU)) == 0.0 for f in (token_mean, seq_mean_token_mean, seq_mean_token_sum)
    )
    assert get_aggregator("token-mean") is token_mean
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        get_aggregator("mean")


def _ppo(logp, old, adv, **kw):
    mask = torch.ones_like(logp, dtype=torch.bool)
    cu = torch.tensor([0, logp.numel()])
    return ppo_clip_loss(logp, old, adv, mask, cu, **kw)


def test_ppo_hand_computed_and_gradients():
    # ratios: 1.0 (inside), 1.5 (A>0: clipped at 1.2), 0.5 (A<0: clipped at 0.8), 5.0 (A<0: dual clip at 3)
    ratio = torch.tensor([1.0, 1.5, 0.5, 5.0])
    adv = torch.tensor([2.0, 1.0, -1.0, -1.0])
    old = torch.full((4,), -1.0)
    logp = (old + ratio.log()).requires_grad_()
    loss, st = _ppo(logp, old, adv)
    per_token = torch.tensor([-2.0, -1.2, 0.8, 3.0])
    assert float(loss.detach()) == pytest.approx(float(per_token.mean()), rel=1e-6)
    loss.backward()
    # only the unclipped token has a gradient: d(-A r)/dlogp = -A r / 4 (token mean)
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, 0.0, 0.0, 0.0]))
    # PPO clip active (l2 > l1) on tokens 1 and 2; token 3 has l1 > l2, the dual clip binds
    assert float(st.clip_frac) == pytest.approx(0.5)
    assert float(st.clip_frac_lower) == pytest.approx(0.25)
    assert float(st.ratio_max) == pytest.approx(5.0, rel=1e-6)
    assert float(st.ratio_mean) == pytest.approx(2.0, rel=1e-6)
    assert float(st.approx_kl) == pytest.approx(-float(ratio.log().mean()), rel=1e-6)
    assert not any(s.requires_grad for s in st)


def test_ppo_asymmetric_clip_no_dual_clip_and_is_weights():
    ratio = torch.tensor([1.25, 5.0])
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    logp = ratio.log()
    loss, st = _ppo(logp, old, adv, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=None)
    # 1.25 < 1.28: not clipped; no dual clip, so the ratio 5 counts in full
    assert float(loss.detach()) == pytest.approx((-1.25 + 5.0) / 2, rel=1e-6)
    assert float(st.clip_frac_lower) == 0.0
    w = torch.tensor([0.5, 2.0])
    loss_w, _ = _ppo(logp, old, adv, clip_ratio_high=0.28, is_weights=w)
    assert float(loss_w) == pytest.approx((-1.25 * 0.5 + 3.0 * 2.0) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        _ppo(logp, old, adv, clip_ratio_c=1.0)


def test_ppo_masked_tokens_get_no_gradient_and_agg_modes():
    cu, mask, logp, old, adv = packed_batch([5, 9, 1, 7], seed=3)
    logp = logp.clone().requires_grad_()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        logp.grad = None
        loss, _ = ppo_clip_loss(logp, old, adv, mask, cu, agg=agg)
        loss.backward()
        assert bool((logp.grad[~mask] == 0).all())
        assert math.isfinite(float(loss.detach()))


def test_truncated_is_weights():
    old = torch.tensor([0.0, 0.0, -1.0])
    sampler = torch.tensor([0.0, -2.0, 0.0])
    torch.testing.assert_close(
        truncated_is_weights(old, sampler, cap=2.0), torch.tensor([1.0, 2.0, math.exp(-1)])
    )


def test_cispo_hand_computed_gradient_flows_through_clipped_tokens():
    ratio = torch.tensor([1.0, 1.5, 0.5])
    adv = torch.tensor([1.0, 2.0, -1.0])
    old = torch.full((3,), -1.0)
    logp = (old + ratio.log()).requires_grad_()
    mask = torch.ones(3, dtype=torch.bool)
    loss, st = cispo_loss(
        logp, old, adv, mask, torch.tensor([0, 3]), clip_ratio_low=0.2, clip_ratio_high=0.2
    )
    w = torch.tensor([1.0, 1.2, 0.8])
    assert float(loss.detach()) == pytest.approx(float((-w * adv * logp.detach()).mean()), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w * adv / 3)  # every token keeps a gradient
    assert float(st.clip_frac) == pytest.approx(2 / 3)
    # default: no lower bound
    _, st2 = cispo_loss(logp.detach(), old, adv, mask, torch.tensor([0, 3]))
    assert float(st2.clip_frac) == pytest.approx(1 / 3)


def test_kl_estimators_hand_computed():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    d = logp - ref  # [0, -1, 1]
    torch.testing.assert_close(kl_k1(logp, ref), d)
    torch.testing.assert_close(kl_k2(logp, ref), 0.5 * d**2)
    torch.testing.assert_close(kl_k3(logp, ref), torch.exp(-d) - 1 + d)
    assert bool((kl_k3(logp, ref) >= 0).all())
    # log-ratio clamped to [-20, 20], the estimate to [-10, 10]: e^-20 + 20 - 1 -> 10
    assert float(kl_k3(torch.tensor([0.0]), torch.tensor([-50.0]))) == 10.0
    assert float(kl_k3(torch.tensor([-50.0]), torch.tensor([0.0]))) == 10.0


def test_kl_penalty_loss_gradient_and_stats():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0]).requires_grad_()
    ref = torch.tensor([-1.0, -1.0, -1.5, 0.0])
    mask = torch.tensor([True, True, True, False])
    loss, st = kl_penalty_loss(logp, ref, mask, torch.tensor([0, 4]), estimator="k2")
    assert float(loss.detach()) == pytest.approx((0 + 0.5 + 0.5) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -1 / 3, 1 / 3, 0.0]))
    assert float(st.kl_max) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty_loss(logp, ref, mask, torch.tensor([0, 4]), estimator="k9")
