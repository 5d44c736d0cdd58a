from __future__ import annotations

import math

import pytest
from algo_testutil import reward, trajectory

from lightning.algorithms.air import StepReward
from lightning.algorithms.credit import (
    CREDIT,
    assign_credit,
    attribute,
    discounted,
    final,
    get_credit,
    per_transition_rewards,
    returns_to_go,
)


def test_attribution_rule():
    assert [attribute(a, 3) for a in (0, 1, 2, 3, 4, 99)] == [0, 0, 1, 2, 2, 2]


def test_per_transition_rewards_places_after_k_on_k_minus_1():
    assert per_transition_rewards(3, [(1, 0.5), (2, 0.25), (0, 1.0), (2, 1.0)], 2.0) == [
        1.5,
        1.25,
        2.0,
    ]
    assert per_transition_rewards(0, [(1, 1.0)], 1.0) == []


def test_final_gives_outcome_everywhere():
    assert final(3, [(1, 5.0)], 2.0) == [2.0, 2.0, 2.0]
    # no return value: the emitted rewards are the outcome
    assert final(2, [(2, 0.5), (2, 0.25)], None) == [0.75, 0.75]


def test_discounted():
    assert discounted(3, [], 1.0, gamma=0.5) == [0.25, 0.5, 1.0]
    assert discounted(1, [], -2.0, gamma=0.9) == [-2.0]


def test_returns_to_go_hand_computed():
    # r = [0.5, 0, 1 + 2] ; gamma = 0.5 -> G2 = 3, G1 = 1.5, G0 = 0.5 + 0.75 = 1.25
    assert returns_to_go(3, [(1, 0.5), (3, 1.0)], 2.0, gamma=0.5) == [1.25, 1.5, 3.0]
    assert returns_to_go(3, [(1, 0.5), (3, 1.0)], None, gamma=1.0) == [1.5, 1.0, 1.0]


def test_gamma_checked_and_registry():
    with pytest.raises(ValueError, match="gamma"):
        returns_to_go(2, [], 1.0, gamma=1.5)
    assert set(CREDIT) == {"final", "discounted", "returns_to_go"}
    assert get_credit("final") is final
    with pytest.raises(ValueError, match="unknown credit method"):
        get_credit("nope")


def test_assign_credit_on_trajectory_with_extra_rewards():
    t = trajectory(3, rewards=[reward(1, 0.5)], final_reward=1.0)
    extra = [StepReward(2, -0.1, "tool_call"), (3, 0.2)]
    assert assign_credit(t, "returns_to_go") == [1.5, 1.0, 1.0]
    # r = [0.5, -0.1, 0.2 + 1.0]
    assert assign_credit(t, "returns_to_go", extra_rewards=extra) == pytest.approx([1.6, 1.1, 1.2])
    assert assign_credit(t, "final", extra_rewards=extra) == [1.0, 1.0, 1.0]
    assert assign_credit(t, lambda n, r, f, gamma: [7.0] * n) == [7.0] * 3  # a user callable


def test_failed_trajectory_policy():
    t = trajectory(2, rewards=[reward(1, 0.5)], final_reward=1.0, status="failed")
    assert assign_credit(t) is None
    assert assign_credit(t, on_failure="zero") == [0.5, 0.0]
    assert assign_credit(t, "final", on_failure="zero", failure_reward=-1.0) == [-1.0, -1.0]
    assert assign_credit(trajectory(2, status="cancelled")) is None
    with pytest.raises(ValueError, match="on_failure"):
        assign_credit(t, on_failure="keep")  # type: ignore[arg-type]


def test_empty_and_non_finite():
    assert assign_credit(trajectory(0)) == []
    with pytest.raises(ValueError, match="finite"):
        per_transition_rewards(1, [(1, math.nan)])
