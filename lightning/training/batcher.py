"""Finished trajectories -> training batches: credit, groups, advantages, staleness.

Per trajectory (:meth:`Batcher.add`)
    evaluation rollouts (``metadata["split"] == "eval"``) and rollouts without token ids
    are set aside (consumed, counted) -> failure policy (``drop``, or ``zero`` reward) ->
    AIR step rewards (when configured) -> credit assignment: one return ``G_k`` per
    transition -> multi-turn merge into token sequences (:mod:`lightning._sequences`).

Groups
    Trajectories sharing a ``group_key`` (a runner gives the ``group_size`` attempts of one
    task the same key) wait until ``group_size`` of them have finished, or until
    ``group_timeout_s`` has passed since the first one arrived; then the group is ready
    with what it has. A group whose trajectories all have the same return carries no signal
    for a group-relative estimator (every advantage is 0); with ``drop_uniform_groups`` it
    is set aside instead of costing a forward and backward pass (DAPO's dynamic sampling).
    Trajectories without a group key (online traffic) are ready at once.

Advantages (computed per batch, over whole groups, by :mod:`lightning.algorithms`)
    Like with like: transition ``k`` of trajectory ``i`` is compared with the returns
    ``G_{j,k}`` of the same turn ``k`` of its group's trajectories ``j`` (those that reached
    turn ``k``), so a later turn's return-to-go, which has fewer rewards left to collect,
    is never measured against first-turn returns:

    - ``grpo``: ``(G_{i,k} - mean_j G_{j,k}) / (std_j G_{j,k} + eps)``;
    - ``grpo_no_std``: ``G_{i,k} - mean_j G_{j,k}`` (Dr. GRPO);
    - ``rloo``: ``G_{i,k} - mean_{j != i} G_{j,k}``;
    - ``reinforce_pp``: ``G_{i,k}`` whitened over every transition of the batch.

    With ``credit="final"`` every ``G_{i,k} = R_i`` and the group is the baseline's set at
    every turn: exactly the textbook sequence-level estimators. A turn no other member of
    the group reached has nothing to compare with: its advantage is 0. Trajectories
    without a group key use the ``reinforce_pp`` baseline of the batch's other ungrouped
    transitions, whatever the estimator. The advantage of transition ``k`` is spread over
    the tokens it sampled.

Batches
    Ready groups are taken first-in first-out until the batch holds ``batch_size``
    trajectories (whole groups, so it may hold a few more) or the next group would pass
    ``max_batch_tokens``. Every sequence carries the oldest policy version that sampled
    one of its tokens; a sequence more than ``max_staleness`` versions behind the trainer
    is dropped (``stale_policy="drop"``) or kept and marked for truncated importance
    weighting (``"is"``: the trainer recomputes its log-probs, see
    :class:`~lightning.training.trainer.Trainer`).

Every trajectory a batch uses, and every one set aside, is reported in
:attr:`Batch.consumed`, so the caller can persist exactly what has been used.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec
import structlog
import torch

from lightning._sequences import TokenSequence, merge_transitions
from lightning.algorithms.credit import assign_credit
from lightning.algorithms.grpo import grpo_advantages, grpo_advantages_no_std
from lightning.algorithms.reinforce_pp import reinforce_pp_advantages
from lightning.algorithms.rloo import rloo_advantages
from lightning.training.batch import TrainBatch, pack_sequences

logger = structlog.get_logger()

FAILURE_WARN_S = 60.0
"""How often the batcher checks for (and warns about) training traffic that only fails."""

__all__ = ["Batch", "Batcher", "BatcherConfig", "ConsumedSet"]

ESTIMATORS: tuple[str, ...] = ("grpo", "grpo_no_std", "rloo", "reinforce_pp")
"""Our estimators. ``"verl:<name>"`` uses verl's estimator registered as ``<name>`` (verl
installed) on one score per transition (``G_k``) with the trajectory's group as verl's
``index``: outcome-level estimators (``grpo``, ``rloo``, ``opo``...) mean what they mean in
verl; token-level ones (``gae``, ``reinforce_plus_plus``) see one-token responses."""


class BatcherConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How trajectories become batches (all checked at construction)."""

    group_size: int = 8
    """Finished rollouts that complete a group (a runner's attempts per task)."""
    group_timeout_s: float = 300.0
    """A group that waited this long since its first rollout is used with what it has."""
    batch_size: int = 32
    """Trajectories per optimizer step (whole groups: a batch may hold a few more)."""
    max_batch_tokens: int | None = None
    """Stop adding groups before a batch passes this many tokens (one group always fits)."""
    estimator: str = "grpo"
    """Advantage estimator: grpo, grpo_no_std, rloo, reinforce_pp, or verl:<name>."""
    credit: Literal["final", "discounted", "returns_to_go"] = "returns_to_go"
    """Credit assignment over a trajectory's transitions (:mod:`lightning.algorithms.credit`)."""
    gamma: float = 1.0
    """Discount of ``discounted`` and ``returns_to_go`` credit."""
    eps: float = 1e-6
    """GRPO's std epsilon."""
    on_failure: Literal["drop", "zero"] = "drop"
    """Failed or cancelled rollouts: drop them, or train on them with ``failure_reward``."""
    failure_reward: float = 0.0
    drop_uniform_groups: bool = True
    """Set aside groups whose returns are all equal (all their advantages would be 0)."""
    max_staleness: int = 2
    """Sequences sampled more than this many policy versions ago are stale."""
    stale_policy: Literal["drop", "is"] = "drop"
    """Stale sequences: drop them, or weight them by a truncated importance ratio."""
    missing_logprobs: Literal["recompute", "drop"] = "recompute"
    """Action tokens without usable sampler log-probs (none recorded, or not of the
    processed distribution; NaN in the batch): ``recompute`` = the trainer scores them
    with the current weights before the step (their ratio starts at 1: exact when they
    were sampled by the current version, an on-policy approximation otherwise), ``drop`` =
    their sequences are set aside (counted ``sequences_dropped_no_logprobs``). Never 0."""

    def __post_init__(self) -> None:
        _positive("group_size", self.group_size)
        _positive("batch_size", self.batch_size)
        if self.max_batch_tokens is not None:
            _positive("max_batch_tokens", self.max_batch_tokens)
        if not self.group_timeout_s > 0:
            raise ValueError(f"group_timeout_s must be > 0, got {self.group_timeout_s}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.estimator not in ESTIMATORS and not (
            self.estimator.startswith("verl:") and len(self.estimator) > 5
        ):
            raise ValueError(
                f"unknown estimator {self.estimator!r}: choose one of {ESTIMATORS} or "
                "'verl:<name>' (a verl estimator by name)"
            )
        if not math.isfinite(self.failure_reward):
            raise ValueError(f"failure_reward must be finite, got {self.failure_reward}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class ConsumedSet:
    """Trajectory indices used so far: a watermark (every index up to it) plus the used
    indices above it. Small however long the run, because indices are used roughly in
    order; persisted in checkpoints."""

    __slots__ = ("above", "through")

    def __init__(self, through: int = -1, above: Iterable[int] = ()) -> None:
        self.through = through
        self.above: set[int] = set(above)
        self._advance()

    def add(self, index: int) -> None:
        if index > self.through:
            self.above.add(index)
            self._advance()

    def __contains__(self, index: int) -> bool:
        return index <= self.through or index in self.above

    def _advance(self) -> None:
        while self.through + 1 in self.above:
            self.through += 1
            self.above.discard(self.through)

    def to_dict(self) -> dict[str, Any]:
        return {"through": self.through, "above": sorted(self.above)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConsumedSet:
        return cls(int(d["through"]), (int(i) for i in d["above"]))


@dataclasses.dataclass(slots=True)
class _Prepared:
    index: int
    rollout_id: str
    group_key: str | None
    outcome: float  # R = G_0, the return from the first transition
    returns: list[float]  # G_k per transition
    seqs: list[TokenSequence]
    tokens: int
    arrived: float


@dataclasses.dataclass(slots=True)
class _Group:
    key: str
    members: list[_Prepared]
    first_arrived: float


@dataclasses.dataclass
class Batch:
    """A packed training batch and what it is made of."""

    batch: TrainBatch
    consumed: list[int]
    """Trajectory indices this batch accounts for (used, or set aside while forming it)."""
    stale: torch.Tensor
    """bool ``[B]``: sequence ``b`` is stale and must be importance-weighted."""
    metrics: dict[str, float]


class Batcher:
    """Collects prepared trajectories into groups and forms batches (not thread-safe:
    one consumer)."""

    def __init__(
        self,
        config: BatcherConfig | None = None,
        *,
        air: Callable[[Any], Iterable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BatcherConfig()
        self.air = air
        self._clock = clock
        self._open: OrderedDict[str, _Group] = OrderedDict()
        self._ready: deque[list[_Prepared]] = deque()
        self._set_aside: list[int] = []
        self.counters: Counter[str] = Counter()
        self._seq_counters: Counter[str] = Counter()
        self._outcomes: list[float] = []  # every closed training rollout since the last batch
        # training rollouts since the last health check: [completed, failed], first error
        self._health: list[Any] = [0, 0, None]
        self._health_since = clock()
        # groups closed in the current FAILURE_WARN_S interval: [all, uniform, outcomes seen]
        self._groups_health: list[Any] = [0, 0, set()]
        self._version = 0  # the trainer's version at the last next_batch
        self._warned_unknown_version = False

    # ------------------------------------------------------------------ intake

    @property
    def ready_trajectories(self) -> int:
        return sum(len(g) for g in self._ready)

    @property
    def pending_trajectories(self) -> int:
        return sum(len(g.members) for g in self._open.values())

    def add(self, traj: Any, *, version: int | None = None) -> None:
        """Take one finished trajectory (:class:`lightning._ingest.Trajectory`).

        ``version`` is the trainer's policy version as the trajectory arrives (None: the
        one last given to :meth:`next_batch`). Actions whose policy version is unknown
        (-1: a ``token_id_base_urls`` server, ``record_transition`` without one) are taken
        to be of that version: the newest they can be, so staleness never drops them for
        being unknown (counted ``unknown_version_transitions``, warned once).
        """
        cfg = self.config
        c = self.counters
        c["trajectories"] += 1
        if (traj.metadata or {}).get("split") == "eval":
            c["set_aside.eval"] += 1
            self._set_aside.append(traj.index)
            return
        self._watch_failures(traj)
        extra = list(self.air(traj)) if self.air is not None and traj.transitions else []
        returns = assign_credit(
            traj,
            cfg.credit,
            gamma=cfg.gamma,
            extra_rewards=extra,
            on_failure=cfg.on_failure,
            failure_reward=cfg.failure_reward,
        )
        if returns is None:
            c["set_aside.failed"] += 1
            c["set_aside_train"] += 1
            self._set_aside.append(traj.index)
            return
        if traj.status != "completed":
            c["failed_as_zero"] += 1
        seqs = merge_transitions(traj.transitions, self._seq_counters, rollout_id=traj.rollout_id)
        self._date_unknown_versions(traj, seqs, self._version if version is None else version)
        if not seqs:
            c["set_aside.no_tokens"] += 1
            c["set_aside_train"] += 1
            self._set_aside.append(traj.index)
            return
        prep = _Prepared(
            index=traj.index,
            rollout_id=traj.rollout_id,
            group_key=traj.group_key,
            outcome=returns[0],
            returns=returns,
            seqs=seqs,
            tokens=sum(len(s.token_ids) for s in seqs),
            arrived=self._clock(),
        )
        if traj.group_key is None:
            self._outcomes.append(prep.outcome)
            self._ready.append([prep])
            return
        group = self._open.get(traj.group_key)
        if group is None:
            group = self._open[traj.group_key] = _Group(traj.group_key, [], prep.arrived)
        group.members.append(prep)
        if len(group.members) >= cfg.group_size:
            del self._open[traj.group_key]
            self._close(group, timed_out=False)

    def _watch_failures(self, traj: Any) -> None:
        """Every ``FAILURE_WARN_S``: warn, with counts, when every training rollout failed.

        Online traffic has no runner to stop it; a daemon whose agents fail on every path
        says so periodically instead of training on nothing in silence.
        """
        h = self._health
        if traj.status == "completed":
            h[0] += 1
        else:
            h[1] += 1
            h[2] = h[2] or traj.error or traj.status
        now = self._clock()
        if now - self._health_since < FAILURE_WARN_S:
            return
        g = self._groups_health
        if g[0] and g[0] == g[1]:
            self.counters["only_uniform_warnings"] += 1
            logger.warning("batcher.only_uniform_groups", groups=g[0],
                           outcomes=sorted(g[2])[:8], over_s=round(now - self._health_since, 1),
                           hint="every group closed in this interval had one outcome for all "
                           "its rollouts, so a group-relative estimator has no signal and "
                           "they were set aside (drop_uniform_groups): the task is too easy "
                           "or too hard for the policy, or the agent ignores what it samples")
        self._groups_health = [0, 0, set()]
        if h[0] == 0 and h[1]:
            self.counters["only_failures_warnings"] += 1
            logger.warning("batcher.only_failures", failed=h[1], completed=0,
                           over_s=round(now - self._health_since, 1), first_error=h[2],
                           hint="every training rollout failed in this interval: check the "
                           "agents' logs (their exceptions are the rollouts' errors)")
        self._health = [0, 0, None]
        self._health_since = now

    def _date_unknown_versions(self, traj: Any, seqs: list[TokenSequence], version: int) -> None:
        unknown = sum(1 for t in traj.transitions if t.policy_version < 0)
        if not unknown:
            return
        self.counters["unknown_version_transitions"] += unknown
        for s in seqs:
            pv = s.policy_versions
            for i, act in enumerate(s.action_mask):
                if act and pv[i] < 0:
                    pv[i] = version
        if not self._warned_unknown_version:
            self._warned_unknown_version = True
            logger.warning(
                "batcher.unknown_policy_version", rollout_id=traj.rollout_id,
                transitions=unknown, taken_as=version,
                rule="a transition without a policy version counts as sampled by the version "
                "current when it reached the trainer (counter unknown_version_transitions)",
                fix="serve through the lightning policy server, or pass policy_version= to "
                "record_transition",
            )

    def expire(self, now: float | None = None) -> None:
        """Close groups that have waited ``group_timeout_s`` (oldest first)."""
        now = self._clock() if now is None else now
        limit = self.config.group_timeout_s
        while self._open:
            key, group = next(iter(self._open.items()))
            if now - group.first_arrived < limit:
                break
            del self._open[key]
            self._close(group, timed_out=True)

    def next_timeout(self) -> float | None:
        """Seconds until the oldest open group times out (None if there is none)."""
        if not self._open:
            return None
        first = next(iter(self._open.values())).first_arrived
        return max(0.0, first + self.config.group_timeout_s - self._clock())

    def _close(self, group: _Group, *, timed_out: bool) -> None:
        c = self.counters
        if timed_out:
            c["groups_timed_out"] += 1
            logger.info(
                "batcher.group_timeout", group_key=group.key, size=len(group.members),
                expected=self.config.group_size,
            )
        outcomes = [m.outcome for m in group.members]
        self._outcomes.extend(outcomes)
        self._groups_health[0] += 1
        if self.config.drop_uniform_groups and (
            len(outcomes) < 2 or max(outcomes) == min(outcomes)
        ):
            self._groups_health[1] += 1
            if len(self._groups_health[2]) < 64:
                self._groups_health[2].update(outcomes)
            c["set_aside.uniform_groups"] += 1
            c["set_aside.uniform_trajectories"] += len(group.members)
            c["set_aside_train"] += len(group.members)
            self._set_aside.extend(m.index for m in group.members)
            return
        c["groups_ready"] += 1
        self._ready.append(group.members)

    # ------------------------------------------------------------------ batches

    def next_batch(self, policy_version: int, *, flush: bool = False) -> Batch | None:
        """A batch once ``batch_size`` trajectories are ready (``flush``: whatever is ready),
        else None. ``policy_version`` is the trainer's current version (staleness)."""
        cfg = self.config
        self._version = policy_version
        if not self._ready or (self.ready_trajectories < cfg.batch_size and not flush):
            return None
        groups: list[list[_Prepared]] = []
        n = tokens = 0
        while self._ready and n < cfg.batch_size:
            g = self._ready[0]
            g_tokens = sum(m.tokens for m in g)
            if groups and cfg.max_batch_tokens is not None and tokens + g_tokens > cfg.max_batch_tokens:
                break
            self._ready.popleft()
            groups.append(g)
            n += len(g)
            tokens += g_tokens
        return self._build(groups, policy_version)

    def _build(self, groups: list[list[_Prepared]], version: int) -> Batch | None:
        cfg = self.config
        c = self.counters
        consumed = self._set_aside + [m.index for g in groups for m in g]
        self._set_aside = []
        trajs = [m for g in groups for m in g]
        adv = _transition_advantages(groups, cfg.estimator, cfg.eps, cfg.credit)  # per traj: [n_k]
        seqs: list[TokenSequence] = []
        seq_adv: list[torch.Tensor] = []
        stale: list[bool] = []
        staleness: list[int] = []
        dropped = no_lp = recompute = 0
        for m, a in zip(trajs, adv):
            for s in m.seqs:
                versions = [v for v, act in zip(s.policy_versions, s.action_mask) if act]
                oldest = min(versions) if versions else version
                lag = max(0, version - oldest)
                if lag > cfg.max_staleness and cfg.stale_policy == "drop":
                    dropped += 1
                    continue
                missing = sum(1 for lp, act in zip(s.logprobs, s.action_mask)
                              if act and math.isnan(lp))
                if missing and cfg.missing_logprobs == "drop":
                    no_lp += 1
                    continue
                recompute += missing
                tok = torch.zeros(len(s.token_ids), dtype=torch.float32)  # [n]
                for k, (t0, t1) in zip(s.transitions, s.response_spans):
                    tok[t0:t1] = a[k]
                seqs.append(s)
                seq_adv.append(tok)
                stale.append(lag > cfg.max_staleness)
                staleness.append(lag)
        c["sequences_dropped_stale"] += dropped
        c["sequences_dropped_no_logprobs"] += no_lp
        outcomes = torch.tensor([m.outcome for m in trajs], dtype=torch.float64)  # [N]
        window, self._outcomes = self._outcomes, []
        metrics = {
            # every training rollout finished since the previous batch, set-aside groups too
            "rollouts/reward_mean": sum(window) / len(window) if window else 0.0,
            "rollouts/count": float(len(window)),
            "batch/trajectories": float(len(trajs)),
            "batch/groups": float(len(groups)),
            "batch/sequences": float(len(seqs)),
            "batch/dropped_stale": float(dropped),
            "batch/dropped_no_logprobs": float(no_lp),
            "batch/recomputed_logprob_tokens": float(recompute),
            "reward/mean": float(outcomes.mean()) if len(trajs) else 0.0,
            "reward/std": float(outcomes.std()) if len(trajs) > 1 else 0.0,
            "staleness/mean": float(sum(staleness) / len(staleness)) if staleness else 0.0,
            "staleness/max": float(max(staleness, default=0)),
        }
        if not seqs:
            c["batches_empty"] += 1
            logger.warning(
                "batcher.empty_batch", trajectories=len(trajs), dropped_stale=dropped,
                reason="every sequence was staler than max_staleness or had no usable "
                "sampler log-probs (missing_logprobs='drop')",
            )
            self._set_aside = consumed  # reported with the next batch
            return None
        batch = pack_sequences(seqs, seq_adv)
        c["batches"] += 1
        return Batch(batch, consumed, torch.tensor(stale, dtype=torch.bool), metrics)

    def take_set_aside(self) -> list[int]:
        """Indices set aside since the last batch (eval, failed, uniform...), now consumed."""
        out, self._set_aside = self._set_aside, []
        return out

    def stats(self) -> dict[str, int]:
        return {**self.counters, **{"sequences." + k: v for k, v in self._seq_counters.items()}}


def _transition_advantages(
    groups: list[list[_Prepared]], estimator: str, eps: float, credit: str = "final"
) -> list[torch.Tensor]:
    """Per trajectory, float32 ``[n_transitions]`` advantages (see the module docstring),
    computed by :mod:`lightning.algorithms` (the functions the verl-parity tests cover)."""
    trajs = [m for g in groups for m in g]
    if not trajs:
        return []
    g_ids = torch.tensor(
        [gi if g[0].group_key is not None else -1 for gi, g in enumerate(groups) for _ in g]
    )  # [N]: -1 marks ungrouped trajectories
    lengths = torch.tensor([len(m.returns) for m in trajs])  # [N]
    G = torch.tensor([r for m in trajs for r in m.returns], dtype=torch.float32)  # [K]
    owner = torch.repeat_interleave(torch.arange(len(trajs)), lengths)  # [K]
    grouped = g_ids[owner] >= 0  # [K]
    if estimator.startswith("verl:"):
        return list(_verl_advantages(estimator[5:], G, owner, g_ids).split(lengths.tolist()))
    if estimator == "reinforce_pp":
        return list(reinforce_pp_advantages(G).split(lengths.tolist()))
    # like with like: transition k is compared with the group's returns *from turn k*
    # (with credit="final" every G_{i,k} = R_i, and this is the textbook outcome baseline)
    turn = torch.arange(len(G)) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)  # [K]: k within its trajectory
    key = g_ids[owner] if credit == "final" else g_ids[owner] * int(lengths.max()) + turn  # [K]
    if estimator == "grpo":
        a = grpo_advantages(G, key, eps=eps)  # [K]
    elif estimator == "grpo_no_std":
        a = grpo_advantages_no_std(G, key)  # [K]
    elif estimator == "rloo":
        a = rloo_advantages(G, key)  # [K]
    else:
        raise ValueError(f"unknown estimator {estimator!r}: choose one of {ESTIMATORS}")
    adv = torch.where(grouped, a, 0.0)  # [K]
    free = ~grouped  # [K]
    if bool(free.any()):  # ungrouped online traffic: the batch baseline (REINFORCE++)
        adv[free] = reinforce_pp_advantages(G[free])
    return list(adv.split(lengths.tolist()))


def _verl_advantages(
    name: str, G: torch.Tensor, owner: torch.Tensor, g_ids: torch.Tensor
) -> torch.Tensor:
    """verl's estimator ``name`` over one score per transition, float32 ``[K]``."""
    try:
        from lightning_backends._verl import verl_advantages
    except (ImportError, LookupError) as exc:
        raise ValueError(
            f"estimator 'verl:{name}' needs verl: pip install 'lightning-rl[verl]' ({exc})"
        ) from exc
    # one label per transition: its trajectory's group; ungrouped ones get their own
    gid = torch.where(g_ids[owner] >= 0, g_ids[owner], -1 - owner)  # [K]
    adv = verl_advantages(
        name, G.unsqueeze(1), torch.ones(len(G), 1), [int(i) for i in gid]
    )  # [K, 1]
    return adv.squeeze(1).float()  # [K]
