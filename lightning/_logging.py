"""structlog configuration for the entry points (library code never configures), and the
repeat filter that keeps a log storm to one line per interval.

A warning that repeats (a broken agent failing every rollout, a client sending the same bad
event) would otherwise write one line per occurrence: 17,443 lines in 90 s in one report.
:class:`RepeatFilter` writes the first occurrence of each (event, error) pair at once; later
ones within ``interval_s`` are counted, not written, and the first one after the interval
carries ``repeated=N`` (how many were held back since the last line). :meth:`RepeatFilter.flush`
writes the counts still held (entry points call it at exit) as lines with ``summary=true``
(a count only, not an occurrence), so no occurrence goes uncounted: occurrences = lines
without ``summary`` + the sum of ``repeated``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

__all__ = ["RepeatFilter", "configure_logging", "level_number", "repeat_filter"]

_ENC = msgspec.json.Encoder(enc_hook=repr)

# logging.getLevelNamesMapping() is 3.11+
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}

# the fields that tell one kind of repeated warning from another (besides the event)
_KEY_FIELDS = ("error", "reason", "code", "kind")
_FILTERED = frozenset(("warning", "warn", "error", "exception", "critical"))


def level_number(level: str) -> int:
    """``"warning"`` -> ``logging.WARNING``; raises ValueError naming the valid levels."""
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}: use one of {', '.join(_LEVELS)}") from None


class RepeatFilter:
    """A structlog processor: repeats of a warning within ``interval_s`` are counted, not written.

    Two log lines are repeats when their event and their ``error``/``reason``/``kind`` fields
    are equal, or, for lines with a stable ``code`` (a rejection's), their event, code and
    kind (other fields, such as a rollout id or a reason naming one, may differ). Info and
    debug lines always pass. Thread-safe. ``clock`` is injectable for tests.
    """

    def __init__(self, interval_s: float = 10.0, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        # key -> [time of the last written line, count held back since, last event dict]
        self._seen: dict[tuple, list[Any]] = {}

    def _key(self, event_dict: dict[str, Any]) -> tuple:
        if "code" in event_dict:  # a stable reason code: its free-text reason names ids
            return (event_dict.get("event"), "code", str(event_dict["code"]),
                    str(event_dict.get("kind", "")))
        return (event_dict.get("event"),) + tuple(
            str(event_dict.get(f, ""))[:300] for f in _KEY_FIELDS)

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if method_name not in _FILTERED or self.interval_s == 0:
            return event_dict
        key = self._key(event_dict)
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self.interval_s:
                entry[1] += 1
                entry[2] = (method_name, event_dict)
                raise structlog.DropEvent
            if entry is not None and entry[1]:
                event_dict["repeated"] = entry[1]
                event_dict["repeated_over_s"] = round(now - entry[0], 1)
            if len(self._seen) >= self._max_keys and key not in self._seen:
                self._evict(now)
            self._seen[key] = [now, 0, None]
        return event_dict

    def _evict(self, now: float) -> None:
        # keys with nothing held back and an elapsed interval carry no information
        for k in [k for k, e in self._seen.items() if not e[1] and now - e[0] >= self.interval_s]:
            del self._seen[k]
        while len(self._seen) >= self._max_keys:  # still full: forget the oldest
            del self._seen[next(iter(self._seen))]

    def held(self) -> int:
        """Occurrences counted but not yet written."""
        with self._lock:
            return sum(e[1] for e in self._seen.values())

    def flush(self) -> None:
        """Write one line per key with occurrences held back (with ``repeated=N``)."""
        with self._lock:
            pending = [(e[1], e[2]) for e in self._seen.values() if e[1]]
            self._seen.clear()
        log = structlog.get_logger()
        for count, (method_name, event_dict) in pending:
            fields = {k: v for k, v in event_dict.items() if k not in ("event", "level", "timestamp")}
            fields["repeated"] = count
            fields["summary"] = True
            getattr(log, method_name if method_name != "exception" else "error")(
                event_dict.get("event"), **fields)


_filter: RepeatFilter | None = None


def repeat_filter() -> RepeatFilter | None:
    """The filter :func:`configure_logging` installed (None before it ran)."""
    return _filter


def configure_logging(level: str = "info", *, stream=None, repeat_interval_s: float = 10.0) -> None:
    """JSON lines on stderr: ``{"event": "daemon.listening", "level": ..., ...}``.

    Repeated warnings are aggregated by a :class:`RepeatFilter` (``repeat_interval_s``; 0
    writes every line); it is flushed at interpreter exit.
    """
    global _filter
    if _filter is not None:
        _filter.flush()
    _filter = RepeatFilter(repeat_interval_s)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _filter,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # structlog passes default= to the serializer, which msgspec does not take.
            structlog.processors.JSONRenderer(serializer=lambda o, **_: _ENC.encode(o)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=structlog.BytesLoggerFactory(file=stream or sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
    _register_exit_flush()


_exit_registered = False


def _register_exit_flush() -> None:
    global _exit_registered
    if not _exit_registered:
        import atexit

        atexit.register(_flush_at_exit)
        _exit_registered = True


def _flush_at_exit() -> None:
    try:
        if _filter is not None:
            _filter.flush()
    except (ValueError, OSError):  # the log stream is already closed: nothing to write to
        pass
