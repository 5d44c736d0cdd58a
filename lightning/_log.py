"""Append-only record logs on local disk: the client's spill log and the daemon's WAL.

A log is a directory of segment files ``00000000000000000000.log``, named by the offset
of their first record. A record is::

    u32 little-endian payload length | u32 little-endian crc32(payload) | payload

Each append is one ``writev`` system call, so a record is in the OS when
:meth:`AppendLog.append` returns (what a SIGKILL-safe acknowledgement needs);
:meth:`AppendLog.sync` additionally fsyncs, for power loss. For a group commit off the
caller's thread, :meth:`AppendLog.begin_sync` hands out file descriptors that cover every
record appended so far (the caller fsyncs them in a worker thread, meanwhile appending
more, then gives them back with :meth:`AppendLog.end_sync`). An append that fails (disk
full, a short write) is undone, the file truncated back to the record before it, and the
``OSError`` raised: the log never holds a torn record it did not report, so the caller
can refuse (the daemon's retryable ``disk_full`` nack) or keep the record elsewhere (the
runtime's memory queue) and try again later. On open, a torn or corrupt tail (a crash
in the middle of a write) is truncated away and reported; everything before it is intact
by construction. Reading streams record by record: memory stays bounded by one record
whatever the size of the log.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import structlog

logger = structlog.get_logger()

_HEADER = struct.Struct("<II")
_SUFFIX = ".log"


class AppendLog:
    """A segmented append-only log of byte records.

    Not thread-safe: callers serialise access (the runtime holds its lock, the daemon
    uses it from one task).
    """

    def __init__(self, directory: str | os.PathLike, *, segment_bytes: int = 64 << 20,
                 group_sync: bool = False) -> None:
        self.directory = Path(directory)
        # group_sync: a segment rotated away with records not yet covered by a
        # begin_sync keeps its descriptor open until the next begin_sync hands it out
        self._group_sync = group_sync
        self._unsynced = False  # records appended since the last begin_sync
        self._retired_fds: list[int] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._segments: list[Path] = sorted(self.directory.glob("*" + _SUFFIX))
        self.truncated_bytes = 0
        if self._segments:
            self._repair_tail(self._segments[-1])
        else:
            self._segments.append(self.directory / f"{0:020d}{_SUFFIX}")
        self._tail = self._segments[-1]
        self._fd = _open_tail(self._tail)
        self._tail_size = os.fstat(self._fd).st_size
        # sizes of the segments before the tail (size_of_all needs no system call)
        self._sizes = {seg: seg.stat().st_size for seg in self._segments[:-1]}
        self.records_appended = 0

    # ----------------------------------------------------------------- writing

    def append(self, payload: bytes | memoryview, *, sync: bool = False) -> None:
        """Append one record (one system call; ``sync``: then fsync). On ``OSError``
        nothing was appended."""
        if self._tail_size >= self.segment_bytes:
            self._rotate()
        header = _HEADER.pack(len(payload), zlib.crc32(payload))
        size = _HEADER.size + len(payload)
        try:
            written = os.writev(self._fd, (header, payload))
            if written != size:  # the file system ran out of space mid-record
                raise OSError(errno.ENOSPC, f"short write: {written} of {size} bytes")
            if sync:
                os.fsync(self._fd)
        except OSError:
            self._undo()
            raise
        self._tail_size += size
        self.records_appended += 1
        self._unsynced = True

    def _undo(self) -> None:
        """Cut the tail back to the last whole record (after a failed append or sync)."""
        try:
            os.ftruncate(self._fd, self._tail_size)
        except OSError as exc:  # the next open repairs the torn tail instead
            logger.error("log.undo_failed", path=str(self._tail), error=str(exc))

    def flush(self) -> None:
        """Records are in the OS once appended: kept so callers need not know."""

    def sync(self) -> None:
        """fsync: records survive a machine crash too."""
        fds = self.begin_sync()
        try:
            fsync_all(fds)
        finally:
            self.end_sync(fds)

    def begin_sync(self) -> list[int]:
        """Descriptors whose fsync makes every record appended so far durable (the tail
        segment's, duplicated, and those of segments rotated away since the last call).
        Any thread may fsync them (:func:`fsync_all`) while this log goes on appending;
        hand them back with :meth:`end_sync`, which closes them."""
        fds, self._retired_fds = self._retired_fds, []
        fds.append(os.dup(self._fd))
        self._unsynced = False
        return fds

    @staticmethod
    def end_sync(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    @property
    def unsynced(self) -> bool:
        """Whether records were appended since the last :meth:`begin_sync`."""
        return self._unsynced

    @property
    def size_of_tail(self) -> int:
        return self._tail_size

    def _rotate(self) -> None:
        start = int(self._tail.stem) + self._tail_size
        tail = self.directory / f"{start:020d}{_SUFFIX}"
        fd = _open_tail(tail)  # may fail (disk full): the current segment stays the tail
        if self._group_sync and self._unsynced:
            self._retired_fds.append(self._fd)  # the next begin_sync covers it
        else:
            os.close(self._fd)
        self._sizes[self._tail] = self._tail_size
        self._fd, self._tail = fd, tail
        self._segments.append(tail)
        self._tail_size = 0

    def rotate(self) -> str:
        """End the current segment (if it holds anything); later appends go to a new one.
        Returns the name of the segment the next record will be in."""
        if self._tail_size > 0:
            self._rotate()
        return self._tail.name

    def drop_before(self, name: str) -> int:
        """Delete every segment before segment ``name`` (names sort by offset); returns the
        bytes freed. The current segment is never deleted."""
        return unlink_segments(self.detach_before(name))

    def detach_before(self, name: str) -> list[Path]:
        """Forget every segment before segment ``name`` (never the current one) and return
        their paths, for the caller to delete (:func:`unlink_segments`, in any thread:
        deleting large files can block)."""
        gone = [seg for seg in self._segments if seg.name < name and seg != self._tail]
        self._segments = [seg for seg in self._segments if seg not in gone]
        for seg in gone:
            self._sizes.pop(seg, None)
        return gone

    def size_of_all(self) -> int:
        """Bytes in the log's segments, as this log wrote them (no system call; equal to
        :meth:`size_bytes` unless someone else changes the files)."""
        return sum(self._sizes.values()) + self._tail_size

    # ----------------------------------------------------------------- reading

    def iter_from(self, name: str) -> Iterator[bytes]:
        """The records of segment ``name`` and every later one, in append order."""
        for seg in list(self._segments):
            if seg.name >= name:
                yield from _read_segment(seg)

    def __iter__(self) -> Iterator[bytes]:
        """All records in append order."""
        for seg in list(self._segments):
            yield from _read_segment(seg)

    def count(self) -> int:
        """How many records the log holds (reads the headers only)."""
        return sum(_count_segment(seg) for seg in list(self._segments))

    def size_bytes(self) -> int:
        return sum(s.stat().st_size for s in self._segments if s.exists())

    def is_empty(self) -> bool:
        return self.size_bytes() == 0

    # ------------------------------------------------------------ maintenance

    def reset(self) -> None:
        """Drop every record (after they were all delivered)."""
        self.close()
        for seg in self._segments:
            seg.unlink(missing_ok=True)
        self._segments = [self.directory / f"{0:020d}{_SUFFIX}"]
        self._sizes = {}
        self._tail = self._segments[0]
        self._fd = _open_tail(self._tail)
        self._tail_size = 0

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.end_sync(self._retired_fds)
        self._retired_fds = []

    def destroy(self) -> None:
        """Close and delete the log directory's segments (and the directory if empty)."""
        self.close()
        for seg in self._segments:
            seg.unlink(missing_ok=True)
        try:
            self.directory.rmdir()
        except OSError:
            pass

    def _repair_tail(self, seg: Path) -> None:
        n = seg.stat().st_size
        good = _intact_prefix(seg)
        if good != n:
            self.truncated_bytes = n - good
            logger.warning(
                "log.tail_truncated",
                path=str(seg),
                kept_bytes=good,
                dropped_bytes=n - good,
                hint="a previous process died mid-write; the incomplete record was never "
                "acknowledged, so its sender still holds it",
            )
            with open(seg, "r+b") as f:
                f.truncate(good)


def unlink_segments(paths: list[Path]) -> int:
    """Delete segment files (from :meth:`AppendLog.detach_before`); returns bytes freed."""
    freed = 0
    for seg in paths:
        try:
            freed += seg.stat().st_size
        except FileNotFoundError:
            continue
        seg.unlink(missing_ok=True)
    return freed


def fsync_all(fds: list[int]) -> None:
    """fsync each descriptor (from :meth:`AppendLog.begin_sync`); raises ``OSError``."""
    for fd in fds:
        os.fsync(fd)


def _open_tail(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _intact_prefix(seg: Path) -> int:
    """Bytes of ``seg`` made of whole, checksummed records (streamed: bounded memory)."""
    good = 0
    with open(seg, "rb") as f:
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return good
            length, crc = _HEADER.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return good
            good += _HEADER.size + length


def _count_segment(seg: Path) -> int:
    n = 0
    try:
        f = open(seg, "rb")
    except FileNotFoundError:
        return 0
    with f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + _HEADER.size <= size:
            f.seek(pos)
            (length,) = struct.unpack("<I", f.read(4))
            if pos + _HEADER.size + length > size:
                break
            pos += _HEADER.size + length
            n += 1
    return n


class LogReader:
    """Reads an :class:`AppendLog` forward from the start, picking up later appends.

    Each :meth:`read` returns what has been appended (and flushed) since the last call,
    so a log that is written and read at the same time is read exactly once, in order.
    """

    def __init__(self, log: AppendLog) -> None:
        self._log = log
        self._seg = 0
        self._off = 0
        self._fh = None

    def read(self, max_records: int, max_bytes: int) -> list[bytes]:
        self._log.flush()
        out: list[bytes] = []
        nbytes = 0
        segments = self._log._segments
        while len(out) < max_records and nbytes < max_bytes:
            if self._fh is None:
                if self._seg >= len(segments):
                    break
                self._fh = open(segments[self._seg], "rb")
                self._fh.seek(self._off)
            header = self._fh.read(_HEADER.size)
            if len(header) < _HEADER.size:
                if self._seg + 1 < len(segments):  # this segment is complete: next one
                    self._fh.close()
                    self._fh = None
                    self._seg += 1
                    self._off = 0
                    continue
                self._fh.seek(self._off)  # caught up with the writer
                break
            length, crc = _HEADER.unpack(header)
            payload = self._fh.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                self._fh.seek(self._off)  # only possible if someone else writes the file
                break
            self._off += _HEADER.size + length
            out.append(payload)
            nbytes += length
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _read_segment(seg: Path) -> Iterator[bytes]:
    try:
        f = open(seg, "rb")
    except FileNotFoundError:
        return
    with f:
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, crc = _HEADER.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                logger.warning("log.corrupt_record", path=str(seg))
                return
            yield payload
