from __future__ import annotations

import pytest
import torch

from lightning.algorithms.gae import gae_advantages
from lightning.algorithms.grpo import grpo_advantages, grpo_advantages_no_std
from lightning.algorithms.reinforce_pp import reinforce_pp_advantages, reinforce_pp_token_advantages
from lightning.algorithms.rloo import rloo_advantages
from lightning.algorithms.tokens import (
    broadcast_to_tokens,
    from_padded,
    place_at_last_action,
    seq_ids,
    to_padded,
)

IMPLS = ["reference", None]


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_hand_computed(impl):
    r = torch.tensor([1.0, 0.0, 3.0, 5.0, 7.0])
    g = torch.tensor([10, 10, 20, 20, 30])  # arbitrary labels; group 30 is a singleton
    # group 10: mean .5, std sqrt(.5); group 20: mean 4, std sqrt(2)
    s1, s2 = 0.5**0.5, 2.0**0.5
    want = torch.tensor(
        [0.5 / (s1 + 1e-6), -0.5 / (s1 + 1e-6), -1 / (s2 + 1e-6), 1 / (s2 + 1e-6), 0.0]
    )
    torch.testing.assert_close(grpo_advantages(r, g, impl=impl), want)
    torch.testing.assert_close(
        grpo_advantages_no_std(r, g, impl=impl), torch.tensor([0.5, -0.5, -1.0, 1.0, 0.0])
    )
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(r, g, eps=0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_rloo_hand_computed(impl):
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 9.0])
    g = torch.tensor([0, 0, 0, 1, 2])
    # sample 0: 1 - (2 + 6) / 2 = -3 ; 1: 2 - 3.5 = -1.5 ; 2: 6 - 1.5 = 4.5
    torch.testing.assert_close(
        rloo_advantages(r, g, impl=impl), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0])
    )


def test_reinforce_pp_sequence_level():
    r = torch.tensor([1.0, 2.0, 3.0])
    # mean 2, unbiased var 1
    torch.testing.assert_close(reinforce_pp_advantages(r), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(reinforce_pp_advantages(torch.tensor([5.0])), torch.tensor([0.0]))


def test_reinforce_pp_token_level_hand_computed():
    # one sequence: tokens [a, m, a], outcome 2 on the last action; gamma 0.5 -> returns [1, 0, 2]
    cu = torch.tensor([0, 3])
    mask = torch.tensor([True, False, True])
    rewards = place_at_last_action(torch.tensor([2.0]), cu, mask)  # [T]
    torch.testing.assert_close(rewards, torch.tensor([0.0, 0.0, 2.0]))
    adv, ret = reinforce_pp_token_advantages(rewards, mask, cu, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([1.0, 0.0, 2.0]))
    s = (0.5**0.5) ** -1  # kept values [1, 2]: mean 1.5, unbiased var .5
    torch.testing.assert_close(adv, torch.tensor([-0.5 * s, 0.0, 0.5 * s]))


def test_gae_advantages_no_whiten_hand_computed():
    cu = torch.tensor([0, 3])
    mask = torch.tensor([True, False, True])
    rewards = torch.tensor([0.0, 0.0, 1.0])
    values = torch.tensor([0.5, 9.0, 0.25])
    # t=2: delta = 1 - .25 = .75 = A2 ; t=0: delta = 0 + .9 * .25 - .5 = -.275, A0 = -.275 + .9*.5*.75
    adv, ret = gae_advantages(rewards, values, mask, cu, gamma=0.9, lam=0.5, whiten=False)
    a0 = -0.275 + 0.45 * 0.75
    torch.testing.assert_close(adv, torch.tensor([a0, 0.0, 0.75]))
    torch.testing.assert_close(ret, torch.tensor([a0 + 0.5, 0.0, 1.0]))
    w, _ = gae_advantages(rewards, values, mask, cu, gamma=0.9, lam=0.5)
    assert w[1] == 0 and abs(float(w[0] + w[2])) < 1e-6


def test_token_helpers():
    cu = torch.tensor([0, 2, 2, 5])  # an empty middle sequence
    mask = torch.tensor([True, True, False, True, False])
    assert seq_ids(cu).tolist() == [0, 0, 2, 2, 2]
    torch.testing.assert_close(
        broadcast_to_tokens(torch.tensor([1.0, 2.0, 3.0]), cu, mask),
        torch.tensor([1.0, 1.0, 0.0, 3.0, 0.0]),
    )
    torch.testing.assert_close(
        place_at_last_action(torch.tensor([1.0, 2.0, 3.0]), cu, mask),
        torch.tensor([0.0, 1.0, 0.0, 3.0, 0.0]),
    )
    x = torch.arange(5.0)
    p = to_padded(x, cu, pad=-1.0)
    torch.testing.assert_close(
        p, torch.tensor([[0.0, 1.0, -1.0], [-1.0, -1.0, -1.0], [2.0, 3.0, 4.0]])
    )
    torch.testing.assert_close(from_padded(p, cu), x)
    with pytest.raises(ValueError, match="values must be"):
        broadcast_to_tokens(torch.ones(2), cu)
