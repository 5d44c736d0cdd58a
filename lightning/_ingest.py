"""The daemon's ingest state machine: de-duplicate, validate, assemble trajectories.

Pure and deterministic: it does no I/O, so replaying the write-ahead log through it after
a crash rebuilds exactly the state the daemon had acknowledged.
"""

# No `from __future__ import annotations`: msgspec resolves these annotations at
# runtime, and lightning/__init__.py re-homes public classes to the `lightning` module.

from collections import Counter, OrderedDict
from typing import Any

import msgspec
import structlog

from ._errors import ProtocolError
from ._protocol import (
    Batch,
    Event,
    Refused,
    Rejection,
    Reward,
    RolloutEnd,
    RolloutStart,
    Span,
    Transition,
    validate_event,
)

logger = structlog.get_logger()

__all__ = ["GapError", "IngestState", "Snapshot", "Trajectory"]


class Trajectory(msgspec.Struct, kw_only=True):
    """A finished rollout with everything it recorded, in order."""

    index: int
    """Position in the order trajectories completed in this store (0, 1, 2...)."""
    rollout_id: str
    name: str
    client_id: str
    group_key: str | None
    attempt: int
    parent_id: str | None
    metadata: dict[str, Any]
    status: str
    final_reward: float | None
    error: str | None
    started_at: float
    ended_at: float
    transitions: list[Transition]
    rewards: list[Reward]
    spans: list[Span]
    warnings: list[str] = []


class GapError(Exception):
    def __init__(self, expected: int) -> None:
        super().__init__(expected)
        self.expected = expected


class _Open:
    __slots__ = ("start", "client_id", "transitions", "rewards", "spans")

    def __init__(self, start: RolloutStart, client_id: str) -> None:
        self.start = start
        self.client_id = client_id
        self.transitions: list[Transition] = []
        self.rewards: list[Reward] = []
        self.spans: list[Span] = []


class _OpenRollout(msgspec.Struct, kw_only=True):
    start: RolloutStart
    client_id: str
    transitions: list[Transition]
    rewards: list[Reward]
    spans: list[Span]


class Snapshot(msgspec.Struct, kw_only=True):
    """The ingest state at a point of the write-ahead log, so the log before it can go.

    Recovery = this state + replaying the log from segment :attr:`wal_from` on.
    """

    format: int = 1
    wal_from: str
    """First write-ahead log segment that is not part of this snapshot."""
    hwm: dict[str, int]
    open: list[_OpenRollout]
    finished: list[str]
    completed: int
    counters: dict[str, int]
    committed: int
    """The consumer's commit point when the snapshot was taken."""
    pending: list[Trajectory]
    """Completed trajectories after ``committed``: still needed by the consumer."""


class BatchResult(msgspec.Struct):
    acked_through: int
    rejected: list[Rejection]
    completed: list[Trajectory]
    accepted: int
    duplicates: int


class IngestState:
    def __init__(self, *, max_finished_remembered: int = 1_000_000) -> None:
        self.hwm: dict[str, int] = {}
        self.open: dict[str, _Open] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.max_finished = max_finished_remembered
        self.completed = 0
        self.counters: Counter[str] = Counter()

    def snapshot(self, *, wal_from: str, committed: int, pending: list[Trajectory]) -> Snapshot:
        """This state as a :class:`Snapshot` (shares the event objects: encode it at once)."""
        return Snapshot(
            wal_from=wal_from,
            hwm=dict(self.hwm),
            open=[_OpenRollout(start=o.start, client_id=o.client_id, transitions=o.transitions,
                               rewards=o.rewards, spans=o.spans) for o in self.open.values()],
            finished=list(self.finished),
            completed=self.completed,
            counters=dict(self.counters),
            committed=committed,
            pending=pending,
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot, *, max_finished_remembered: int = 1_000_000) -> "IngestState":
        state = cls(max_finished_remembered=max_finished_remembered)
        state.hwm = dict(snap.hwm)
        for o in snap.open:
            op = _Open(o.start, o.client_id)
            op.transitions, op.rewards, op.spans = o.transitions, o.rewards, o.spans
            state.open[o.start.rollout_id] = op
        state.finished = OrderedDict.fromkeys(snap.finished)
        state.completed = snap.completed
        state.counters = Counter(snap.counters)
        return state

    def is_duplicate(self, batch: Batch) -> bool:
        """True if every event of the batch is already stored."""
        return batch.first_seq + len(batch.events) - 1 <= self.hwm.get(batch.client_id, 0)

    def check_gap(self, batch: Batch) -> None:
        expected = self.hwm.get(batch.client_id, 0) + 1
        if batch.first_seq > expected and not batch.resync:
            raise GapError(expected)

    def apply(self, batch: Batch) -> BatchResult:
        cid = batch.client_id
        hwm = self.hwm.get(cid, 0)
        first = batch.first_seq
        if first > hwm + 1:
            if not batch.resync:
                raise GapError(hwm + 1)
            self.counters["events_lost_by_client"] += first - hwm - 1
            logger.warning(
                "ingest.gap_accepted",
                client_id=cid,
                missing=first - hwm - 1,
                reason="the client no longer held these events (a crashed process)",
            )
        rejected: list[Rejection] = []
        completed: list[Trajectory] = []
        accepted = dups = 0
        seq = first - 1
        for event in batch.events:
            seq += 1
            if seq <= hwm:
                dups += 1
                continue
            if type(event) is Refused:  # did not decode: the daemon refused it alone
                rejected.append(Rejection(seq=seq, code="invalid", reason=event.reason))
                self.counters["rejected.invalid"] += 1
                hwm = seq
                continue
            try:
                validate_event(event)
                done = self._apply_event(cid, event)
            except ProtocolError as exc:
                rejected.append(Rejection(seq=seq, code=exc.code, reason=str(exc)))
                self.counters["rejected." + exc.code] += 1
            else:
                accepted += 1
                if done is not None:
                    completed.append(done)
            hwm = seq
        self.hwm[cid] = hwm
        self.counters["events_accepted"] += accepted
        self.counters["events_duplicate"] += dups
        return BatchResult(hwm, rejected, completed, accepted, dups)

    def _get_open(self, event: Event) -> _Open:
        o = self.open.get(event.rollout_id)
        if o is not None:
            return o
        if event.rollout_id in self.finished:
            raise ProtocolError(
                f"rollout {event.rollout_id} already finished: {type(event).__name__} "
                "after its end is refused (emit rewards before the rollout returns)",
                code="rollout_finished",
            )
        raise ProtocolError(
            f"unknown rollout {event.rollout_id}: no rollout.start was received for it",
            code="unknown_rollout",
        )

    def _apply_event(self, cid: str, event: Event) -> Trajectory | None:
        match event:
            case Transition():
                o = self._get_open(event)
                if event.index != len(o.transitions):
                    raise ProtocolError(
                        f"transition index {event.index} of rollout {event.rollout_id} is "
                        f"out of order: expected {len(o.transitions)}",
                        code="transition_order",
                    )
                o.transitions.append(event)
            case Reward():
                self._get_open(event).rewards.append(event)
            case Span():
                self._get_open(event).spans.append(event)
            case RolloutStart():
                rid = event.rollout_id
                if rid in self.open or rid in self.finished:
                    raise ProtocolError(
                        f"rollout {rid} was already started: rollout ids must be unique",
                        code="duplicate_rollout",
                    )
                self.open[rid] = _Open(event, cid)
            case RolloutEnd():
                o = self._get_open(event)
                del self.open[event.rollout_id]
                self.finished[event.rollout_id] = None
                if len(self.finished) > self.max_finished:
                    self.finished.popitem(last=False)
                return self._assemble(o, event)
        return None

    def _assemble(self, o: _Open, end: RolloutEnd) -> Trajectory:
        warnings = []
        if end.n_transitions != len(o.transitions):
            warnings.append(
                f"client recorded {end.n_transitions} transitions, {len(o.transitions)} "
                "were stored (the others were rejected)"
            )
            self.counters["trajectories_incomplete"] += 1
        s = o.start
        traj = Trajectory(
            index=self.completed,
            rollout_id=s.rollout_id,
            name=s.name,
            client_id=o.client_id,
            group_key=s.group_key,
            attempt=s.attempt,
            parent_id=s.parent_id,
            metadata=s.metadata,
            status=end.status,
            final_reward=end.final_reward,
            error=end.error,
            started_at=s.started_at,
            ended_at=end.ended_at,
            transitions=o.transitions,
            rewards=o.rewards,
            spans=o.spans,
            warnings=warnings,
        )
        self.completed += 1
        self.counters["trajectories_completed"] += 1
        return traj
