"""Per-client state is bounded: Goodbye retires a client id, idle ids expire after
``client_ttl_s``, and both survive a restart with exact accounting (nothing lost, nothing
counted twice, no replayed gap)."""

from __future__ import annotations

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon import PEER, Harness, _batch, _end, _start, _tr

import lightning
from lightning import DaemonConfig
from lightning._protocol import (
    Ack,
    Farewell,
    Goodbye,
    Nack,
    Welcome,
    encode_message,
)
from lightning.testing import Daemon, MemoryHub, recover


def _bye(h, cid="c1", through=0, peer=PEER):
    return h.send(encode_message(Goodbye(client_id=cid, acked_through=through)), peer)


def test_goodbye_retires_the_id_durably_and_it_may_come_back_fresh(tmp_path):
    h = Harness(tmp_path)
    h.hello()
    assert h.send(_batch(1, [_start("a"), _tr("a", 0), _end("a", 1)])).acked_through == 3
    assert h.daemon.stats()["clients_known"] == 1
    f = _bye(h, through=3)
    assert f == Farewell(client_id="c1", retired=True)
    s = h.daemon.stats()
    assert s["clients_known"] == 0 and s["client_tombstones"] == 1
    assert s["clients_retired.goodbye"] == 1 and s["sessions"] == 0
    # the session went with it: a late frame on that connection is told to say Hello
    assert h.send(_batch(1, [_start("x")])).code == "no_session"
    h.close()

    h2 = Harness(tmp_path)  # restart: the retirement replays from the log
    assert "c1" not in h2.daemon.state.hwm and "c1" in h2.daemon.state.retired
    w = h2.hello()
    assert isinstance(w, Welcome) and w.acked_through == 0
    # a fresh stream from seq 1 is not taken for the old one's duplicates
    ack = h2.send(_batch(1, [_start("b"), _tr("b", 0), _end("b", 1)]))
    assert ack == Ack(client_id="c1", acked_through=3, rejected=[])
    assert h2.daemon.stats()["client_tombstones"] == 0  # back: no longer retired
    h2.close()

    state, pending, _ = recover(tmp_path / "data")
    assert [t.rollout_id for t in pending] == ["a", "b"]
    assert state.counters["events_accepted"] == 6
    assert state.counters["events_duplicate"] == 0
    assert state.counters["wal_gaps_replayed"] == 0  # old seqs then seq 1: no gap
    assert state.hwm == {"c1": 3} and not state.retired


def test_goodbye_is_refused_unless_everything_was_stored_by_its_owner(tmp_path):
    h = Harness(tmp_path)
    h.hello()
    h.send(_batch(1, [_start("a"), _tr("a", 0)]))
    f = _bye(h, through=5)  # the client thinks it sent more than was stored
    assert not f.retired and "through sequence 2" in f.reason
    f = _bye(h, through=2, peer=b"someone-else")  # not the owner
    assert not f.retired and "does not own" in f.reason
    assert h.daemon.state.hwm == {"c1": 2}
    assert h.daemon.stats()["goodbyes_refused"] == 2
    assert h.send(_batch(3, [_end("a", 1)])).acked_through == 3  # the session is intact
    h.close()


@pytest.mark.parametrize("compact", [False, True])
def test_a_stale_resync_of_a_retired_id_is_refused_after_restart(tmp_path, compact):
    h = Harness(tmp_path)
    h.hello()
    h.send(_batch(1, [_start("a"), _end("a", 0)]))
    assert _bye(h, through=2).retired
    if compact:  # the tombstone then lives in the snapshot, not the log
        h.daemon.compact()
    h.close()
    h2 = Harness(tmp_path)
    h2.hello()
    # e.g. a copy of the old process's spill log, replayed from its seq 2 with resync
    nack = h2.send(_batch(2, [_end("a", 0)], resync=True))
    assert isinstance(nack, Nack) and nack.code == "retired" and not nack.retry
    assert "fresh stream from sequence 1" in nack.reason
    # ...or from seq 1: a resync continues an old stream, whatever its first number
    nack = h2.send(_batch(1, [_start("a"), _end("a", 0)], resync=True))
    assert isinstance(nack, Nack) and nack.code == "retired"
    assert h2.daemon.stats()["nacked.retired"] == 2
    assert h2.daemon.state.counters["events_accepted"] == 2  # nothing stored twice
    h2.close()


def test_idle_clients_expire_only_where_safe(tmp_path):
    h = Harness(tmp_path, client_ttl_s=60)
    d = h.daemon
    for cid, peer in (("gone", b"p1"), ("busy", b"p2"), ("online", b"p3")):
        h.hello(cid, peer)
    h.send(_batch(1, [_start("g"), _end("g", 0)], cid="gone"), b"p1")
    h.send(_batch(1, [_start("open")], cid="busy"), b"p2")  # its rollout never ends
    h.send(_batch(1, [_start("o"), _end("o", 0)], cid="online"), b"p3")
    d.ingest_local(_start("server-side"))  # the daemon's own stream
    d.forget_peer(b"p1")
    d.forget_peer(b"p2")  # "online" stays connected
    t0 = max(d._client_seen.values())
    d.maintain(now=t0 + 30)
    assert d.stats().get("clients_retired.idle", 0) == 0  # not idle long enough
    d.maintain(now=t0 + 61)
    assert set(d.state.hwm) == {"busy", "online", d._local_id}
    assert d.stats()["clients_retired.idle"] == 1
    assert d.stats()["clients_idle_kept_open_rollouts"] >= 1
    h.close()
    h2 = Harness(tmp_path, client_ttl_s=60)  # durable: the log says "gone" is retired
    assert "gone" not in h2.daemon.state.hwm and "gone" in h2.daemon.state.retired
    assert h2.daemon.state.hwm["busy"] == 1
    h2.close()


def test_client_ttl_is_checked():
    with pytest.raises(lightning.ConfigError, match="client_ttl_s"):
        DaemonConfig(client_ttl_s=-1)
    with pytest.raises(lightning.ConfigError, match="client_ttl_s"):
        DaemonConfig(client_ttl_s=float("nan"))


# One step of a fleet of clients: (client, action). Actions: send a rollout (3 events),
# send it twice (a resend), say Goodbye, disconnect without one, restart the daemon,
# let the TTL pass.
_steps = st.lists(
    st.tuples(
        st.integers(0, 7), st.sampled_from(["send", "resend", "bye", "vanish", "restart", "ttl"])
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=_steps)
def test_many_clients_come_and_go_bounded_and_exact(tmp_path_factory, steps):
    """Clients come and go; Goodbye and the TTL keep the table to the clients that are
    live; across restarts every event sent is stored exactly once."""
    tmp = tmp_path_factory.mktemp("fleet")
    h = Harness(tmp, client_ttl_s=10)
    clock = [0.0]
    gen = {}  # client slot -> incarnation (a Goodbye'd id comes back as a new one)
    seq = {}  # client id -> last seq sent
    live = set()  # ids with a session now
    sent = 0
    n = 0

    def cid(slot):
        return f"c{slot}-{gen.setdefault(slot, 0)}"

    for slot, action in steps:
        c = cid(slot)
        peer = c.encode()
        if action in ("send", "resend"):
            if c not in live:
                assert isinstance(h.hello(c, peer), Welcome)
                live.add(c)
            first = seq.get(c, 0) + 1
            if first > 1 and c in h.daemon.state.retired:
                # idle past the TTL, then back with its old numbering: refused, and the
                # client must start over as a new id (nothing it sent is lost: all acked)
                nack = h.send(_batch(first, [_start("late")], cid=c), peer)
                assert isinstance(nack, Nack) and nack.code == "retired"
                live.discard(c)
                gen[slot] += 1
                continue
            n += 1
            frame = _batch(first, [_start(f"r{n}"), _tr(f"r{n}", 0), _end(f"r{n}", 1)], cid=c)
            for _ in range(2 if action == "resend" else 1):
                assert h.send(frame, peer).acked_through == first + 2
            seq[c] = first + 2
            sent += 3
        elif action == "bye" and c in live:
            assert _bye(h, c, seq.get(c, 0), peer).retired
            live.discard(c)
            gen[slot] += 1  # the next process is a new client id
        elif action == "vanish":
            h.daemon.forget_peer(peer)
            live.discard(c)
        elif action == "restart":
            h.close()
            h = Harness(tmp, client_ttl_s=10)
            live.clear()
        elif action == "ttl":
            clock[0] += 11
            h.daemon.maintain(now=_now(h) + clock[0])
        known = h.daemon.stats()["clients_known"]
        assert known <= len(seq)  # never more than the ids that sent something
    end = _now(h) + clock[0] + 1e6
    h.daemon.maintain(now=end)  # ids recovered at a restart: their TTL starts here
    h.daemon.maintain(now=end + 11)  # every vanished id expires
    assert set(h.daemon.state.hwm) <= live  # bounded: only connected clients are kept
    h.close()
    state, pending, _ = recover(tmp / "data")
    assert state.counters["events_accepted"] == sent
    assert len(pending) == n and len({t.rollout_id for t in pending}) == n
    assert state.counters["wal_gaps_replayed"] == 0


def _now(h):
    return max(h.daemon._client_seen.values(), default=0.0)


# ---------------------------------------------------------------- the runtime's side


async def test_runtime_says_goodbye_on_a_clean_shutdown(tmp_path):
    hub = MemoryHub()
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0), transport=hub
    )
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with lightning.session(
            transport=hub.connect(), spill_dir=str(tmp_path / "spill")
        ) as rt:

            @lightning.rollout
            async def agent() -> float:
                lightning.record_transition([1, 2], [3], [-0.1])
                return 1.0

            for _ in range(3):
                await agent()
            cid = rt.client_id
        stats = rt.stats()
        assert stats["goodbyes_sent"] == 1 and stats["client_id_retired"] == 1
        assert stats["events_acked"] == 9
        assert cid not in daemon.state.hwm and cid in daemon.state.retired
        assert daemon.stats()["clients_known"] == 0 and daemon.stats()["sessions"] == 0
        tg.cancel_scope.cancel()
    state, pending, _ = recover(tmp_path / "data")
    assert len(pending) == 3 and state.counters["events_accepted"] == 9
    assert not (tmp_path / "spill" / cid).exists()


async def test_runtime_with_a_spill_log_left_does_not_say_goodbye(tmp_path):
    hub = MemoryHub()
    hub.set_down(True)  # never reachable: everything is spilled at shutdown
    async with lightning.session(
        transport=hub.connect(), spill_dir=str(tmp_path / "spill"), shutdown_grace_s=0.2
    ) as rt:

        @lightning.rollout
        async def agent() -> None:
            lightning.record_transition([1], [2], [-0.1])

        await agent()
    assert rt.stats()["goodbyes_sent"] == 0
    assert (tmp_path / "spill" / rt.client_id).exists()


async def test_a_replayed_orphan_log_retires_the_dead_id_once_delivered(tmp_path):
    spill = str(tmp_path / "spill")
    hub = MemoryHub()
    hub.set_down(True)
    async with lightning.session(
        transport=hub.connect(), spill_dir=spill, shutdown_grace_s=0.1
    ) as dead:

        @lightning.rollout
        async def agent() -> float:
            lightning.record_transition([1, 2], [3], [-0.1])
            return 1.0

        for _ in range(4):
            await agent()
    assert dead.stats()["goodbyes_sent"] == 0  # it left a spill log: no Goodbye
    hub.set_down(False)
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0), transport=hub
    )
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with lightning.session(transport=hub.connect(), spill_dir=spill) as rt:
            with anyio.fail_after(30):
                while dead.client_id not in daemon.state.retired:
                    await anyio.sleep(0.01)
            assert rt.pending_events() == 0
        assert daemon.stats()["clients_known"] == 0
        assert daemon.stats()["clients_retired.goodbye"] == 2  # the dead id, then its own
        tg.cancel_scope.cancel()
    state, pending, _ = recover(tmp_path / "data")
    assert state.counters["events_accepted"] == 4 * 3 and len(pending) == 4


async def test_a_runtime_whose_spill_log_drained_says_goodbye(tmp_path):
    hub = MemoryHub()
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0), transport=hub
    )
    spill = tmp_path / "spill"
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        hub.set_down(True)
        async with lightning.session(
            transport=hub.connect(), spill_dir=str(spill), max_queue_events=2
        ) as rt:

            @lightning.rollout
            async def agent() -> float:
                lightning.record_transition([1, 2], [3], [-0.1])
                return 1.0

            for _ in range(5):
                await agent()
            assert rt.stats()["events_spilled"] > 0
            hub.set_down(False)
            with anyio.fail_after(30):
                while rt.pending_events():
                    await anyio.sleep(0.01)
        assert rt.stats()["goodbyes_sent"] == 1 and rt.stats()["client_id_retired"] == 1
        assert daemon.stats()["clients_known"] == 0
        tg.cancel_scope.cancel()
    assert not list((spill / rt.client_id).rglob("*.log"))  # no spill log left behind
    state, pending, _ = recover(tmp_path / "data")
    assert state.counters["events_accepted"] == 15 and len(pending) == 5
