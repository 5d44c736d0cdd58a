"""The real thing: `lightning-daemon` processes, ZeroMQ sockets, SIGKILL, CURVE."""

from __future__ import annotations

import subprocess
import sys
import time

import anyio
import pytest

import lightning
from lightning._protocol import unpack_ids
from lightning.testing import recover

from lightning_test_helpers import ROOT, free_tcp_address, wait_until

N_ROLLOUTS = 4
STEPS = 2500  # 4 x 2500 = 10,000 transitions


@lightning.rollout
async def paced_agent(i: int) -> float:
    for s in range(STEPS):
        lightning.record_transition([i, s] + [7] * 30, [s % 1000] * 8, [-0.25] * 8, policy_version=1)
        if s % 5 == 4:
            await anyio.sleep(0.002)
    return float(i)


def _check(data_dir, n_rollouts, steps):
    state, trajs, _ = recover(data_dir)
    assert not state.open
    assert len(trajs) == n_rollouts
    for t in trajs:
        i = int(t.final_reward)
        assert [tr.index for tr in t.transitions] == list(range(steps))
        ids = [list(unpack_ids(tr.prompt_ids))[:2] for tr in t.transitions]
        assert ids == [[i, s] for s in range(steps)]
    assert sorted(int(t.final_reward) for t in trajs) == list(range(n_rollouts))
    return state


def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(daemon_process, tmp_path):
    d = daemon_process().start()
    rt = lightning.init(daemon=d.address, spill_dir=str(tmp_path / "spill"), heartbeat_s=0.1,
                        peer_timeout_s=1.0, max_batch_events=64)

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(N_ROLLOUTS):
                tg.start_soon(paced_agent, i)
            await anyio.to_thread.run_sync(
                lambda: wait_until(lambda: rt.counters["events_acked"] > 2000, 60)
            )
            d.kill()  # SIGKILL: no flush, no goodbye
            acked_at_kill = rt.counters["events_acked"]
            await anyio.sleep(0.7)
            d.start()  # same address, same data dir
            return acked_at_kill

    acked_at_kill = anyio.run(main)
    assert 2000 < acked_at_kill < N_ROLLOUTS * (STEPS + 2)
    assert wait_until(lambda: rt.pending_events() == 0, 60), rt.stats()
    assert rt.counters["reconnects"] + rt.counters["nacks"] >= 1
    lightning.shutdown()
    assert d.stop() == 0
    state = _check(tmp_path / "data", N_ROLLOUTS, STEPS)
    assert state.counters["events_accepted"] == N_ROLLOUTS * (STEPS + 2)
    assert not list((tmp_path / "spill").rglob("*.log"))


@pytest.mark.parametrize("mode", ["session", "thread"])
def test_event_loop_never_blocked_while_daemon_down(daemon_process, tmp_path, mode):
    address = free_tcp_address()
    spill = str(tmp_path / "spill")
    kw = dict(daemon=address, spill_dir=spill, heartbeat_s=0.1, peer_timeout_s=0.5,
              max_queue_events=500)
    max_gap = 0.0

    async def ticker(stop):
        nonlocal max_gap
        last = time.perf_counter()
        while not stop.is_set():
            await anyio.sleep(0.005)
            now = time.perf_counter()
            max_gap = max(max_gap, now - last - 0.005)
            last = now

    @lightning.rollout
    async def busy_agent(i):
        for s in range(300):
            lightning.record_transition(list(range(512)), list(range(128)), [-0.1] * 128)
            if s % 10 == 0:
                await anyio.sleep(0.001)
        return float(i)

    async def app(rt):
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker, stop)
            t0 = time.monotonic()
            i = 0
            while time.monotonic() - t0 < 3.0:  # the daemon is down all this time
                await busy_agent(i)
                i += 1
            assert rt.counters["events_spilled"] > 0
            # (starting a process blocks: not in the loop under test)
            d = await anyio.to_thread.run_sync(daemon_process(address=address).start)
            await anyio.to_thread.run_sync(lambda: wait_until(lambda: rt.pending_events() == 0, 60))
            stop.set()
        return d, i

    async def run_session():
        async with lightning.session(**kw) as rt:
            return await app(rt)

    if mode == "session":
        d, n = anyio.run(run_session)
    else:
        rt = lightning.init(**kw)
        d, n = anyio.run(app, rt)
        lightning.shutdown()
    # A blocking call would stall the loop for a reconnect or peer timeout (>= 500 ms here);
    # 250 ms leaves room for the OS scheduler on a loaded 2-core CI box.
    assert max_gap < 0.250, f"event loop blocked for {max_gap * 1000:.1f} ms"
    d.stop()
    state, trajs, _ = recover(tmp_path / "data")
    assert len(trajs) == n and all(len(t.transitions) == 300 for t in trajs)
    assert sum(len(t.transitions) for t in trajs) == n * 300


def test_ipc_transport(daemon_process, tmp_path):
    d = daemon_process(address=f"ipc://{tmp_path}/d.sock").start()
    lightning.init(daemon=d.address, spill_dir=str(tmp_path / "spill"))

    @lightning.rollout
    def agent():
        lightning.record_transition([1, 2], [3])
        return 1.0

    for _ in range(10):
        agent()
    assert wait_until(lambda: lightning.get_runtime().pending_events() == 0, 20)
    lightning.shutdown()
    d.stop()
    _, trajs, _ = recover(tmp_path / "data")
    assert len(trajs) == 10


def _cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "lightning._cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cli_help_and_bad_arguments(tmp_path):
    out = _cli("--help")
    assert out.returncode == 0 and "--bind" in out.stdout and "--backend" in out.stdout
    out = _cli("--backend", "tensorflow")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = _cli("--bind", "tcp://0.0.0.0:0", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "without authentication" in out.stderr
    out = _cli("--bind", "udp://x", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "unsupported address" in out.stderr


def test_curve_authentication_for_non_loopback(daemon_process, tmp_path):
    keys = tmp_path / "keys"
    assert _cli("keygen", str(keys)).returncode == 0
    allowed = keys / "allowed"
    allowed.mkdir()
    (keys / "client.key").rename(allowed / "client.key")
    assert _cli("keygen", str(tmp_path / "other"), "--names", "intruder").returncode == 0
    port = free_tcp_address().rsplit(":", 1)[1]
    d = daemon_process("--curve-secret-key", str(keys / "daemon.key_secret"),
                       "--curve-authorized-keys", str(allowed),
                       address=f"tcp://0.0.0.0:{port}").start()
    target = f"tcp://127.0.0.1:{port}"

    @lightning.rollout
    def agent():
        lightning.record_transition([1], [2])
        return 1.0

    # an unknown key gets nowhere
    rt = lightning.init(daemon=target, spill_dir=str(tmp_path / "s1"),
                        curve_server_key=str(keys / "daemon.key"),
                        curve_secret_key_file=str(tmp_path / "other" / "intruder.key_secret"),
                        replay_orphans=False)
    agent()
    time.sleep(1.5)
    assert rt.pending_events() == 3 and not rt.stats()["connected"]
    lightning.shutdown(grace_s=0)

    # the authorised key delivers
    rt = lightning.init(daemon=target, spill_dir=str(tmp_path / "s2"),
                        curve_server_key=str(keys / "daemon.key"),
                        curve_secret_key_file=str(keys / "client.key_secret"))
    agent()
    assert wait_until(lambda: rt.pending_events() == 0, 20)
    lightning.shutdown()
    d.stop()
    _, trajs, _ = recover(tmp_path / "data")
    assert len(trajs) == 1
