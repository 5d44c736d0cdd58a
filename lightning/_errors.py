"""Exceptions raised by lightning.

The tree::

    LightningError                      root of everything lightning raises
    ├── ConfigError                     a setting is missing, malformed or contradictory
    ├── ProtocolError                   a wire message could not be decoded or is invalid
    │   └── ProtocolVersionError        the peer speaks an incompatible protocol version
    ├── TransportError                  the connection to the daemon failed
    │   └── TransportTimeout            ... within the configured time (also a TimeoutError)
    ├── RolloutError                    misuse of a rollout (carries ``.rollout_id``)
    └── BackendError                    a training backend failed or is unavailable

Every message says what was wrong and how to fix it. Errors from dependencies are
chained with ``raise ... from exc``.

Note what is *not* here: the app-side runtime never raises into the application because
the daemon is down or slow. Delivery problems degrade to buffering and spilling to disk,
and are reported in the log. Only programming errors (bad arguments, misuse) raise.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "LightningError",
    "ProtocolError",
    "ProtocolVersionError",
    "RolloutError",
    "TransportError",
    "TransportTimeout",
]


class LightningError(Exception):
    """Base class of every exception raised by lightning."""


class ConfigError(LightningError, ValueError):
    """A configuration value is missing, malformed or contradictory."""


class ProtocolError(LightningError):
    """A wire message could not be decoded, or decoded but is invalid.

    ``code`` is the stable machine-readable reason also used in nacks and counters.
    """

    def __init__(self, message: str, *, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


class ProtocolVersionError(ProtocolError):
    """The peer speaks a protocol version this side does not understand."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="protocol_version")


class TransportError(LightningError):
    """The connection to the daemon failed."""


class TransportTimeout(TransportError, TimeoutError):
    """The daemon did not answer within the configured time."""


class RolloutError(LightningError):
    """A rollout was used incorrectly (for example, rewarding a finished rollout)."""

    def __init__(self, message: str, *, rollout_id: str | None = None) -> None:
        super().__init__(message)
        self.rollout_id = rollout_id


class BackendError(LightningError):
    """A training backend failed, or its optional dependencies are not installed."""
