"""Disk full, for real: the daemon's data dir and the app's spill dir on a small tmpfs.

Needs root (``mount -t tmpfs``); skipped cleanly where mounting is not permitted. The
short-write path (a file system that fills up mid-record) is also tested without root.
"""

from __future__ import annotations

import errno
import os
import subprocess

import anyio
import pytest

import lightning
from lightning import DaemonConfig
from lightning._log import AppendLog
from lightning._protocol import Ack, Nack, encode_batch, encode_event
from lightning.testing import Daemon, MemoryHub, recover

from test_daemon import Harness, _end, _start, _tr


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs; yields its path and a function that fills it but ``keep`` bytes."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    filler = mnt / "filler"

    def fill(keep: int) -> None:
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        with open(filler, "ab") as f:
            f.write(b"\0" * max(free - keep, 0))

    try:
        yield mnt, fill, filler
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _rollout_frames(cid, n, first=1, steps=3):
    frames, seq = [], first
    for i in range(n):
        ev = [_start(f"r{i}"), *[_tr(f"r{i}", k, n=200) for k in range(steps)], _end(f"r{i}", steps)]
        frames.append((seq, encode_batch(cid, seq, [encode_event(e) for e in ev]), len(ev)))
        seq += len(ev)
    return frames


def test_daemon_disk_full_nacks_retryably_keeps_serving_and_resumes(small_disk, tmp_path):
    mnt, fill, filler = small_disk
    h = Harness(tmp_path, data_dir=str(mnt / "data"))
    h.hello()
    fill(keep=64 << 10)
    acked, refused = 0, 0
    frames = _rollout_frames("c1", 200)
    pending = list(frames)
    while pending:
        seq, frame, n = pending[0]
        reply = h.send(frame)
        if isinstance(reply, Nack):
            assert reply.code == "disk_full" and reply.retry and reply.retry_after_s > 0
            refused += 1
            break
        assert isinstance(reply, Ack) and reply.acked_through == seq + n - 1
        acked = reply.acked_through
        pending.pop(0)
    assert refused and pending, "the disk never filled up"
    # still serving: pings, Hello, and the same refusal while full; nothing acked
    assert h.send(pending[0][1]).code == "disk_full"
    assert h.hello().acked_through == acked
    assert h.daemon.stats()["nacked.disk_full"] == 2
    filler.unlink()  # space is back: the same frames are stored, in order
    for seq, frame, n in pending:
        assert h.send(frame).acked_through == seq + n - 1
    h.close()
    state, trajs, _ = recover(mnt / "data")
    assert sorted(t.rollout_id for t in trajs) == sorted(f"r{i}" for i in range(200))
    assert state.counters["events_accepted"] == 200 * 5 and not state.counters.get("events_duplicate")


@lightning.rollout
async def _agent(i: int) -> float:
    for k in range(3):
        lightning.record_transition([i] * 100, [k] * 20, [-0.1] * 20)
    return float(i)


async def test_app_spill_disk_full_holds_in_memory_says_so_and_delivers(small_disk, tmp_path, caplog):
    mnt, fill, filler = small_disk
    hub = MemoryHub()
    hub.set_down(True)
    n = 300
    async with anyio.create_task_group() as tg:
        daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                        transport=hub)
        await tg.start(daemon.serve)
        async with lightning.session(transport=hub.connect(), spill_dir=str(mnt / "spill"),
                                     max_queue_events=50, open_linger_s=0) as rt:
            fill(keep=32 << 10)
            for i in range(n):
                await _agent(i)
            s = lightning.stats()
            # said when it happened, not at shutdown; nothing dropped (memory held it)
            assert s["running"] and s["spill_failures"] > 0 and s["held_unspillable"] > 0
            assert s["events_dropped_spill_failed"] == 0
            hub.set_down(False)
            with anyio.fail_after(30):
                while rt.pending_events():
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    trajs = list(daemon.buffer._items)
    assert sorted(int(t.final_reward) for t in trajs) == list(range(n))
    assert all(len(t.transitions) == 3 for t in trajs)
    assert daemon.stats()["events_accepted"] == n * 5


def test_a_short_write_is_undone_not_left_torn(tmp_path, monkeypatch):
    log = AppendLog(tmp_path / "l")
    log.append(b"a" * 100)
    real = os.writev

    def short(fd, bufs):
        data = b"".join(bufs)
        return os.write(fd, data[: len(data) // 2])

    monkeypatch.setattr("lightning._log.os.writev", short)
    with pytest.raises(OSError) as exc:
        log.append(b"b" * 100)
    assert exc.value.errno == errno.ENOSPC
    monkeypatch.setattr("lightning._log.os.writev", real)
    log.append(b"c" * 100)
    assert list(log) == [b"a" * 100, b"c" * 100] and log.count() == 2
    log.close()
    assert AppendLog(tmp_path / "l").truncated_bytes == 0


async def test_spill_cap_drops_the_newest_counted_without_a_sequence_gap(tmp_path):
    hub = MemoryHub()
    hub.set_down(True)
    async with anyio.create_task_group() as tg:
        daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                        transport=hub)
        await tg.start(daemon.serve)
        async with lightning.session(transport=hub.connect(), spill_dir=str(tmp_path / "s"),
                                     max_queue_events=10, max_spill_bytes=20_000,
                                     open_linger_s=0) as rt:
            for i in range(60):
                await _agent(i)
            s = rt.stats()
            assert s["events_dropped_spill_full"] > 0 and s["spill_bytes"] <= 20_000
            kept = s["events_submitted"] - s["events_dropped_spill_full"]
            hub.set_down(False)
            with anyio.fail_after(30):
                while rt.pending_events():
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    stats = daemon.stats()
    assert stats["events_accepted"] + stats.get("rejected.unknown_rollout", 0) == kept
    assert stats.get("events_lost_by_client", 0) == 0 and rt.counters["events_acked"] == kept


def test_server_side_capture_on_a_full_disk_is_a_retryable_refusal(small_disk, tmp_path):
    """ingest_local (server-side capture, OTLP) on a full disk: a ``disk_full`` rejection,
    nothing stored, no sequence number taken; stored once space is back."""
    mnt, fill, filler = small_disk
    h = Harness(tmp_path, data_dir=str(mnt / "data"))
    d = h.daemon
    fill(keep=16 << 10)
    refused = None
    for i in range(400):
        rej = d.ingest_local(_start(f"s{i}"))
        if rej is not None:
            refused = i
            assert rej.code == "disk_full" and "send it again later" in rej.reason
            break
    assert refused is not None, "the disk never filled up"
    seq = d._local_seq
    assert d.ingest_local(_start(f"s{refused}")).code == "disk_full"
    assert d._local_seq == seq  # no sequence number was taken
    filler.unlink()
    assert d.ingest_local(_start(f"s{refused}")) is None
    h.close()
    state, _, _ = recover(mnt / "data")
    assert set(state.open) == {f"s{i}" for i in range(refused + 1)}
