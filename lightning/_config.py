"""Configuration: frozen msgspec Structs, from keyword arguments, environment or TOML.

Every field of :class:`RuntimeConfig` can be set from the environment as
``LIGHTNING_<FIELD>`` (for example ``LIGHTNING_DAEMON=tcp://10.0.0.5:5555`` or
``LIGHTNING_MAX_QUEUE_EVENTS=50000``); keyword arguments given to ``lightning.init`` win
over the environment. Unknown keys are an error, never silently ignored.
"""

# No `from __future__ import annotations`: msgspec resolves these annotations at
# runtime, and lightning/__init__.py re-homes public classes to the `lightning` module.

import os
from pathlib import Path
from typing import Any, Literal

import msgspec

from ._errors import ConfigError

__all__ = ["DaemonConfig", "RuntimeConfig"]

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"


def _default_spill_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "lightning", "spill")


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the app-side runtime."""

    daemon: str = DEFAULT_ADDRESS
    """Address of the daemon: tcp://HOST:PORT or ipc://PATH."""
    spill_dir: str = ""
    """Directory of the local spill log ('' = $XDG_CACHE_HOME/lightning/spill)."""
    max_queue_events: int = 100_000
    """Events held in memory before new ones spill to disk."""
    max_queue_bytes: int = 256 << 20
    """Bytes held in memory before new events spill to disk."""
    max_spill_bytes: int = 8 << 30
    """Most bytes in this process's spill log. When it is full (the daemon has not taken
    events for a long while), newer events are dropped: counted in
    ``events_dropped_spill_full`` (see ``lightning.stats()``) and logged once per episode."""
    max_batch_events: int = 512
    """Most events per frame."""
    max_batch_bytes: int = 4 << 20
    """Most bytes per frame (a single larger event still travels alone). A transition with
    a long prompt is 10-100 KB; each frame sent while agents run costs the app GIL time
    (see ``open_linger_s``), so frames are large."""
    max_inflight_frames: int = 16
    """Frames sent but not yet acknowledged, per stream."""
    linger_s: float = 0.005
    """How long a small batch that ends a rollout waits for more events before it is sent
    (0: send at once). Trades a few milliseconds of delivery latency for far less work per
    event."""
    open_linger_s: float = 1.0
    """How long a small batch of events of rollouts still running (LLM calls, rewards,
    spans) waits for more before it is sent. The daemon uses a rollout once it ends, and
    an event that ends one sends the batch within ``linger_s``; so does a full batch. Each
    send is the runtime's thread taking the app's GIL: fewer of them while agents run is
    most of what capture costs per call. A process killed mid-rollout loses up to this
    much of that rollout's events (it could not finish it anyway). 0: as ``linger_s``."""
    heartbeat_s: float = 1.0
    """Ping interval while idle."""
    peer_timeout_s: float = 5.0
    """Silence from the daemon after which the runtime says Hello again."""
    shutdown_grace_s: float = 5.0
    """How long shutdown() waits for acknowledgements before spilling the rest to disk."""
    outside_rollout: Literal["warn", "ignore", "raise"] = "warn"
    """What emit_reward/record_transition/span do outside a rollout."""
    curve_server_key: str = ""
    """The daemon's CURVE public key (Z85 or path to its NAME.key) for non-loopback daemons."""
    curve_secret_key_file: str = ""
    """This client's CURVE NAME.key_secret file."""
    replay_orphans: bool = True
    """Replay spill logs left behind by dead processes of this machine on start."""
    policy_url: str = "http://127.0.0.1:8000/v1"
    """OpenAI base URL of the daemon's policy server (what :func:`lightning.llm` returns)."""
    policy_model: str = ""
    """Model name to request from the policy server ('' = whatever it serves)."""
    policy_api_key: str = "EMPTY"
    """API key for the policy server (its --api-key; any string when it has none)."""
    capture: bool = True
    """Capture calls made with the `openai` package inside rollouts automatically."""
    token_id_urls: tuple[str, ...] = ()
    """More OpenAI-compatible servers that return token ids (vLLM): the runtime asks them
    for token ids and log-probs too."""

    def __post_init__(self) -> None:
        for name in ("max_queue_events", "max_queue_bytes", "max_spill_bytes",
                     "max_batch_events", "max_batch_bytes", "max_inflight_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("linger_s", "open_linger_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("heartbeat_s", "peer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")

    @property
    def resolved_spill_dir(self) -> str:
        return self.spill_dir or _default_spill_dir()


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the daemon's ingest side."""

    bind: str = DEFAULT_ADDRESS
    """Where clients connect: tcp://HOST:PORT (port 0 picks a free one) or ipc://PATH."""
    backend: str = "torch"
    """Training backend: torch, verl or deepspeed."""
    data_dir: str = "lightning-data"
    """Write-ahead log and cursor of the trajectory store."""
    max_frame_bytes: int = 64 << 20
    """Frames above this size are refused with a nack."""
    heartbeat_s: float = 1.0
    buffer_size: int = 10_000
    """Completed trajectories waiting for the consumer before clients are told to wait."""
    fsync: Literal["never", "always"] = "never"
    """'never': acknowledge once the OS has the data (survives a killed daemon);
    'always': fsync before acknowledging (survives power loss, much slower)."""
    max_finished_remembered: int = 1_000_000
    """Finished rollout ids remembered to tell 'finished' from 'unknown' rollouts."""
    curve_secret_key_file: str = ""
    curve_authorized_keys: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    stats_interval_s: float = 30.0
    """Interval of the ``daemon.stats`` log line (0 disables it)."""
    wal_compact_bytes: int = 256 << 20
    """When the consumer commits and the write-ahead log has grown by this much since the
    last compaction, snapshot the ingest state and delete the log before it (0: never)."""
    rollout_ttl_s: float = 3600.0
    """A rollout still open this long after this daemon process first saw it is ended as
    failed with error 'expired...' (written to the log like any end, counted in
    ``rollouts_expired``); the trainer's failure policy then drops it or scores it 0, and
    the client's later events for it are rejected as ``rollout_finished``. 0: never."""
    peer_idle_s: float = 120.0
    """A connection silent this long (runtimes ping every second while idle) is forgotten:
    its session and the client ids it owned; if it speaks again it is told to say Hello."""
    client_ttl_s: float = 86400.0
    """A client id that never said Goodbye (a crashed process, an older runtime) and sent
    nothing for this long, with no connection owning it and no open rollout holding its
    events, is retired: its de-duplication mark is dropped (logged, so recovery agrees;
    counted in ``clients_retired.idle``). It may come back only as a fresh stream from
    sequence 1; a stale resync of it is refused (``retired``). Keep it longer than a dead
    process's spill log may wait to be replayed. 0: never."""

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 1024:
            raise ConfigError(f"max_frame_bytes must be >= 1024, got {self.max_frame_bytes}")
        if self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")
        for name in ("rollout_ttl_s", "peer_idle_s", "client_ttl_s"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.wal_compact_bytes < 0:
            raise ConfigError(f"wal_compact_bytes must be >= 0, got {self.wal_compact_bytes}")


def from_env(cls: type, overrides: dict[str, Any], prefix: str = "LIGHTNING_") -> Any:
    """Build ``cls`` from ``LIGHTNING_*`` variables, then keyword overrides."""
    fields = {f.name for f in msgspec.structs.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
            f"valid settings: {', '.join(sorted(fields))}"
        )
    values: dict[str, Any] = {}
    tuples = {f.name for f in msgspec.structs.fields(cls)
              if getattr(f.type, "__origin__", None) is tuple}
    for name in fields:
        raw = os.environ.get(prefix + name.upper())
        if raw is not None and raw != "":
            values[name] = [v.strip() for v in raw.split(",") if v.strip()] if name in tuples else raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid {cls.__name__} setting: {exc}") from exc


def load_toml(path: str | os.PathLike, cls: type) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    try:
        return msgspec.toml.decode(data, type=cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid config file {str(path)!r}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def load_toml_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a plain dict (for backend settings the backend validates itself)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
    try:
        out = msgspec.toml.decode(data)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    if not isinstance(out, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of settings")
    return out
