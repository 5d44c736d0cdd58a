"""A hypothesis fuzzer of ZeroMQ frames and events against a live daemon process.

Generated frames (malformed bytes, random messages, batches mixing whole good rollouts
with mistyped, truncated, huge-int and deeply nested events, forged batches for another
connection's client id) go to a running ``lightning-daemon`` over a real DEALER socket.
Invariants after every frame: exactly one reply, the daemon alive, good events
acknowledged. At the end every good rollout is stored exactly once, and a restart from
the data directory recovers the same.
"""

from __future__ import annotations

import itertools
import uuid

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_daemon import _end, _start, _tr

from lightning._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Farewell,
    Goodbye,
    Hello,
    Nack,
    Ping,
    Pong,
    Reward,
    decode_message,
    encode_batch,
    encode_event,
    encode_message,
)
from lightning.testing import recover

EXAMPLES = 200  # each example sends several frames (and a ping after each): >1,000 frames


class Client:
    def __init__(self, ctx, address, cid):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 20_000)
        self.sock.connect(address)
        self.cid = cid
        self.seq = 0
        self.frames = 0

    def call(self, frame: bytes):
        self.sock.send(frame)
        self.frames += 1
        return decode_message(self.sock.recv())  # a missing reply raises zmq.Again

    def hello(self):
        return self.call(encode_message(Hello(protocol_version=PROTOCOL_VERSION,
                                              client_id=self.cid)))


def _good_rollout(rid: str, steps: int) -> list[bytes]:
    ev = [_start(rid, group_key="g", metadata={"k": [1, "x"]})]
    ev += [_tr(rid, k) for k in range(steps)]
    ev += [Reward(rollout_id=rid, value=0.5, after=steps), _end(rid, steps, final_reward=1.0)]
    return [encode_event(e) for e in ev]


def _deep(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"


any_value = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.binary(max_size=20), st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = ["type", "rollout_id", "index", "prompt_ids", "response_ids", "logprobs",
          "policy_version", "model", "finish_reason", "trainable", "value", "name",
          "components", "status", "final_reward", "n_transitions", "metadata", "attempt",
          "group_key", "after", "span_id", "attributes", "no_such_field"]


@st.composite
def junk_event(draw) -> bytes:
    rid = "junk-" + draw(st.sampled_from(["a", "b", "c"]))
    base = draw(st.sampled_from([_start(rid), _tr(rid, draw(st.integers(0, 3))),
                                 Reward(rollout_id=rid, value=1.0), _end(rid, 1)]))
    kind = draw(st.sampled_from(["mutate", "mutate", "truncate", "not_a_map", "deep"]))
    if kind == "not_a_map":
        return msgspec.msgpack.encode(draw(any_value))
    if kind == "deep":  # nested metadata: decoded, or refused alone; never a crash
        return (b"\x84\xa4type\xadrollout.start\xaarollout_id" + msgspec.msgpack.encode(rid)
                + b"\xa4name\xa1n\xa8metadata\x81\xa1k" + _deep(draw(st.integers(50, 400))))
    fields = {"type": type(base).__struct_config__.tag, **msgspec.structs.asdict(base)}
    if kind == "truncate":
        fields.pop(draw(st.sampled_from(sorted(fields))))
    else:
        fields[draw(st.sampled_from(FIELDS))] = draw(any_value)
    fields["rollout_id"] = rid if draw(st.booleans()) else fields.get("rollout_id", rid)
    try:
        return msgspec.msgpack.encode(fields)
    except OverflowError:  # an int msgpack cannot hold (nested in a drawn dict): an event
        return msgspec.msgpack.encode(str(fields)[:100])  # that is not a map stands in


op = st.one_of(
    st.tuples(st.just("good"), st.integers(1, 3), st.integers(0, 3),
              st.lists(st.tuples(st.integers(0, 40), junk_event()), max_size=4)),
    st.tuples(st.just("garbage"), st.binary(max_size=200)),
    st.tuples(st.just("message"), st.dictionaries(
        st.sampled_from(["type", "client_id", "first_seq", "events", "protocol_version",
                         "resync", "sent_at"]),
        st.one_of(any_value, st.sampled_from(["batch", "hello", "ping", "ack", "welcome",
                                              "goodbye", "farewell", "retired"])),
        max_size=5)),
    st.tuples(st.just("forged"), st.integers(1, 2**63), st.booleans()),
    st.tuples(st.just("hello_other_version"), st.integers(-(2**63), 2**63 - 1)),
    # a Goodbye for our id from another connection, or from us with a mark we do not
    # have: refused, our stream goes on
    st.tuples(st.just("goodbye"), st.booleans(), st.integers(1, 2**63)),
)


@pytest.mark.slow
def test_fuzzed_frames_and_events_never_crash_and_lose_nothing(daemon_process, tmp_path):
    d = daemon_process().start()
    ctx = zmq.Context()
    me = Client(ctx, d.address, "fuzz-" + uuid.uuid4().hex)
    other = Client(ctx, d.address, "other-" + uuid.uuid4().hex)
    assert me.hello().acked_through == 0 and other.hello().acked_through == 0
    expected: dict[str, int] = {}
    names = (f"good-{i}" for i in itertools.count())

    def send_good(n_rollouts, steps, junk):
        tagged = []  # (encoded event, is junk)
        for _ in range(n_rollouts):
            rid = next(names)
            expected[rid] = steps
            tagged += [(ev, False) for ev in _good_rollout(rid, steps)]
        for pos, ev in sorted(junk, key=lambda j: j[0]):
            tagged.insert(min(pos, len(tagged)), (ev, True))
        first = me.seq + 1
        raw = [ev for ev, _ in tagged]
        junk_seqs = {first + i for i, (_, is_junk) in enumerate(tagged) if is_junk}
        reply = me.call(encode_batch(me.cid, first, raw))
        assert isinstance(reply, Ack), reply
        assert reply.acked_through == first + len(raw) - 1
        assert {r.seq for r in reply.rejected} <= junk_seqs
        me.seq = reply.acked_through

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=st.lists(op, min_size=1, max_size=8))
    def run(ops):
        for o in ops:
            match o:
                case ("good", n, steps, junk):
                    send_good(n, steps, junk)
                case ("garbage", data):
                    assert me.call(data) is not None
                case ("message", fields):
                    try:
                        frame = msgspec.msgpack.encode(fields)
                    except OverflowError:
                        continue
                    reply = me.call(frame)
                    if isinstance(reply, Ack):  # a lucky valid batch for our id
                        me.seq = max(me.seq, reply.acked_through)
                case ("forged", first, resync):
                    forged = encode_batch(me.cid, first, [encode_event(_start("evil"))], resync)
                    reply = other.call(forged)
                    assert isinstance(reply, Nack) and reply.code == "fenced"
                case ("goodbye", forged, k):
                    sender = other if forged else me
                    through = min(me.seq + (0 if forged else k), 2**63)
                    reply = sender.call(encode_message(Goodbye(client_id=me.cid,
                                                               acked_through=through)))
                    assert isinstance(reply, Farewell) and not reply.retired
                case ("hello_other_version", v):
                    frame = encode_message(Hello(protocol_version=v, client_id=other.cid))
                    other.call(frame)  # Error for other versions; Welcome for ours
            assert me.call(encode_message(Ping(sent_at=1.0))) == Pong(sent_at=1.0)

    try:
        run()
    except BaseException:
        print(d.log.read_text()[-3000:])
        raise
    # nothing of ours was dropped by anyone else's frames
    assert me.hello().acked_through == me.seq
    total = me.frames + other.frames
    assert total >= 1000, total
    me.sock.close()
    other.sock.close()
    ctx.term()
    assert d.stop() == 0
    _, trajs, _ = recover(d.data_dir)
    stored = {t.rollout_id: t for t in trajs if t.rollout_id.startswith("good-")}
    assert set(stored) == set(expected)
    for rid, steps in expected.items():
        t = stored[rid]
        assert [x.index for x in t.transitions] == list(range(steps)) and t.final_reward == 1.0
        assert len(t.rewards) == 1 and not t.warnings
    assert sum(t.rollout_id.startswith("good-") for t in trajs) == len(expected)
    # a clean restart from the data dir: serving again, with the same resume point
    d2 = daemon_process(data_dir=d.data_dir).start()
    ctx = zmq.Context()
    again = Client(ctx, d2.address, me.cid)
    assert again.hello().acked_through == me.seq
    again.sock.close()
    ctx.term()
    assert d2.stop() == 0
