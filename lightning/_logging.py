"""structlog configuration for the daemon entry point (library code never configures)."""

from __future__ import annotations

import logging
import sys

import msgspec
import structlog

_ENC = msgspec.json.Encoder(enc_hook=repr)


def configure_logging(level: str = "info", *, stream=None) -> None:
    """JSON lines on stderr: ``{"event": "daemon.listening", "level": ..., ...}``."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            # structlog passes default= to the serializer, which msgspec does not take.
            structlog.processors.JSONRenderer(serializer=lambda o, **_: _ENC.encode(o)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.BytesLoggerFactory(file=stream or sys.stderr.buffer),
        cache_logger_on_first_use=True,
    )
