"""Runtime <-> daemon over the in-memory transport: loss, outages, spill, replay."""

from __future__ import annotations

import anyio
import pytest

import lightning
from lightning import DaemonConfig
from lightning._protocol import unpack_ids
from lightning.testing import Daemon, MemoryHub, recover

# These tests are about delivery, so events of running rollouts are sent like any other
# (open_linger_s=0); batching has tests of its own below.
FAST = dict(heartbeat_s=0.05, peer_timeout_s=0.3, open_linger_s=0)


def _runtime_kw(tmp_path, **kw):
    return {"spill_dir": str(tmp_path / "spill"), **FAST, **kw}


@lightning.rollout
async def agent(i: int, steps: int) -> float:
    for s in range(steps):
        lightning.record_transition([i, s], [s] * 3, [-0.1] * 3, policy_version=s)
        if s % 7 == 0:
            await anyio.sleep(0)
    lightning.emit_reward(0.5)
    return float(i)


def _check_exactly_once(trajs, n_rollouts, steps):
    assert len(trajs) == n_rollouts
    assert len({t.rollout_id for t in trajs}) == n_rollouts
    seen = set()
    for t in trajs:
        i = int(t.final_reward)
        seen.add(i)
        assert [tr.index for tr in t.transitions] == list(range(steps))
        assert [list(unpack_ids(tr.prompt_ids)) for tr in t.transitions] == [
            [i, s] for s in range(steps)
        ]
        assert [r.value for r in t.rewards] == [0.5]
    assert seen == set(range(n_rollouts))


async def _serve_daemon(tg, tmp_path, hub, **cfg):
    d = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0, **cfg), transport=hub)
    await tg.start(d.serve)
    return d


async def _wait(pred, timeout=10.0):
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


async def test_lossy_link_delivers_exactly_once_in_order(tmp_path):
    hub = MemoryHub(drop_rate=0.2, seed=1)
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(
            transport=hub.connect(), max_batch_events=16, max_inflight_frames=4,
            **_runtime_kw(tmp_path)
        ) as rt:
            async with anyio.create_task_group() as agents:
                for i in range(12):
                    agents.start_soon(agent, i, 40)
            await _wait(lambda: rt.pending_events() == 0, 30)
        assert rt.counters["frames_resent"] > 0 and rt.counters["events_acked"] == 12 * 43
        tg.cancel_scope.cancel()
    _check_exactly_once(list(daemon.buffer._items), 12, 40)
    assert daemon.stats()["events_accepted"] == 12 * 43


async def test_outage_spills_and_replays_in_order(tmp_path):
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(
            transport=hub.connect(), max_queue_events=50, **_runtime_kw(tmp_path)
        ) as rt:
            await agent(0, 5)
            await _wait(lambda: rt.pending_events() == 0)
            hub.set_down(True)
            for i in range(1, 6):
                await agent(i, 30)
            assert rt.counters["events_spilled"] > 0
            assert list((tmp_path / "spill").rglob("*.log"))
            await anyio.sleep(0.5)
            hub.set_down(False)
            await _wait(lambda: rt.pending_events() == 0)
        tg.cancel_scope.cancel()
    trajs = sorted(daemon.buffer._items, key=lambda t: t.final_reward)
    assert len(trajs) == 6
    for t in trajs[1:]:
        assert [tr.index for tr in t.transitions] == list(range(30))
    # the spill log is removed once drained
    assert not list((tmp_path / "spill").rglob("*.log"))


async def test_shutdown_while_down_spills_and_next_process_replays(tmp_path):
    hub = MemoryHub()
    hub.set_down(True)
    async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:
        for i in range(4):
            await agent(i, 10)
        assert rt.pending_events() == 4 * 13
    # session exit waited the grace period, then wrote everything to the spill log
    assert list((tmp_path / "spill").rglob("*.log"))
    hub.set_down(False)
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt2:
            await agent(4, 10)
            await _wait(lambda: rt2.pending_events() == 0 and len(daemon.buffer) == 5)
        tg.cancel_scope.cancel()
    _check_exactly_once(list(daemon.buffer._items), 5, 10)
    assert not list((tmp_path / "spill").rglob("*.log"))


@lightning.rollout
async def slow_agent(i: int, steps: int) -> float:
    for s in range(steps):
        lightning.record_transition([i, s], [s] * 3, [-0.1] * 3, policy_version=s)
        await anyio.sleep(0.002)
    lightning.emit_reward(0.5)
    return float(i)


async def _run_in_scope(daemon, *, task_status=anyio.TASK_STATUS_IGNORED):
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.serve)
            task_status.started(scope)


async def test_daemon_restart_resumes_without_duplicates(tmp_path):
    hub = MemoryHub()
    cfg = DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0)
    first, second = Daemon(cfg, transport=hub), Daemon(cfg, transport=hub)
    async with anyio.create_task_group() as tg:
        scope = await tg.start(_run_in_scope, first)
        async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:
            async with anyio.create_task_group() as agents:
                for i in range(3):
                    agents.start_soon(slow_agent, i, 50)
                await _wait(lambda: first.stats().get("events_accepted", 0) > 20)
                scope.cancel()  # the daemon dies mid-stream...
                hub.set_down(True)
                await anyio.sleep(0.1)
                hub.set_down(False)  # ...and a new daemon process takes over the data dir
                await tg.start(_run_in_scope, second)
            await _wait(lambda: rt.pending_events() == 0)
        tg.cancel_scope.cancel()
    accepted_by_first = first.stats()["events_accepted"]
    assert 20 < accepted_by_first < 3 * 53
    # ingest counters are rebuilt from the log, so they count both daemons' work
    assert second.stats()["events_accepted"] == 3 * 53
    _, trajs, _ = recover(tmp_path / "data")
    _check_exactly_once(trajs, 3, 50)


async def test_busy_daemon_makes_client_wait_not_lose(tmp_path):
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub, buffer_size=2)
        async with lightning.session(transport=hub.connect(), max_batch_events=4,
                                     **_runtime_kw(tmp_path)) as rt:
            for i in range(5):
                await agent(i, 3)
            await anyio.sleep(0.3)
            assert rt.counters["nacks"] > 0 and rt.pending_events() > 0
            assert rt.counters["paused_by_daemon"] > 0  # soft backpressure came first
            assert daemon.stats()["flow_control_sent"] > 0
            got = []
            while len(got) < 5:
                got.append(await daemon.buffer.get())
            await _wait(lambda: rt.pending_events() == 0)
        tg.cancel_scope.cancel()
    _check_exactly_once(got, 5, 3)


async def test_unencodable_metadata_is_dropped_not_raised(tmp_path):
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:

            @lightning.rollout
            def a():
                lightning.record_transition([1], [2], metadata={"huge": 2**70})
                return 1.0

            assert a() == 1.0
            await _wait(lambda: rt.pending_events() == 0)
            assert rt.counters["events_dropped_unencodable"] == 1
        tg.cancel_scope.cancel()
    t = daemon.buffer.get_nowait()
    assert t.transitions == [] and t.warnings  # the end says 1 transition, 0 stored


def test_init_twice_is_an_error(tmp_path):
    lightning.init(daemon="tcp://127.0.0.1:9", **_runtime_kw(tmp_path))
    with pytest.raises(lightning.ConfigError, match="already"):
        lightning.init(daemon="tcp://127.0.0.1:9")
    lightning.shutdown(grace_s=0)
    lightning.shutdown()  # idempotent


def test_unknown_setting_is_an_error():
    with pytest.raises(lightning.ConfigError, match="unknown setting.*deamon"):
        lightning.init(deamon="tcp://127.0.0.1:1")
    with pytest.raises(lightning.ConfigError, match="max_queue_events"):
        lightning.init(max_queue_events=0)


def test_env_configuration(monkeypatch, tmp_path):
    from lightning._config import RuntimeConfig, from_env

    monkeypatch.setenv("LIGHTNING_DAEMON", "ipc:///tmp/x.sock")
    monkeypatch.setenv("LIGHTNING_MAX_QUEUE_EVENTS", "7")
    cfg = from_env(RuntimeConfig, {"heartbeat_s": 0.5})
    assert (cfg.daemon, cfg.max_queue_events, cfg.heartbeat_s) == ("ipc:///tmp/x.sock", 7, 0.5)
    monkeypatch.setenv("LIGHTNING_MAX_QUEUE_EVENTS", "lots")
    with pytest.raises(lightning.ConfigError, match="max_queue_events"):
        from_env(RuntimeConfig, {})


def test_llm_endpoint_from_env(monkeypatch):
    monkeypatch.setenv("LIGHTNING_POLICY_URL", "http://gpu-box:8000/v1")
    monkeypatch.setenv("LIGHTNING_TOKEN_ID_URLS", "http://a/v1, http://b/v1")
    ep = lightning.llm()
    assert (ep.base_url, ep.model, ep.api_key) == ("http://gpu-box:8000/v1", "default", "EMPTY")
    from lightning._config import RuntimeConfig, from_env

    assert from_env(RuntimeConfig, {}).token_id_urls == ("http://a/v1", "http://b/v1")


async def test_events_after_shutdown_are_counted_not_raised(tmp_path):
    hub = MemoryHub()
    async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:
        pass
    from lightning._protocol import RolloutStart

    rt.submit(RolloutStart(rollout_id="r", name="x"))
    assert rt.counters["events_after_shutdown"] == 1


async def test_orphan_log_with_a_gap_is_replayed_in_consecutive_frames(tmp_path):
    """A dead process's spill log missing a range (held only in memory) still replays."""
    import struct

    from lightning._log import AppendLog
    from lightning._protocol import RolloutEnd, RolloutStart, encode_event

    d = tmp_path / "spill" / "deadbeef"
    log = AppendLog(d)
    (d / "lock").touch()
    seq = struct.Struct("<Q")
    events = {1: RolloutStart(rollout_id="a", name="x"), 2: RolloutEnd(rollout_id="a"),
              5: RolloutStart(rollout_id="b", name="x"), 6: RolloutEnd(rollout_id="b")}
    for s_, e in events.items():
        log.append(seq.pack(s_) + encode_event(e))
    log.close()
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:
            await _wait(lambda: len(daemon.buffer) == 2 and rt.pending_events() == 0)
        tg.cancel_scope.cancel()
    assert sorted(t.rollout_id for t in daemon.buffer._items) == ["a", "b"]
    assert daemon.stats()["events_lost_by_client"] == 2
    assert not d.exists()


async def test_events_of_a_running_rollout_wait_until_it_ends(tmp_path):
    """Mid-rollout events wait up to open_linger_s; the rollout's end sends them at once,
    and so does a full batch."""
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        daemon = await _serve_daemon(tg, tmp_path, hub)
        kw = _runtime_kw(tmp_path, open_linger_s=30.0, max_batch_events=8)
        async with lightning.session(transport=hub.connect(), **kw) as rt:
            release = anyio.Event()

            @lightning.rollout
            async def agent(n: int) -> float:
                for s in range(n):
                    lightning.record_transition([s], [s], [-0.1], policy_version=0)
                await release.wait()
                return 1.0

            async with anyio.create_task_group() as agents:
                agents.start_soon(agent, 3)  # start + 3 transitions: a small batch
                await anyio.sleep(0.3)
                assert rt.counters["frames_sent"] == 0  # waiting: the rollout runs
                agents.start_soon(agent, 12)  # fills a batch of 8: sent while running
                await _wait(lambda: rt.counters["frames_sent"] >= 1, 5)
                assert daemon.stats().get("events_accepted", 0) >= 8
                release.set()
            with anyio.fail_after(5):  # far less than open_linger_s: the ends sent them
                while rt.pending_events():
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    _, trajs, _ = recover(tmp_path / "data")
    assert sorted(len(t.transitions) for t in trajs) == [3, 12]


async def test_linger_groups_trickling_events_into_one_frame(tmp_path):
    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(transport=hub.connect(), linger_s=0.2,
                                     **_runtime_kw(tmp_path, open_linger_s=0.2)) as rt:
            await agent(0, 3)  # 6 events, recorded within far less than the linger
            await anyio.sleep(0.05)
            assert rt.counters["frames_sent"] == 0  # still waiting for company
            await _wait(lambda: rt.pending_events() == 0, 5)
            assert rt.counters["frames_sent"] == 1
        tg.cancel_scope.cancel()


async def test_a_stalled_app_is_not_a_silent_daemon(tmp_path):
    """While the app holds the thread (CPU-bound agent code, a blocking call), neither the
    runtime nor the daemon's answers can run: that time is not the daemon's silence, so
    the runtime must not reconnect and resend when it gets the thread back."""
    import time

    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        await _serve_daemon(tg, tmp_path, hub)
        async with lightning.session(transport=hub.connect(), **_runtime_kw(tmp_path)) as rt:
            await agent(0, 3)
            await _wait(lambda: rt.pending_events() == 0)
            for i in range(1, 4):
                await agent(i, 3)
                time.sleep(0.5)  # blocks the loop: > peer_timeout_s (0.3)
            await _wait(lambda: rt.pending_events() == 0)
            assert rt.counters["reconnects"] == 0
            assert rt.counters["frames_resent"] == 0
        tg.cancel_scope.cancel()
