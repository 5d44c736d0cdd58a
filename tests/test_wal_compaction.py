"""Write-ahead log compaction: snapshot + the log after it recover the same state."""

from pathlib import Path

from lightning._config import DaemonConfig
from lightning._daemon import Daemon, recover
from lightning._log import AppendLog
from lightning._protocol import RolloutEnd, RolloutStart, Transition, pack_ids, pack_logprobs


def make(data: Path, **cfg) -> Daemon:
    d = Daemon(DaemonConfig(data_dir=str(data), stats_interval_s=0, **cfg))
    d._recover()
    d._wal = AppendLog(data / "wal", segment_bytes=cfg.pop("segment_bytes", 64 << 20))
    return d


def start(d, rid):
    d.ingest_local(RolloutStart(rollout_id=rid, name="t", group_key="g"))
    d.ingest_local(Transition(rollout_id=rid, index=0, prompt_ids=pack_ids([1, 2]),
                              response_ids=pack_ids([3]), logprobs=pack_logprobs([-1.0])))


def end(d, rid, reward=1.0):
    d.ingest_local(RolloutEnd(rollout_id=rid, final_reward=reward, n_transitions=1))


def drain(d):
    out = []
    while len(d.buffer):
        out.append(d.buffer.get_nowait().index)
    return out


def test_snapshot_plus_tail_recovers_the_same_state(tmp_path):
    data = tmp_path / "data"
    d = make(data)
    for i in range(6):
        start(d, f"r{i}")
        end(d, f"r{i}", reward=float(i))
    start(d, "open-before")  # open across the compaction
    assert drain(d) == [0, 1, 2, 3, 4, 5]
    d.buffer.commit(2)  # 3, 4, 5 taken by the consumer but not used yet
    size_before = d._wal.size_bytes()
    freed = d.compact()
    assert freed == size_before > 0
    assert d._wal.size_bytes() == 0
    end(d, "open-before")
    start(d, "r6")
    end(d, "r6")
    d._wal.close()

    state, pending, committed = recover(data)
    assert committed == 2
    assert [t.index for t in pending] == [3, 4, 5, 6, 7]
    assert [t.final_reward for t in pending[:3]] == [3.0, 4.0, 5.0]
    assert pending[3].rollout_id == "open-before" and len(pending[3].transitions) == 1
    assert state.hwm == d.state.hwm and state.completed == d.state.completed == 8
    assert set(state.finished) == set(d.state.finished) and not state.open
    # a resent frame is still recognised as a duplicate after the log before it is gone
    d2 = make(data)
    assert d2.state.hwm[d._local_id] == d.state.hwm[d._local_id]
    assert drain(d2) == [3, 4, 5, 6, 7]  # handed out again: not used yet
    d2._wal.close()


def test_commit_compacts_once_the_log_has_grown_enough(tmp_path):
    data = tmp_path / "data"
    d = make(data, wal_compact_bytes=1)
    start(d, "a")
    end(d, "a")
    drain(d)
    d.buffer.commit(0)
    assert d.counters["wal_compactions"] == 1
    assert (data / "snapshot.msgpack").exists()
    start(d, "b")
    end(d, "b")
    d.buffer.commit(1)
    assert d.counters["wal_compactions"] == 2
    d._wal.close()
    state, pending, committed = recover(data)
    assert (state.completed, pending, committed) == (2, [], 1)


def test_recovery_after_compaction_keeps_the_rollouts_still_open(tmp_path):
    data = tmp_path / "data"
    d = make(data)
    start(d, "long")
    d.compact()
    d._wal.close()
    d2 = make(data)  # restart: the open rollout comes back from the snapshot
    end(d2, "long", reward=0.5)
    (traj,) = [d2.buffer.get_nowait()]
    assert traj.rollout_id == "long" and traj.final_reward == 0.5 and len(traj.transitions) == 1
    d2._wal.close()


async def test_compaction_while_serving_leaves_the_event_loop(tmp_path, monkeypatch):
    """A commit while serving schedules the compaction; its file work (write, fsync,
    rename, deleting segments) runs in a worker thread while ingest goes on."""
    import threading

    import anyio

    import lightning._daemon as daemon_mod
    from lightning.testing import MemoryHub

    gate, entered = threading.Event(), threading.Event()
    real = daemon_mod._write_snapshot

    def slow_write(data_dir, data):
        entered.set()
        gate.wait(60)
        real(data_dir, data)

    monkeypatch.setattr(daemon_mod, "_write_snapshot", slow_write)
    data = tmp_path / "data"
    d = Daemon(DaemonConfig(data_dir=str(data), stats_interval_s=0, wal_compact_bytes=1),
               transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(d.serve)
        start(d, "a")
        end(d, "a")
        d.buffer.commit(d.buffer.get_nowait().index)  # asks for a compaction
        with anyio.fail_after(30):
            while not entered.is_set():
                await anyio.sleep(0.005)
        # the snapshot write is stuck in its thread: the daemon still stores and hands out
        start(d, "b")
        end(d, "b")
        assert d.buffer.get_nowait().rollout_id == "b"
        d.buffer.commit(1)  # a compaction is running: not a second one
        assert d.counters["wal_compactions"] == 0
        gate.set()
        with anyio.fail_after(30):
            while d.counters["wal_compactions"] < 1:
                await anyio.sleep(0.005)
        tg.cancel_scope.cancel()
    state, pending, committed = recover(data)
    assert (state.completed, pending, committed) == (2, [], 1)
    assert state.counters["events_accepted"] == 6
