"""The stated rules for sampling parameters and missing data, from transition to step:
per-token sampling in the batch, unknown versions, missing log-probs (recompute or drop),
sub-batch selection, and the rate-limited gap warning."""

from __future__ import annotations

import math
from array import array

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning_backends._common import check_batch, scalar_sampling_problem
from structlog.testing import capture_logs

from lightning._protocol import Sampling, Transition, pack_ids, pack_logprobs
from lightning._sequences import TokenSequence, merge_transitions
from lightning.training.batch import pack_sequences, resolve_sampling, select_sequences
from lightning.training.batcher import Batch, Batcher, BatcherConfig

from test_batcher import traj
from test_trainer import FakeBackend, make_daemon


def _t(resp, sampling=None, lps=True, version=0, prompt=(1, 2)):
    return Transition(rollout_id="r", index=0, prompt_ids=pack_ids(list(prompt)),
                      response_ids=pack_ids(resp),
                      logprobs=pack_logprobs([-1.0] * len(resp)) if lps else b"",
                      policy_version=version, sampling=sampling)


def test_batch_carries_each_tokens_sampling_and_resolves_the_rules():
    s1 = Sampling(temperature=0.7, top_p=0.9, logprobs="processed")
    s2 = Sampling(temperature=0.0, top_k=5, logprobs="processed")
    turn2 = Transition(rollout_id="r", index=1, prompt_ids=pack_ids([1, 2, 3, 4, 9]),
                       response_ids=pack_ids([6]), logprobs=pack_logprobs([-1.0]), sampling=s2)
    seqs = merge_transitions([_t([3, 4], s1), turn2]) + merge_transitions([_t([7])])
    batch = pack_sequences(seqs, [1.0, 1.0])
    act = batch.action_mask
    assert batch.temperature[act].tolist()[:3] == pytest.approx([0.7, 0.7, 0.0])
    assert math.isnan(batch.temperature[act][3])  # no sampling: unknown
    assert batch.top_p[act].tolist() == pytest.approx([0.9, 0.9, 1.0, 1.0])
    assert batch.top_k[act].tolist() == [0, 0, 5, 0]
    assert (batch.temperature[~act] == 1).all()
    t, k, p, counts = resolve_sampling(batch, 1.3)
    assert t[act].tolist() == pytest.approx([0.7, 0.7, 1.0, 1.3])  # greedy -> 1, unknown -> 1.3
    assert k[act].tolist() == [0, 0, 0, 0]  # greedy: full vocabulary (top_k 5 dropped)
    assert p[act].tolist() == pytest.approx([0.9, 0.9, 1.0, 1.0])
    assert counts == {"data/unknown_temperature_tokens": 1.0, "data/greedy_tokens": 1.0}
    assert check_batch(batch, 1.3) == counts
    assert "another temperature" in scalar_sampling_problem(batch, 0.7)
    plain = pack_sequences(merge_transitions([_t([3, 4], Sampling(temperature=0.7))]), [1.0])
    assert scalar_sampling_problem(plain, 0.7) is None


def test_a_step_refuses_nan_old_logprobs():
    batch = pack_sequences(merge_transitions([_t([3, 4], lps=False)]), [1.0])
    with pytest.raises(ValueError, match="2 action tokens have no usable old log-prob"):
        check_batch(batch, 1.0)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(2, 6), min_size=1, max_size=6), data=st.data())
def test_select_sequences_takes_exactly_those_tokens(lengths, data):
    seqs = []
    for b, n in enumerate(lengths):
        seqs.append(TokenSequence(
            token_ids=array("i", [100 * b + i for i in range(n)]),
            action_mask=bytearray([0] + [1] * (n - 1)), logprobs=array("f", [0.0] * n),
            policy_versions=array("i", [b] * n), transitions=[0], prompt_len=1,
            response_spans=[(1, n)], sampling=[Sampling(temperature=0.1 * (b + 1))]))
    batch = pack_sequences(seqs, [float(b) for b in range(len(lengths))])
    idx = sorted(data.draw(st.sets(st.integers(0, len(lengths) - 1))))
    sub, pos = select_sequences(batch, torch.tensor(idx, dtype=torch.long))
    assert sub.num_sequences == len(idx)
    assert sub.input_ids.tolist() == [100 * b + i for b in idx for i in range(lengths[b])]
    assert torch.equal(batch.input_ids[pos], sub.input_ids)
    assert sub.policy_versions.tolist() == idx
    assert torch.equal(sub.temperature, batch.temperature[pos])
    assert sub.cu_seqlens.tolist()[-1] == sub.num_tokens


def test_unknown_versions_are_the_version_current_on_arrival_counted_and_warned_once():
    b = Batcher(BatcherConfig(group_size=2, batch_size=2, credit="final", max_staleness=1))
    with capture_logs() as logs:
        b.add(traj(1.0, version=-1), version=7)
        b.add(traj(0.0, version=-1), version=7)
    assert b.counters["unknown_version_transitions"] == 2
    assert [e["event"] for e in logs].count("batcher.unknown_policy_version") == 1
    out = b.next_batch(8)  # one version later: within max_staleness, nothing dropped
    assert out is not None and out.batch.policy_versions.tolist() == [7, 7]
    assert out.metrics["batch/dropped_stale"] == 0
    # without a version given, the one last passed to next_batch
    b.add(traj(1.0, version=-1))
    b.add(traj(0.0, version=-1))
    assert b.next_batch(8).batch.policy_versions.tolist() == [8, 8]


def _no_lp_traj(reward):
    t = traj(reward)
    return msgspec.structs.replace(
        t, transitions=[msgspec.structs.replace(x, logprobs=b"") for x in t.transitions])


@pytest.mark.parametrize("mode", ["recompute", "drop"])
def test_missing_logprobs_are_recomputed_or_dropped_never_zero(mode):
    b = Batcher(BatcherConfig(group_size=3, batch_size=3, credit="final", missing_logprobs=mode))
    for t in (traj(1.0), _no_lp_traj(0.0), traj(0.5)):
        b.add(t)
    out = b.next_batch(0)
    if mode == "drop":
        assert out.batch.num_sequences == 2
        assert b.counters["sequences_dropped_no_logprobs"] == 1
        assert out.metrics["batch/dropped_no_logprobs"] == 1
        assert not torch.isnan(out.batch.old_logprobs).any()
    else:
        assert out.batch.num_sequences == 3
        assert out.metrics["batch/recomputed_logprob_tokens"] == 2
        act = out.batch.action_mask
        assert int(torch.isnan(out.batch.old_logprobs[act]).sum()) == 2
        assert (out.batch.old_logprobs[act] != 0).all()  # never a silent 0


def test_trainer_recomputes_only_the_sequences_that_need_it(tmp_path):
    from lightning.training.trainer import Trainer

    seen = []

    class Scorer(FakeBackend):
        def compute_logprobs(self, batch):
            seen.append(batch.input_ids.tolist())
            return torch.where(batch.action_mask, -0.25, 0.0)  # [T]

    seqs = merge_transitions([_t([3, 4])]) + merge_transitions([_t([5, 6], lps=False)]) \
        + merge_transitions([_t([7, 8], version=0)])
    batch = pack_sequences(seqs, [1.0, 1.0, 1.0])
    trainer = Trainer(make_daemon(tmp_path / "d"), Scorer(), None,
                      batcher=Batcher(BatcherConfig(stale_policy="is")))
    out = trainer._rescore(Batch(batch, [], torch.tensor([False, False, True]), {}))
    assert seen == [[1, 2, 5, 6, 1, 2, 7, 8]]  # the missing one and the stale one, only
    act = out.action_mask
    assert out.old_logprobs[act].tolist() == pytest.approx([-1.0, -1.0, -0.25, -0.25, -0.25, -0.25])
    # stale: truncated_is_weights(exp(-0.25 - -1)) = 2.117 -> cap 2; missing: weight 1
    assert out.is_weights[act].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0, 2.0, 2.0])
    untouched = trainer._rescore(Batch(pack_sequences(seqs[:1], [1.0]), [], torch.tensor([False]), {}))
    assert len(seen) == 1 and untouched.is_weights is None
    trainer.daemon._wal.close()


def test_on_policy_gap_warning_is_loud_and_rate_limited(tmp_path):
    from lightning.training.trainer import Trainer, TrainerConfig

    trainer = Trainer(make_daemon(tmp_path / "d"), FakeBackend(), None,
                      config=TrainerConfig(gap_warn=0.01, gap_warn_every=3))
    with capture_logs() as logs:
        for step in range(7):
            trainer.step = step
            trainer._check_gap({"actor/logprob_gap": 0.5}, on_policy=True)
            trainer._check_gap({"actor/logprob_gap": 0.5}, on_policy=False)  # never warns
            trainer._check_gap({"actor/logprob_gap": 0.001}, on_policy=True)
    warned = [e["step"] for e in logs if e["event"] == "trainer.logprob_gap"]
    assert warned == [1, 4, 7]
    trainer.daemon._wal.close()
