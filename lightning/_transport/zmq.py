"""ZeroMQ transport: DEALER (each runtime) -> ROUTER (the daemon).

Why DEALER/ROUTER: the daemon has many clients and must reply (ack) to the one that sent
a frame, without a request/response lockstep that would cap throughput at one frame per
round trip. A DEALER pipelines frames; the ROUTER learns each peer's routing id. ZeroMQ
reconnects by itself with exponential backoff (``RECONNECT_IVL`` .. ``RECONNECT_IVL_MAX``)
and ZMTP heartbeats detect dead peers; ``IMMEDIATE`` keeps frames from queueing for a
connection that does not exist yet, so a send while the daemon is down fails at once
(:class:`WouldBlock`) and the runtime spills instead. Frames queued in a pipe whose
connection then dies are lost by ZeroMQ; the runtime's acknowledgements and go-back-N
resend make that harmless.

pyzmq's async support is asyncio-only (zeromq/pyzmq#1827): this transport runs on
anyio's asyncio backend, not trio.

Security: binding to anything but loopback (or ipc://) requires CURVE: the daemon's
secret key plus a directory of authorised client public keys (ZAP). Create keys with
``lightning-daemon keygen DIR``.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.asyncio

from .._errors import ConfigError, TransportError
from .base import WouldBlock

__all__ = ["ZmqClientTransport", "ZmqServerTransport", "check_bind", "hard_frame_limit",
           "is_loopback", "keygen"]


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on a loopback interface."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        raise ConfigError(
            f"unsupported address {address!r}: use tcp://HOST:PORT, ipc://PATH or inproc://NAME"
        )
    host = urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or hostname: treat as reachable from outside


def check_bind(
    bind: str, curve_secret_key_file: str | None, curve_authorized_keys: str | None
) -> None:
    """Refuse a bind reachable from other machines unless CURVE authentication is on."""
    if not is_loopback(bind) and not curve_secret_key_file:
        raise ConfigError(
            f"refusing to bind {bind!r} without authentication: it is reachable from "
            "other machines. Create keys with `lightning-daemon keygen DIR` and pass "
            "--curve-secret-key DIR/daemon.key_secret --curve-authorized-keys DIR "
            "(the client public keys), or bind tcp://127.0.0.1:PORT"
        )
    if curve_secret_key_file and not curve_authorized_keys:
        raise ConfigError(
            "CURVE on the daemon needs --curve-authorized-keys DIR, the directory of "
            "client public keys (NAME.key) allowed to connect"
        )


def keygen(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Create a CURVE key pair ``NAME.key`` (public) and ``NAME.key_secret`` in DIRECTORY."""
    import zmq.auth

    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def _load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read CURVE secret key file {str(path)!r}: {exc}; create one with "
            "`lightning-daemon keygen DIR`"
        ) from exc
    if secret is None:
        raise ConfigError(
            f"{str(path)!r} holds no secret key: pass the NAME.key_secret file, not NAME.key"
        )
    return public, secret


def _load_public(key_or_path: str) -> bytes:
    if len(key_or_path) == 40 and not os.path.exists(key_or_path):
        return key_or_path.encode()  # a Z85 public key given inline
    import zmq.auth

    try:
        public, _ = zmq.auth.load_certificate(key_or_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"curve_server_key must be the daemon's Z85 public key (40 characters) or the "
            f"path of its NAME.key file; {key_or_path!r} is neither ({exc})"
        ) from exc
    return public


def hard_frame_limit(max_frame_bytes: int) -> int:
    """The frame size above which ZeroMQ drops a connection (``MAXMSGSIZE``): frames
    between ``max_frame_bytes`` and this still get a ``frame_too_large`` nack."""
    return max(max_frame_bytes * 8, 512 << 20)


def _raise_from_done(fut) -> None:
    exc = fut.exception() if fut.done() else None
    if exc is not None:
        raise exc


class ZmqClientTransport:
    """A DEALER socket connected to the daemon."""

    def __init__(
        self,
        address: str,
        *,
        sndhwm: int = 64,
        reconnect_ivl_ms: int = 100,
        reconnect_ivl_max_ms: int = 5000,
        heartbeat_ms: int = 1000,
        curve_server_key: str | None = None,
        curve_secret_key_file: str | None = None,
    ) -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 3)
        sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_ms * 3)
        if curve_server_key or curve_secret_key_file:
            if not (curve_server_key and curve_secret_key_file):
                raise ConfigError(
                    "CURVE needs both curve_server_key (the daemon's public key) and "
                    "curve_secret_key_file (this client's NAME.key_secret)"
                )
            public, secret = _load_secret(curve_secret_key_file)
            sock.curve_serverkey = _load_public(curve_server_key)
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        try:
            sock.connect(address)
        except zmq.ZMQError as exc:
            sock.close(0)
            self._ctx.term()
            raise ConfigError(f"cannot connect to {address!r}: {exc}") from exc
        self._sock = sock

    def send(self, frame: bytes) -> None:
        # With DONTWAIT the asyncio socket completes the send at once (the returned future
        # is already done) and still wakes a pending recv: ZeroMQ's file descriptor is
        # edge-triggered, so sends must go through the same wrapper as receives.
        try:
            _raise_from_done(self._sock.send(frame, zmq.DONTWAIT, copy=len(frame) < 65536))
        except zmq.Again as exc:
            raise WouldBlock(str(exc)) from exc
        except zmq.ZMQError as exc:
            raise TransportError(f"send to {self.address} failed: {exc}") from exc

    async def recv(self) -> bytes:
        return await self._sock.recv()

    async def aclose(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class ZmqServerTransport:
    """A ROUTER socket bound for clients."""

    def __init__(
        self,
        bind: str,
        *,
        max_frame_bytes: int,
        sndhwm: int = 1000,
        heartbeat_ms: int = 1000,
        curve_secret_key_file: str | None = None,
        curve_authorized_keys: str | None = None,
    ) -> None:
        check_bind(bind, curve_secret_key_file, curve_authorized_keys)
        self._ctx = zmq.asyncio.Context()
        self._auth = None
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        # Per connection: a runtime keeps at most max_inflight_frames (16) in flight; past
        # this, ZeroMQ stops reading that peer's socket (backpressure, nothing dropped).
        sock.setsockopt(zmq.RCVHWM, 128)
        # A hard guard against rogue peers (memory): the daemon nacks frames above
        # max_frame_bytes itself, with a clear reason and a counter, up to this limit;
        # a frame above it makes ZeroMQ close the connection, with no reply possible.
        sock.setsockopt(zmq.MAXMSGSIZE, hard_frame_limit(max_frame_bytes))
        sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_ms * 3)
        if curve_secret_key_file:
            from zmq.auth.asyncio import AsyncioAuthenticator

            if not Path(curve_authorized_keys).is_dir():
                raise ConfigError(
                    f"--curve-authorized-keys {curve_authorized_keys!r} is not a directory"
                )
            public, secret = _load_secret(curve_secret_key_file)
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(curve_authorized_keys))
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        try:
            if bind.startswith("tcp://") and bind.endswith(":0"):
                port = sock.bind_to_random_port(bind[: -len(":0")])
                self.address = f"{bind[:-2]}:{port}"
            else:
                sock.bind(bind)
                self.address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(0)
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise ConfigError(f"cannot bind {bind!r}: {exc}") from exc
        self._sock = sock

    def send(self, peer: bytes, frame: bytes) -> None:
        try:
            _raise_from_done(self._sock.send_multipart([peer, frame], zmq.DONTWAIT))
        except zmq.ZMQError:
            # Peer gone (EHOSTUNREACH) or its pipe is full (EAGAIN): it will time out and
            # resend, and de-duplication makes the resend harmless.
            pass

    async def recv(self) -> tuple[bytes, memoryview]:
        while True:
            # copy=False: the payload is a view of ZeroMQ's buffer, decoded and logged
            # without another copy of a (possibly megabyte-sized) frame.
            parts = await self._sock.recv_multipart(copy=False)
            if len(parts) == 2:
                return parts[0].bytes, parts[1].buffer
            # A peer that is not a DEALER speaking one frame per message: ignore.

    async def aclose(self) -> None:
        self._sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()
