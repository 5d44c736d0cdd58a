"""Trainer: the loop over a real daemon's buffer, weight publishing, checkpoint and resume
(exactly-once training across a crash), importance weights for stale samples."""

from pathlib import Path

import anyio
import pytest
import torch

from lightning._config import DaemonConfig
from lightning._daemon import Daemon
from lightning._log import AppendLog
from lightning._protocol import RolloutEnd, RolloutStart, Transition, pack_ids, pack_logprobs
from lightning.training.batcher import Batch, Batcher, BatcherConfig
from lightning.training.trainer import Trainer, TrainerConfig, latest_checkpoint

MARK = 1000  # trajectory n's response holds token MARK + n: which ones a step trained on


class FakeBackend:
    def __init__(self):
        self.step = 0
        self.trained: list[set[int]] = []

    def train_step(self, batch):
        self.step += 1
        ids = batch.input_ids[batch.action_mask]
        self.trained.append({int(t) - MARK for t in ids if t >= MARK})
        return {"loss/total": 0.5, "actor/logprob_gap": 0.0}

    def compute_logprobs(self, batch):
        return torch.where(batch.action_mask, -1.0, 0.0)  # [T]

    def export_weights(self):
        return {"step": self.step}

    def save(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "step").write_text(str(self.step))

    def load(self, path):
        self.step = int((Path(path) / "step").read_text())


class FakeEngine:
    def __init__(self):
        self.policy_version = 0
        self.weights = []

    async def update_weights(self, weights, *, version=None):
        assert version is None or version > self.policy_version
        self.policy_version = version if version is not None else self.policy_version + 1
        self.weights.append(weights)
        return self.policy_version


def make_daemon(data_dir: Path, **cfg) -> Daemon:
    d = Daemon(DaemonConfig(data_dir=str(data_dir), stats_interval_s=0, **cfg))
    d._recover()
    d._wal = AppendLog(data_dir / "wal")
    return d


def ingest(daemon, n, *, reward, group, version=0):
    rid = f"r{n}"
    daemon.ingest_local(RolloutStart(rollout_id=rid, name="t", group_key=group))
    daemon.ingest_local(Transition(rollout_id=rid, index=0, prompt_ids=pack_ids([1, 2]),
                                   response_ids=pack_ids([MARK + n, 7]),
                                   logprobs=pack_logprobs([-1.0, -1.0]), policy_version=version))
    daemon.ingest_local(RolloutEnd(rollout_id=rid, final_reward=reward, n_transitions=1))


def ingest_groups(daemon, first, count, version=0):
    for n in range(first, first + count):
        ingest(daemon, n, reward=float(n % 2), group=f"g{n // 2}", version=version)


async def wait_for(pred, timeout=60.0):  # generous: a loaded box is slow, never wrong
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


def new_trainer(daemon, backend, engine, ckpt, save_every):
    return Trainer(daemon, backend, engine,
                   batcher=Batcher(BatcherConfig(group_size=2, batch_size=4)),
                   config=TrainerConfig(save_every=save_every), checkpoint_dir=ckpt)


async def test_steps_publish_weights_and_versions(tmp_path):
    daemon, backend, engine = make_daemon(tmp_path / "data"), FakeBackend(), FakeEngine()
    seen = []
    trainer = Trainer(daemon, backend, engine,
                      batcher=Batcher(BatcherConfig(group_size=2, batch_size=4)),
                      config=TrainerConfig(max_steps=2), on_step=seen.append)
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.run)
        ingest_groups(daemon, 0, 8)
        await wait_for(trainer.done.is_set)
    assert backend.trained == [{0, 1, 2, 3}, {4, 5, 6, 7}]
    assert engine.policy_version == 2 and engine.weights == [{"step": 1}, {"step": 2}]
    assert [m["train/policy_version"] for m in seen] == [1.0, 2.0]
    assert seen[0]["reward/mean"] == 0.5 and seen[0]["loss/total"] == 0.5
    daemon._wal.close()


@pytest.mark.parametrize("compact", [0, 1], ids=["full-log", "compacted-log"])
async def test_crash_after_checkpoint_trains_every_trajectory_exactly_once(tmp_path, compact):
    data, ckpt = tmp_path / "data", tmp_path / "data" / "checkpoints"
    # run 1: steps 1 and 2 (checkpoint at 2), step 3 trained but never checkpointed, crash
    daemon, backend, engine = make_daemon(data, wal_compact_bytes=compact), FakeBackend(), FakeEngine()
    trainer = new_trainer(daemon, backend, engine, ckpt, save_every=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.run)
        ingest_groups(daemon, 0, 12)
        await wait_for(lambda: trainer.step == 3)
        tg.cancel_scope.cancel()  # killed: no final checkpoint
    daemon._wal.close()
    assert backend.trained == [{0, 1, 2, 3}, {4, 5, 6, 7}, {8, 9, 10, 11}]
    assert latest_checkpoint(ckpt).name == "step-000002"
    assert (data / "cursor").read_text() == "7"

    assert (data / "snapshot.msgpack").exists() == bool(compact)
    # run 2: resumes at step 2 / version 2; step 3's data comes back and is trained once
    daemon, backend, engine = make_daemon(data, wal_compact_bytes=compact), FakeBackend(), FakeEngine()
    trainer = new_trainer(daemon, backend, engine, ckpt, save_every=2)
    assert await trainer.resume()
    assert (trainer.step, trainer.version, engine.policy_version, backend.step) == (2, 2, 2, 2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.run)
        ingest_groups(daemon, 12, 4, version=3)  # sampled by the resumed policy
        # the step-4 checkpoint is written after the step counts: wait for it, not the step
        await wait_for(lambda: (c := latest_checkpoint(ckpt)) is not None
                       and c.name == "step-000004")
        tg.cancel_scope.cancel()
    daemon._wal.close()
    assert backend.trained == [{8, 9, 10, 11}, {12, 13, 14, 15}]
    assert latest_checkpoint(ckpt).name == "step-000004"
    assert engine.policy_version == 4


async def test_resume_skips_used_trajectories_above_the_watermark(tmp_path):
    # group g1 (2, 3) completes and is trained before g0 (0, 1): used set = {2, 3}
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    daemon, backend, engine = make_daemon(data), FakeBackend(), FakeEngine()
    trainer = Trainer(daemon, backend, engine,
                      batcher=Batcher(BatcherConfig(group_size=2, batch_size=2)),
                      config=TrainerConfig(save_every=1), checkpoint_dir=ckpt)
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.run)
        ingest(daemon, 0, reward=1.0, group="g0")
        ingest(daemon, 2, reward=1.0, group="g1")
        ingest(daemon, 3, reward=0.0, group="g1")
        await wait_for(lambda: latest_checkpoint(ckpt) is not None)
        tg.cancel_scope.cancel()
    daemon._wal.close()
    assert backend.trained == [{2, 3}]
    daemon, backend, engine = make_daemon(data), FakeBackend(), FakeEngine()
    trainer = Trainer(daemon, backend, engine,
                      batcher=Batcher(BatcherConfig(group_size=2, batch_size=2)),
                      config=TrainerConfig(save_every=1), checkpoint_dir=ckpt)
    await trainer.resume()
    async with anyio.create_task_group() as tg:
        tg.start_soon(trainer.run)
        ingest(daemon, 1, reward=0.0, group="g0")
        await wait_for(lambda: trainer.step == 2)
        tg.cancel_scope.cancel()
    daemon._wal.close()
    assert backend.trained == [{0, 1}]
    # 2 and 3 lie above the cursor (0 was not used yet): handed out again, skipped
    assert trainer.batcher.counters["skipped_consumed"] == 2


def test_stale_sequences_get_truncated_importance_weights(tmp_path):
    class Scorer(FakeBackend):
        def compute_logprobs(self, batch):
            return torch.where(batch.action_mask, -0.5, 0.0)  # [T]

    from lightning._sequences import merge_transitions
    from lightning.training.batch import pack_sequences

    seqs = []
    for v in (0, 5):
        t = Transition(rollout_id="r", index=0, prompt_ids=pack_ids([1]),
                       response_ids=pack_ids([2, 3]), logprobs=pack_logprobs([-1.0, -3.0]),
                       policy_version=v)
        seqs += merge_transitions([t])
    batch = pack_sequences(seqs, [1.0, 1.0])
    trainer = Trainer(make_daemon(tmp_path / "d"), Scorer(), None,
                      batcher=Batcher(BatcherConfig(stale_policy="is")),
                      config=TrainerConfig(tis_cap=2.0))
    out = trainer._rescore(Batch(batch, [], torch.tensor([True, False]), {}))
    act = out.action_mask
    # stale sequence: ratio exp(-0.5 - -1) = 1.6487, exp(-0.5 - -3) = 12.18 -> capped at 2
    assert out.is_weights[act].tolist() == pytest.approx([1.6487213, 2.0, 1.0, 1.0])
    assert out.old_logprobs[act].tolist() == pytest.approx([-0.5, -0.5, -1.0, -3.0])
    trainer.daemon._wal.close()


def test_importance_weights_need_a_scoring_backend(tmp_path):
    from lightning._errors import ConfigError

    class NoScorer(FakeBackend):
        compute_logprobs = property()  # hasattr() is False

    d = make_daemon(tmp_path / "d")
    with pytest.raises(ConfigError, match="stale_policy='is' needs a backend with compute_logprobs"):
        Trainer(d, NoScorer(), None, batcher=Batcher(BatcherConfig(stale_policy="is")))
    with pytest.raises(ConfigError, match="missing_logprobs='recompute' needs"):
        Trainer(d, NoScorer(), None, batcher=Batcher(BatcherConfig()))
    Trainer(d, NoScorer(), None, batcher=Batcher(BatcherConfig(missing_logprobs="drop")))
    d._wal.close()
