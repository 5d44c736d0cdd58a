"""kill -9 with exact accounting: the daemon at random points under load, and an app in
the middle of replaying a partly acknowledged spill log (restarted on the same spill dir).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import anyio

import lightning
from lightning.testing import recover

from lightning_test_helpers import ROOT, wait_until
from test_zmq_end_to_end import _check

STEPS = 20


@lightning.rollout
async def _paced(i: int) -> float:
    for s in range(STEPS):
        lightning.record_transition([i, s] + [7] * 30, [s % 1000] * 8, [-0.25] * 8)
        if s % 5 == 4:
            await anyio.sleep(0.002)
    return float(i)


def test_daemon_sigkilled_at_random_points_stores_every_acked_event_once(daemon_process, tmp_path):
    n = 150
    total = n * (STEPS + 2)
    rng = random.Random(14)
    points = sorted(rng.sample(range(total // 10, total * 8 // 10), 3))
    d = daemon_process().start()
    rt = lightning.init(daemon=d.address, spill_dir=str(tmp_path / "spill"), heartbeat_s=0.1,
                        peer_timeout_s=1.0, max_batch_events=32)

    async def main():
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(_paced, i)
            for p in points:
                await anyio.to_thread.run_sync(
                    lambda: wait_until(lambda: rt.counters["events_acked"] >= p, 60))
                d.kill()  # SIGKILL: no flush, no goodbye
                await anyio.sleep(rng.uniform(0.05, 0.5))
                d.start()  # same address, same data dir

    anyio.run(main)
    assert wait_until(lambda: rt.pending_events() == 0, 60), rt.stats()
    assert rt.counters["events_acked"] == total and rt.counters["events_rejected"] == 0
    lightning.shutdown()
    assert d.stop() == 0
    state = _check(tmp_path / "data", n, STEPS)
    assert state.counters["events_accepted"] == total


APP = """
import sys, threading, time, anyio, lightning
addr, spill, n, phase = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rt = lightning.init(daemon=addr, spill_dir=spill, max_queue_events=1, max_batch_events=8,
                    max_inflight_frames=1, heartbeat_s=0.1, peer_timeout_s=1.0, open_linger_s=0)
@lightning.rollout
def agent(i):
    for s in range(3):
        lightning.record_transition([i, s], [s], [-0.5])
    return float(i)
if phase == "record":
    for i in range(n):
        agent(i)
    print("@recorded", flush=True)
while True:
    s = lightning.stats()
    print("@", s["events_acked"], s["orphan_events_already_acked"], rt.pending_events(),
          flush=True)
    if phase == "replay" and rt.pending_events() == 0:
        lightning.shutdown()
        break
    time.sleep(0.01)
"""


def _lines(proc):
    """The script's own lines (the library logs to stdout too)."""
    for line in proc.stdout:
        if line.startswith("@"):
            yield line[1:].split()


def _app(address, spill, n, phase):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", APP, address, str(spill), str(n), phase],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def test_app_sigkilled_mid_replay_then_restarted_on_its_spill_dir(daemon_process, tmp_path):
    """The app records everything while the daemon is down (all spilled), the daemon
    comes up, the app is killed -9 part-way through sending its spill log; a new process on
    the same spill dir replays only what was not acknowledged: every rollout once."""
    from lightning_test_helpers import free_tcp_address

    n = 1500
    address, spill = free_tcp_address(), tmp_path / "spill"
    app = _app(address, spill, n, "record")
    lines = _lines(app)
    assert next(lines) == ["recorded"]  # all recorded, nothing sent yet
    d = daemon_process(address=address).start()
    deadline = time.monotonic() + 60
    for fields in lines:
        acked = int(fields[0])
        if acked >= n * 5 // 3 or time.monotonic() > deadline:
            break
    app.kill()  # SIGKILL mid-replay
    app.wait()
    app.stdout.close()
    assert n * 5 // 3 <= acked < n * 5
    assert list(spill.rglob("*.log"))  # a partly acknowledged spill log is left behind
    app2 = _app(address, spill, n, "replay")
    out = app2.communicate(timeout=120)[0].split("\n")
    assert app2.returncode == 0
    last = [line[1:].split() for line in out if line.startswith("@")][-1]
    assert int(last[1]) >= acked  # already acknowledged records were skipped, not resent
    assert d.stop() == 0
    state, trajs, _ = recover(tmp_path / "data")
    assert sorted(int(t.final_reward) for t in trajs) == list(range(n))
    assert all([x.index for x in t.transitions] == [0, 1, 2] for t in trajs)
    assert state.counters["events_accepted"] == n * 5
    assert not state.counters.get("events_lost_by_client")
    assert not list(spill.rglob("*.log"))
