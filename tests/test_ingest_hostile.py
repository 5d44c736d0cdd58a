"""Hostile input over ZeroMQ frames: rejection per event, fencing, disk full, expiry.

Driven through ``Daemon.handle`` (what the socket loop calls for every frame) and, where
the runtime's side matters, through the runtime over the in-memory transport.
"""

from __future__ import annotations

import anyio
import msgspec
import pytest

import lightning
from lightning import DaemonConfig
from lightning._protocol import (
    Ack,
    Batch,
    Nack,
    RolloutEnd,
    RolloutStart,
    Transition,
    encode_batch,
    encode_event,
    encode_message,
    pack_ids,
)
from lightning.testing import Daemon, MemoryHub, recover

from test_daemon import Harness, _batch, _end, _start, _tr


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def _raw_transition(rid: str, index: int, /, **override) -> bytes:
    """A transition encoded as a non-Python client might: any field, any type."""
    fields = {"type": "transition", **msgspec.structs.asdict(_tr(rid, index)), **override}
    return msgspec.msgpack.encode(fields)


BAD_FIELDS = [{"finish_reason": None}, {"model": 5}, {"policy_version": 1.5},
              {"index": "0"}, {"prompt_ids": [1, 2]}, {"type": "no-such-event"}]


@pytest.mark.parametrize("bad", BAD_FIELDS, ids=lambda b: ",".join(map(str, b)))
def test_one_mistyped_event_loses_nothing_else_of_its_frame(h, tmp_path, bad):
    """The issue's scenario: 200 concurrent good rollouts and one bad field in a frame."""
    h.hello()
    raw = [encode_event(_start(f"r{i}")) for i in range(201)]
    raw += [encode_event(_tr(f"r{i}", 0)) for i in range(200)]
    raw.append(_raw_transition("r200", 0, **bad))
    bad_seq = len(raw)
    raw += [encode_event(_end(f"r{i}", 1)) for i in range(201)]
    ack = h.send(encode_batch("c1", 1, raw))
    assert isinstance(ack, Ack) and ack.acked_through == len(raw)
    assert [(r.seq, r.code) for r in ack.rejected] == [(bad_seq, "invalid")]
    field = next(iter(bad))
    assert f"$.{field}" in ack.rejected[0].reason
    trajs = list(h.daemon.buffer._items)
    assert len(trajs) == 201
    good = [t for t in trajs if t.rollout_id != "r200"]
    assert len(good) == 200 and all(len(t.transitions) == 1 for t in good)
    (r200,) = [t for t in trajs if t.rollout_id == "r200"]
    assert r200.transitions == [] and r200.warnings  # 1 recorded, 0 stored: flagged
    stats = h.daemon.stats()
    assert stats["rejected.invalid"] == 1 and stats["events_accepted"] == len(raw) - 1
    h.close()
    # the log holds only what recovery can apply, and recovery counts what the live
    # daemon counted
    state, pending, _ = recover(tmp_path / "data")
    assert len(pending) == 201 and state.hwm["c1"] == len(raw)
    assert state.counters["rejected.invalid"] == 1
    assert state.counters["events_accepted"] == len(raw) - 1


def test_a_batch_envelope_that_does_not_decode_is_still_refused_whole(h):
    h.hello()
    frame = msgspec.msgpack.encode({"type": "batch", "client_id": 5, "first_seq": 1,
                                    "events": [{"type": "rollout.start", "rollout_id": "a",
                                                "name": "x"}]})
    nack = h.send(frame)
    assert isinstance(nack, Nack) and nack.code == "invalid" and "client_id" in nack.reason
    frame = msgspec.msgpack.encode({"type": "batch", "client_id": "c1", "first_seq": 1,
                                    "events": [{"type": "transition"}, 7]})
    ack = h.send(frame)  # two undecodable events: each refused, the frame acknowledged
    assert ack.acked_through == 2 and [r.seq for r in ack.rejected] == [1, 2]


@lightning.rollout
async def _good_agent(i: int) -> float:
    lightning.record_transition([i, 1], [2, 3], [-0.5, -0.5], policy_version=1)
    await anyio.sleep(0)
    return 1.0


@lightning.rollout
async def _bad_agent(**bad) -> float:
    await anyio.sleep(0)
    lightning.record_transition([1], [2], [-0.5], **bad)
    return 1.0


@pytest.mark.parametrize("bad", [{"finish_reason": None}, {"model": 5},
                                 {"policy_version": 1.5}, {"policy_version": True},
                                 {"trainable": 1}, {"latency_s": "1"}, {"metadata": [1]}])
async def test_runtime_raises_a_mistyped_argument_at_the_call(tmp_path, bad):
    hub = MemoryHub()
    errors = []

    async def run_bad():
        try:
            await _bad_agent(**bad)
        except TypeError as exc:
            errors.append(str(exc))

    async with anyio.create_task_group() as tg:
        d = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                   transport=hub)
        await tg.start(d.serve)
        async with lightning.session(transport=hub.connect(), spill_dir=str(tmp_path / "s"),
                                     open_linger_s=0) as rt:
            async with anyio.create_task_group() as agents:
                for i in range(200):
                    agents.start_soon(_good_agent, i)
                agents.start_soon(run_bad)
            with anyio.fail_after(20):
                while rt.pending_events():
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    (name,) = bad
    assert len(errors) == 1 and f"{name} must be" in errors[0]
    trajs = list(d.buffer._items)
    assert sum(t.status == "completed" and len(t.transitions) == 1 for t in trajs) == 200
    (failed,) = [t for t in trajs if t.status == "failed"]
    assert "TypeError" in failed.error and failed.transitions == []
    assert rt.counters["events_rejected"] == 0


# ------------------------------------------------------------------ connections own ids

VICTIM, ATTACKER = b"victim", b"attacker"


def test_a_batch_for_another_connections_client_id_cannot_drop_its_data(h):
    h.hello("v", peer=VICTIM)
    assert h.send(_batch(1, [_start("a"), _tr("a", 0)], cid="v"), VICTIM).acked_through == 2
    h.hello("x", peer=ATTACKER)  # has a session of its own, not for "v"
    forged = _batch(10**12, [_start("evil")], cid="v", resync=True)
    nack = h.send(forged, ATTACKER)
    assert isinstance(nack, Nack) and nack.code == "fenced" and not nack.retry
    nack = h.send(forged, b"stranger")  # no session at all
    assert nack.code == "no_session"
    assert h.daemon.state.hwm["v"] == 2
    ack = h.send(_batch(3, [_tr("a", 1), _end("a", 2)], cid="v"), VICTIM)
    assert ack.acked_through == 4 and not ack.rejected
    (t,) = h.daemon.buffer._items
    assert [x.index for x in t.transitions] == [0, 1]
    assert h.daemon.stats()["events_duplicate"] == 0


def test_a_newer_hello_takes_the_client_id_over_and_fences_the_older(h):
    h.hello("v", peer=VICTIM)
    h.send(_batch(1, [_start("a")], cid="v"), VICTIM)
    w = h.hello("v", peer=b"adopter")  # e.g. a new process replaying a dead one's spill
    assert w.acked_through == 1 and w.client_id == "v"
    nack = h.send(_batch(2, [_end("a", 0)], cid="v"), VICTIM)
    assert nack.code == "fenced" and nack.client_id == "v"
    assert h.send(_batch(2, [_end("a", 0)], cid="v"), b"adopter").acked_through == 2
    assert h.daemon.stats()["clients_fenced"] == 1
    h.daemon.forget_peer(b"adopter")  # gone: the id is free again, the old peer says Hello
    assert h.send(_batch(3, [_start("b")], cid="v"), b"adopter").code == "no_session"
    assert h.hello("v", peer=VICTIM).acked_through == 2


def _write_orphan(spill_root, cid, events):
    import struct

    from lightning._log import AppendLog

    d = spill_root / cid
    log = AppendLog(d)
    (d / "lock").touch()
    seq = struct.Struct("<Q")
    for s_, e in enumerate(events, 1):
        log.append(seq.pack(s_) + encode_event(e))
    log.close()
    return d


def _rollouts(n, steps):
    out = []
    for i in range(n):
        out.append(_start(f"o{i}"))
        out += [_tr(f"o{i}", k) for k in range(steps)]
        out.append(_end(f"o{i}", steps))
    return out


async def test_a_partly_acknowledged_orphan_spill_replays_only_the_rest(tmp_path):
    """Issue 14.4: the already-acknowledged records of a dead process's spill log are
    skipped (the daemon's Welcome for its id says how far), the rest arrives exactly once."""
    events = _rollouts(300, 5)  # 2100 events
    d = _write_orphan(tmp_path / "spill", "dead", events)
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                        transport=hub)
        await tg.start(daemon.serve)
        done = 1200  # the dead process had these acknowledged
        daemon.handle(b"old", encode_message(_hello("dead")))
        ack = daemon.handle(b"old", encode_batch("dead", 1, [encode_event(e) for e in events[:done]]))
        assert ack is not None
        async with lightning.session(transport=hub.connect(), spill_dir=str(tmp_path / "spill"),
                                     open_linger_s=0, max_batch_events=64) as rt:
            with anyio.fail_after(30):
                while len(daemon.buffer) < 300 or rt.pending_events():
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    trajs = list(daemon.buffer._items)
    assert sorted(t.rollout_id for t in trajs) == sorted(f"o{i}" for i in range(300))
    assert all([x.index for x in t.transitions] == list(range(5)) for t in trajs)
    stats = daemon.stats()
    assert stats["events_accepted"] == len(events) and stats["events_duplicate"] == 0
    assert rt.counters["orphan_events_already_acked"] == done
    assert stats.get("events_lost_by_client", 0) == 0 and stats["clients_fenced"] == 1
    assert not d.exists()


def _hello(cid):
    from lightning._protocol import PROTOCOL_VERSION, Hello

    return Hello(protocol_version=PROTOCOL_VERSION, client_id=cid)


# ------------------------------------------------------------------ expiry and bounds


def test_abandoned_rollouts_expire_through_the_log_and_memory_stays_bounded(tmp_path):
    """Issue 14.8: 100k rollouts started and never ended are ended as failed after
    rollout_ttl_s (counted), the daemon's per-rollout tables shrink back, the client's late
    events are rejected, and recovery sees the same ends."""
    # (peer_idle_s off: the fake clock below is not time.monotonic(), which a connection's
    # last frame is stamped with; on a box up for long the peer looked silent for hours)
    h = Harness(tmp_path, rollout_ttl_s=60.0, buffer_size=200_000, peer_idle_s=0)
    h.hello()
    n = 100_000
    seq = 1
    for k in range(0, n, 5000):
        h.send(_batch(seq, [_start(f"a{i}") for i in range(k, k + 5000)]))
        seq += 5000
    d = h.daemon
    assert len(d.state.open) == n and d.maintain(now=1000.0) == 0  # first seen
    assert d.maintain(now=1059.0) == 0
    h.send(_batch(seq, [_start("late")]))  # seen later: expires later
    seq += 1
    assert d.maintain(now=1060.0) == n
    assert len(d.state.open) == 1 and list(d._first_seen) == ["late"]
    assert d.stats()["rollouts_expired"] == n and len(d.buffer) == n
    t = d.buffer.get_nowait()
    assert t.status == "failed" and t.error.startswith("expired")
    ack = h.send(_batch(seq, [_end("a0", 0)]))
    assert ack.rejected[0].code == "rollout_finished"
    h.close()
    state, pending, _ = recover(tmp_path / "data")
    assert list(state.open) == ["late"] and len(pending) == n


def test_silent_connections_are_forgotten_and_told_to_say_hello(h):
    h.hello("a", peer=b"p1")
    h.hello("b", peer=b"p2")
    now = h.daemon._peer_seen[b"p2"]
    h.daemon._peer_seen[b"p1"] = now - 1000  # silent for 1000 s
    h.daemon.maintain(now=now)
    assert set(h.daemon._sessions) == {b"p2"} and set(h.daemon._owner) == {"b"}
    assert h.daemon.stats()["peers_forgotten"] == 1
    assert h.send(_batch(1, [_start("x")], cid="a"), b"p1").code == "no_session"


def test_frames_between_the_limit_and_the_hard_guard_get_a_nack(tmp_path):
    from lightning._transport.zmq import hard_frame_limit

    assert hard_frame_limit(64 << 20) > 300 << 20  # the 300 MiB frame is answered
    h = Harness(tmp_path)
    h.hello()
    nack = h.send(b"\x00" * ((64 << 20) + 1))
    assert nack.code == "frame_too_large" and not nack.retry
    assert h.daemon.stats()["nacked.frame_too_large"] == 1
    h.close()
