"""The daemon's receive loop shares the event loop: during a burst of frames (receives that
are already complete, so awaiting them never yields) the consumer, the stats loop and
other tasks keep running, and finished trajectories do not pile up in the buffer."""

from __future__ import annotations

import threading

import anyio
import zmq
from test_daemon import _batch, _end, _start, _tr

from lightning import DaemonConfig
from lightning._daemon import YIELD_EVERY_FRAMES
from lightning._protocol import PROTOCOL_VERSION, Hello, encode_message
from lightning.testing import Daemon, MemoryHub

N = 600  # frames in the burst, each a whole rollout


def _frames(cid="c1"):
    return [
        _batch(1 + 3 * i, [_start(f"r{i}"), _tr(f"r{i}", 0), _end(f"r{i}", 1)], cid=cid)
        for i in range(N)
    ]


async def test_consumer_and_other_tasks_run_during_a_burst(tmp_path):
    """Every frame is queued before the daemon reads the first, so no receive ever
    waits: only the loop's own checkpoints let anything else run."""
    hub = MemoryHub(capacity=N + 10)
    client = hub.connect()
    client.send(encode_message(Hello(protocol_version=PROTOCOL_VERSION, client_id="c1")))
    for f in _frames():
        client.send(f)
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0), transport=hub
    )
    seen_at: list[int] = []  # frames received when the consumer got each trajectory
    ticks: list[int] = []  # frames received at each turn of an unrelated task

    async def consumer():
        async for traj in daemon.buffer:
            seen_at.append(daemon.counters["frames_received"])
            daemon.buffer.commit(traj.index)

    async def ticker():
        while True:
            ticks.append(daemon.counters["frames_received"])
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(consumer)
        tg.start_soon(ticker)
        await tg.start(daemon.serve)
        with anyio.fail_after(60):
            while len(seen_at) < N:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    during = [n for n in ticks if 1 < n < N + 1]  # between the first and the last frame
    assert len(set(during)) >= N // YIELD_EVERY_FRAMES - 1
    # the consumer took trajectories while the burst went on, not all at its end
    assert min(seen_at) <= YIELD_EVERY_FRAMES + 1
    assert sum(n < N + 1 for n in seen_at) >= N // 2
    assert daemon.counters["receive_loop_yields"] >= N // YIELD_EVERY_FRAMES


async def test_stats_loop_and_consumer_keep_running_during_a_zmq_burst(tmp_path):
    """A real ZeroMQ burst from another thread: the daemon's stats task (a timer) fires
    and the consumer drains while frames are still arriving."""
    daemon = Daemon(
        DaemonConfig(
            bind="tcp://127.0.0.1:0", data_dir=str(tmp_path / "data"), stats_interval_s=0.001
        )
    )
    frames = _frames()
    stats_at: list[int] = []
    consumed_at: list[int] = []
    orig_stats = daemon.stats

    def stats():
        stats_at.append(daemon.counters["frames_received"])
        return orig_stats()

    daemon.stats = stats
    sent = threading.Event()

    def blast(address):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 5000)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(address)
        sock.send(encode_message(Hello(protocol_version=PROTOCOL_VERSION, client_id="c1")))
        for f in frames:
            sock.send(f)
        sent.set()
        acks = 0
        while acks < N + 1:  # the Welcome and one Ack per frame
            sock.recv()
            acks += 1
        sock.close()
        ctx.term()

    async def consumer():
        async for traj in daemon.buffer:
            consumed_at.append(daemon.counters["frames_received"])
            daemon.buffer.commit(traj.index)

    async with anyio.create_task_group() as tg:
        address = await tg.start(daemon.serve)
        tg.start_soon(consumer)
        thread = threading.Thread(target=blast, args=(address,), daemon=True)
        thread.start()
        with anyio.fail_after(120):
            while len(consumed_at) < N:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    thread.join(30)
    assert not thread.is_alive()
    # both ran before the last frame was handled (not only once the burst was over)
    assert min(consumed_at) < N + 1 and min(stats_at) < N + 1
    assert sum(n < N + 1 for n in consumed_at) > 0
