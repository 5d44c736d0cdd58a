"""The daemon's ingest state machine: de-duplicate, validate, assemble trajectories.

Pure and deterministic: it does no I/O, so replaying the write-ahead log through it after
a crash rebuilds exactly the state the daemon had acknowledged.

Several sources, one rollout
    A rollout's events may come from more than one client: the app's runtime (the
    ``openai`` calls it captured, its rewards and spans) and the daemon's own server-side
    capture (a raw HTTP client naming the runtime's rollout on a per-rollout URL or the
    ``X-Lightning-Rollout-Id`` header). Each source numbers the transitions *it* records
    (``Transition.index``, ``Reward.after``, ``Span.after``, ``RolloutEnd.n_transitions``
    count that source's transitions only): neither can know how many the other recorded,
    since the runtime holds its events back for up to ``open_linger_s`` while the server
    stores at once. So the order check is per source, and a rollout's end is checked
    against what its sender recorded. When the rollout ends, the sources' transitions are
    interleaved by the time each was recorded (``created_at``; each source's own order is
    kept whatever the clocks say), renumbered 0, 1, 2... in that order, and every
    reward's and span's ``after`` is moved to the same place in the merged order (after
    its own source's transitions before it, and after the other sources' transitions
    recorded no later than it). That order is exact for calls made one after another on
    one host (or on hosts with synchronised clocks); calls that overlapped in time have
    no order to keep. A rollout with a single source is stored exactly as it arrived.
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
    __slots__ = ("start", "client_id", "transitions", "rewards", "spans", "transition_sources",
                 "reward_sources", "span_sources", "counts")

    def __init__(self, start: RolloutStart, client_id: str) -> None:
        self.start = start
        self.client_id = client_id
        self.transitions: list[Transition] = []
        self.rewards: list[Reward] = []
        self.spans: list[Span] = []
        # the client each event came from (parallel lists), and transitions per client
        self.transition_sources: list[str] = []
        self.reward_sources: list[str] = []
        self.span_sources: list[str] = []
        self.counts: dict[str, int] = {}

    def recorded_by(self, client_id: str) -> int:
        """Transitions stored in this rollout from ``client_id``."""
        return self.counts.get(client_id, 0)


class _OpenRollout(msgspec.Struct, kw_only=True):
    start: RolloutStart
    client_id: str
    transitions: list[Transition]
    rewards: list[Reward]
    spans: list[Span]
    # The source of each event (new in format 1's schema: a snapshot without them is
    # one whose events all came from ``client_id``).
    transition_sources: list[str] = []
    reward_sources: list[str] = []
    span_sources: list[str] = []


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
    retired: list[str] = []
    """Client ids retired (Goodbye, or idle past the TTL) and not back since, oldest
    first (absent from snapshots before retirement existed: none)."""


class BatchResult(msgspec.Struct):
    acked_through: int
    rejected: list[Rejection]
    completed: list[Trajectory]
    accepted: int
    duplicates: int


class IngestState:
    """De-duplication marks (``hwm``: client id -> highest sequence number stored), the
    open rollouts, and what finished.

    Bounds: ``hwm`` loses an id when the id is retired (:meth:`retire`: after the client's
    Goodbye, or when it was idle past the daemon's ``client_ttl_s``); the id is then
    remembered in ``retired`` (a tombstone, at most ``max_retired_remembered``, the oldest
    forgotten first and counted in ``client_tombstones_evicted``) so that a stale batch
    for it can be refused (:meth:`is_stale_retired`) instead of being stored again.
    """

    def __init__(self, *, max_finished_remembered: int = 1_000_000,
                 max_retired_remembered: int = 1_000_000) -> None:
        self.hwm: dict[str, int] = {}
        self.open: dict[str, _Open] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.max_finished = max_finished_remembered
        self.retired: OrderedDict[str, None] = OrderedDict()
        self.max_retired = max_retired_remembered
        self.completed = 0
        self.counters: Counter[str] = Counter()

    def retire(self, client_id: str, through: int, reason: str) -> None:
        """Forget ``client_id``'s high-water mark (it stored ``through``); remember the id
        as retired. Deterministic: the daemon logs a :class:`~lightning._protocol.Retired`
        record first, and replay calls this at the same point."""
        had = self.hwm.pop(client_id, 0)
        if had != through:  # the daemon checks before logging: only a foreign edit
            self.counters["clients_retired_mark_mismatch"] += 1
        self.retired[client_id] = None
        self.retired.move_to_end(client_id)
        if len(self.retired) > self.max_retired:
            self.retired.popitem(last=False)
            self.counters["client_tombstones_evicted"] += 1
        self.counters["clients_retired." + reason] += 1

    def is_stale_retired(self, batch: Batch) -> bool:
        """A batch for a retired id that does not start a fresh stream (seq 1, no
        ``resync``): a resync says the sender continues an older stream (a dead process's
        spill log, whatever its first number), and the daemon cannot tell which of its
        events it stored before the id was retired."""
        cid = batch.client_id
        return ((batch.first_seq > 1 or batch.resync) and cid not in self.hwm
                and cid in self.retired)

    def snapshot(self, *, wal_from: str, committed: int, pending: list[Trajectory]) -> Snapshot:
        """This state as a :class:`Snapshot` (shares the event objects: encode it at once)."""
        return Snapshot(
            wal_from=wal_from,
            hwm=dict(self.hwm),
            open=[_OpenRollout(start=o.start, client_id=o.client_id, transitions=o.transitions,
                               rewards=o.rewards, spans=o.spans,
                               transition_sources=_foreign(o.transition_sources, o.client_id),
                               reward_sources=_foreign(o.reward_sources, o.client_id),
                               span_sources=_foreign(o.span_sources, o.client_id))
                  for o in self.open.values()],
            finished=list(self.finished),
            completed=self.completed,
            counters=dict(self.counters),
            committed=committed,
            pending=pending,
            retired=list(self.retired),
        )

    @classmethod
    def from_snapshot(cls, snap: Snapshot, *, max_finished_remembered: int = 1_000_000,
                      max_retired_remembered: int = 1_000_000) -> "IngestState":
        state = cls(max_finished_remembered=max_finished_remembered,
                    max_retired_remembered=max_retired_remembered)
        state.hwm = dict(snap.hwm)
        state.retired = OrderedDict.fromkeys(snap.retired)
        for o in snap.open:
            op = _Open(o.start, o.client_id)
            op.transitions, op.rewards, op.spans = o.transitions, o.rewards, o.spans

            def sources(given: list[str], n: int, owner: str = o.client_id) -> list[str]:
                return list(given) if len(given) == n else [owner] * n

            op.transition_sources = sources(o.transition_sources, len(o.transitions))
            op.reward_sources = sources(o.reward_sources, len(o.rewards))
            op.span_sources = sources(o.span_sources, len(o.spans))
            for src in op.transition_sources:
                op.counts[src] = op.counts.get(src, 0) + 1
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
        if self.retired and cid in self.retired:  # a retired id back as a fresh stream
            del self.retired[cid]
            self.counters["clients_returned_after_retirement"] += 1
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
                expected = o.recorded_by(cid)
                if event.index != expected:
                    raise ProtocolError(
                        f"transition index {event.index} of rollout {event.rollout_id} is "
                        f"out of order: expected {expected} (the number of transitions this "
                        "client recorded in it before)",
                        code="transition_order",
                    )
                o.transitions.append(event)
                o.transition_sources.append(cid)
                o.counts[cid] = expected + 1
            case Reward():
                o = self._get_open(event)
                o.rewards.append(event)
                o.reward_sources.append(cid)
            case Span():
                o = self._get_open(event)
                o.spans.append(event)
                o.span_sources.append(cid)
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
                return self._assemble(o, event, cid)
        return None

    def next_index(self, rollout_id: str, client_id: str) -> int | None:
        """The index ``client_id``'s next transition in the open ``rollout_id`` must have
        (None if it is not open)."""
        o = self.open.get(rollout_id)
        return None if o is None else o.recorded_by(client_id)

    def _assemble(self, o: _Open, end: RolloutEnd, cid: str) -> Trajectory:
        warnings = []
        total = len(o.transitions)
        own = o.recorded_by(cid)
        # The end counts its sender's transitions; one from a client that recorded none
        # may count them all (the daemon's expiry ends do).
        if not (end.n_transitions == own or (own == 0 and end.n_transitions == total)):
            others = total - own
            warnings.append(
                f"client recorded {end.n_transitions} transitions, {own} of them were stored "
                "(the others were rejected)"
                + (f"; {others} more were stored from other sources" if others else "")
            )
            self.counters["trajectories_incomplete"] += 1
        transitions, rewards, spans = o.transitions, o.rewards, o.spans
        if len({*o.transition_sources, *o.reward_sources, *o.span_sources}) > 1:
            transitions, rewards, spans = _interleave(o)
            self.counters["trajectories_multi_source"] += 1
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
            transitions=transitions,
            rewards=rewards,
            spans=spans,
            warnings=warnings,
        )
        self.completed += 1
        self.counters["trajectories_completed"] += 1
        return traj


def _foreign(sources: list[str], owner: str) -> list[str]:
    """``sources`` for a snapshot: empty when every event came from ``owner`` (the
    common case; read back as all ``owner``)."""
    return sources if any(src != owner for src in sources) else []


def _interleave(o: _Open) -> tuple[list[Transition], list[Reward], list[Span]]:
    """The transitions of several sources in the order they were recorded, renumbered,
    with rewards and spans placed where they were emitted (see the module docstring).

    A merge, not a sort: each source's transitions stay in its own order, and at each step
    the source whose next transition was recorded earliest goes first (ties: the one that
    arrived first).
    """
    queues: dict[str, list[int]] = {}
    for pos, src in enumerate(o.transition_sources):
        queues.setdefault(src, []).append(pos)
    heads = dict.fromkeys(queues, 0)
    order: list[int] = []
    while len(order) < len(o.transitions):
        best = None
        for src, q in queues.items():
            h = heads[src]
            if h < len(q) and (best is None or
                               (o.transitions[q[h]].created_at, q[h]) < best[0]):
                best = ((o.transitions[q[h]].created_at, q[h]), src)
        assert best is not None
        src = best[1]
        order.append(queues[src][heads[src]])
        heads[src] += 1
    merged_src = [o.transition_sources[p] for p in order]
    times = [o.transitions[p].created_at for p in order]
    transitions = [msgspec.structs.replace(o.transitions[p], index=i)
                   for i, p in enumerate(order)]
    mine: dict[str, list[int]] = {}  # source -> merged positions of its transitions
    for i, src in enumerate(merged_src):
        mine.setdefault(src, []).append(i)

    def place(src: str, after: int, at: float) -> int:
        own = mine.get(src, [])
        k = min(after, len(own))
        p = own[k - 1] + 1 if k > 0 else 0
        while p < len(transitions) and merged_src[p] != src and times[p] <= at:
            p += 1
        return p

    rewards = [msgspec.structs.replace(r, after=place(src, r.after, r.created_at))
               for r, src in zip(o.rewards, o.reward_sources)]
    spans = [msgspec.structs.replace(sp, after=place(src, sp.after, sp.end_time))
             for sp, src in zip(o.spans, o.span_sources)]
    return transitions, rewards, spans
