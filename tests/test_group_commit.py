"""``fsync=always`` as a group commit: the fsync runs in a worker thread, the event loop
keeps receiving meanwhile, and no reply (ack, gap nack, welcome) nor trajectory leaves
before the fsync that covers what was appended before it has returned."""

from __future__ import annotations

import threading

import anyio
import pytest
from test_daemon import _batch, _end, _start, _tr

import lightning._daemon as daemon_mod
from lightning import DaemonConfig
from lightning._log import AppendLog
from lightning._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Hello,
    Ping,
    Welcome,
    decode_message,
    encode_message,
)
from lightning.testing import Daemon, MemoryHub, recover


class SlowFsync:
    """An instrumented fsync: blocks until released; records what was durable when."""

    def __init__(self, real):
        self.real = real
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.returned = 0  # fsyncs that returned

    def __call__(self, fds):
        self.calls += 1
        self.entered.set()
        self.gate.wait(60)
        self.real(fds)
        self.returned += 1


async def _wait(pred, timeout=30.0):
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.005)


async def test_acks_wait_for_the_fsync_and_the_loop_keeps_serving(tmp_path, monkeypatch):
    slow = SlowFsync(daemon_mod.fsync_all)
    monkeypatch.setattr(daemon_mod, "fsync_all", slow)
    hub = MemoryHub()
    client = hub.connect()
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0, fsync="always"),
        transport=hub,
    )
    replies: list = []  # (message, fsyncs returned when it arrived)
    ticks = [0]

    async def reader():
        while True:
            msg = decode_message(await client.recv())
            replies.append((msg, slow.returned))

    async def ticker():  # any other task of the loop (HTTP, stats, the trainer)
        while True:
            ticks[0] += 1
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        tg.start_soon(reader)
        tg.start_soon(ticker)
        client.send(encode_message(Hello(protocol_version=PROTOCOL_VERSION, client_id="c1")))
        await _wait(lambda: replies)
        assert isinstance(replies[0][0], Welcome)  # nothing was appended: not held
        client.send(_batch(1, [_start("a"), _tr("a", 0), _end("a", 1)]))
        await _wait(slow.entered.is_set)  # the fsync of frame 1 is stuck in its thread
        # the loop goes on: it receives and stores more frames, other tasks run...
        client.send(_batch(4, [_start("b"), _end("b", 0)]))
        client.send(encode_message(Ping(sent_at=1.0)))
        await _wait(lambda: daemon.counters["frames_received"] == 4)
        t = ticks[0]
        await _wait(lambda: ticks[0] > t + 5)
        # ...but nothing was acknowledged, and no trajectory handed to the trainer
        assert len(replies) == 1 and len(daemon.buffer) == 0
        slow.gate.set()
        await _wait(lambda: any(isinstance(m, Ack) and m.acked_through == 5 for m, _ in replies))
        await _wait(lambda: len(daemon.buffer) == 2)
        tg.cancel_scope.cancel()
    acks = [(m, n) for m, n in replies if isinstance(m, Ack)]
    assert [m.acked_through for m, _ in acks] == [3, 5]
    assert all(n >= 1 for _, n in replies[1:])  # every later reply after an fsync returned
    assert daemon.counters["group_commits"] >= 1
    _, pending, _ = recover(tmp_path / "data")
    assert [t.rollout_id for t in pending] == ["a", "b"]


async def test_a_failed_fsync_stops_the_daemon_without_acking(tmp_path, monkeypatch):
    def broken(fds):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(daemon_mod, "fsync_all", broken)
    hub = MemoryHub()
    client = hub.connect()
    daemon = Daemon(
        DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0, fsync="always"),
        transport=hub,
    )
    client.send(encode_message(Hello(protocol_version=PROTOCOL_VERSION, client_id="c1")))
    client.send(_batch(1, [_start("a"), _end("a", 0)]))
    with pytest.raises(BaseException) as exc:  # the task group's ExceptionGroup
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.serve)
    assert "Input/output error" in repr(exc.value)
    replies = []
    while True:
        with anyio.move_on_after(0.05):
            replies.append(decode_message(await client.recv()))
            continue
        break
    assert not any(isinstance(m, Ack) for m in replies)


def test_begin_sync_covers_segments_rotated_away(tmp_path):
    log = AppendLog(tmp_path / "wal", segment_bytes=64, group_sync=True)
    log.append(b"x" * 100)  # fills the first segment
    log.append(b"y" * 10)  # rotates: the first segment's fd is kept for the next sync
    fds = log.begin_sync()
    assert len(fds) == 2 and not log.unsynced
    log.end_sync(fds)
    log.append(b"z")
    assert log.unsynced
    log.sync()
    assert not log.unsynced
    log.close()
    assert [len(r) for r in AppendLog(tmp_path / "wal")] == [100, 10, 1]
