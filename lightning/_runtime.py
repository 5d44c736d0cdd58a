"""The app-side runtime: a bounded, durable, ordered event stream to the daemon.

Recording (:meth:`Runtime.submit`) is what the application thread pays for: encode the
event once, take a sequence number, append it to an in-memory queue, or, when the queue
is full or earlier events are already on disk, to the spill log. It never waits on the
network and never raises because the daemon is down.

Sending (:meth:`Runtime.serve`) is a background task, in the app's event loop or in a
thread of its own (:func:`init`). It frames queued events into batches, keeps up to
``max_inflight_frames`` unacknowledged frames per stream, resends from the daemon's
expected sequence number after a gap (go-back-N), says Hello again after a silence or a
daemon restart, and replays the spill log in order once the daemon is back.

Ordering: sequence numbers are assigned under one lock in submission order. Events are
in memory (queue) or on disk (spill), never both for the same range: once something is
spilled, everything after it is spilled too until the spill log is drained, so sending
``queue, then spill`` is always in sequence order.

Durability: what is acknowledged is stored by the daemon. What is not yet acknowledged
is in this process's memory or in the spill log; on shutdown, whatever the grace period
did not flush is written to the spill log, and a later process replays it (spill logs of
dead processes are found by a lock file and replayed under their original client id, so
the daemon still de-duplicates them). A process that is SIGKILLed loses only what was in
memory and not yet acknowledged (at most ``max_queue_bytes``).
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import TaskStatus
from anyio.lowlevel import checkpoint

from ._config import RuntimeConfig
from ._errors import ProtocolError
from ._log import AppendLog, LogReader
from ._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    Event,
    Farewell,
    FlowControl,
    Goodbye,
    Hello,
    Nack,
    Ping,
    Pong,
    RolloutEnd,
    Welcome,
    decode_message,
    encode_batch,
    encode_event,
    encode_message,
)
from ._transport.base import ClientTransport, WouldBlock

logger = structlog.get_logger()

try:  # POSIX
    import fcntl as _fcntl
except ImportError:  # Windows
    _fcntl = None
try:
    import msvcrt as _msvcrt
except ImportError:
    _msvcrt = None


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on a spill directory's lock file without waiting.

    ``flock`` on POSIX, ``msvcrt.locking`` on Windows: either is released by the OS when its
    holder dies, which is how a dead process's spill log is told from a live one's. Where
    neither exists, no lock can be taken and this returns False: the runtime then spills
    as usual but never adopts another directory (it cannot tell a live owner from a dead
    one): a dead process's log stays on disk until a runtime that can lock adopts it.
    """
    try:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
            return True
        if _msvcrt is not None:
            _msvcrt.locking(fd, _msvcrt.LK_NBLCK, 1)
            return True
    except OSError:  # BlockingIOError (POSIX), PermissionError (Windows): held elsewhere
        return False
    return False

__all__ = ["Runtime"]

_SEQ = struct.Struct("<Q")
_SPILL_OVERHEAD = _SEQ.size + 8  # a spill record's bytes beyond the event (seq, log header)
_HEAD = "head"  # a spill directory's log of what was in flight at shutdown (read first)
_PUMP_BUDGET = 2 << 20  # bytes sent per turn of the send loop before yielding
Item = tuple[int, bytes]  # (sequence number, encoded event)


class _Frame:
    __slots__ = ("first", "last", "items", "sent_at", "payload", "resync")

    def __init__(self, items: list[Item], resync: bool) -> None:
        self.items = items
        self.first = items[0][0]
        self.last = items[-1][0]
        self.sent_at = 0.0  # 0 = not sent (or must be resent)
        self.payload: bytes | None = None
        self.resync = resync


class _Stream:
    """One sequence-number stream: the live one, or a dead process's spill log."""

    def __init__(self, client_id: str, *, orphan: bool = False) -> None:
        self.client_id = client_id
        self.orphan = orphan
        self.inflight: deque[_Frame] = deque()
        self.acked_through = 0
        self.rewound_to = -1  # expected seq of the last gap nack we acted on
        # A dead process's spill log may lack what it held only in memory: its first
        # frame tells the daemon to accept the gap.
        self.resync_next = orphan
        self.welcomed = not orphan  # orphans: the daemon answered our Hello for this id
        self.pending: deque[Item] = deque()  # orphans: records read ahead, not yet sent
        self.remaining = 0  # orphans: records in the logs not read yet
        self.sources: list[tuple[AppendLog, LogReader]] = []  # orphans: head, then main
        self.last_read = 0  # orphans: highest sequence number read so far
        self.lock_fd = -1
        self.path: Path | None = None

    def open_logs(self, d: Path) -> None:
        """Orphans: the spill directory's logs, in replay order (see Runtime._finalize)."""
        for path in (d / _HEAD, d):
            if path.is_dir():
                log = AppendLog(path)
                self.remaining += log.count()
                self.sources.append((log, LogReader(log)))

    def read_ahead(self, max_items: int, max_bytes: int) -> int:
        """Orphans: read the next records (a frame's worth: bounded memory), skipping what
        the daemon acknowledged or was read already; returns how many were skipped."""
        skipped = 0
        while not self.pending and self.remaining and self.sources:
            records = self.sources[0][1].read(min(max_items, self.remaining), max_bytes)
            if not records:  # this log is done: the next one
                log, reader = self.sources.pop(0)
                reader.close()
                log.close()
                if not self.sources:
                    self.remaining = 0
                continue
            self.remaining -= len(records)
            for rec in records:
                (seq,) = _SEQ.unpack_from(rec)
                if seq > self.acked_through and seq > self.last_read:
                    self.pending.append((seq, rec[_SEQ.size :]))
                    self.last_read = seq
                else:
                    skipped += 1
        return skipped

    def has_unsent(self) -> bool:
        return bool(self.pending or self.remaining)

    def close_log(self) -> None:
        for log, reader in self.sources:
            reader.close()
            log.close()
        self.sources.clear()


class Runtime:
    """The app-side runtime. Construct, then run :meth:`serve` (or use ``lightning.init``).

    ``transport`` (a :class:`~lightning._transport.base.ClientTransport`) defaults to
    ZeroMQ to ``config.daemon``; tests pass ``lightning.testing.MemoryHub().connect()``.
    """

    def __init__(
        self, config: RuntimeConfig | None = None, *, transport: ClientTransport | None = None
    ) -> None:
        self.config = config or RuntimeConfig()
        self.client_id = uuid.uuid4().hex
        self._transport = transport
        self._lock = threading.Lock()
        self._next_seq = 1
        self._queue: deque[Item] = deque()
        self._queue_bytes = 0
        self._spilling = False
        self._spill: AppendLog | None = None
        self._spill_lock_fd: int | None = None
        self._spill_reader: LogReader | None = None
        self._spill_unread = 0  # records appended to the spill log and not read back yet
        self._spill_bytes = 0  # bytes in the spill log (max_spill_bytes caps it)
        # events that could not be spilled (disk full), kept in memory behind the spill
        self._held: deque[Item] = deque()
        self._held_bytes = 0
        self._spill_broken = False  # said once per episode
        self._overflowing = False
        self._stream = _Stream(self.client_id)
        self._orphans: list[_Stream] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake = asyncio.Event()
        self._idle = True
        self._closing = False
        self._abandon = False
        self._closed = False
        self._session = False
        self._daemon_id = ""
        self._last_heard = 0.0
        self._last_hello = 0.0
        self._last_sent = 0.0
        self._paused_until = 0.0
        self._max_frame_bytes = 64 << 20
        self._hello_backoff = 0.05
        self._budget = _PUMP_BUDGET
        self._linger_start: float | None = None
        self._urgent_seq = 0  # the last event that ends a rollout (sent within linger_s)
        self._lingering_open = False  # the sender sleeps in an open-rollout linger
        self._due = math.inf  # when the send loop's current wait ends at the latest
        self._warned_down = False
        self._farewell: anyio.Event | None = None  # set when the daemon answers Goodbye
        self._sender_done: anyio.Event | None = None  # set when _send_loop returns
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "events_submitted",
                "events_acked",
                "events_rejected",
                "events_spilled",
                "events_dropped_oversize",
                "events_dropped_unencodable",
                "events_dropped_spill_full",
                "events_dropped_spill_failed",
                "events_lost_at_shutdown",
                "spill_failures",
                "events_after_shutdown",
                "frames_sent",
                "frames_resent",
                "nacks",
                "fenced",
                "client_id_conflicts",
                "daemon_disk_full",
                "orphan_events_already_acked",
                "paused_by_daemon",
                "reconnects",
                "goodbyes_sent",
                "client_id_retired",
            ),
            0,
        )

    # ============================================================ recording (any thread)

    def submit(self, event: Event) -> None:
        """Record an event. Never blocks on the network, never raises on delivery."""
        try:
            data = encode_event(event)
        except (TypeError, OverflowError, ValueError, RecursionError) as exc:  # an int beyond
            # 64 bits, or metadata nested deeper than the daemon's decoder goes
            self.counters["events_dropped_unencodable"] += 1
            logger.error(
                "runtime.event_unencodable",
                type=type(event).__name__,
                rollout_id=event.rollout_id,
                error=str(exc),
                hint="metadata and span attributes must be JSON-like with 64-bit integers",
            )
            return
        size = len(data)
        if size + 64 > self._max_frame_bytes:
            self.counters["events_dropped_oversize"] += 1
            logger.error(
                "runtime.event_too_large",
                type=type(event).__name__,
                rollout_id=event.rollout_id,
                bytes=size,
                max_frame_bytes=self._max_frame_bytes,
                hint="raise the daemon's --max-frame-bytes or record smaller transitions",
            )
            return
        cfg = self.config
        with self._lock:
            if self._closed:
                self.counters["events_after_shutdown"] += 1
                if self.counters["events_after_shutdown"] == 1:
                    logger.error(
                        "runtime.event_after_shutdown",
                        rollout_id=event.rollout_id,
                        hint="lightning.shutdown() already ran: events recorded after it are "
                        "not kept; shut down after the agents finish",
                    )
                return
            self.counters["events_submitted"] += 1
            if (
                self._spilling
                or len(self._queue) >= cfg.max_queue_events
                or self._queue_bytes + size > cfg.max_queue_bytes
            ):
                if not self._overflow_locked(event, size):
                    return
                seq = self._take_seq()
                self._spill_locked(seq, data)
            else:
                seq = self._take_seq()
                self._queue.append((seq, data))
                self._queue_bytes += size
            wake = self._idle
            self._idle = False
            if isinstance(event, RolloutEnd):
                self._urgent_seq = seq
                wake = wake or self._lingering_open
            elif self._lingering_open and self._batch_full(open_rollouts=True):
                wake = True  # a full batch does not wait
            if wake:
                self._lingering_open = False
        if wake:
            self._notify()

    def send_soon(self) -> None:
        """Send everything recorded so far within ``linger_s``, as if a rollout ended.

        For a rollout whose id is handed to another client (a raw HTTP client naming it
        on a per-rollout URL or header, :attr:`RolloutContext.headers`): the daemon
        refuses server-side capture into a rollout whose start it has not received, and
        the start would otherwise wait up to ``open_linger_s`` with the rollout's other
        events. Cheap: no I/O here, the sender is woken if it lingers.
        """
        with self._lock:
            last = self._next_seq - 1
            if last <= self._urgent_seq:
                return
            self._urgent_seq = last
            wake = self._lingering_open
            if wake:
                self._lingering_open = False
        if wake:
            self._notify()

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq = seq + 1
        return seq

    def _notify(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:
                pass  # loop closed: shutdown already spilled what was left

    # ------------------------------------------------------------------ spill log

    def _spill_dir(self) -> Path:
        return Path(self.config.resolved_spill_dir) / self.client_id

    def _open_spill_locked(self) -> AppendLog:
        if self._spill is None:
            d = self._spill_dir()
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / "lock", os.O_CREAT | os.O_RDWR, 0o600)
            _try_lock(fd)  # ours: a fresh uuid, so it is free
            self._spill_lock_fd = fd
            self._spill = AppendLog(d)
            logger.warning(
                "runtime.spilling",
                path=str(d),
                reason="daemon unreachable or in-memory queue full",
            )
        return self._spill

    def _overflow_locked(self, event: Event, size: int) -> bool:
        """Whether an event that does not fit in memory can be kept (spilled or held).

        The overflow policy, when the spill log holds ``max_spill_bytes`` (or the spill
        failed and ``max_queue_bytes`` more wait in memory behind it): the newest event is
        dropped, counted and said once per episode. It never takes a sequence number, so
        the stream the daemon sees has no gap; its rollout arrives incomplete (flagged).
        """
        if self._held:
            full, counter = self._held_bytes + size > self.config.max_queue_bytes, "spill_failed"
        else:
            full = self._spill_bytes + _SPILL_OVERHEAD + size > self.config.max_spill_bytes
            counter = "spill_full"
        if not full:
            return True
        self.counters["events_dropped_" + counter] += 1
        if not self._overflowing:
            self._overflowing = True
            logger.error(
                "runtime.events_dropped", reason=counter, rollout_id=event.rollout_id,
                spill_bytes=self._spill_bytes, max_spill_bytes=self.config.max_spill_bytes,
                hint="the daemon is not taking events and the spill log is full (or "
                "unwritable): newer events are dropped until it catches up; raise "
                "max_spill_bytes or free the spill directory's disk",
            )
        return False

    def _spill_locked(self, seq: int, data: bytes) -> None:
        self._spilling = True  # from here on, events go behind the spill log, in order
        self.counters["events_spilled"] += 1
        if not self._held:
            try:
                self._open_spill_locked().append(_SEQ.pack(seq) + data)
            except OSError as exc:
                self._spill_failed_locked(exc)
            else:
                self._spill_unread += 1
                self._spill_bytes += _SPILL_OVERHEAD + len(data)
                self._spill_broken = False
                return
        # The spill log cannot take it (disk full, unwritable directory): keep it in
        # memory behind what the log holds, until the log is drained.
        self._held.append((seq, data))
        self._held_bytes += len(data)

    def _spill_failed_locked(self, exc: OSError) -> None:
        self.counters["spill_failures"] += 1
        if not self._spill_broken:
            self._spill_broken = True
            logger.error(
                "runtime.spill_failed", path=str(self._spill_dir()), error=str(exc),
                hint=f"events are kept in memory (up to max_queue_bytes="
                f"{self.config.max_queue_bytes}) and sent when the daemon is back; free "
                "disk space in the spill directory to spill again",
            )

    def _read_spill(self, max_items: int, max_bytes: int) -> list[Item]:
        """Read the next spilled records, in order (called by the sender only)."""
        with self._lock:
            if self._spill_unread == 0:
                return self._take_held_locked(max_items, max_bytes)
            if self._spill_reader is None:
                self._spill_reader = LogReader(self._spill)
            records = self._spill_reader.read(min(max_items, self._spill_unread), max_bytes)
            self._spill_unread -= len(records)
        return [(_SEQ.unpack_from(rec)[0], rec[_SEQ.size :]) for rec in records]

    def _take_held_locked(self, max_items: int, max_bytes: int) -> list[Item]:
        items: list[Item] = []
        nbytes = 0
        held = self._held
        while held and len(items) < max_items and (not items or nbytes + len(held[0][1]) <= max_bytes):
            it = held.popleft()
            items.append(it)
            nbytes += len(it[1])
        self._held_bytes -= nbytes
        return items

    def _maybe_finish_spill(self) -> None:
        """Once every spilled record is read and acknowledged, drop the log."""
        with self._lock:
            if (
                self._spilling
                and self._spill_unread == 0
                and not self._held
                and not self._stream.inflight
            ):
                if self._spill_reader is not None:
                    self._spill_reader.close()
                    self._spill_reader = None
                if self._spill is not None:
                    try:
                        self._spill.reset()
                    except OSError as exc:  # recreating the segment failed: retry later
                        self._spill_failed_locked(exc)
                        self._spill = None
                        if self._spill_lock_fd is not None:
                            os.close(self._spill_lock_fd)
                            self._spill_lock_fd = None
                self._spill_bytes = 0
                self._spilling = False
                self._overflowing = False  # a new episode may be said again
                logger.info("runtime.spill_drained")

    # ================================================================ orphan replay

    def _adopt_orphans(self) -> None:
        root = Path(self.config.resolved_spill_dir)
        if not root.is_dir():
            return
        for d in sorted(root.iterdir()):
            if d.name == self.client_id or not (d / "lock").exists():
                continue
            fd = os.open(d / "lock", os.O_RDWR)
            if not _try_lock(fd):
                os.close(fd)  # a live process owns it (or, without file locks, may)
                continue
            # Streamed, never read whole: records are read a frame at a time as the
            # window allows, and those the daemon acknowledged (its Welcome for this
            # client id says how far) are skipped unsent.
            stream = _Stream(d.name, orphan=True)
            stream.open_logs(d)
            n = stream.remaining
            if not n:
                stream.close_log()
                _remove_spill_dir(d, fd)
                continue
            stream.lock_fd, stream.path = fd, d
            self._orphans.append(stream)
            logger.warning(
                "runtime.replaying_orphan_spill",
                path=str(d),
                events=n,
                client_id=d.name,
            )

    # ==================================================================== sending

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the sender until :meth:`aclose` is called (or the task is cancelled)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._last_heard = time.monotonic()  # the silence clock starts now
        owned = self._transport is None  # a transport passed in is the caller's to close
        if self._transport is None:
            from ._transport.zmq import ZmqClientTransport

            cfg = self.config
            self._transport = ZmqClientTransport(
                cfg.daemon,
                heartbeat_ms=int(cfg.heartbeat_s * 1000),
                curve_server_key=cfg.curve_server_key or None,
                curve_secret_key_file=cfg.curve_secret_key_file or None,
            )
        if self.config.replay_orphans:
            self._adopt_orphans()
        self._stop = anyio.Event()
        self._sender_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._recv_loop)
                task_status.started()
                try:
                    await self._send_loop()
                finally:
                    self._sender_done.set()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                self._finalize()
                if owned:
                    await self._transport.aclose()

    async def _recv_loop(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            frame = await transport.recv()
            try:
                msg = decode_message(frame)
            except ProtocolError as exc:
                logger.error("runtime.bad_frame_from_daemon", error=str(exc))
                continue
            self._last_heard = time.monotonic()
            self._on_message(msg)
            self._wake.set()

    def _on_message(self, msg: Any) -> None:
        match msg:
            case Ack():
                self._on_ack(msg)
            case Welcome() if msg.client_id not in ("", self.client_id):
                stream = self._stream_for(msg.client_id)
                if stream is not None:  # an orphan's Hello answered: resume after its ack
                    stream.welcomed = True
                    self._on_ack(Ack(client_id=msg.client_id, acked_through=msg.acked_through))
                    for f in stream.inflight:
                        f.sent_at = 0.0
            case Welcome():
                if msg.daemon_id != self._daemon_id:
                    logger.info(
                        "runtime.connected",
                        daemon_id=msg.daemon_id,
                        acked_through=msg.acked_through,
                    )
                self._daemon_id = msg.daemon_id
                self._session = True
                self._warned_down = False
                self._hello_backoff = 0.05
                self._max_frame_bytes = msg.max_frame_bytes
                if msg.acked_through >= self._next_seq:  # more than we ever recorded
                    self.counters["client_id_conflicts"] += 1
                    logger.error(
                        "runtime.client_id_conflict", client_id=self.client_id,
                        daemon_acked_through=msg.acked_through, recorded=self._next_seq - 1,
                        hint="another connection sent events under this process's client id "
                        "(it said Hello with it); events recorded from here on may be taken "
                        "for duplicates: restart this process",
                    )
                self._on_ack(Ack(client_id=self.client_id, acked_through=msg.acked_through))
                # Everything still in flight may have died with the old connection.
                for f in self._stream.inflight:
                    f.sent_at = 0.0
                # A new session: each orphan says Hello again. A daemon whose Welcome has no
                # client_id predates ownership: it takes orphan batches without a Hello (and
                # its answer to one could not be told from the answer to ours).
                for s in self._orphans:
                    s.welcomed = not msg.client_id
                if msg.client_id:
                    try:
                        self._hello_orphans()
                    except WouldBlock:
                        pass  # _pump says it again
            case Nack():
                self._on_nack(msg)
            case Pong():
                pass
            case Farewell():
                if msg.client_id == self.client_id:
                    if msg.retired:
                        self.counters["client_id_retired"] += 1
                        logger.debug("runtime.client_id_retired", client_id=self.client_id)
                    else:
                        logger.info("runtime.goodbye_refused", reason=msg.reason)
                    if self._farewell is not None:
                        self._farewell.set()
            case FlowControl():
                self._paused_until = time.monotonic() + msg.pause_s
                self.counters["paused_by_daemon"] += 1
                logger.debug("runtime.paused_by_daemon", pause_s=msg.pause_s, reason=msg.reason)
            case Error():
                self._session = False
                logger.error("runtime.daemon_error", code=msg.code, message=msg.message)
                self._paused_until = time.monotonic() + 5.0
            case _:
                logger.error("runtime.unexpected_message", type=type(msg).__name__)

    def _stream_for(self, client_id: str) -> _Stream | None:
        if client_id == self.client_id:
            return self._stream
        for s in self._orphans:
            if s.client_id == client_id:
                return s
        return None

    def _streams(self) -> list[_Stream]:
        return [self._stream, *self._orphans]

    def _on_ack(self, ack: Ack) -> None:
        stream = self._stream_for(ack.client_id)
        if stream is None:
            return
        for r in ack.rejected:
            self.counters["events_rejected"] += 1
            logger.error("runtime.event_rejected", seq=r.seq, code=r.code, reason=r.reason)
        if ack.acked_through <= stream.acked_through:
            return
        n = ack.acked_through - stream.acked_through
        stream.acked_through = ack.acked_through
        if stream is self._stream:
            self.counters["events_acked"] += n
        inflight = stream.inflight
        while inflight and inflight[0].last <= ack.acked_through:
            inflight.popleft()
        if inflight and inflight[0].first <= ack.acked_through:
            head = inflight[0]
            head.items = [it for it in head.items if it[0] > ack.acked_through]
            head.first = head.items[0][0]
            head.payload = None
            head.sent_at = 0.0
        stream.rewound_to = -1

    def _on_nack(self, nack: Nack) -> None:
        self.counters["nacks"] += 1
        orphan = self._stream_for(nack.client_id)
        if orphan is self._stream:
            orphan = None
        match nack.code:
            case "no_session" if orphan is not None:
                orphan.welcomed = False
            case "no_session":
                self._session = False
            case "fenced" if orphan is not None:
                # another connection said Hello with this dead process's id and replays
                # its log: leave the log to it
                self.counters["fenced"] += 1
                logger.error("runtime.orphan_fenced", client_id=nack.client_id,
                             reason=nack.reason)
                self._drop_orphan(orphan, delivered=False)
            case "retired" if orphan is not None:
                # the daemon retired this dead process's id (idle past its client TTL)
                # and cannot tell which of the log's events it stored: leave the log
                logger.error("runtime.orphan_client_id_retired", client_id=nack.client_id,
                             path=str(orphan.path), reason=nack.reason,
                             hint="the spill log stays on disk; its events were not sent")
                self._drop_orphan(orphan, delivered=False)
            case "unknown_tag" if self._farewell is not None and not self._farewell.is_set():
                # a daemon that predates Goodbye: it keeps the id (its TTL prunes it)
                self._farewell.set()
            case "fenced":
                self.counters["fenced"] += 1
                self._session = False  # say Hello again: it takes our client id back
                logger.error(
                    "runtime.fenced", client_id=nack.client_id, reason=nack.reason,
                    hint="another connection said Hello with this process's client id",
                )
            case "disk_full":
                self.counters["daemon_disk_full"] += 1
                if self.counters["daemon_disk_full"] == 1:
                    logger.warning("runtime.daemon_disk_full", reason=nack.reason,
                                   hint="events are kept and resent when the daemon has space")
                self._on_busy(nack)
            case "gap":
                stream = self._stream_for(nack.client_id)
                if stream is None or stream.rewound_to == nack.expected_seq:
                    return
                self._on_ack(Ack(client_id=nack.client_id, acked_through=nack.expected_seq - 1))
                stream.rewound_to = nack.expected_seq
                for f in stream.inflight:
                    f.sent_at = 0.0
                if stream.inflight and stream.inflight[0].first > nack.expected_seq:
                    stream.inflight[0].resync = True
                    stream.inflight[0].payload = None
            case "busy":
                self._on_busy(nack)
            case _:
                logger.error(
                    "runtime.frame_refused",
                    code=nack.code,
                    reason=nack.reason,
                    retry=nack.retry,
                )
                if not nack.retry:
                    # Nothing will make this frame acceptable: drop what was in flight
                    # rather than loop forever, and say so.
                    stream = self._stream_for(nack.client_id) or self._stream
                    if stream.inflight:
                        f = stream.inflight[0]
                        self.counters["events_rejected"] += len(f.items)
                        self._on_ack(Ack(client_id=stream.client_id, acked_through=f.last))

    def _on_busy(self, nack: Nack) -> None:
        self._paused_until = time.monotonic() + max(nack.retry_after_s, 0.01)
        for s in self._streams():
            for f in s.inflight:
                f.sent_at = 0.0

    def _drop_orphan(self, s: _Stream, *, delivered: bool) -> None:
        self._orphans.remove(s)
        s.close_log()
        if delivered:
            _remove_spill_dir(s.path, s.lock_fd)
            logger.info("runtime.orphan_spill_delivered", client_id=s.client_id)
            if self._session and s.welcomed:
                # the dead process's id has nothing left anywhere: let the daemon retire
                # it (best effort, unanswered: if lost, its client TTL does)
                self._send_raw(encode_message(Goodbye(client_id=s.client_id,
                                                      acked_through=s.acked_through)))
                self.counters["goodbyes_sent"] += 1
        else:  # undelivered records stay in their directory for a later process
            os.close(s.lock_fd)

    async def _send_loop(self) -> None:
        cfg = self.config
        while True:
            now = time.monotonic()
            if now > self._due:
                # The loop woke late: the app held the thread (blocking code) or the GIL
                # (a CPU-bound thread). The daemon's answers could not be read meanwhile,
                # so that time does not count as its silence.
                self._last_heard += now - self._due
            blocked = False
            linger = 0.0
            if not self._session:
                self._say_hello(now)
            elif now >= self._paused_until:
                linger = self._linger_left(now)
                if linger <= 0:
                    blocked = not self._pump(now)
            self._check_silence(now)
            if self._closing and (self._abandon or self._drained()):
                if not self._abandon:
                    await self._goodbye()
                return
            self._maybe_finish_spill()
            for s in list(self._orphans):
                if not s.has_unsent() and not s.inflight:
                    self._drop_orphan(s, delivered=True)
            if self._spill is not None:
                with self._lock:
                    self._spill.flush()
            with self._lock:
                has_work = bool(self._queue or self._held) or self._spill_unread > 0
                self._idle = not has_work
            timeout = cfg.heartbeat_s
            if not self._session:
                timeout = min(timeout, self._hello_backoff)
            elif blocked:
                timeout = 0.002
            elif linger > 0:
                timeout = linger
            elif has_work and self._window_open():
                timeout = 0 if now >= self._paused_until else self._paused_until - now
            self._due = time.monotonic() + max(timeout, 0.0)
            if timeout <= 0:
                await checkpoint()  # Event.wait() would not yield if already set
            else:
                with anyio.move_on_after(timeout):
                    await self._wake.wait()
            self._wake.clear()

    async def _goodbye(self) -> None:
        """On a clean close with nothing left (every event acknowledged, no spill log),
        tell the daemon this process's stream ends, so it can retire
        this client id instead of keeping its mark until the client TTL; waits up to 1 s
        for the answer. New events are refused from here on (``events_after_shutdown``):
        one recorded after the Goodbye would otherwise be spilled under a retired id."""
        if not self._session:
            return
        self._maybe_finish_spill()  # a spill log drained just now: dropped first
        with self._lock:
            if (self._queue or self._held or self._spill_unread or self._spilling
                    or self._stream.inflight or self._stream.acked_through != self._next_seq - 1):
                return
            self._closed = True
            through = self._stream.acked_through
        self._farewell = anyio.Event()
        if not self._send_raw(encode_message(Goodbye(client_id=self.client_id,
                                                     acked_through=through))):
            return
        self.counters["goodbyes_sent"] += 1
        with anyio.move_on_after(min(1.0, max(self.config.shutdown_grace_s, 0.05))):
            await self._farewell.wait()

    def _linger_left(self, now: float) -> float:
        """Seconds to wait before sending a small batch (0: send now).

        A few events trickling in (one LLM call at a time) wait for company, so the
        sender wakes once per batch instead of once per event: fewer turns of its loop,
        less of its time under the app's GIL. A batch holding the end of a rollout waits
        up to ``linger_s``; one of events of running rollouts only, up to
        ``open_linger_s``. A full batch, a spill backlog or shutdown sends at once.
        """
        cfg = self.config
        with self._lock:
            n, spilled = len(self._queue), self._spill_unread + len(self._held)
            ends = n > 0 and self._urgent_seq >= self._queue[0][0]
            limit = cfg.linger_s if ends else max(cfg.linger_s, cfg.open_linger_s)
            left = 0.0
            if not (self._closing or limit <= 0 or n == 0 or spilled
                    or self._batch_full(open_rollouts=not ends)):
                if self._linger_start is None:
                    self._linger_start = now
                left = max(0.0, limit - (now - self._linger_start))
            if left <= 0:
                self._linger_start = None
            # Set with the state it was decided on: from here on, submit() wakes an
            # open-rollout linger for a rollout's end or a full batch.
            self._lingering_open = left > 0 and not ends
        return left

    def _batch_full(self, *, open_rollouts: bool) -> bool:
        """Whether the queue holds a batch worth sending now (call with the lock held).

        Half a frame when a rollout's end waits in it (the next frame fills while this
        one travels); a whole frame when it holds events of running rollouts only.
        """
        cfg = self.config
        nbytes = cfg.max_batch_bytes if open_rollouts else cfg.max_batch_bytes // 2
        return len(self._queue) >= cfg.max_batch_events or self._queue_bytes >= nbytes

    def _window_open(self) -> bool:
        return len(self._stream.inflight) < self.config.max_inflight_frames

    def _say_hello(self, now: float) -> None:
        if now - self._last_hello < self._hello_backoff:
            return
        self._last_hello = now
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            client_id=self.client_id,
            pid=os.getpid(),
            host=socket.gethostname(),
            library_version=_version(),
        )
        try:
            self._transport.send(encode_message(hello))  # type: ignore[union-attr]
        except WouldBlock:
            if not self._warned_down and now - self._last_heard > self.config.peer_timeout_s:
                self._warned_down = True
                logger.warning(
                    "runtime.daemon_unreachable",
                    daemon=self.config.daemon,
                    hint="events are kept in memory, then spilled to disk, and sent when "
                    "the daemon is back; start it with `lightning-daemon`",
                )
        self._hello_backoff = min(self._hello_backoff * 2, 2.0)

    def _hello_orphans(self) -> None:
        """Say Hello for each dead process's client id whose log we replay: the daemon
        ties the id to this connection (a newer Hello takes an id over, and batches for
        an id this connection has not said Hello for are refused)."""
        for s in self._orphans:
            if not s.welcomed:
                self._transport.send(encode_message(Hello(  # type: ignore[union-attr]
                    protocol_version=PROTOCOL_VERSION, client_id=s.client_id,
                    pid=os.getpid(), host=socket.gethostname(), library_version=_version())))

    def _check_silence(self, now: float) -> None:
        """Say Hello again when the daemon has been silent too long while we wait on it."""
        if not self._session:
            return
        waiting = any(s.inflight for s in self._streams())
        if now - self._last_sent > self.config.heartbeat_s:
            self._send_raw(encode_message(Ping(sent_at=time.time())))
        if waiting and now - self._last_heard > self.config.peer_timeout_s:
            self._session = False
            self.counters["reconnects"] += 1
            self._hello_backoff = 0.05
            logger.warning("runtime.daemon_silent", seconds=round(now - self._last_heard, 2))

    def _send_raw(self, frame: bytes) -> bool:
        try:
            self._transport.send(frame)  # type: ignore[union-attr]
        except WouldBlock:
            return False
        self._last_sent = time.monotonic()
        return True

    def _pump(self, now: float) -> bool:
        """Send what the windows allow, up to ``_PUMP_BUDGET`` bytes per call.

        Returns False if the transport would block or the budget ran out; either way the
        send loop yields to the event loop before pumping again, so replaying a large
        spill log never holds the app's loop for long.
        """
        self._budget = _PUMP_BUDGET
        if any(not s.welcomed for s in self._orphans) and now - self._last_hello > 0.5:
            self._last_hello = now  # an orphan's Hello or Welcome was lost: say it again
            try:
                self._hello_orphans()
            except WouldBlock:
                return False
        for stream in self._streams():
            if stream.welcomed and not self._pump_stream(stream, now):
                return False
        return True

    def _pump_stream(self, stream: _Stream, now: float) -> bool:
        cfg = self.config
        # 1. (re)send frames that are in flight but not (or no longer) on the wire
        for f in stream.inflight:
            if f.sent_at == 0.0:
                if self._budget <= 0 or not self._send_frame(stream, f, now):
                    return False
                self.counters["frames_resent"] += 1
        # 2. new frames while the window is open
        while len(stream.inflight) < cfg.max_inflight_frames:
            if self._budget <= 0:
                return False
            items = self._next_items(stream)
            if not items:
                break
            resync = stream.resync_next
            stream.resync_next = False
            if stream.orphan:
                self.counters["orphan_events_already_acked"] += stream.read_ahead(
                    cfg.max_batch_events, cfg.max_batch_bytes)
                if stream.pending and stream.pending[0][0] != items[-1][0] + 1:
                    stream.resync_next = True  # the next frame starts after a gap
            f = _Frame(items, resync=resync)
            stream.inflight.append(f)
            if not self._send_frame(stream, f, now):
                return False
        return True

    def _next_items(self, stream: _Stream) -> list[Item]:
        cfg = self.config
        max_items = cfg.max_batch_events
        max_bytes = min(cfg.max_batch_bytes, self._max_frame_bytes - 1024)
        items: list[Item] = []
        nbytes = 0
        if stream.orphan:
            # A frame holds consecutive sequence numbers only: a gap in a dead process's
            # log (events it held only in memory) ends the frame, and the next frame
            # tells the daemon to accept the gap.
            self.counters["orphan_events_already_acked"] += stream.read_ahead(max_items, max_bytes)
            src = stream.pending
            while src and len(items) < max_items and (not items or nbytes + len(src[0][1]) <= max_bytes):
                if items and src[0][0] != items[-1][0] + 1:
                    stream.resync_next = True
                    break
                it = src.popleft()
                items.append(it)
                nbytes += len(it[1])
            return items
        with self._lock:
            q = self._queue
            while q and len(items) < max_items and (not items or nbytes + len(q[0][1]) <= max_bytes):
                it = q.popleft()
                items.append(it)
                nbytes += len(it[1])
            self._queue_bytes -= nbytes
        if not items:
            items = self._read_spill(max_items, max_bytes)
        return items

    def _send_frame(self, stream: _Stream, f: _Frame, now: float) -> bool:
        if f.payload is None:
            f.payload = encode_batch(
                stream.client_id, f.first, [it[1] for it in f.items], resync=f.resync
            )
        if not self._send_raw(f.payload):
            return False
        self._budget -= len(f.payload)
        f.sent_at = now
        self.counters["frames_sent"] += 1
        return True

    # ================================================================== shutdown

    def _drained(self) -> bool:
        with self._lock:
            if self._queue or self._held or self._spill_unread:
                return False
        return not any(s.inflight or s.has_unsent() for s in self._streams())

    def pending_events(self) -> int:
        """Events recorded but not yet acknowledged by the daemon."""
        with self._lock:
            n = len(self._queue) + self._spill_unread + len(self._held)
        for s in self._streams():
            n += len(s.pending) + s.remaining + sum(len(f.items) for f in s.inflight)
        return n

    async def aclose(self, grace_s: float | None = None) -> None:
        """Flush within ``grace_s`` (default ``config.shutdown_grace_s``), then stop.

        What is not acknowledged by then is written to the spill log for a later process.
        """
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._closing = True
        self._wake.set()
        with anyio.move_on_after(grace):
            while not self._drained():
                await anyio.sleep(0.005)
            if self._sender_done is not None:
                # drained: the sender says Goodbye (waits at most 1 s for the answer)
                self._wake.set()
                await self._sender_done.wait()
        self._stop_now()

    def _stop_now(self) -> None:
        self._closing = True
        self._abandon = True  # return even if not drained: _finalize spills the rest
        self._wake.set()

    def _finalize(self) -> None:
        """Persist everything not acknowledged; called once, when the sender stops."""
        with self._lock:
            self._closed = True
            leftovers: list[Item] = []
            for f in self._stream.inflight:
                leftovers.extend(f.items)
            self._stream.inflight.clear()
            leftovers.extend(self._queue)
            self._queue.clear()
            self._queue_bytes = 0
            leftovers.sort()
            # Replay order is sequence order: what was in flight or queued comes before
            # the spill log's unread records, and what was held (unspillable) after them.
            # With records in the spill log, the first go to its "head" log, read first.
            head: list[Item] = []
            if self._spill is not None and self._spill_bytes:
                head, leftovers = leftovers, []
            leftovers.extend(self._held)
            self._held.clear()
            if head or leftovers or self._spill_unread:
                self._spill_leftovers_locked(head, leftovers)
            elif self._spill is not None:
                self._spill.destroy()
                self._spill = None
            if self._spill_reader is not None:
                self._spill_reader.close()
                self._spill_reader = None
            if self._spill is not None:
                self._spill.close()
                self._spill = None
                if self._spill_lock_fd is not None:
                    os.close(self._spill_lock_fd)  # releases the flock: now an orphan
                    self._spill_lock_fd = None
        for s in list(self._orphans):
            self._drop_orphan(s, delivered=not (s.has_unsent() or s.inflight))

    def _spill_leftovers_locked(self, head: list[Item], tail: list[Item]) -> None:
        written = 0
        try:
            log = self._open_spill_locked()
            if head:
                head_log = AppendLog(self._spill_dir() / _HEAD)
                try:
                    for seq, data in head:
                        head_log.append(_SEQ.pack(seq) + data)
                        written += 1
                finally:
                    head_log.close()
            for seq, data in tail:
                log.append(_SEQ.pack(seq) + data)
                written += 1
        except OSError as exc:
            lost = len(head) + len(tail) - written
            self.counters["events_lost_at_shutdown"] += lost
            logger.error(
                "runtime.shutdown_spill_failed", events_lost=lost, error=str(exc),
                path=str(self._spill_dir()),
                hint="the spill directory's disk is full or unwritable: these events were "
                "neither acknowledged nor kept",
            )
        logger.warning(
            "runtime.shutdown_spilled",
            events=written + self._spill_unread,
            path=str(self._spill_dir()),
            hint="the next process using this spill directory replays them",
        )

    def stats(self) -> dict[str, Any]:
        """Counters and queue levels (``lightning.stats()`` returns these)."""
        with self._lock:
            queued = len(self._queue)
            spilled = self._spill_unread
            held = len(self._held)
            spill_bytes = self._spill_bytes
        return {
            **self.counters,
            "queued": queued,
            "spilled_unsent": spilled,
            "held_unspillable": held,
            "spill_bytes": spill_bytes,
            "inflight_frames": len(self._stream.inflight),
            "connected": self._session,
            "client_id": self.client_id,
        }


def _remove_spill_dir(d: Path, fd: int) -> None:
    for p in [*d.glob("*.log"), *d.glob(f"{_HEAD}/*.log")]:
        p.unlink(missing_ok=True)
    try:
        (d / _HEAD).rmdir()
    except OSError:
        pass
    (d / "lock").unlink(missing_ok=True)
    os.close(fd)
    try:
        d.rmdir()
    except OSError:
        pass


def _version() -> str:
    from . import __version__

    return __version__


def check_finite(value: Any) -> float | None:
    """``float(value)`` if it is a real, finite number (bools count as 0/1), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, complex):
        v = float(value)
        return v if math.isfinite(v) else None
    return None

