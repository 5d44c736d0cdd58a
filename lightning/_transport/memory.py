"""In-memory transport for tests: a daemon and clients in one process, no sockets.

``hub = MemoryHub()`` is the server side (pass it to the daemon as its transport);
``hub.connect()`` makes a client transport. ``hub.set_down(True)`` simulates a daemon
that is unreachable: frames sent meanwhile are lost in transit (as with a dead TCP
connection), and clients get :class:`WouldBlock` on send, like ZeroMQ with
``IMMEDIATE`` set. Frames may also be dropped at random (``drop_rate``) to exercise the
retry paths.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from typing import Generic, TypeVar

import anyio

from .base import WouldBlock

__all__ = ["MemoryClientTransport", "MemoryHub"]

T = TypeVar("T")
_peer_ids = itertools.count(1)


class _Queue(Generic[T]):
    """A bounded FIFO with an async get; put never waits (full -> WouldBlock)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[T] = deque()
        self._ready = anyio.Event()

    def put_nowait(self, item: T) -> None:
        if len(self._items) >= self.capacity:
            raise WouldBlock("queue full")
        self._items.append(item)
        self._ready.set()

    async def get(self) -> T:
        while not self._items:
            self._ready = anyio.Event()
            await self._ready.wait()
        return self._items.popleft()

    def clear(self) -> None:
        self._items.clear()


class MemoryHub:
    def __init__(self, *, capacity: int = 10_000, drop_rate: float = 0.0, seed: int = 0):
        self._capacity = capacity
        self._inbox: _Queue[tuple[bytes, bytes]] = _Queue(capacity)
        self._clients: dict[bytes, MemoryClientTransport] = {}
        self.down = False
        self.drop_rate = drop_rate
        self._rng = random.Random(seed)
        self.address = "memory://hub"

    def connect(self) -> MemoryClientTransport:
        peer = b"peer-%d" % next(_peer_ids)
        client = MemoryClientTransport(self, peer, self._capacity)
        self._clients[peer] = client
        return client

    def set_down(self, down: bool) -> None:
        """Simulate the daemon going away (frames in transit are lost) or coming back."""
        self.down = down
        if down:
            self._inbox.clear()

    def _lost(self) -> bool:
        return self.drop_rate > 0 and self._rng.random() < self.drop_rate

    # ------------------------------------------------------- ServerTransport API

    def send(self, peer: bytes, frame: bytes) -> None:
        client = self._clients.get(peer)
        if client is None or self.down or self._lost():
            return
        try:
            client._inbox.put_nowait(frame)
        except WouldBlock:
            pass  # a slow client loses replies, like a full ZeroMQ pipe

    async def recv(self) -> tuple[bytes, bytes]:
        return await self._inbox.get()

    async def aclose(self) -> None:
        self._inbox.clear()


class MemoryClientTransport:
    def __init__(self, hub: MemoryHub, peer: bytes, capacity: int) -> None:
        self._hub = hub
        self.peer = peer
        self._inbox: _Queue[bytes] = _Queue(capacity)

    def send(self, frame: bytes) -> None:
        if self._hub.down:
            raise WouldBlock("memory hub is down")
        if self._hub._lost():
            return
        self._hub._inbox.put_nowait((self.peer, frame))

    async def recv(self) -> bytes:
        return await self._inbox.get()

    async def aclose(self) -> None:
        self._hub._clients.pop(self.peer, None)
