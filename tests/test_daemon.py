"""Daemon ingest: validation, de-duplication, bad input, durability, recovery."""

from __future__ import annotations

import math

import msgspec
import pytest

from lightning import DaemonConfig
from lightning._protocol import (
    PROTOCOL_VERSION,
    Ack,
    Batch,
    Error,
    Hello,
    Nack,
    Ping,
    Pong,
    Reward,
    RolloutEnd,
    RolloutStart,
    Transition,
    Welcome,
    decode_message,
    encode_batch,
    encode_event,
    encode_message,
    pack_ids,
    pack_logprobs,
)
from lightning.testing import Daemon, recover

PEER = b"peer-1"


def _start(rid, **kw):
    return RolloutStart(rollout_id=rid, name="agent", **kw)


def _tr(rid, i, n=4):
    return Transition(
        rollout_id=rid,
        index=i,
        prompt_ids=pack_ids(range(n)),
        response_ids=pack_ids([i] * 2),
        logprobs=pack_logprobs([-0.5, -0.5]),
        policy_version=1,
    )


def _end(rid, n, **kw):
    return RolloutEnd(rollout_id=rid, n_transitions=n, **kw)


def _batch(first, events, cid="c1", resync=False):
    return encode_batch(cid, first, [encode_event(e) for e in events], resync=resync)


class Harness:
    """Drives Daemon.handle directly (the socket loop only moves these frames)."""

    def __init__(self, tmp_path, **cfg):
        cfg.setdefault("data_dir", str(tmp_path / "data"))
        cfg.setdefault("stats_interval_s", 0)
        self.daemon = Daemon(DaemonConfig(**cfg))
        self.daemon._recover()
        from lightning._log import AppendLog
        from pathlib import Path

        self.daemon._wal = AppendLog(Path(cfg["data_dir"]) / "wal")

    def send(self, frame, peer=PEER):
        reply = self.daemon.handle(peer, frame)
        return decode_message(reply) if reply is not None else None

    def hello(self, cid="c1", peer=PEER, version=PROTOCOL_VERSION):
        return self.send(encode_message(Hello(protocol_version=version, client_id=cid)), peer)

    def close(self):
        self.daemon._wal.close()


@pytest.fixture
def h(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def test_happy_path_and_ack(h):
    w = h.hello()
    assert isinstance(w, Welcome) and w.acked_through == 0
    events = [_start("r1", group_key="g"), _tr("r1", 0), _tr("r1", 1),
              Reward(rollout_id="r1", value=0.5, after=2), _end("r1", 2, final_reward=1.0)]
    ack = h.send(_batch(1, events))
    assert ack == Ack(client_id="c1", acked_through=5, rejected=[])
    t = h.daemon.buffer.get_nowait()
    assert t.rollout_id == "r1" and t.group_key == "g" and t.final_reward == 1.0
    assert [x.index for x in t.transitions] == [0, 1] and t.rewards[0].value == 0.5
    assert h.send(encode_message(Ping(sent_at=3.0))) == Pong(sent_at=3.0)


def test_duplicates_are_stored_once(h):
    h.hello()
    frame = _batch(1, [_start("r1"), _tr("r1", 0)])
    assert h.send(frame).acked_through == 2
    assert h.send(frame).acked_through == 2  # resent whole frame
    # overlapping frame: seq 2 is a duplicate, seq 3..4 are new
    assert h.send(_batch(2, [_tr("r1", 0), _tr("r1", 1), _end("r1", 2)])).acked_through == 4
    t = h.daemon.buffer.get_nowait()
    assert [x.index for x in t.transitions] == [0, 1]
    s = h.daemon.stats()
    assert s["events_accepted"] == 4 and s["events_duplicate"] == 3
    assert s["frames_duplicate"] == 1


def test_gap_is_nacked_with_expected_seq_and_resync_accepts_it(h):
    h.hello()
    h.send(_batch(1, [_start("r1")]))
    nack = h.send(_batch(5, [_start("r2")]))
    assert isinstance(nack, Nack) and nack.code == "gap" and nack.expected_seq == 2 and nack.retry
    ack = h.send(_batch(5, [_start("r2")], resync=True))
    assert ack.acked_through == 5
    assert h.daemon.stats()["events_lost_by_client"] == 3


def test_batch_before_hello_is_refused(h):
    nack = h.send(_batch(1, [_start("r1")]))
    assert nack.code == "no_session" and nack.retry


def test_ping_without_a_session_is_told_to_say_hello(h):
    """A restarted daemon must not answer Pong to a client whose frames died with the old
    one: its window full of them, it would wait for their acks forever (the kill -9 test
    stalled this way). Told no_session, it says Hello and resends."""
    nack = h.send(encode_message(Ping(sent_at=1.0)))
    assert isinstance(nack, Nack) and nack.code == "no_session" and nack.retry
    h.hello()
    assert h.send(encode_message(Ping(sent_at=2.0))) == Pong(sent_at=2.0)
    h.daemon.forget_peer(PEER)  # a silent peer forgotten: the same again
    assert h.send(encode_message(Ping(sent_at=3.0))).code == "no_session"


def test_wrong_protocol_version_gets_error(h):
    err = h.hello(version=PROTOCOL_VERSION + 1)
    assert isinstance(err, Error) and err.code == "protocol_version"
    assert "install the same lightning-rl version" in err.message
    assert h.send(_batch(1, [_start("r1")])).code == "no_session"


@pytest.mark.parametrize(
    "frame, code",
    [
        (b"\xc1garbage", "malformed"),
        (b"\x00\x01", "invalid"),
        (b"", "malformed"),
        (msgspec.msgpack.encode({"type": "nonsense"}), "unknown_tag"),
        (msgspec.msgpack.encode({"type": "batch", "client_id": "c1"}), "invalid"),
        (encode_message(Ack(client_id="c", acked_through=1)), "unexpected_message"),
    ],
)
def test_bad_frames_are_nacked_and_daemon_keeps_serving(h, frame, code):
    h.hello()
    nack = h.send(frame)
    assert isinstance(nack, Nack) and nack.code == code and not nack.retry
    assert h.daemon.stats()[f"nacked.{code}"] == 1
    assert h.send(_batch(1, [_start("r1"), _end("r1", 0)])).acked_through == 2


def test_oversized_frame(tmp_path):
    h = Harness(tmp_path, max_frame_bytes=4096)
    h.hello()
    big = _batch(1, [_start("r1", metadata={"blob": "x" * 5000})])
    nack = h.send(big)
    assert nack.code == "frame_too_large" and "4096" in nack.reason and not nack.retry
    assert h.send(_batch(1, [_start("r1")])).acked_through == 1
    h.close()


def test_bad_events_are_rejected_individually(h):
    h.hello()
    nan_reward = Reward(rollout_id="r1", value=math.nan)  # a client that skips checks
    events = [
        _start("r1"),
        _tr("r1", 0),
        nan_reward,                                    # 3: non-finite
        _tr("r1", 5),                                  # 4: out of order
        _tr("nope", 0),                                # 5: unknown rollout
        _start("r1"),                                  # 6: duplicate start
        _end("r1", 1),                                 # 7
        Reward(rollout_id="r1", value=1.0),            # 8: finished
        _end("r2", 0, final_reward=math.inf),          # 9: non-finite final reward
    ]
    ack = h.send(_batch(1, events))
    assert ack.acked_through == 9
    codes = {r.seq: r.code for r in ack.rejected}
    assert codes == {
        3: "non_finite_reward",
        4: "transition_order",
        5: "unknown_rollout",
        6: "duplicate_rollout",
        8: "rollout_finished",
        9: "non_finite_reward",
    }
    assert all(r.reason for r in ack.rejected)
    t = h.daemon.buffer.get_nowait()
    assert len(t.transitions) == 1 and t.rewards == []
    stats = h.daemon.stats()
    assert stats["rejected.unknown_rollout"] == 1 and stats["rejected.non_finite_reward"] == 2


def test_transition_count_mismatch_is_flagged(h):
    h.hello()
    h.send(_batch(1, [_start("r1"), _tr("r1", 0), _end("r1", 3)]))
    t = h.daemon.buffer.get_nowait()
    assert t.warnings and "3 transitions" in t.warnings[0]


def test_busy_when_buffer_full(tmp_path):
    h = Harness(tmp_path, buffer_size=1)
    h.hello()
    assert h.send(_batch(1, [_start("a"), _end("a", 0)])).acked_through == 2
    nack = h.send(_batch(3, [_start("b"), _end("b", 0)]))
    assert nack.code == "busy" and nack.retry and nack.retry_after_s > 0
    h.daemon.buffer.get_nowait()
    assert h.send(_batch(3, [_start("b"), _end("b", 0)])).acked_through == 4
    h.close()


def test_recovery_rebuilds_state_and_honours_commit(tmp_path):
    h = Harness(tmp_path)
    h.hello()
    h.send(_batch(1, [_start("a"), _tr("a", 0), _end("a", 1)]))
    h.send(_batch(4, [_start("b"), _tr("b", 0), _end("b", 1)]))
    h.send(_batch(7, [_start("c"), _tr("c", 0)]))  # still open
    first = h.daemon.buffer.get_nowait()
    h.daemon.buffer.commit(first.index)
    h.close()

    h2 = Harness(tmp_path)  # a new daemon process on the same data dir
    w = h2.hello()
    assert w.acked_through == 8  # resume point survives
    assert [t.rollout_id for t in h2.daemon.buffer._items] == ["b"]  # "a" was committed
    assert h2.send(_batch(7, [_start("c"), _tr("c", 0)])).acked_through == 8  # dup
    assert h2.send(_batch(9, [_end("c", 1)])).acked_through == 9
    assert h2.send(_batch(10, [_tr("a", 1)])).rejected[0].code == "rollout_finished"
    h2.close()
    state, pending, committed = recover(tmp_path / "data")
    assert committed == 0 and [t.rollout_id for t in pending] == ["b", "c"]
    assert [len(t.transitions) for t in pending] == [1, 1]
