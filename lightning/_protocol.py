"""The wire protocol between the app-side runtime and the daemon.

Every message that crosses the wire is one of the tagged ``msgspec.Struct`` types below,
encoded with MessagePack. One ZeroMQ message carries exactly one encoded ``Message``.

Conversation::

    client (DEALER)                              daemon (ROUTER)
    Hello(protocol_version, client_id)   ──▶
                                         ◀──     Welcome(acked_through, limits)   or Error
    Batch(client_id, first_seq, events)  ──▶     (validated, de-duplicated, written to the
                                                  daemon's write-ahead log, *then* acked)
                                         ◀──     Ack(acked_through, rejected=[...])
                                         ◀──     Nack(code, expected_seq, retry)  whole frame
    Ping                                 ──▶
                                         ◀──     Pong
                                         ◀──     FlowControl(pause_s)   daemon is saturated
    Goodbye(client_id, acked_through)    ──▶     (clean shutdown, nothing left unacked or
                                                  spilled: the daemon retires the id)
                                         ◀──     Farewell(client_id, retired)

Delivery is at-least-once with exactly-once storage: each event has a per-client sequence
number (``Batch.first_seq + i``, starting at 1); the daemon accepts only the next expected
number per client (duplicates are acknowledged again and dropped, a gap is nacked with
the expected number so the client goes back to it), so what is stored is exactly once and
in order per client, hence per rollout. ``Ack.acked_through`` is cumulative.

Token ids are packed little-endian int32 bytes and log-probs little-endian float32 bytes
(:func:`pack_ids`, :func:`pack_logprobs`), not lists of Python ints: that is ~14x faster to
encode and decode and 2-5x smaller.

Schema-evolution rules (read before changing anything here):

1. ``PROTOCOL_VERSION`` is bumped for any change an older peer cannot ignore. The daemon
   rejects a ``Hello`` with a different major version with an ``Error``.
2. Tags never change and are never reused. A new message type gets a new tag.
3. New fields go at the end of a struct and must have a default, so older encoders stay
   decodable; decoders ignore fields they do not know, so newer encoders stay decodable
   by older decoders as long as the new field is optional for them.
4. A field's type or meaning never changes; a field is never removed (deprecate it and
   keep accepting it). Renaming is a removal plus an addition.
5. ``array_like=True`` may only be added to a struct together with a version bump.
6. The golden-bytes tests in ``tests/test_protocol.py`` pin the encoding of every message;
   a failing golden test means the wire changed: bump the version or undo the change.
"""

# No `from __future__ import annotations`: msgspec resolves these annotations at
# runtime, and lightning/__init__.py re-homes public classes to the `lightning` module.

import functools
import math
import struct
import sys
from array import array
from typing import Any, Literal, Union

import msgspec

from ._errors import ProtocolError, ProtocolVersionError

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Batch",
    "Error",
    "Event",
    "Farewell",
    "FlowControl",
    "Goodbye",
    "Hello",
    "Message",
    "Nack",
    "Ping",
    "Pong",
    "Refused",
    "Rejection",
    "Retired",
    "Reward",
    "RolloutEnd",
    "RolloutStart",
    "Sampling",
    "Span",
    "StoredEvent",
    "Transition",
    "WalRecord",
    "Welcome",
    "decode_event",
    "decode_frame",
    "decode_message",
    "encode_batch",
    "encode_event",
    "encode_message",
    "pack_ids",
    "pack_logprobs",
    "unpack_ids",
    "unpack_logprobs",
]

PROTOCOL_VERSION = 1

_LITTLE = sys.byteorder == "little"


# gc=False: wire messages never form reference cycles (msgspec perf-tips), so the
# cyclic collector need not track the millions of them a daemon holds.
class _Base(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    pass


# --------------------------------------------------------------------------- events
# Events are what a rollout produces. They travel inside a Batch and are stored by the
# daemon in the order they were recorded.


class RolloutStart(_Base, tag="rollout.start"):
    """A decorated call began."""

    rollout_id: str
    """Globally unique id of the rollout (client-generated)."""
    name: str
    """The rollout's name (the decorated function's qualified name by default)."""
    group_key: str | None = None
    """Rollouts sharing a key form one group for group-relative estimators (GRPO, RLOO)."""
    attempt: int = 0
    """Attempt number when the same task is retried or sampled several times."""
    parent_id: str | None = None
    """The enclosing rollout's id for nested rollouts."""
    metadata: dict[str, Any] = {}
    """Free-form JSON-like metadata given to the decorator or the call."""
    started_at: float = 0.0
    """Unix time in seconds."""


class Sampling(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """How a transition's response was sampled: the processing that shapes the sampling
    distribution, and what its log-probs are. ``None`` means unknown (the client did not
    say and the server did not report it): the trainer then applies a stated, counted rule
    (see README "Sampling parameters"), it never guesses silently.

    The distribution a response was drawn from is ``softmax(logits / temperature)``
    restricted to the top-k tokens, then to the top-p nucleus of what is left (vLLM's and
    the policy server's order), renormalised; temperature 0 is greedy (argmax).
    """

    temperature: float | None = None
    """Softmax temperature; 0 = greedy."""
    top_p: float | None = None
    """Nucleus mass in (0, 1]; 1 = off."""
    top_k: int | None = None
    """Keep the k most likely tokens; 0 or -1 = off."""
    logprobs: Literal["processed", "raw", ""] = ""
    """What ``Transition.logprobs`` are: ``processed`` = log-softmax after temperature and
    top-k/top-p (of the distribution sampled from; for greedy, at temperature 1 with the
    same truncation), ``raw`` = log-softmax of the unprocessed logits, ``""`` unknown."""
    other: dict[str, Any] = {}
    """Other distribution-changing parameters the request set (``min_p``,
    ``frequency_penalty``, ``logit_bias``...), as sent; the trainer cannot reproduce them
    and counts the transitions that have any."""


class Transition(_Base, tag="transition"):
    """One LLM call: state (prompt ids) -> action (response ids) with sampler log-probs."""

    rollout_id: str
    index: int
    """0-based position of this transition within its rollout."""
    prompt_ids: bytes
    """Prompt token ids, packed little-endian int32 (see :func:`pack_ids`)."""
    response_ids: bytes
    """Sampled response token ids, packed little-endian int32."""
    logprobs: bytes = b""
    """Sampler log-probs of the response tokens, packed little-endian float32; empty if
    unknown. When present it has exactly one entry per response token."""
    policy_version: int = -1
    """Version of the policy that sampled the response; -1 when unknown."""
    model: str = ""
    finish_reason: str = ""
    trainable: bool = True
    """False when token ids are not the sampler's own (for example an external API)."""
    latency_s: float = 0.0
    created_at: float = 0.0
    metadata: dict[str, Any] = {}
    sampling: Sampling | None = None
    """The sampling parameters that produced the response; None when unknown (older
    clients, ``record_transition`` without them)."""


class Reward(_Base, tag="reward"):
    """A reward emitted during a rollout, placed after the transition it follows."""

    rollout_id: str
    value: float
    """The primary reward, a finite number."""
    name: str = "reward"
    """Name of the primary reward."""
    components: dict[str, float] = {}
    """All named rewards when several were emitted at once (includes the primary)."""
    after: int = 0
    """Number of transitions recorded in the rollout when the reward was emitted."""
    created_at: float = 0.0


class Span(_Base, tag="span"):
    """An observation: a tool call, its result or error, or any custom step."""

    rollout_id: str
    span_id: str
    name: str
    kind: str = "custom"
    """"tool", "llm", "retrieval", "custom"..."""
    parent_span_id: str | None = None
    start_time: float = 0.0
    end_time: float = 0.0
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    """Error type and message when ``status == "error"``."""
    attributes: dict[str, Any] = {}
    """Inputs, outputs and anything else the rules of AIR look at."""
    after: int = 0
    """Number of transitions recorded in the rollout when the span ended."""


class RolloutEnd(_Base, tag="rollout.end"):
    """A decorated call returned or raised."""

    rollout_id: str
    status: Literal["completed", "failed", "cancelled"] = "completed"
    final_reward: float | None = None
    """The numeric return value, if the function returned a number."""
    error: str | None = None
    n_transitions: int = 0
    """How many transitions the rollout recorded (the daemon checks it)."""
    ended_at: float = 0.0


Event = Union[RolloutStart, Transition, Reward, Span, RolloutEnd]


class Refused(_Base, tag="refused"):
    """An event the daemon refused before storing it (it did not decode as an event).

    The daemon writes this in its write-ahead log in place of the event, so recovery
    advances the sequence numbers and counts the rejection exactly as the live daemon
    did, and the log holds only what recovery can apply. A client never needs to send
    it; one that does rejects its own event.
    """

    reason: str
    """Why the event was refused (the decoder's error, naming the field)."""


StoredEvent = Union[RolloutStart, Transition, Reward, Span, RolloutEnd, Refused]
"""What a :class:`Batch` holds: the events, or the daemon's placeholders for refused ones."""


# ------------------------------------------------------------------------- messages


class Hello(_Base, tag="hello"):
    """First message of a client on a connection."""

    protocol_version: int
    client_id: str
    """Identifies the sequence-number stream; unique per runtime incarnation."""
    pid: int = 0
    host: str = ""
    library_version: str = ""


class Welcome(_Base, tag="welcome"):
    """The daemon accepts a client session."""

    protocol_version: int
    daemon_id: str
    """Changes each time the daemon process starts."""
    acked_through: int
    """Highest sequence number of this client already stored (0 if none): resume after."""
    max_frame_bytes: int
    heartbeat_s: float
    client_id: str = ""
    """The client id of the Hello this answers (a connection may own several: its own and
    the dead processes' whose spill logs it replays); '' from older daemons."""


class Ping(_Base, tag="ping"):
    sent_at: float = 0.0


class Pong(_Base, tag="pong"):
    sent_at: float = 0.0


class Batch(_Base, tag="batch"):
    """Consecutive events of one client: event ``i`` has sequence ``first_seq + i``."""

    client_id: str
    first_seq: int
    events: list[StoredEvent]
    resync: bool = False
    """Set when the sender no longer holds sequence numbers before ``first_seq`` (they
    were lost with a crashed process): the daemon then accepts the gap instead of
    nacking it, and counts it."""


class Rejection(_Base, tag="rejection"):
    """One event the daemon refused permanently; it is acknowledged, never retried."""

    seq: int
    code: str
    reason: str


class Ack(_Base, tag="ack"):
    """Everything of ``client_id`` through ``acked_through`` is stored (or rejected)."""

    client_id: str
    acked_through: int
    rejected: list[Rejection] = []


class Nack(_Base, tag="nack"):
    """A whole frame was refused.

    ``retry`` tells whether sending again can succeed: after ``no_session`` (say Hello
    first, for this ``client_id``), ``gap`` (resend from ``expected_seq``), ``busy`` or
    ``disk_full`` (wait ``retry_after_s``). ``fenced``: a newer connection said Hello
    with this client id and owns it now. Malformed or oversized frames are not retryable.
    """

    code: str
    reason: str
    client_id: str = ""
    expected_seq: int = 0
    retry: bool = False
    retry_after_s: float = 0.0


class FlowControl(_Base, tag="flow"):
    """The daemon asks clients to hold off sending for ``pause_s`` seconds."""

    pause_s: float
    reason: str = ""


class Error(_Base, tag="error"):
    """A fatal condition for this session (for example an unsupported protocol version)."""

    code: str
    message: str


class Goodbye(_Base, tag="goodbye"):
    """A client's sequence-number stream ends cleanly: everything it recorded is
    acknowledged and it keeps nothing to resend (no spill log). The daemon then retires
    ``client_id``: it forgets the id's high-water mark and session (durably, through its
    write-ahead log) and answers :class:`Farewell`.

    Optional (no version bump): a daemon that predates it refuses it with a non-retryable
    ``unknown_tag`` nack and keeps the id's mark, as before; a runtime that predates it
    never sends it (the daemon prunes idle ids after ``--client-ttl-s`` instead).

    A retired id may come back only as a fresh stream: Hello (the Welcome says
    ``acked_through=0``) and sequence numbers from 1. A batch for it that starts later,
    or any ``resync`` batch (a stale spill log replayed under it), is refused with a
    non-retryable ``retired`` nack: the daemon no longer knows which of those events it
    stored.
    """

    client_id: str
    acked_through: int
    """The last sequence number the client recorded, all acknowledged: the daemon retires
    the id only if it stored exactly that much."""


class Farewell(_Base, tag="farewell"):
    """The daemon's answer to :class:`Goodbye`."""

    client_id: str
    retired: bool
    """True: the id's state is gone (a later Hello for it starts a fresh stream)."""
    reason: str = ""
    """Why it was not retired (``retired=False``)."""


Message = Union[Hello, Welcome, Ping, Pong, Batch, Ack, Nack, FlowControl, Error, Goodbye,
                Farewell]


class Retired(_Base, tag="retired"):
    """A write-ahead log record, never a wire message: the daemon retired ``client_id``
    after its :class:`Goodbye` (``reason="goodbye"``) or after it was idle past the
    daemon's ``client_ttl_s`` (``reason="idle"``), having stored its events through
    ``through``. Replay drops the id's high-water mark at the same point of the log, so
    the id's earlier batches before it and a fresh stream from seq 1 after it both
    replay as they were applied."""

    client_id: str
    through: int
    reason: str


WalRecord = Batch | Retired
"""What a daemon's write-ahead log record holds."""


# --------------------------------------------------------------------- encode/decode

_encoder = msgspec.msgpack.Encoder()
_message_decoder = msgspec.msgpack.Decoder(Message)
_event_decoder = msgspec.msgpack.Decoder(Event)


def encode_message(msg: Message) -> bytes:
    return _encoder.encode(msg)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_message(data: bytes | memoryview) -> Message:
    """Decode one wire message, raising :class:`ProtocolError` with a stable ``code``."""
    try:
        return _message_decoder.decode(data)
    except RecursionError as exc:
        raise ProtocolError(f"invalid message: {exc}", code="invalid") from exc
    except msgspec.ValidationError as exc:
        text = str(exc)
        code = "unknown_tag" if "Invalid value" in text and "$.type" in text else "invalid"
        raise ProtocolError(f"invalid message: {text}", code=code) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed frame: {exc}", code="malformed") from exc


class _BatchEnvelope(_Base, tag="batch"):
    # Decoding-side twin of Batch whose events stay encoded: when one event of a frame
    # does not decode, the others are decoded one by one (see decode_frame).
    client_id: str
    first_seq: int
    events: list[msgspec.Raw]
    resync: bool = False


_envelope_decoder = msgspec.msgpack.Decoder(_BatchEnvelope)
_stored_event_decoder = msgspec.msgpack.Decoder(StoredEvent)
_MAX_REASON = 500


def decode_frame(data: bytes | memoryview) -> tuple[Message, bool]:
    """Decode one frame from a client; events are refused one by one, never per frame.

    Returns ``(message, repaired)``. A :class:`Batch` with an event that does not decode
    (a wrong type, a missing field) comes back with a :class:`Refused` in that event's
    place and ``repaired=True``: the caller stores ``encode_message(message)``, not the
    frame. Anything else that does not decode raises :class:`ProtocolError`, as
    :func:`decode_message`.
    """
    try:
        return _message_decoder.decode(data), False
    except msgspec.ValidationError as exc:
        if "$.events[" not in str(exc):
            return decode_message(data), False  # raises with the frame's code
    except RecursionError:
        pass  # nested too deep: somewhere in an event, or the envelope (below)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return decode_message(data), False  # raises "malformed"
    try:
        env = _envelope_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"invalid message: {exc}", code="invalid") from exc
    events = [_decode_or_refuse(raw, i) for i, raw in enumerate(env.events)]
    batch = Batch(client_id=env.client_id, first_seq=env.first_seq, events=events,
                  resync=env.resync)
    return batch, True


def _decode_or_refuse(raw: msgspec.Raw, i: int) -> "StoredEvent":
    try:
        return _stored_event_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = f"event {i} of the frame is invalid and was refused alone: {exc}"
        return Refused(reason=reason[:_MAX_REASON])


def decode_event(data: bytes | memoryview) -> Event:
    try:
        return _event_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"invalid event: {exc}", code="invalid") from exc


class _BatchOut(_Base, tag="batch"):
    # Encoding-side twin of Batch whose events are already encoded: the runtime encodes
    # each event once when it is recorded (it needs the bytes for sizing and spilling),
    # and a batch is then assembled by concatenation. Same tag, same fields, same order;
    # tests/test_protocol.py checks both encode identically.
    client_id: str
    first_seq: int
    events: msgspec.Raw
    resync: bool = False


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


@functools.lru_cache(maxsize=64)
def _batch_envelope(client_id: str, resync: bool) -> tuple[bytes, bytes, bytes]:
    """The bytes of a Batch before ``first_seq``, between it and the events, and after.

    Found by encoding the struct twice with different placeholders, so the split follows
    msgspec's encoding exactly whatever the field order or string contents.
    """
    def enc(seq: int, events: bytes) -> bytes:
        return _encoder.encode(_BatchOut(client_id=client_id, first_seq=seq,
                                         events=msgspec.Raw(events), resync=resync))

    a, b = enc(0, b"\xc0"), enc(1, b"\xc3")
    i = next(k for k in range(len(a)) if a[k] != b[k])  # first_seq: one fixint byte
    c = enc(1, b"\xc2")
    j = next(k for k in range(i + 1, len(b)) if b[k] != c[k])  # the events placeholder
    return a[:i], b[i + 1 : j], b[j + 1 :]


def _uint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 1 << 8:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


def encode_batch(
    client_id: str, first_seq: int, encoded_events: list[bytes], resync: bool = False
) -> bytes:
    """Encode a :class:`Batch` from events already encoded with :func:`encode_event`.

    One copy of the events (a single join), byte-identical to ``encode_message(Batch(...))``.
    """
    head, mid, tail = _batch_envelope(client_id, resync)
    return b"".join(
        (head, _uint(first_seq), mid, _array_header(len(encoded_events)), *encoded_events, tail)
    )


def check_hello(hello: Hello) -> None:
    if hello.protocol_version != PROTOCOL_VERSION:
        raise ProtocolVersionError(
            f"client speaks protocol version {hello.protocol_version}, this daemon speaks "
            f"{PROTOCOL_VERSION}: install the same lightning-rl version on both sides"
        )


# ------------------------------------------------------------------ packed arrays


@functools.lru_cache(maxsize=4096)
def _struct(typecode: str, n: int) -> struct.Struct:
    return struct.Struct(f"<{n}{typecode}")


def _pack(values: Any, typecode: str, what: str, problem: str) -> bytes:
    if isinstance(values, (list, tuple)):
        # struct packs a list ~2.5x faster than array(typecode, list), little-endian always
        try:
            return _struct(typecode, len(values)).pack(*values)
        except struct.error as exc:
            raise ProtocolError(f"{what} must be {problem}: {exc}", code="invalid") from exc
    if isinstance(values, (bytes, bytearray, memoryview)):
        if len(values) % 4:
            raise ProtocolError(
                f"packed {what} must be a multiple of 4 bytes, got {len(values)}", code="invalid"
            )
        return bytes(values)
    if isinstance(values, array) and values.typecode == typecode and values.itemsize == 4:
        a = values
    else:
        if hasattr(values, "tolist"):  # numpy arrays, torch tensors
            values = values.tolist()
        try:
            a = array(typecode, values)
        except (TypeError, OverflowError) as exc:
            raise ProtocolError(f"{what} must be {problem}: {exc}", code="invalid") from exc
    if not _LITTLE:
        a = array(typecode, a)
        a.byteswap()
    return a.tobytes()


def _unpack(data: bytes, typecode: str) -> array:
    a = array(typecode)
    a.frombytes(data)
    if not _LITTLE:
        a.byteswap()
    return a


def pack_ids(ids: Any) -> bytes:
    """Pack token ids as little-endian int32 bytes.

    Accepts a sequence of ints, an ``array('i')``, a numpy array or torch tensor of
    integers, or bytes already packed.
    """
    return _pack(ids, "i", "token ids", "integers in int32 range")


def unpack_ids(data: bytes) -> array:
    """Unpack little-endian int32 token ids into an ``array('i')``."""
    return _unpack(data, "i")


def pack_logprobs(logprobs: Any) -> bytes:
    """Pack log-probs as little-endian float32 bytes (same inputs as :func:`pack_ids`)."""
    return _pack(logprobs, "f", "log-probs", "numbers")


def unpack_logprobs(data: bytes) -> array:
    """Unpack little-endian float32 log-probs into an ``array('f')``."""
    return _unpack(data, "f")


# ------------------------------------------------------------------ validation


def check_sampling(s: Sampling) -> str | None:
    """What is wrong with ``s`` (one sentence naming the field and the fix), or None."""
    t, p, k = s.temperature, s.top_p, s.top_k
    if t is not None and not (math.isfinite(t) and t >= 0):
        return f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {t!r}"
    if p is not None and not 0 < p <= 1:
        return f"sampling.top_p must be in (0, 1] (1 = off), got {p!r}"
    if k is not None and not -1 <= k < 2**31:
        return f"sampling.top_k must be an integer in [0, 2**31) (0 or -1 = off), got {k!r}"
    return None


def validate_event(event: Event) -> None:
    """Structural checks that do not need state; raise :class:`ProtocolError`."""
    if not event.rollout_id:
        raise ProtocolError("rollout_id must be a non-empty string", code="invalid")
    match event:
        case Transition():
            if len(event.prompt_ids) % 4 or len(event.response_ids) % 4:
                raise ProtocolError(
                    "prompt_ids/response_ids must be packed int32 (length multiple of 4)",
                    code="invalid",
                )
            if event.logprobs and len(event.logprobs) != len(event.response_ids):
                raise ProtocolError(
                    f"logprobs has {len(event.logprobs) // 4} entries for "
                    f"{len(event.response_ids) // 4} response tokens: send one log-prob per "
                    "response token, or none",
                    code="invalid",
                )
            if event.index < 0:
                raise ProtocolError("transition index must be >= 0", code="invalid")
            if event.sampling is not None and (problem := check_sampling(event.sampling)):
                raise ProtocolError(problem, code="invalid")
        case Reward():
            if not math.isfinite(event.value):
                raise ProtocolError(
                    f"reward {event.name!r} is {event.value}: rewards must be finite",
                    code="non_finite_reward",
                )
            for k, v in event.components.items():
                if not math.isfinite(v):
                    raise ProtocolError(
                        f"reward component {k!r} is {v}: rewards must be finite",
                        code="non_finite_reward",
                    )
        case RolloutEnd():
            if event.final_reward is not None and not math.isfinite(event.final_reward):
                raise ProtocolError(
                    f"final reward is {event.final_reward}: rewards must be finite",
                    code="non_finite_reward",
                )
        case _:
            pass
