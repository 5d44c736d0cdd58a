"""Wire protocol: golden bytes, packed arrays, and a fuzzed decoder."""

from __future__ import annotations

import math
from array import array

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning import ProtocolError
from lightning._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Error,
    Farewell,
    FlowControl,
    Goodbye,
    Hello,
    Nack,
    Ping,
    Pong,
    Rejection,
    Retired,
    Reward,
    RolloutEnd,
    RolloutStart,
    Sampling,
    Span,
    Transition,
    Welcome,
    decode_message,
    encode_batch,
    encode_event,
    encode_message,
    pack_ids,
    pack_logprobs,
    unpack_ids,
    unpack_logprobs,
    validate_event,
)

SAMPLES = {
    "hello": Hello(protocol_version=1, client_id="c1", pid=7, host="h", library_version="0.1.0"),
    "welcome": Welcome(
        protocol_version=1, daemon_id="d1", acked_through=5, max_frame_bytes=1024, heartbeat_s=1.0,
        client_id="c1",
    ),
    "ping": Ping(sent_at=1.5),
    "pong": Pong(sent_at=1.5),
    "batch": Batch(
        client_id="c1",
        first_seq=3,
        events=[
            RolloutStart(rollout_id="r1", name="agent", group_key="g", attempt=1, parent_id=None,
                         metadata={"k": 1}, started_at=10.0),
            Transition(rollout_id="r1", index=0, prompt_ids=pack_ids([1, 2, 3]),
                       response_ids=pack_ids([4, 5]), logprobs=pack_logprobs([-0.5, -0.25]),
                       policy_version=2, model="m", finish_reason="stop", trainable=True,
                       latency_s=0.5, created_at=11.0, metadata={},
                       sampling=Sampling(temperature=0.7, top_p=0.9, top_k=20,
                                         logprobs="processed", other={"min_p": 0.05})),
            Reward(rollout_id="r1", value=1.0, name="acc", components={"acc": 1.0, "fmt": 0.5},
                   after=1, created_at=12.0),
            Span(rollout_id="r1", span_id="s1", name="calc", kind="tool", parent_span_id=None,
                 start_time=11.0, end_time=11.5, status="error", error="ValueError: x",
                 attributes={"input": "1+"}, after=1),
            RolloutEnd(rollout_id="r1", status="completed", final_reward=1.0, error=None,
                       n_transitions=1, ended_at=13.0),
        ],
        resync=False,
    ),
    "ack": Ack(client_id="c1", acked_through=7,
               rejected=[Rejection(seq=6, code="non_finite_reward", reason="nan")]),
    "nack": Nack(code="gap", reason="expected 3", client_id="c1", expected_seq=3, retry=True,
                 retry_after_s=0.0),
    "flow": FlowControl(pause_s=0.5, reason="full"),
    "error": Error(code="protocol_version", message="v2"),
    "goodbye": Goodbye(client_id="c1", acked_through=7),
    "farewell": Farewell(client_id="c1", retired=False, reason="x"),
}

# If one of these fails, the wire format changed: bump PROTOCOL_VERSION and follow the
# schema-evolution rules in lightning/_protocol.py, or undo the change.
GOLDEN = {
    "hello": "86a474797065a568656c6c6fb070726f746f636f6c5f76657273696f6e01a9636c69656e745f6964a26331a370696407a4686f7374a168af6c6962726172795f76657273696f6ea5302e312e30",
    "welcome": "87a474797065a777656c636f6d65b070726f746f636f6c5f76657273696f6e01a96461656d6f6e5f6964a26431ad61636b65645f7468726f75676805af6d61785f6672616d655f6279746573cd0400ab6865617274626561745f73cb3ff0000000000000a9636c69656e745f6964a26331",
    "ping": "82a474797065a470696e67a773656e745f6174cb3ff8000000000000",
    "pong": "82a474797065a4706f6e67a773656e745f6174cb3ff8000000000000",
    "batch": "85a474797065a56261746368a9636c69656e745f6964a26331a966697273745f73657103a66576656e74739588a474797065ad726f6c6c6f75742e7374617274aa726f6c6c6f75745f6964a27231a46e616d65a56167656e74a967726f75705f6b6579a167a7617474656d707401a9706172656e745f6964c0a86d6574616461746181a16b01aa737461727465645f6174cb40240000000000008ea474797065aa7472616e736974696f6eaa726f6c6c6f75745f6964a27231a5696e64657800aa70726f6d70745f696473c40c010000000200000003000000ac726573706f6e73655f696473c4080400000005000000a86c6f6770726f6273c408000000bf000080beae706f6c6963795f76657273696f6e02a56d6f64656ca16dad66696e6973685f726561736f6ea473746f70a9747261696e61626c65c3a96c6174656e63795f73cb3fe0000000000000aa637265617465645f6174cb4026000000000000a86d6574616461746180a873616d706c696e6785ab74656d7065726174757265cb3fe6666666666666a5746f705f70cb3feccccccccccccda5746f705f6b14a86c6f6770726f6273a970726f636573736564a56f7468657281a56d696e5f70cb3fa999999999999a87a474797065a6726577617264aa726f6c6c6f75745f6964a27231a576616c7565cb3ff0000000000000a46e616d65a3616363aa636f6d706f6e656e747382a3616363cb3ff0000000000000a3666d74cb3fe0000000000000a5616674657201aa637265617465645f6174cb40280000000000008ca474797065a47370616eaa726f6c6c6f75745f6964a27231a77370616e5f6964a27331a46e616d65a463616c63a46b696e64a4746f6f6cae706172656e745f7370616e5f6964c0aa73746172745f74696d65cb4026000000000000a8656e645f74696d65cb4027000000000000a6737461747573a56572726f72a56572726f72ad56616c75654572726f723a2078aa6174747269627574657381a5696e707574a2312ba561667465720187a474797065ab726f6c6c6f75742e656e64aa726f6c6c6f75745f6964a27231a6737461747573a9636f6d706c65746564ac66696e616c5f726577617264cb3ff0000000000000a56572726f72c0ad6e5f7472616e736974696f6e7301a8656e6465645f6174cb402a000000000000a6726573796e63c2",
    "ack": "84a474797065a361636ba9636c69656e745f6964a26331ad61636b65645f7468726f75676807a872656a65637465649184a474797065a972656a656374696f6ea373657106a4636f6465b16e6f6e5f66696e6974655f726577617264a6726561736f6ea36e616e",
    "nack": "87a474797065a46e61636ba4636f6465a3676170a6726561736f6eaa65787065637465642033a9636c69656e745f6964a26331ac65787065637465645f73657103a57265747279c3ad72657472795f61667465725f73cb0000000000000000",
    "flow": "83a474797065a4666c6f77a770617573655f73cb3fe0000000000000a6726561736f6ea466756c6c",
    "error": "83a474797065a56572726f72a4636f6465b070726f746f636f6c5f76657273696f6ea76d657373616765a27632",
    "goodbye": "83a474797065a7676f6f64627965a9636c69656e745f6964a26331ad61636b65645f7468726f75676807",
    "farewell": "84a474797065a86661726577656c6ca9636c69656e745f6964a26331a772657469726564c2a6726561736f6ea178",
}

# The daemon's write-ahead log records besides Batch (never on the wire): pinned too, since
# a data directory written by one version is recovered by the next.
RETIRED = Retired(client_id="c1", through=7, reason="goodbye")
RETIRED_GOLDEN = "84a474797065a772657469726564a9636c69656e745f6964a26331a77468726f75676807a6726561736f6ea7676f6f64627965"


def test_wal_record_golden_bytes():
    from lightning._protocol import WalRecord

    assert msgspec.msgpack.encode(RETIRED).hex() == RETIRED_GOLDEN
    assert msgspec.msgpack.decode(bytes.fromhex(RETIRED_GOLDEN), type=WalRecord) == RETIRED
    batch = bytes.fromhex(GOLDEN["batch"])
    assert msgspec.msgpack.decode(batch, type=WalRecord) == SAMPLES["batch"]


def test_retired_is_not_a_wire_message():
    # a client cannot forge the daemon's log record: it is an unknown tag on the wire
    with pytest.raises(ProtocolError) as exc:
        decode_message(bytes.fromhex(RETIRED_GOLDEN))
    assert exc.value.code == "unknown_tag"


# Welcome before its client_id field (added at the end with a default, rule 3): an older
# daemon's Welcome still decodes, as an answer for the Hello's own client id.
OLD_WELCOME = "86a474797065a777656c636f6d65b070726f746f636f6c5f76657273696f6e01a96461656d6f6e5f6964a26431ad61636b65645f7468726f75676805af6d61785f6672616d655f6279746573cd0400ab6865617274626561745f73cb3ff0000000000000"


def test_welcome_of_an_older_daemon_still_decodes():
    w = decode_message(bytes.fromhex(OLD_WELCOME))
    assert isinstance(w, Welcome) and w.client_id == "" and w.acked_through == 5


# The batch golden of PROTOCOL_VERSION 1 before ``Transition.sampling`` was appended (a
# field with a default: rule 3, no version bump). Frames from encoders of that time must
# keep decoding, to ``sampling=None`` (unknown).
GOLDEN_BEFORE_SAMPLING = {
    "batch": "85a474797065a56261746368a9636c69656e745f6964a26331a966697273745f73657103a66576656e74739588a474797065ad726f6c6c6f75742e7374617274aa726f6c6c6f75745f6964a27231a46e616d65a56167656e74a967726f75705f6b6579a167a7617474656d707401a9706172656e745f6964c0a86d6574616461746181a16b01aa737461727465645f6174cb40240000000000008da474797065aa7472616e736974696f6eaa726f6c6c6f75745f6964a27231a5696e64657800aa70726f6d70745f696473c40c010000000200000003000000ac726573706f6e73655f696473c4080400000005000000a86c6f6770726f6273c408000000bf000080beae706f6c6963795f76657273696f6e02a56d6f64656ca16dad66696e6973685f726561736f6ea473746f70a9747261696e61626c65c3a96c6174656e63795f73cb3fe0000000000000aa637265617465645f6174cb4026000000000000a86d657461646174618087a474797065a6726577617264aa726f6c6c6f75745f6964a27231a576616c7565cb3ff0000000000000a46e616d65a3616363aa636f6d706f6e656e747382a3616363cb3ff0000000000000a3666d74cb3fe0000000000000a5616674657201aa637265617465645f6174cb40280000000000008ca474797065a47370616eaa726f6c6c6f75745f6964a27231a77370616e5f6964a27331a46e616d65a463616c63a46b696e64a4746f6f6cae706172656e745f7370616e5f6964c0aa73746172745f74696d65cb4026000000000000a8656e645f74696d65cb4027000000000000a6737461747573a56572726f72a56572726f72ad56616c75654572726f723a2078aa6174747269627574657381a5696e707574a2312ba561667465720187a474797065ab726f6c6c6f75742e656e64aa726f6c6c6f75745f6964a27231a6737461747573a9636f6d706c65746564ac66696e616c5f726577617264cb3ff0000000000000a56572726f72c0ad6e5f7472616e736974696f6e7301a8656e6465645f6174cb402a000000000000a6726573796e63c2",
}


def test_frames_from_before_sampling_still_decode():
    msg = decode_message(bytes.fromhex(GOLDEN_BEFORE_SAMPLING["batch"]))
    t = msg.events[1]
    assert isinstance(t, Transition) and t.sampling is None
    expected = SAMPLES["batch"].events[1]
    assert t == msgspec.structs.replace(expected, sampling=None)


def test_decoder_without_sampling_ignores_it():
    """A peer built before the field (modelled by a struct without it) decodes new frames."""

    class OldTransition(msgspec.Struct, frozen=True, kw_only=True, tag_field="type",
                        tag="transition"):
        rollout_id: str
        index: int
        prompt_ids: bytes
        response_ids: bytes
        logprobs: bytes = b""
        policy_version: int = -1

    new = encode_message(SAMPLES["batch"].events[1])
    old = msgspec.msgpack.decode(new, type=OldTransition)
    assert (old.rollout_id, old.policy_version, old.logprobs) == ("r1", 2, SAMPLES["batch"].events[1].logprobs)


@pytest.mark.parametrize("bad, field", [
    (Sampling(temperature=-0.1), "temperature"),
    (Sampling(temperature=math.nan), "temperature"),
    (Sampling(temperature=math.inf), "temperature"),
    (Sampling(top_p=0.0), "top_p"),
    (Sampling(top_p=1.5), "top_p"),
    (Sampling(top_k=-2), "top_k"),
])
def test_validate_rejects_bad_sampling(bad, field):
    t = msgspec.structs.replace(SAMPLES["batch"].events[1], sampling=bad)
    with pytest.raises(ProtocolError, match=f"sampling.{field}") as exc:
        validate_event(t)
    assert exc.value.code == "invalid"


def test_protocol_version_is_pinned():
    assert PROTOCOL_VERSION == 1


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_golden_bytes(name):
    assert encode_message(SAMPLES[name]).hex() == GOLDEN[name]
    assert decode_message(bytes.fromhex(GOLDEN[name])) == SAMPLES[name]


def test_golden_covers_every_message_type():
    import typing

    from lightning._protocol import Message

    assert {type(m) for m in SAMPLES.values()} == set(typing.get_args(Message))


def test_encode_batch_matches_struct_encoding():
    b = SAMPLES["batch"]
    fast = encode_batch(b.client_id, b.first_seq, [encode_event(e) for e in b.events])
    assert fast == encode_message(b)
    for n in (0, 15, 16, 70_000):  # every msgpack array header size
        events = [Ping()] * 0 + [SAMPLES["batch"].events[2]] * n
        fast = encode_batch("c", 1, [encode_event(e) for e in events], resync=True)
        assert fast == encode_message(Batch(client_id="c", first_seq=1, events=events, resync=True))


def test_packed_arrays_roundtrip():
    ids = [0, 1, 2**31 - 1, 151_935]
    assert list(unpack_ids(pack_ids(ids))) == ids
    assert pack_ids(array("i", ids)) == pack_ids(ids) == pack_ids(bytes(pack_ids(ids)))
    lp = [-0.5, -1e-3, 0.0]
    assert list(unpack_logprobs(pack_logprobs(lp))) == pytest.approx(lp)
    assert len(pack_ids(ids)) == 4 * len(ids)


def test_pack_rejects_bad_input():
    with pytest.raises(ProtocolError, match="int32"):
        pack_ids([2**40])
    with pytest.raises(ProtocolError, match="int32"):
        pack_ids(["a"])
    with pytest.raises(ProtocolError, match="multiple of 4"):
        pack_ids(b"abc")
    with pytest.raises(ProtocolError, match="numbers"):
        pack_logprobs(["x"])


def test_unknown_tag_and_garbage():
    with pytest.raises(ProtocolError) as e:
        decode_message(msgspec.msgpack.encode({"type": "no.such.thing"}))
    assert e.value.code == "unknown_tag"
    with pytest.raises(ProtocolError) as e:
        decode_message(b"\xc1\xc1")
    assert e.value.code == "malformed"
    with pytest.raises(ProtocolError) as e:
        decode_message(msgspec.msgpack.encode({"type": "hello", "client_id": 3}))
    assert e.value.code == "invalid"


def test_validate_event():
    t = SAMPLES["batch"].events[1]
    validate_event(t)
    bad = msgspec.structs.replace(t, logprobs=pack_logprobs([-1.0]))
    with pytest.raises(ProtocolError, match="1 entries for 2 response tokens"):
        validate_event(bad)
    with pytest.raises(ProtocolError, match="finite") as e:
        validate_event(Reward(rollout_id="r", value=math.nan))
    assert e.value.code == "non_finite_reward"
    with pytest.raises(ProtocolError, match="finite"):
        validate_event(Reward(rollout_id="r", value=1.0, components={"x": math.inf}))
    with pytest.raises(ProtocolError, match="finite"):
        validate_event(RolloutEnd(rollout_id="r", final_reward=-math.inf))
    with pytest.raises(ProtocolError, match="rollout_id"):
        validate_event(RolloutStart(rollout_id="", name="x"))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes_on_random_bytes(data):
    try:
        decode_message(data)
    except ProtocolError as exc:
        assert exc.code in {"malformed", "invalid", "unknown_tag"}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(GOLDEN)), st.data())
def test_decoder_on_mutated_frames(name, data):
    frame = bytearray(bytes.fromhex(GOLDEN[name]))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(frame)))
    try:
        decode_message(bytes(frame[:cut]))
    except ProtocolError:
        pass


_names = st.text(min_size=1, max_size=12)
_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
_ids = st.lists(st.integers(0, 2**31 - 1), max_size=40)


@st.composite
def _transitions(draw):
    resp = draw(_ids)
    return Transition(
        rollout_id=draw(_names),
        index=draw(st.integers(0, 10**6)),
        prompt_ids=pack_ids(draw(_ids)),
        response_ids=pack_ids(resp),
        logprobs=pack_logprobs([-1.0] * len(resp)) if draw(st.booleans()) else b"",
        policy_version=draw(st.integers(-1, 10**9)),
        metadata=draw(st.dictionaries(_names, st.integers(-(2**63), 2**64 - 1) | _names, max_size=3)),
    )


_events = st.one_of(
    _transitions(),
    st.builds(Reward, rollout_id=_names, value=_finite, name=_names, after=st.integers(0, 99)),
    st.builds(RolloutStart, rollout_id=_names, name=_names, group_key=st.none() | _names),
    st.builds(RolloutEnd, rollout_id=_names, final_reward=st.none() | _finite,
              status=st.sampled_from(["completed", "failed", "cancelled"])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_events, max_size=20), st.integers(1, 2**62), st.booleans())
def test_batches_roundtrip(events, first_seq, resync):
    frame = encode_batch("client", first_seq, [encode_event(e) for e in events], resync=resync)
    msg = decode_message(frame)
    assert msg == Batch(client_id="client", first_seq=first_seq, events=events, resync=resync)
    for e in events:
        validate_event(e)
