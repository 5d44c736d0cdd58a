"""The daemon's ingest service: receive, validate, de-duplicate, store, acknowledge.

For every frame: size check -> decode -> session check -> gap check -> append the frame
to the write-ahead log and hand it to the OS (``fsync`` optional) -> apply it to the
:class:`~lightning._ingest.IngestState` -> acknowledge. A frame is acknowledged only
after it is in the log, so a killed daemon never loses an acknowledged event; on start the
log is replayed through the same state machine, which rebuilds the de-duplication marks
and the open and finished rollouts exactly.

Completed trajectories go to :attr:`Daemon.buffer`, which an in-process consumer (the
trainer) reads. The consumer calls :meth:`TrajectoryBuffer.commit` for what it has used;
the commit point is persisted, so a restarted daemon does not hand out used
trajectories again. When the buffer is full, frames are refused with a retryable
``busy`` nack: clients keep the data (in memory, then on disk) and retry.

Bad input never stops the daemon: every refused frame or event gets a nack or a
rejection with a reason, a log line and a counter, and the next frame is served.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from ._config import DaemonConfig
from ._errors import ProtocolError
from ._ingest import GapError, IngestState, Snapshot, Trajectory
from ._log import AppendLog, fsync_all, unlink_segments
from ._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Error,
    Event,
    Farewell,
    FlowControl,
    Goodbye,
    Hello,
    Nack,
    Ping,
    Pong,
    Rejection,
    Retired,
    Reward,
    RolloutEnd,
    RolloutStart,
    Transition,
    WalRecord,
    Welcome,
    check_hello,
    decode_event,
    decode_frame,
    encode_batch,
    encode_event,
    encode_message,
    pack_ids,
    pack_logprobs,
    validate_event,
)
from ._transport.base import ServerTransport

logger = structlog.get_logger()

__all__ = ["Daemon", "LocalCapture", "TrajectoryBuffer", "recover"]

YIELD_EVERY_FRAMES = 32
"""The receive loop yields to the event loop after this many frames..."""
YIELD_EVERY_S = 0.002
"""...or after this many seconds of handling frames, whichever comes first."""


class TrajectoryBuffer:
    """Completed trajectories in completion order, for one in-process consumer."""

    def __init__(self, max_size: int, *, on_commit=None) -> None:
        self.max_size = max_size
        self._items: deque[Trajectory] = deque()
        self._event = anyio.Event()
        self._on_commit = on_commit
        self.committed_through = -1

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return len(self._items) >= self.max_size

    def nearly_full(self) -> bool:
        return len(self._items) >= 0.9 * self.max_size

    def put(self, traj: Trajectory) -> None:
        self._items.append(traj)
        self._event.set()

    def get_nowait(self) -> Trajectory:
        """Pop the oldest trajectory; raise ``anyio.WouldBlock`` if there is none."""
        if not self._items:
            raise anyio.WouldBlock
        return self._items.popleft()

    async def get(self) -> Trajectory:
        while not self._items:
            self._event = anyio.Event()
            await self._event.wait()
        return self._items.popleft()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Trajectory:
        return await self.get()

    def commit(self, index: int) -> None:
        """Mark trajectories up to ``index`` as used: a restarted daemon skips them."""
        if index > self.committed_through:
            self.committed_through = index
            if self._on_commit is not None:
                self._on_commit(index)


def recover(
    data_dir: str | os.PathLike, *, max_finished_remembered: int = 1_000_000,
    quarantine: Callable[[bytes, str], None] | None = None, include_committed: bool = False,
) -> tuple[IngestState, list[Trajectory], int]:
    """Rebuild the ingest state from a data directory without starting a daemon.

    Returns ``(state, trajectories not yet committed, committed_through)``; with
    ``include_committed``, every finished trajectory the snapshot and the log still hold.
    Used at start-up and by tools (``lightning-daemon inspect``) and tests that inspect
    what a daemon stored.

    Recovery never refuses to start. A log record it cannot decode or apply is skipped,
    counted (``wal_records_quarantined``), logged, and handed to ``quarantine(record,
    reason)`` (the daemon moves it aside); a sequence gap between records (a record
    lost, or never written) is accepted and counted (``wal_gaps_replayed``), since what
    follows it was acknowledged.
    """
    wal_dir = Path(data_dir) / "wal"
    committed = _read_cursor(Path(data_dir))
    snap = _read_snapshot(Path(data_dir))
    if snap is None:
        state = IngestState(max_finished_remembered=max_finished_remembered)
        pending: list[Trajectory] = []
        wal_from = ""
    else:
        state = IngestState.from_snapshot(snap, max_finished_remembered=max_finished_remembered)
        pending = [t for t in snap.pending if include_committed or t.index > committed]
        wal_from = snap.wal_from
    if not wal_dir.exists():
        return state, pending, committed
    log = AppendLog(wal_dir)
    try:
        for frame in log.iter_from(wal_from):
            try:
                completed = _replay(state, frame)
            except Exception as exc:  # noqa: BLE001 - any record recovery cannot apply
                reason = f"{type(exc).__qualname__}: {exc}"
                state.counters["wal_records_quarantined"] += 1
                logger.error("daemon.wal_record_quarantined", bytes=len(frame),
                             reason=reason[:500], consequence="this record is not replayed; "
                             "it is kept in the data directory's quarantine/ folder")
                if quarantine is not None:
                    quarantine(bytes(frame), reason)
                continue
            pending.extend(t for t in completed if include_committed or t.index > committed)
    finally:
        log.close()
    return state, pending, committed


_wal_decoder = msgspec.msgpack.Decoder(WalRecord)


def _replay(state: IngestState, frame: bytes) -> list[Trajectory]:
    """Apply one write-ahead log record; a gap before it is accepted (and counted)."""
    batch = _wal_decoder.decode(frame)
    if type(batch) is Retired:
        state.retire(batch.client_id, batch.through, batch.reason)
        return []
    try:
        state.check_gap(batch)
    except GapError:
        state.counters["wal_gaps_replayed"] += 1
        batch = msgspec.structs.replace(batch, resync=True)
    return state.apply(batch).completed


def check_local_event(event: Event, *, max_bytes: int) -> tuple[bytes, Event]:
    """``(encoded, decoded)`` of an event made inside the daemon, checked exactly as a
    client's event is: encodable (no ints beyond 64 bits, no foreign types), at most
    ``max_bytes``, of the wire types (a Struct built in Python is not type-checked), and
    structurally valid (:func:`validate_event`). What passes replays from the log.

    Raises:
        ProtocolError: code ``invalid`` or ``too_large``, naming the field.
    """
    kind = type(event).__name__
    try:
        data = encode_event(event)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid {kind}: {exc}", code="invalid") from exc
    if len(data) > max_bytes:
        raise ProtocolError(f"{kind} of {len(data)} bytes exceeds the daemon's limit of "
                            f"{max_bytes} (--max-frame-bytes)", code="too_large")
    try:
        checked = decode_event(data)
    except RecursionError as exc:
        raise ProtocolError(f"invalid {kind}: nested too deeply", code="invalid") from exc
    validate_event(checked)
    return data, checked


_SNAPSHOT = "snapshot.msgpack"
_QUARANTINE = "quarantine"
_snapshot_decoder = msgspec.msgpack.Decoder(Snapshot)


def _read_snapshot(data_dir: Path) -> Snapshot | None:
    try:
        data = (data_dir / _SNAPSHOT).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return _snapshot_decoder.decode(data)
    except msgspec.DecodeError as exc:  # written by rename: only a foreign edit breaks it
        raise RuntimeError(
            f"{data_dir / _SNAPSHOT} is corrupt ({exc}): the write-ahead log before it is "
            "gone, so the daemon cannot recover; restore the file or start a new data dir"
        ) from exc


def _write_snapshot(data_dir: Path, data: bytes) -> None:
    """Write, fsync and rename a snapshot into place (blocking: a worker thread's job)."""
    tmp = data_dir / (_SNAPSHOT + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_dir / _SNAPSHOT)


def _read_cursor(data_dir: Path) -> int:
    try:
        return int((data_dir / "cursor").read_text().strip())
    except (FileNotFoundError, ValueError):
        return -1


class Daemon:
    """Ingest service. ``addr = await tg.start(daemon.serve)``; read ``daemon.buffer``."""

    def __init__(
        self, config: DaemonConfig | None = None, *, transport: ServerTransport | None = None
    ) -> None:
        self.config = config or DaemonConfig()
        self.daemon_id = uuid.uuid4().hex
        self._transport = transport
        self._data_dir = Path(self.config.data_dir)
        self.state = IngestState(max_finished_remembered=self.config.max_finished_remembered)
        self.buffer = TrajectoryBuffer(self.config.buffer_size, on_commit=self._write_cursor)
        self.counters: Counter[str] = Counter()
        # Connections own client ids: peer -> the ids it said Hello for, id -> its peer.
        self._sessions: dict[bytes, set[str]] = {}
        self._owner: dict[str, bytes] = {}
        self._peer_seen: dict[bytes, float] = {}  # peer -> last frame (monotonic)
        self._wal: AppendLog | None = None
        self._local_id = "local-" + self.daemon_id
        self._local_seq = 0
        self.capture = LocalCapture(self)
        self.address = ""
        # completed trajectories after the commit point, in completion order: a compaction
        # keeps them (the consumer may hold them without having used them yet)
        self._uncommitted: dict[int, Trajectory] = {}
        self._wal_compacted_at = 0
        self._quarantined_at_start = 0
        self._disk_full_since: float | None = None  # monotonic time the WAL stopped growing
        self._first_seen: dict[str, float] = {}  # open rollout -> when first seen (TTL)
        self._expiry_id = "expiry-" + self.daemon_id  # the stream of expiry ends
        self._expiry_seq = 0
        # rollout id -> set once it is open or finished (LocalCapture.wait_open)
        self._start_waiters: dict[str, _Waiting] = {}
        self._client_seen: dict[str, float] = {}  # client id -> last Hello/batch (TTL)
        # Group commit (fsync=always): replies and completed trajectories wait for the
        # fsync that covers every record appended before them (see _sync_loop).
        self._group_commit = self.config.fsync == "always"
        self._held_replies: list[tuple[bytes, bytes]] = []
        self._held_trajectories: list[Trajectory] = []
        self._syncing = False
        self._sync_wake = anyio.Event()
        # compaction off the event loop once serving (see _compaction_loop)
        self._compaction_task = False
        self._compacting = False
        self._compact_wake = anyio.Event()

    # ------------------------------------------------------------------ service

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        self._recover()
        self._wal = AppendLog(self._data_dir / "wal", group_sync=self._group_commit)
        if self._quarantined_at_start:
            self.compact()
        transport = self._transport
        owned = transport is None  # a transport passed in is the caller's to close
        if transport is None:
            from ._transport.zmq import ZmqServerTransport

            transport = ZmqServerTransport(
                cfg.bind,
                max_frame_bytes=cfg.max_frame_bytes,
                heartbeat_ms=int(cfg.heartbeat_s * 1000),
                curve_secret_key_file=cfg.curve_secret_key_file or None,
                curve_authorized_keys=cfg.curve_authorized_keys or None,
            )
        self._transport = transport
        self.address = transport.address
        logger.info(
            "daemon.listening",
            address=self.address,
            daemon_id=self.daemon_id,
            data_dir=str(self._data_dir),
            backend=cfg.backend,
        )
        try:
            async with anyio.create_task_group() as tg:
                if cfg.stats_interval_s > 0:
                    tg.start_soon(self._stats_loop)
                tg.start_soon(self._maintenance_loop)
                tg.start_soon(self._compaction_loop)
                if self._group_commit:
                    tg.start_soon(self._sync_loop)
                task_status.started(self.address)
                await self._receive_loop(transport)
        finally:
            with anyio.CancelScope(shield=True):
                if self._group_commit and self._wal.unsynced:
                    try:  # what was appended reaches the disk (its acks were never sent)
                        self._wal.sync()
                    except OSError as exc:
                        logger.error("daemon.final_fsync_failed", error=str(exc))
                self._wal.close()
                if owned:
                    await transport.aclose()
                logger.info("daemon.stopped", **self.stats())

    async def _receive_loop(self, transport: ServerTransport) -> None:
        """Receive, handle, reply; forever.

        It yields to the event loop every :data:`YIELD_EVERY_FRAMES` frames or
        :data:`YIELD_EVERY_S` seconds of work, whichever comes first: a receive that is
        already complete (frames queued in ZeroMQ during a burst) returns without
        yielding, and without these checkpoints the consumer (the trainer), the stats
        and maintenance loops and the HTTP server would wait for the burst to end, while
        completed trajectories pile up in the buffer.
        """
        throttle = encode_message(
            FlowControl(pause_s=0.05, reason="trajectory buffer nearly full")
        )
        clock = time.perf_counter
        frames = 0
        since = clock()
        while True:
            peer, frame = await transport.recv()
            reply = self.handle(peer, frame)
            del frame  # the receive buffer is not kept past its frame
            if reply is not None:
                self._reply(peer, reply)
            if self.buffer.nearly_full():
                # Soft backpressure before the hard "busy" refusals start.
                self.counters["flow_control_sent"] += 1
                transport.send(peer, throttle)
            frames += 1
            if frames >= YIELD_EVERY_FRAMES or clock() - since >= YIELD_EVERY_S:
                self.counters["receive_loop_yields"] += 1
                await checkpoint()
                frames = 0
                since = clock()

    def _reply(self, peer: bytes, reply: bytes) -> None:
        """Send a reply now, or, in a group commit with records not yet fsynced, once
        they are: every reply may tell the client what is stored (an Ack, a gap Nack's
        ``expected_seq``, a Welcome's ``acked_through``), so none overtakes the fsync
        of what was appended before it."""
        if self._group_commit and (self._syncing or self._wal.unsynced):
            self._held_replies.append((peer, reply))
            self._sync_wake.set()
        else:
            self._transport.send(peer, reply)

    async def _sync_loop(self) -> None:
        """Group commit (``fsync=always``): fsync in a worker thread, covering every
        record appended so far, while the receive loop goes on appending; then send the
        replies and hand over the trajectories that waited for it. One fsync covers
        every frame that arrived during the previous one.

        An fsync that fails stops the daemon (after the kernel reports a write-back
        error, the pages may be dropped and a retry would succeed falsely): nothing it
        covered was acknowledged, and a restart recovers what reached the disk; the
        clients resend the rest.
        """
        wal = self._wal
        assert wal is not None
        while True:
            await self._sync_wake.wait()
            self._sync_wake = anyio.Event()
            while self._held_replies or self._held_trajectories or wal.unsynced:
                replies, self._held_replies = self._held_replies, []
                trajectories, self._held_trajectories = self._held_trajectories, []
                fds = wal.begin_sync()
                self._syncing = True
                t0 = time.perf_counter()
                try:
                    await anyio.to_thread.run_sync(fsync_all, fds)
                except OSError as exc:
                    logger.critical(
                        "daemon.fsync_failed", data_dir=str(self._data_dir), error=str(exc),
                        consequence="the daemon stops: nothing the fsync covered was "
                        f"acknowledged ({len(replies)} replies dropped); restart it to "
                        "recover what reached the disk, clients resend the rest")
                    raise
                finally:
                    self._syncing = False
                    wal.end_sync(fds)
                self.counters["group_commits"] += 1
                self.counters["group_commit_replies"] += len(replies)
                self.counters["group_commit_us"] += int((time.perf_counter() - t0) * 1e6)
                for traj in trajectories:
                    self.buffer.put(traj)
                for peer, reply in replies:
                    self._transport.send(peer, reply)

    def _recover(self) -> None:
        t0 = time.perf_counter()
        quarantined: list[int] = []

        def quarantine(record: bytes, reason: str) -> None:
            log = AppendLog(self._data_dir / _QUARANTINE)
            try:
                log.append(record)
                log.sync()
            finally:
                log.close()
            quarantined.append(len(record))

        state, pending, committed = recover(
            self._data_dir, max_finished_remembered=self.config.max_finished_remembered,
            quarantine=quarantine,
        )
        # Moved aside, not only skipped: the compaction at serve (once the log is open)
        # drops the log segments that still hold them (a crash before it quarantines the
        # same records again at the next start: a copy, nothing applied twice).
        self._quarantined_at_start = len(quarantined)
        self.state = state
        self.buffer.committed_through = committed
        for t in pending:
            self._uncommitted[t.index] = t
            self.buffer.put(t)
        if state.completed or state.open:
            logger.info(
                "daemon.recovered",
                trajectories=state.completed,
                uncommitted=len(pending),
                open_rollouts=len(state.open),
                clients=len(state.hwm),
                quarantined=self._quarantined_at_start,
                seconds=round(time.perf_counter() - t0, 3),
            )

    # ------------------------------------------------------------ local ingest

    def ingest_local(self, event: Event) -> Rejection | None:
        """Store an event produced inside the daemon (server-side capture, OTLP).

        Validate before durable: the event is encoded and decoded back through the wire
        types and checked like a client's (:func:`check_local_event`) before anything
        changes; a refused event takes no sequence number and never reaches the
        write-ahead log. Then, as for a client: append to the log, apply, return the
        state's rejection if it refused the event (that refusal replays the same way). A
        full disk is a ``disk_full`` rejection (retryable; nothing stored).
        """
        wal = self._wal
        if wal is None:
            raise RuntimeError("the daemon is not serving: start Daemon.serve first")
        try:
            data, event = check_local_event(event, max_bytes=self.config.max_frame_bytes)
        except ProtocolError as exc:
            self.state.counters["rejected." + exc.code] += 1
            return Rejection(seq=0, code=exc.code, reason=str(exc))
        seq = self._local_seq + 1
        try:
            self._store(encode_batch(self._local_id, seq, [data]))
        except OSError as exc:  # disk full: nothing stored, no sequence number taken
            self._disk_full(self._local_id, exc)
            self.state.counters["rejected.disk_full"] += 1
            return Rejection(seq=0, code="disk_full",
                             reason=f"the daemon could not store the event ({exc.strerror or exc}):"
                             " nothing was stored; send it again later")
        self._local_seq = seq
        result = self.state.apply(Batch(client_id=self._local_id, first_seq=seq, events=[event]))
        for traj in result.completed:
            self._completed(traj)
        if self._start_waiters:
            self._wake_start_waiters()
        return result.rejected[0] if result.rejected else None

    def _wake_start_waiters(self) -> None:
        state = self.state
        for rid in [r for r in self._start_waiters if r in state.open or r in state.finished]:
            self._start_waiters.pop(rid).event.set()

    def _store(self, frame: bytes | memoryview) -> None:
        """Append a frame to the write-ahead log; raise ``OSError`` (nothing appended) if
        the disk refuses it."""
        wal = self._wal
        assert wal is not None
        wal.append(frame)  # fsync=always: the group commit (_sync_loop) syncs it
        if self._group_commit:
            self._sync_wake.set()
        if self._disk_full_since is not None:
            logger.warning("daemon.disk_space_back", data_dir=str(self._data_dir),
                           seconds_full=round(time.monotonic() - self._disk_full_since, 1))
            self._disk_full_since = None

    def _disk_full(self, cid: str, exc: OSError) -> bytes:
        """The frame was not stored: a retryable nack (the client keeps the events)."""
        if self._disk_full_since is None:
            self._disk_full_since = time.monotonic()
            logger.error(
                "daemon.disk_full", data_dir=str(self._data_dir), error=str(exc),
                hint="frames are refused (retryable) and nothing is acknowledged until the "
                "write-ahead log can grow again; free space in the data dir",
            )
        return self._nack(
            "disk_full",
            f"the daemon could not store the frame ({exc.strerror or exc}): nothing was "
            "acknowledged; send it again later",
            client_id=cid, retry=True, retry_after_s=1.0,
        )

    def _completed(self, traj: Trajectory) -> None:
        if traj.index > self.buffer.committed_through:
            self._uncommitted[traj.index] = traj
        if self._group_commit and (self._syncing or self._wal.unsynced):
            self._held_trajectories.append(traj)  # trained on only once durable
            self._sync_wake.set()
        else:
            self.buffer.put(traj)

    def _write_cursor(self, index: int) -> None:
        tmp = self._data_dir / "cursor.tmp"
        try:
            tmp.write_text(str(index))
            os.replace(tmp, self._data_dir / "cursor")
        except OSError as exc:  # disk full: the consumer goes on; the next commit retries
            self.counters["cursor_write_failed"] += 1
            logger.error("daemon.cursor_write_failed", error=str(exc), index=index,
                         hint="a restart before the next commit hands these trajectories "
                         "to the consumer again; free space in the data dir")
            return
        for i in [i for i in self._uncommitted if i <= index]:
            del self._uncommitted[i]
        limit = self.config.wal_compact_bytes
        # (a consumer may commit while the daemon shuts down: the log is closed by then)
        if (limit and self._wal is not None and not self._wal.closed and not self._compacting
                and self._wal.size_of_all() - self._wal_compacted_at >= limit):
            if self._compaction_task:  # serving: the file work leaves the event loop
                self._compact_wake.set()
                return
            try:
                self.compact()
            except OSError as exc:  # the log is intact: compaction waits for space
                self._compaction_failed(exc)

    def _compaction_failed(self, exc: OSError) -> None:
        self.counters["wal_compaction_failed"] += 1
        (self._data_dir / (_SNAPSHOT + ".tmp")).unlink(missing_ok=True)
        logger.error("daemon.wal_compaction_failed", error=str(exc))

    async def _compaction_loop(self) -> None:
        """Compactions asked for by commits while serving: the snapshot is taken and
        encoded on the event loop (the state is live there), then written, fsynced,
        renamed into place and the old segments deleted in a worker thread."""
        self._compaction_task = True
        try:
            while True:
                await self._compact_wake.wait()
                self._compact_wake = anyio.Event()
                try:
                    await self.compact_async()
                except OSError as exc:
                    self._compaction_failed(exc)
        finally:
            self._compaction_task = False

    def compact(self) -> int:
        """Snapshot the ingest state and delete the write-ahead log before it; returns the
        bytes freed. Recovery then starts from the snapshot (same state, same pending
        trajectories) and replays only the log after it. Blocking (file writes, fsync,
        deletes): while serving, commits use :meth:`compact_async`."""
        t0 = time.perf_counter()
        wal_from, data, snap = self._take_snapshot()
        _write_snapshot(self._data_dir, data)
        freed = unlink_segments(self._wal.detach_before(wal_from))
        return self._compacted(freed, data, snap, t0)

    async def compact_async(self) -> int:
        """:meth:`compact` with the file work in a worker thread; the event loop goes on
        receiving (into the segment the snapshot does not cover) meanwhile."""
        if self._compacting:
            return 0
        self._compacting = True
        try:
            t0 = time.perf_counter()
            wal_from, data, snap = self._take_snapshot()
            await anyio.to_thread.run_sync(_write_snapshot, self._data_dir, data)
            wal = self._wal
            if wal is None or wal.closed:
                return 0
            freed = await anyio.to_thread.run_sync(unlink_segments,
                                                   wal.detach_before(wal_from))
            return self._compacted(freed, data, snap, t0)
        finally:
            self._compacting = False

    def _take_snapshot(self) -> tuple[str, bytes, Snapshot]:
        wal = self._wal
        if wal is None:
            raise RuntimeError("the daemon is not serving: start Daemon.serve first")
        wal.flush()
        wal_from = wal.rotate()
        snap = self.state.snapshot(
            wal_from=wal_from, committed=self.buffer.committed_through,
            pending=list(self._uncommitted.values()),
        )
        return wal_from, msgspec.msgpack.encode(snap), snap

    def _compacted(self, freed: int, data: bytes, snap: Snapshot, t0: float) -> int:
        self._wal_compacted_at = self._wal.size_of_all()
        self.counters["wal_compactions"] += 1
        logger.info(
            "daemon.wal_compacted", freed_bytes=freed, snapshot_bytes=len(data),
            pending=len(snap.pending), open_rollouts=len(snap.open),
            seconds=round(time.perf_counter() - t0, 3),
        )
        return freed

    # ------------------------------------------------------------ expiry and bounds

    async def _maintenance_loop(self) -> None:
        cfg = self.config
        periods = [t / 10 for t in (cfg.rollout_ttl_s, cfg.peer_idle_s, cfg.client_ttl_s)
                   if t > 0]
        if not periods:
            return
        interval = min(5.0, *periods)
        while True:
            await anyio.sleep(interval)
            self.maintain()

    def maintain(self, now: float | None = None) -> int:
        """Expire open rollouts past ``rollout_ttl_s``, forget connections silent past
        ``peer_idle_s`` and retire client ids idle past ``client_ttl_s``; returns how
        many rollouts expired. Called periodically."""
        now = time.monotonic() if now is None else now
        idle = self.config.peer_idle_s
        if idle > 0:
            for peer in [p for p, t in self._peer_seen.items() if now - t > idle]:
                self.forget_peer(peer)
                self.counters["peers_forgotten"] += 1
        expired = self._expire_rollouts(now) if self.config.rollout_ttl_s > 0 else 0
        if self.config.client_ttl_s > 0:
            self._prune_idle_clients(now)
        return expired

    def _prune_idle_clients(self, now: float) -> int:
        """Retire client ids that never said Goodbye and were idle past ``client_ttl_s``
        (ids recovered from the log count from this process's first look), where that is
        safe: no connection owns the id, no open rollout holds its events, and it is not
        one of this daemon's own streams. Each is logged (a :class:`Retired` record,
        reason ``idle``) before it is dropped, so recovery agrees; returns how many."""
        ttl = self.config.client_ttl_s
        seen = self._client_seen
        state = self.state
        own = (self._local_id, self._expiry_id)
        for cid in [c for c in seen if c not in state.hwm and c not in self._owner]:
            del seen[cid]  # said Hello, sent nothing, gone: nothing to retire
        candidates = [cid for cid in state.hwm
                      if cid not in self._owner and cid not in own
                      and now - seen.setdefault(cid, now) >= ttl]
        if not candidates:
            return 0
        busy = set()  # ids whose events an open rollout holds
        for o in state.open.values():
            busy.add(o.client_id)
            busy.update(o.counts)
            busy.update(o.reward_sources)
            busy.update(o.span_sources)
        pruned = 0
        for cid in candidates:
            if cid in busy:
                self.counters["clients_idle_kept_open_rollouts"] += 1
                continue
            through = state.hwm[cid]
            try:
                self._store(encode_message(Retired(client_id=cid, through=through,
                                                   reason="idle")))
            except OSError as exc:
                self._disk_full(cid, exc)
                break  # tried again at the next round
            state.retire(cid, through, "idle")
            seen.pop(cid, None)
            pruned += 1
        if pruned:
            logger.info("daemon.idle_clients_retired", count=pruned, ttl_s=ttl,
                        hint="a retired id may come back only as a fresh stream (seq 1)")
        return pruned

    def _expire_rollouts(self, now: float) -> int:
        open_ = self.state.open
        seen = self._first_seen
        for rid in [r for r in seen if r not in open_]:
            del seen[rid]
        ttl = self.config.rollout_ttl_s
        expired = []
        for rid, o in open_.items():
            t = seen.setdefault(rid, now)
            if now - t >= ttl:
                expired.append(RolloutEnd(
                    rollout_id=rid, status="failed", n_transitions=len(o.transitions),
                    error=f"expired: no rollout.end within rollout_ttl_s={ttl:g} s",
                    ended_at=time.time()))
        if not expired:
            return 0
        # ended like any rollout, through the log: recovery sees the same ends
        first = self._expiry_seq + 1
        frame = encode_batch(self._expiry_id, first, [encode_event(e) for e in expired])
        try:
            self._store(frame)
        except OSError as exc:
            self._disk_full(self._expiry_id, exc)
            return 0  # tried again at the next round
        self._expiry_seq += len(expired)
        result = self.state.apply(Batch(client_id=self._expiry_id, first_seq=first,
                                        events=expired))
        for traj in result.completed:
            self._completed(traj)
        for e in expired:
            del seen[e.rollout_id]
        self.counters["rollouts_expired"] += len(expired)
        logger.warning("daemon.rollouts_expired", count=len(expired), ttl_s=ttl,
                       hint="their clients never ended them (crashed, or lost the end); "
                       "the failure policy applies")
        return len(expired)

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.stats_interval_s)
            logger.info("daemon.stats", **self.stats())

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            **self.state.counters,
            "open_rollouts": len(self.state.open),
            "buffered": len(self.buffer),
            "sessions": len(self._sessions),
            "clients_connected": len(self._owner),
            "clients_known": len(self.state.hwm),
            "client_tombstones": len(self.state.retired),
        }

    # ------------------------------------------------------------------ frames

    def _nack(self, code: str, reason: str, **kw: Any) -> bytes:
        self.counters["nacked." + code] += 1
        if code not in ("busy", "gap", "no_session", "disk_full"):
            logger.warning("daemon.frame_refused", code=code, reason=reason)
        return encode_message(Nack(code=code, reason=reason, **kw))

    def handle(self, peer: bytes, frame: bytes | memoryview) -> bytes | None:
        """Process one frame from ``peer``; return the reply frame, if any."""
        self.counters["frames_received"] += 1
        self.counters["bytes_received"] += len(frame)
        if len(frame) > self.config.max_frame_bytes:
            return self._nack(
                "frame_too_large",
                f"frame of {len(frame)} bytes exceeds the daemon's limit of "
                f"{self.config.max_frame_bytes} (--max-frame-bytes)",
            )
        try:
            msg, repaired = decode_frame(frame)
        except ProtocolError as exc:
            return self._nack(exc.code, str(exc))
        if peer in self._peer_seen:
            self._peer_seen[peer] = time.monotonic()
        match msg:
            case Batch():
                # a repaired batch (an event refused at decoding) is stored as decoded:
                # the log holds only what recovery can apply
                return self._on_batch(peer, msg, encode_message(msg) if repaired else frame)
            case Hello():
                return self._on_hello(peer, msg)
            case Goodbye():
                return self._on_goodbye(peer, msg)
            case Ping() if peer not in self._sessions:
                # A connection this daemon has no session for (it restarted, or forgot a
                # silent peer): answering Pong would tell a client whose frames died with
                # the old daemon that all is well, and with its window full of those
                # frames it would wait for their acks forever. Told to say Hello, it
                # resends them.
                return self._nack("no_session", "say Hello first: this daemon has no "
                                  "session for this connection", retry=True)
            case Ping():
                return encode_message(Pong(sent_at=msg.sent_at))
            case _:
                return self._nack(
                    "unexpected_message",
                    f"a client may not send {type(msg).__name__} to the daemon",
                )

    def _on_hello(self, peer: bytes, hello: Hello) -> bytes:
        try:
            check_hello(hello)
        except ProtocolError as exc:
            self.counters["nacked.protocol_version"] += 1
            logger.error(
                "daemon.protocol_version_mismatch",
                client_id=hello.client_id,
                client_version=hello.protocol_version,
                daemon_version=PROTOCOL_VERSION,
            )
            return encode_message(Error(code=exc.code, message=str(exc)))
        cid = hello.client_id
        if not cid:
            return self._nack("invalid", "Hello.client_id must not be empty")
        owner = self._owner.get(cid)
        if owner != peer:
            if owner is not None:  # a newer connection takes the id over: fence the old
                self._disown(owner, cid)
                self.counters["clients_fenced"] += 1
                logger.warning("daemon.client_id_taken_over", client_id=cid,
                               reason="a newer connection said Hello with this client id; "
                               "batches from the older one are refused (fenced)")
            logger.info(
                "daemon.client_connected",
                client_id=cid,
                host=hello.host,
                pid=hello.pid,
                library_version=hello.library_version,
            )
        self._owner[cid] = peer
        self._sessions.setdefault(peer, set()).add(cid)
        self._peer_seen[peer] = self._client_seen[cid] = time.monotonic()
        return encode_message(
            Welcome(
                protocol_version=PROTOCOL_VERSION,
                daemon_id=self.daemon_id,
                acked_through=self.state.hwm.get(cid, 0),
                max_frame_bytes=self.config.max_frame_bytes,
                heartbeat_s=self.config.heartbeat_s,
                client_id=cid,
            )
        )

    def _on_goodbye(self, peer: bytes, bye: Goodbye) -> bytes:
        """Retire a client id whose stream ended cleanly: log a :class:`Retired` record,
        forget the id's mark and session; answer :class:`Farewell`."""
        cid = bye.client_id

        def refuse(reason: str) -> bytes:
            self.counters["goodbyes_refused"] += 1
            logger.info("daemon.goodbye_refused", client_id=cid, reason=reason)
            return encode_message(Farewell(client_id=cid, retired=False, reason=reason))

        if cid not in self._sessions.get(peer, ()):
            return refuse("this connection does not own the client id (say Hello for it "
                          "first; only its owner may retire it)")
        if cid in (self._local_id, self._expiry_id):
            return refuse("the daemon's own streams cannot be retired")
        stored = self.state.hwm.get(cid, 0)
        if bye.acked_through != stored:
            return refuse(f"the daemon stored this client's events through sequence "
                          f"{stored}, the client says {bye.acked_through}: the id stays "
                          "(send what is missing, or let --client-ttl-s prune it)")
        try:
            self._store(encode_message(Retired(client_id=cid, through=stored,
                                               reason="goodbye")))
        except OSError as exc:
            return refuse(f"the daemon could not log the retirement ({exc.strerror or exc})")
        self.state.retire(cid, stored, "goodbye")
        self._forget_client(cid)
        logger.info("daemon.client_retired", client_id=cid, through=stored, reason="goodbye")
        return encode_message(Farewell(client_id=cid, retired=True))

    def _forget_client(self, cid: str) -> None:
        """Drop a retired id's session and activity; a connection left owning nothing
        is forgotten too (its next frame is told to say Hello)."""
        self._client_seen.pop(cid, None)
        peer = self._owner.pop(cid, None)
        if peer is not None:
            ids = self._sessions.get(peer)
            if ids is not None:
                ids.discard(cid)
                if not ids:
                    self.forget_peer(peer)

    def _disown(self, peer: bytes, cid: str) -> None:
        # the fenced connection keeps its (maybe empty) session, so its next batch for
        # the id is told "fenced", not "say Hello", and it does not take the id back
        self._sessions.get(peer, set()).discard(cid)

    def forget_peer(self, peer: bytes) -> None:
        """Drop a connection's state (it disconnected, or was silent too long); the ids it
        owned become free, and a later frame from it is told to say Hello again."""
        for cid in self._sessions.pop(peer, ()):
            if self._owner.get(cid) == peer:
                del self._owner[cid]
        self._peer_seen.pop(peer, None)

    def _on_batch(self, peer: bytes, batch: Batch, frame: bytes | memoryview) -> bytes:
        cid = batch.client_id
        if cid not in self._sessions.get(peer, ()):
            if cid in self._owner and peer in self._sessions:  # another connection owns it
                return self._nack(
                    "fenced",
                    f"client id {cid} belongs to another connection (the last to say Hello "
                    "for it): this connection's batches for it are refused",
                    client_id=cid,
                )
            return self._nack(
                "no_session", f"say Hello for client id {cid} first", client_id=cid,
                retry=True,
            )
        if batch.first_seq < 1 or not cid:
            return self._nack("invalid", "Batch needs a client_id and first_seq >= 1")
        state = self.state
        self._client_seen[cid] = time.monotonic()
        if state.retired and state.is_stale_retired(batch):
            return self._nack(
                "retired",
                f"client id {cid} was retired (it said Goodbye, or was idle past "
                f"--client-ttl-s) and this batch (first_seq {batch.first_seq}, resync "
                f"{batch.resync}) continues its old stream: a retired id comes back only "
                "as a fresh stream from sequence 1, since the daemon no longer knows which "
                "of its events it stored; these events are refused (use a new client id)",
                client_id=cid,
            )
        if state.is_duplicate(batch):
            self.counters["frames_duplicate"] += 1
            state.counters["events_duplicate"] += len(batch.events)
            return encode_message(Ack(client_id=cid, acked_through=state.hwm[cid]))
        try:
            state.check_gap(batch)
        except GapError as gap:
            return self._nack(
                "gap",
                f"expected sequence {gap.expected}, got {batch.first_seq}",
                client_id=cid,
                expected_seq=gap.expected,
                retry=True,
            )
        if self.buffer.full():
            return self._nack(
                "busy",
                f"{len(self.buffer)} trajectories wait for the trainer",
                client_id=cid,
                retry=True,
                retry_after_s=0.5,
            )
        # Durability first: the frame reaches the OS (and the disk with fsync=always)
        # before its events can change state or be acknowledged.
        try:
            self._store(frame)
        except OSError as exc:
            return self._disk_full(cid, exc)
        result = state.apply(batch)
        for traj in result.completed:
            self._completed(traj)
        if self._start_waiters:
            self._wake_start_waiters()
        if result.rejected:
            for r in result.rejected[:5]:
                logger.warning(
                    "daemon.event_rejected", client_id=cid, seq=r.seq, code=r.code, reason=r.reason
                )
        return encode_message(
            Ack(client_id=cid, acked_through=result.acked_through, rejected=result.rejected)
        )


class _Waiting:
    """Requests waiting for one rollout to open."""

    __slots__ = ("event", "n")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.n = 0


class LocalCapture:
    """Server-side capture into the daemon's own store (the policy server's sink).

    Rollouts started over HTTP (``POST /v1/rollouts``) and the LLM calls made through
    ``/rollouts/{id}/v1/...`` become events exactly like the runtime's.
    """

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    @property
    def daemon(self) -> Daemon:
        """The daemon this capture stores into (OTLP ingest stores there too)."""
        return self._daemon

    max_start_waiters = 1024
    """Most rollout ids requests may wait on at once (:meth:`wait_open`)."""

    def is_open(self, rollout_id: str) -> bool:
        return rollout_id in self._daemon.state.open

    async def wait_open(self, rollout_id: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``rollout_id`` to be open; whether it is.

        For a client that names a rollout the app's runtime started: the runtime holds a
        rollout's start back with its other events (up to ``open_linger_s``), so an HTTP
        call naming it can reach the server first. A rollout that already finished is not
        waited for (it will not open again), and neither is one when
        :attr:`max_start_waiters` other ids are waited on (counted:
        ``capture_start_waiters_full``); a wait that times out is counted
        (``capture_start_wait_timeouts``).
        """
        d = self._daemon
        if rollout_id in d.state.open:
            return True
        if rollout_id in d.state.finished or timeout <= 0:
            return False
        waiting = d._start_waiters.get(rollout_id)
        if waiting is None:
            if len(d._start_waiters) >= self.max_start_waiters:
                d.counters["capture_start_waiters_full"] += 1
                return False
            waiting = d._start_waiters[rollout_id] = _Waiting()
        waiting.n += 1
        d.counters["capture_start_waits"] += 1
        try:
            with anyio.move_on_after(timeout):
                await waiting.event.wait()
        finally:
            waiting.n -= 1
            if waiting.n == 0 and d._start_waiters.get(rollout_id) is waiting:
                del d._start_waiters[rollout_id]  # timed out (or cancelled): forget it
        if rollout_id in d.state.open:
            return True
        d.counters["capture_start_wait_timeouts"] += 1
        return False

    def find(self, rollout_id: str) -> tuple[Trajectory, bool] | None:
        """A rollout the daemon holds in memory, as ``(trajectory, used by training)``: an
        open one (status ``"open"``, index -1, what it recorded so far) or a finished one
        training has not yet committed. None otherwise (unknown, or used and released:
        ``lightning-daemon inspect DATA_DIR`` reads those from disk)."""
        d = self._daemon
        o = d.state.open.get(rollout_id)
        if o is not None:
            s = o.start
            return Trajectory(
                index=-1, rollout_id=rollout_id, name=s.name, client_id=o.client_id,
                group_key=s.group_key, attempt=s.attempt, parent_id=s.parent_id,
                metadata=s.metadata, status="open", final_reward=None, error=None,
                started_at=s.started_at, ended_at=0.0, transitions=list(o.transitions),
                rewards=list(o.rewards), spans=list(o.spans)), False
        for t in d._uncommitted.values():
            if t.rollout_id == rollout_id:
                return t, t.index <= d.buffer.committed_through
        return None

    def _ingest(self, event: Event) -> None:
        rejection = self._daemon.ingest_local(event)
        if rejection is not None:
            raise ProtocolError(rejection.reason, code=rejection.code)

    def _recorded(self, rollout_id: str) -> int:
        """Transitions server-side capture recorded so far in the open ``rollout_id``:
        its own count, the numbering of its transitions, rewards and end (a rollout the
        app's runtime started numbers the runtime's transitions apart; see
        :mod:`lightning._ingest`)."""
        n = self._daemon.state.next_index(rollout_id, self._daemon._local_id)
        if n is None:
            raise ProtocolError(f"rollout {rollout_id} is not open (unknown, or it ended "
                                "while this request ran)", code="unknown_rollout")
        return n

    def start_rollout(self, *, rollout_id: str, name: str, group_key: str | None,
                      attempt: int, metadata: dict[str, Any]) -> None:
        """Raises :class:`ProtocolError` (its ``code`` says why) if it was refused."""
        self._ingest(RolloutStart(rollout_id=rollout_id, name=name, group_key=group_key,
                                  attempt=attempt, metadata=metadata, started_at=time.time()))

    def record_transition(self, rollout_id: str, *, prompt_ids: Any, response_ids: Any,
                          logprobs: Any, **fields: Any) -> int:
        index = self._recorded(rollout_id)
        self._ingest(Transition(
            rollout_id=rollout_id, index=index, prompt_ids=pack_ids(prompt_ids),
            response_ids=pack_ids(response_ids), logprobs=pack_logprobs(logprobs),
            created_at=time.time(), **fields))
        return index

    def record_reward(self, rollout_id: str, value: float, name: str,
                      components: dict[str, float]) -> None:
        self._ingest(Reward(rollout_id=rollout_id, value=value, name=name,
                            components=components, after=self._recorded(rollout_id),
                            created_at=time.time()))

    def end_rollout(self, rollout_id: str, *, status: str, final_reward: float | None,
                    error: str | None) -> int:
        n = self._recorded(rollout_id)
        self._ingest(RolloutEnd(rollout_id=rollout_id, status=status, final_reward=final_reward,
                                error=error, n_transitions=n, ended_at=time.time()))
        return n
