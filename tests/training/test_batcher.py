"""Batcher: groups, timeouts, failure policy, advantages by hand, staleness, used indices."""

import math

import pytest
import torch

from lightning._ingest import Trajectory
from lightning._protocol import Reward, Transition, pack_ids, pack_logprobs
from lightning.training.batcher import Batcher, BatcherConfig, ConsumedSet

_index = iter(range(10**6))


def traj(reward, *, group="g", status="completed", version=0, turns=1, rewards=(), split=None,
         trainable=True, index=None):
    """A trajectory of ``turns`` transitions that extend each other (one merged sequence)."""
    ts, prompt = [], [1, 2]
    for k in range(turns):
        resp = [10 + k, 20 + k]
        ts.append(Transition(rollout_id="r", index=k, prompt_ids=pack_ids(prompt),
                             response_ids=pack_ids(resp) if trainable else b"",
                             logprobs=pack_logprobs([-1.0, -2.0]), policy_version=version,
                             trainable=trainable))
        prompt = prompt + resp + [5]  # glue token between turns
    return Trajectory(
        index=next(_index) if index is None else index, rollout_id=f"r{reward}", name="a",
        client_id="c", group_key=group, attempt=0, parent_id=None,
        metadata={"split": split} if split else {}, status=status, final_reward=reward,
        error=None, started_at=0.0, ended_at=1.0, transitions=ts,
        rewards=[Reward(rollout_id="r", value=v, after=a) for a, v in rewards],
        spans=[],
    )


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def action_advantages(batch):
    """Per sequence, the advantage on its action tokens (all equal per transition)."""
    out = []
    cu = batch.cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        m = batch.action_mask[cu[b]:cu[b + 1]]
        out.append(batch.advantages[cu[b]:cu[b + 1]][m].tolist())
    return out


def test_group_waits_for_group_size_then_grpo_by_hand():
    b = Batcher(BatcherConfig(group_size=4, batch_size=4, credit="final"))
    for r in (1.0, 0.0, 0.0):
        b.add(traj(r))
    assert b.next_batch(0) is None and b.pending_trajectories == 3
    b.add(traj(1.0))
    out = b.next_batch(0)
    assert out is not None and len(out.consumed) == 4
    # mean 0.5, unbiased std sqrt(1/3): (1 - 0.5) / 0.57735 = 0.866
    adv = [a[0] for a in action_advantages(out.batch)]
    s = math.sqrt(1 / 3)
    a, z = 0.5 / (s + 1e-6), -0.5 / (s + 1e-6)
    assert adv == pytest.approx([a, z, z, a], rel=1e-5)
    assert out.metrics["reward/mean"] == 0.5 and out.metrics["batch/groups"] == 1


@pytest.mark.parametrize(
    "estimator, expected",
    [
        # returns 3, 1, 2: mean 2, std 1
        ("grpo", [1.0, -1.0, 0.0]),
        ("grpo_no_std", [1.0, -1.0, 0.0]),
        # leave-one-out: 3 - 1.5, 1 - 2.5, 2 - 2
        ("rloo", [1.5, -1.5, 0.0]),
        # whitened over the batch: same as grpo here (one group)
        ("reinforce_pp", [1.0, -1.0, 0.0]),
    ],
)
def test_estimators_by_hand(estimator, expected):
    b = Batcher(BatcherConfig(group_size=3, batch_size=3, estimator=estimator, credit="final",
                              eps=1e-9))
    for r in (3.0, 1.0, 2.0):
        b.add(traj(r))
    out = b.next_batch(0)
    assert [a[0] for a in action_advantages(out.batch)] == pytest.approx(expected, abs=1e-5)


def test_step_rewards_give_per_transition_advantages_against_the_same_turn():
    # two turns; reward 1 emitted after turn 0, final 0 -> G = [1, 0] (returns_to_go);
    # the other trajectory: G = [0, 0]. Turn 0 returns 1 and 0: mean .5, std .7071;
    # turn 1 returns 0 and 0: equal, so both turn-1 advantages are 0.
    b = Batcher(BatcherConfig(group_size=2, batch_size=2, eps=1e-9))
    b.add(traj(0.0, turns=2, rewards=[(1, 1.0)]))
    b.add(traj(0.0, turns=2))
    out = b.next_batch(0)
    s = math.sqrt(0.5)
    a0, a1 = action_advantages(out.batch)
    assert a0 == pytest.approx([0.5 / s] * 2 + [0.0] * 2, rel=1e-5, abs=1e-6)
    assert a1 == pytest.approx([-0.5 / s] * 2 + [0.0] * 2, rel=1e-5, abs=1e-6)
    assert out.batch.num_sequences == 2  # each trajectory merged into one sequence


def test_the_old_first_turn_baseline_was_biased():
    """Old scheme: every turn's G_{i,k} against the group's first-turn returns. Both
    trajectories' second turns have the same return (0), yet it gave them -0.5/s, a
    systematic push down on every later turn whenever step rewards come early."""
    b = Batcher(BatcherConfig(group_size=2, batch_size=2, eps=1e-9))
    b.add(traj(0.0, turns=2, rewards=[(1, 1.0)]))
    b.add(traj(0.0, turns=2))
    out = b.next_batch(0)
    G = [[1.0, 0.0], [0.0, 0.0]]
    first = [g[0] for g in G]
    mean, std = sum(first) / 2, math.sqrt(0.5)
    old = [[(g - mean) / std for g in row] for row in G]
    new = [[a[0], a[2]] for a in action_advantages(out.batch)]
    assert old[0][1] == old[1][1] == pytest.approx(-0.7071, abs=1e-4)  # the bias
    assert new[0][1] == new[1][1] == pytest.approx(0.0, abs=1e-6)  # like with like
    assert sum(new[0][1:] + new[1][1:]) == pytest.approx(0.0, abs=1e-6)


def test_rloo_per_turn_by_hand_with_turns_of_different_reach():
    # three trajectories, returns-to-go: A (step reward 1 after turn 0, final 1): G = [2, 1];
    # B (final 1): G = [1, 1]; C (one turn, final 0): G = [0]
    b = Batcher(BatcherConfig(group_size=3, batch_size=3, estimator="rloo"))
    b.add(traj(1.0, turns=2, rewards=[(1, 1.0)]))  # G = [2, 1]
    b.add(traj(1.0, turns=2))  # G = [1, 1]
    b.add(traj(0.0, turns=1))  # G = [0]
    out = b.next_batch(0)
    adv = [[a[0]] + ([a[2]] if len(a) > 2 else []) for a in action_advantages(out.batch)]
    # turn 0: 2 - (1 + 0)/2 = 1.5, 1 - (2 + 0)/2 = 0, 0 - (2 + 1)/2 = -1.5
    # turn 1 (A and B only): 1 - 1 = 0 each
    assert adv == [pytest.approx([1.5, 0.0]), pytest.approx([0.0, 0.0]), pytest.approx([-1.5])]


def test_uniform_groups_are_set_aside_and_reported_consumed():
    b = Batcher(BatcherConfig(group_size=2, batch_size=2))
    t1, t2 = traj(1.0), traj(1.0)
    b.add(t1)
    b.add(t2)
    assert b.ready_trajectories == 0 and b.counters["set_aside.uniform_groups"] == 1
    t3, t4 = traj(1.0, group="h"), traj(0.0, group="h")
    b.add(t3)
    b.add(t4)
    out = b.next_batch(0)
    assert sorted(out.consumed) == sorted([t1.index, t2.index, t3.index, t4.index])
    assert b.counters["set_aside_train"] == 2


def test_timeout_closes_a_partial_group():
    clock = Clock()
    b = Batcher(BatcherConfig(group_size=8, batch_size=2, group_timeout_s=10), clock=clock)
    b.add(traj(1.0))
    b.add(traj(0.0))
    clock.t = 5.0
    b.expire()
    assert b.next_batch(0) is None and b.next_timeout() == pytest.approx(5.0)
    clock.t = 10.0
    b.expire()
    out = b.next_batch(0)
    assert out is not None and b.counters["groups_timed_out"] == 1


def test_failure_policy_drop_and_zero():
    drop = Batcher(BatcherConfig(group_size=2, batch_size=2))
    drop.add(traj(1.0, status="failed"))
    assert drop.counters["set_aside.failed"] == 1 and drop.pending_trajectories == 0
    zero = Batcher(BatcherConfig(group_size=2, batch_size=2, on_failure="zero", eps=1e-9))
    zero.add(traj(1.0, status="failed"))
    zero.add(traj(1.0))
    out = zero.next_batch(0)
    assert [a[0] for a in action_advantages(out.batch)] == pytest.approx(
        [-math.sqrt(0.5), math.sqrt(0.5)], rel=1e-5)


def test_ungrouped_trajectories_use_a_batch_baseline():
    b = Batcher(BatcherConfig(batch_size=3, credit="final", eps=1e-9))
    for r in (1.0, 2.0, 3.0):
        b.add(traj(r, group=None))
    out = b.next_batch(0)
    # whitened: (r - 2) / sqrt(var=1 + 1e-8)
    assert [a[0] for a in action_advantages(out.batch)] == pytest.approx([-1, 0, 1], abs=1e-4)


def test_eval_and_tokenless_rollouts_are_never_trained():
    b = Batcher(BatcherConfig(group_size=2, batch_size=2))
    e = traj(1.0, split="eval")
    n = traj(1.0, trainable=False)
    b.add(e)
    b.add(n)
    assert b.counters["set_aside.eval"] == 1 and b.counters["set_aside.no_tokens"] == 1
    assert b.ready_trajectories == 0 and sorted(b.take_set_aside()) == sorted([e.index, n.index])


def test_stale_sequences_dropped_or_marked():
    cfg = {"group_size": 2, "batch_size": 2, "max_staleness": 1}
    drop = Batcher(BatcherConfig(**cfg))
    drop.add(traj(1.0, version=0))
    drop.add(traj(0.0, version=3))
    out = drop.next_batch(3)  # first is 3 versions behind
    assert out.batch.num_sequences == 1 and out.metrics["batch/dropped_stale"] == 1
    assert len(out.consumed) == 2  # both used up
    keep = Batcher(BatcherConfig(**cfg, stale_policy="is"))
    keep.add(traj(1.0, version=0))
    keep.add(traj(0.0, version=3))
    out = keep.next_batch(3)
    assert out.stale.tolist() == [True, False]
    assert out.metrics["staleness/max"] == 3 and out.metrics["staleness/mean"] == 1.5


def test_batches_take_whole_groups_and_respect_the_token_budget():
    b = Batcher(BatcherConfig(group_size=2, batch_size=4, max_batch_tokens=12))
    for g in "abc":
        b.add(traj(1.0, group=g))
        b.add(traj(0.0, group=g))
    out = b.next_batch(0)  # each trajectory is 4 tokens: two groups would be 16 > 12
    assert out.metrics["batch/groups"] == 1
    out = b.next_batch(0, flush=True)
    assert out.metrics["batch/groups"] == 1


def test_packed_batch_carries_versions_and_sampler_logprobs():
    b = Batcher(BatcherConfig(group_size=2, batch_size=2))
    b.add(traj(1.0, version=4))
    b.add(traj(0.0, version=5))
    out = b.next_batch(5)
    assert out.batch.policy_versions.tolist() == [4, 5]
    lp = out.batch.old_logprobs[out.batch.action_mask]
    assert lp.tolist() == [-1.0, -2.0, -1.0, -2.0]
    assert torch.equal(out.batch.input_ids[:4], torch.tensor([1, 2, 10, 20]))


def test_consumed_set_watermark():
    c = ConsumedSet()
    for i in (1, 3, 0):
        c.add(i)
    assert c.through == 1 and c.above == {3} and 3 in c and 2 not in c
    c.add(2)
    assert c.through == 3 and not c.above
    assert ConsumedSet.from_dict(ConsumedSet(5, [7]).to_dict()).to_dict() == {"through": 5,
                                                                              "above": [7]}


def test_bad_config_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="group_size"):
        BatcherConfig(group_size=0)
    with pytest.raises(ValueError, match="gamma"):
        BatcherConfig(gamma=1.5)
