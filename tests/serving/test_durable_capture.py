"""Validate before durable (issue 14): server-side events are checked before the WAL, and
recovery quarantines what it cannot apply instead of refusing to start."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning import DaemonConfig
from lightning._daemon import recover
from lightning._log import AppendLog
from lightning._protocol import (
    RolloutEnd,
    RolloutStart,
    Transition,
    encode_batch,
    encode_event,
    pack_ids,
)
from lightning.testing import Daemon, MemoryHub

pytestmark = pytest.mark.anyio


def _wal_records(data_dir):
    log = AppendLog(data_dir / "wal")
    try:
        return list(log)
    finally:
        log.close()


async def _serving(data_dir):
    daemon = Daemon(DaemonConfig(data_dir=str(data_dir), stats_interval_s=0),
                    transport=MemoryHub())
    return daemon


@pytest.mark.parametrize("bad", [
    RolloutStart(rollout_id="r", name="n", group_key=123),  # type: ignore[arg-type]
    RolloutStart(rollout_id="r", name="n", attempt=True),  # type: ignore[arg-type]
    RolloutStart(rollout_id="r", name="n", attempt=2**70),
    RolloutStart(rollout_id="r", name="n", metadata={"x": 2**70}),
    RolloutStart(rollout_id="r", name="n", metadata={"x": object()}),
    RolloutStart(rollout_id="", name="n"),
    RolloutEnd(rollout_id="r", error=123),  # type: ignore[arg-type]
    Transition(rollout_id="r", index=0, prompt_ids=b"abc", response_ids=b""),
    Transition(rollout_id="r", index=0, prompt_ids=b"", response_ids=b"",
               policy_version=1.5),  # type: ignore[arg-type]
])
async def test_ingest_local_refuses_before_the_log(tmp_path, bad):
    daemon = await _serving(tmp_path / "data")
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        assert daemon.ingest_local(RolloutStart(rollout_id="ok", name="n")) is None
        seq, records = daemon._local_seq, len(_wal_records(tmp_path / "data"))
        rejection = daemon.ingest_local(bad)
        assert rejection is not None and rejection.code == "invalid", rejection
        assert daemon._local_seq == seq
        assert len(_wal_records(tmp_path / "data")) == records
        assert daemon.ingest_local(RolloutEnd(rollout_id="ok")) is None  # no gap after it
        tg.cancel_scope.cancel()
    state, trajs, _ = recover(tmp_path / "data")
    assert [t.rollout_id for t in trajs] == ["ok"]
    assert state.counters["wal_records_quarantined"] == 0
    assert state.counters["wal_gaps_replayed"] == 0


async def test_ingest_local_refuses_events_over_the_frame_limit(tmp_path):
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0,
                                 max_frame_bytes=1 << 16), transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        r = daemon.ingest_local(RolloutStart(rollout_id="r", name="n",
                                             metadata={"x": "y" * (1 << 16)}))
        assert r is not None and r.code == "too_large"
        assert daemon._local_seq == 0
        tg.cancel_scope.cancel()


def _batch(seq, *events):
    return encode_batch("c1", seq, [encode_event(e) for e in events])


async def test_recovery_quarantines_what_it_cannot_apply_and_starts(tmp_path):
    data = tmp_path / "data"
    bad_typed = msgspec.msgpack.encode({
        "type": "batch", "client_id": "c1", "first_seq": 2,
        "events": [{"type": "rollout.start", "rollout_id": "r2", "name": "x", "group_key": 123}]})
    log = AppendLog(data / "wal")
    log.append(_batch(1, RolloutStart(rollout_id="r1", name="n")))
    log.append(bad_typed)
    log.append(b"\xc1 not msgpack")
    log.append(_batch(3, Transition(rollout_id="r1", index=0, prompt_ids=pack_ids([1]),
                                    response_ids=pack_ids([2]))))
    log.append(_batch(4, RolloutEnd(rollout_id="r1", n_transitions=1)))
    log.close()

    daemon = await _serving(data)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        stats = daemon.stats()
        assert stats["wal_records_quarantined"] == 2
        assert stats["wal_gaps_replayed"] == 1
        t = daemon.buffer.get_nowait()
        assert (t.rollout_id, len(t.transitions)) == ("r1", 1)
        # new events after recovery are stored and replay too
        assert daemon.ingest_local(RolloutStart(rollout_id="r3", name="n")) is None
        tg.cancel_scope.cancel()

    quarantined = AppendLog(data / "quarantine")
    assert sorted(quarantined) == sorted([bad_typed, b"\xc1 not msgpack"])
    quarantined.close()
    # moved aside: the log no longer holds them, so a second start quarantines nothing new
    assert not any(r in (bad_typed, b"\xc1 not msgpack") for r in _wal_records(data))
    state, trajs, _ = recover(data, quarantine=lambda rec, why: pytest.fail(why))
    assert [t.rollout_id for t in trajs] == ["r1"]
    assert "r3" in state.open
    assert state.counters["wal_records_quarantined"] == 2  # the count is kept


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=4), lambda c: st.lists(c, max_size=3)
    | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=5)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(events=st.lists(st.tuples(
    st.sampled_from(["start", "transition", "end"]),
    st.fixed_dictionaries({}, optional={"group_key": _values, "attempt": _values,
                                        "metadata": _values, "policy_version": _values,
                                        "model": _values, "error": _values,
                                        "final_reward": _values})), max_size=8))
def test_ingest_local_property_stored_means_replayable(tmp_path_factory, events):
    """Whatever fields Python code puts in an event, ingest_local either refuses it (no
    sequence number, nothing in the log) or stores it; recovery then rebuilds exactly
    the live state, with nothing quarantined and no gap."""
    data = tmp_path_factory.mktemp("prop") / "data"

    async def run():
        daemon = await _serving(data)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.serve)
            stored = 0
            for kind, fields in events:
                make = {"start": lambda f: RolloutStart(rollout_id="r", name="n", **{
                            k: v for k, v in f.items() if k in ("group_key", "attempt",
                                                                 "metadata")}),
                        "transition": lambda f: Transition(
                            rollout_id="r", index=0, prompt_ids=b"", response_ids=b"", **{
                                k: v for k, v in f.items() if k in ("policy_version", "model",
                                                                     "metadata")}),
                        "end": lambda f: RolloutEnd(rollout_id="r", **{
                            k: v for k, v in f.items() if k in ("error", "final_reward")})}
                before = daemon._local_seq
                rejection = daemon.ingest_local(make[kind](fields))
                if rejection is not None and rejection.seq == 0:
                    assert daemon._local_seq == before
                else:
                    stored += 1
                    assert daemon._local_seq == before + 1
            assert len(_wal_records(data)) == stored
            live = (set(daemon.state.open), set(daemon.state.finished), daemon.state.completed)
            tg.cancel_scope.cancel()
        return live

    live = anyio.run(run, backend="asyncio")
    state, _, _ = recover(data, quarantine=lambda rec, why: pytest.fail(why))
    assert (set(state.open), set(state.finished), state.completed) == live
    assert state.counters["wal_gaps_replayed"] == 0
