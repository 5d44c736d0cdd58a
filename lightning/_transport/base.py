"""The transport boundary: transports move opaque frames, the runtime and daemon own policy.

A client transport sends and receives frames to and from one daemon; a server transport
receives frames from many peers, each tagged with an opaque peer id, and replies to a
peer. Delivery guarantees (acks, retries, de-duplication, ordering) are *not* the
transport's job: they live in the runtime and the daemon, so every transport gets them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["ClientTransport", "ServerTransport", "WouldBlock"]


class WouldBlock(Exception):
    """The frame cannot be handed over now (no connection, or the send queue is full).

    Not an error: the caller keeps the frame and tries again later.
    """


@runtime_checkable
class ClientTransport(Protocol):
    def send(self, frame: bytes) -> None:
        """Hand a frame over without waiting; raise :class:`WouldBlock` if it cannot."""

    async def recv(self) -> bytes:
        """Wait for the next frame from the daemon."""

    async def aclose(self) -> None: ...


@runtime_checkable
class ServerTransport(Protocol):
    @property
    def address(self) -> str:
        """Where clients connect (the resolved bind address)."""

    def send(self, peer: bytes, frame: bytes) -> None:
        """Send a frame to a peer without waiting; drop it if the peer is gone."""

    async def recv(self) -> tuple[bytes, bytes | memoryview]:
        """Wait for the next ``(peer, frame)``; the frame may be a zero-copy view."""

    async def aclose(self) -> None: ...
