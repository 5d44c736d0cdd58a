"""The daemon's training loop: buffer -> batcher -> backend step -> publish weights.

One task in the daemon's task group (``await tg.start(trainer.run)``)::

    trajectory buffer ──> Batcher (credit, groups, advantages, staleness)
        ──> backend.train_step(batch)          in a worker thread (one at a time)
        ──> engine.update_weights(weights)     policy_version += 1
        ──> checkpoint every ``save_every`` steps

The event loop stays free while a step runs, so ingest and serving go on; rollouts that
finish meanwhile were sampled by the old version and the batcher accounts for it
(``max_staleness``). The engine lets requests in flight finish on the old weights before
it swaps (never a mix of two versions in one completion).

Before the step, the sequences that need the trainer's own log-probs are scored once (only
those, with the backend's ``compute_logprobs``):

- stale sequences kept for importance weighting (``stale_policy="is"``): their
  ``old_logprobs`` become the trainer's current log-probs (so PPO's ratio and clip are
  taken against the current policy) and their ``is_weights`` become
  :func:`~lightning.algorithms.ppo.truncated_is_weights` (``min(exp(trainer - sampler),
  tis_cap)`` per token);
- action tokens without usable sampler log-probs (NaN, ``missing_logprobs="recompute"``):
  their ``old_logprobs`` become the trainer's (ratio 1 at the start of the step; no
  importance weight, there is no sampler log-prob to correct with).

Per step the backend reports the trainer-vs-sampler gap (``actor/logprob_gap`` mean and
``actor/logprob_gap_p99``). On a step whose batch was all sampled by the current version
(on-policy) the gap should be ~0 (numerics only); above ``gap_warn`` the trainer logs
``trainer.logprob_gap`` loudly, at most once every ``gap_warn_every`` steps.

Checkpoints (``save_every``)
    ``checkpoint_dir/step-NNNNNN/`` holds ``backend/`` (the backend's own ``save``) and
    ``trainer.json``: step, policy version, the set of trajectory indices used, batcher
    counters. A checkpoint is written to a temporary directory and renamed, then the
    daemon's cursor advances to what it covers, then older checkpoints beyond
    ``keep_checkpoints`` are removed. :meth:`Trainer.resume` loads the newest one: the
    backend's weights and optimizer, the version (pushed to the engine), and the used set;
    trajectories stored after it are handed out again by the daemon and trained once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
import torch
from anyio.abc import TaskStatus

from lightning._errors import ConfigError
from lightning.algorithms.ppo import truncated_is_weights
from lightning.algorithms.tokens import seq_ids
from lightning.training.batch import TrainBatch, select_sequences
from lightning.training.batcher import Batch, Batcher, BatcherConfig, ConsumedSet

logger = structlog.get_logger()

__all__ = ["Trainer", "TrainerConfig", "latest_checkpoint"]

_STATE = "trainer.json"
_FORMAT = 1


class TrainerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The training loop's settings (the batcher's are in :class:`BatcherConfig`)."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run until cancelled)."""
    save_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end of :meth:`Trainer.run`
    when ``max_steps`` is reached)."""
    keep_checkpoints: int = 2
    """Newest checkpoints to keep."""
    tis_cap: float = 2.0
    """Truncation of the importance weight of stale sequences (``stale_policy="is"``)."""
    gap_warn: float = 0.01
    """Warn when an on-policy step's mean ``|trainer - sampler|`` log-prob gap exceeds this
    (nats): trainer and sampler do not score the same distribution."""
    gap_warn_every: int = 50
    """At most one gap warning per this many steps (the first one at once)."""

    def __post_init__(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not self.tis_cap >= 1.0:
            raise ValueError(f"tis_cap must be >= 1, got {self.tis_cap}")
        if not self.gap_warn > 0:
            raise ValueError(f"gap_warn must be > 0, got {self.gap_warn}")
        if self.gap_warn_every < 1:
            raise ValueError(f"gap_warn_every must be >= 1, got {self.gap_warn_every}")


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory under ``checkpoint_dir``, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / _STATE).exists())
    return done[-1] if done else None


class Trainer:
    """Trains ``backend`` on the trajectories of ``daemon.buffer`` and publishes the
    weights to ``engine`` (optional: without one the version is only counted).

    Args:
        daemon: the :class:`lightning._daemon.Daemon` whose buffer it reads.
        backend: a set-up backend (``lightning_backends.Backend``).
        engine: the serving engine (``update_weights``), or None.
        batcher: the :class:`Batcher` (default: one with ``BatcherConfig()``).
        config: :class:`TrainerConfig`.
        checkpoint_dir: where checkpoints go (None: no checkpoints).
        on_step: called with each step's metrics dict (in the event loop; keep it quick).
    """

    def __init__(
        self,
        daemon: Any,
        backend: Any,
        engine: Any = None,
        *,
        batcher: Batcher | None = None,
        config: TrainerConfig | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        on_step: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.backend = backend
        self.engine = engine
        self.batcher = batcher or Batcher(BatcherConfig())
        self.config = config or TrainerConfig()
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.on_step = on_step
        self.consumed = ConsumedSet()
        self.step = 0
        self.version = engine.policy_version if engine is not None else 0
        self.done = anyio.Event()
        self.last_metrics: dict[str, float] = {}
        self.trained_trajectories = 0
        """Trajectories used by the steps taken by this process (not before a resume)."""
        self._limiter = anyio.CapacityLimiter(1)
        bc = self.batcher.config
        if not hasattr(backend, "compute_logprobs"):
            if bc.stale_policy == "is":
                raise ConfigError(
                    f"stale_policy='is' needs a backend with compute_logprobs; "
                    f"{type(backend).__name__} has none: use stale_policy='drop'"
                )
            if bc.missing_logprobs == "recompute":
                raise ConfigError(
                    f"missing_logprobs='recompute' needs a backend with compute_logprobs; "
                    f"{type(backend).__name__} has none: use missing_logprobs='drop'"
                )
        self._gap_warned_at: int | None = None
        self._warned_unknown_sampling = False

    # ------------------------------------------------------------------ loop

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Train until ``max_steps`` (then checkpoint and set :attr:`done`) or cancellation."""
        buffer = self.daemon.buffer
        task_status.started()
        while not self._finished():
            wait = self.batcher.next_timeout()
            with anyio.move_on_after(1.0 if wait is None else min(wait + 0.01, 1.0)):
                self._take(await buffer.get())
            while True:  # everything already there, without waiting
                try:
                    self._take(buffer.get_nowait())
                except anyio.WouldBlock:
                    break
            self.batcher.expire()
            while not self._finished():
                batch = self.batcher.next_batch(self.version)
                if batch is None:
                    break
                await self._train(batch)
        if self.checkpoint_dir is not None and self.step and self._last_saved != self.step:
            await self.save()
        self.done.set()

    _last_saved = -1

    @property
    def consumed_trajectories(self) -> int:
        """Training trajectories this process is done with: trained on, or set aside
        (failed, uniform group, no tokens). A runner paces itself with it."""
        return self.trained_trajectories + self.batcher.counters["set_aside_train"]

    def _finished(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _take(self, traj: Any) -> None:
        if traj.index in self.consumed:  # trained before the checkpoint we resumed from
            self.batcher.counters["skipped_consumed"] += 1
            return
        self.batcher.add(traj, version=self.version)

    async def _train(self, pb: Batch) -> None:
        t0 = time.perf_counter()
        on_policy = bool((pb.batch.policy_versions >= self.version).all())
        batch = await anyio.to_thread.run_sync(self._rescore, pb, limiter=self._limiter)
        metrics = await anyio.to_thread.run_sync(
            self.backend.train_step, batch, limiter=self._limiter
        )
        self._check_gap(metrics, on_policy)
        self.step += 1
        t1 = time.perf_counter()
        if self.engine is not None:
            weights = await anyio.to_thread.run_sync(
                self.backend.export_weights, limiter=self._limiter
            )
            self.version = await self.engine.update_weights(weights)
            del weights
        else:
            self.version += 1
        # counted once the new weights serve, so a pacing runner samples from them
        self.trained_trajectories += int(pb.metrics["batch/trajectories"])
        for i in pb.consumed + self.batcher.take_set_aside():
            self.consumed.add(i)
        out = {
            **pb.metrics,
            **metrics,
            "train/step": float(self.step),
            "train/policy_version": float(self.version),
            "perf/train_s": t1 - t0,
            "perf/publish_s": time.perf_counter() - t1,
            "perf/tokens_per_s": float(batch.num_tokens) / max(t1 - t0, 1e-9),
        }
        self.last_metrics = out
        logger.info("trainer.step", **{k: round(v, 5) for k, v in out.items()})
        if self.on_step is not None:
            self.on_step(out)
        every = self.config.save_every
        if self.checkpoint_dir is not None and every and self.step % every == 0:
            await self.save()

    def _rescore(self, pb: Batch) -> TrainBatch:
        """The trainer's log-probs for the sequences that need them (see the module
        docstring), scored once; the batch unchanged when none does."""
        batch = pb.batch
        act = batch.action_mask  # [T]
        missing = torch.isnan(batch.old_logprobs) & act  # [T]
        seq_len = batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]  # [B]
        owner = seq_ids(batch.cu_seqlens)  # [T]
        need = pb.stale.clone()  # [B]
        need[owner[missing]] = True
        if not bool(need.any()):
            return batch
        sub, pos = select_sequences(batch, need.nonzero().squeeze(-1))
        lp = torch.zeros(batch.num_tokens, dtype=torch.float32)  # [T]
        lp[pos] = self.backend.compute_logprobs(sub).float().cpu()  # [T_sel]
        stale_tok = torch.repeat_interleave(pb.stale, seq_len) & act & ~missing  # [T]
        old = batch.old_logprobs  # [T]
        is_w = None
        if bool(stale_tok.any()) or batch.is_weights is not None:
            w = truncated_is_weights(lp, torch.nan_to_num(old), cap=self.config.tis_cap)  # [T]
            is_w = torch.where(stale_tok, w, 1.0)  # [T]
            if batch.is_weights is not None:
                is_w = is_w * batch.is_weights
        old = torch.where(stale_tok | missing, lp, old)  # [T]
        return dataclasses.replace(batch, old_logprobs=old, is_weights=is_w)

    def _check_gap(self, metrics: dict[str, float], on_policy: bool) -> None:
        """Loud, rate-limited warnings: an on-policy gap above ``gap_warn``; tokens scored at
        the configured temperature because their sampling was unknown (once)."""
        gap = metrics.get("actor/logprob_gap", 0.0)
        every = self.config.gap_warn_every
        if on_policy and gap > self.config.gap_warn and (
            self._gap_warned_at is None or self.step - self._gap_warned_at >= every
        ):
            self._gap_warned_at = self.step
            logger.warning(
                "trainer.logprob_gap", step=self.step + 1, gap_mean=round(gap, 5),
                gap_p99=round(metrics.get("actor/logprob_gap_p99", 0.0), 5),
                threshold=self.config.gap_warn,
                consequence="on this on-policy step the trainer does not score the "
                "distribution the sampler drew from: PPO ratios and clipping are biased",
                fix="record the sampling parameters and log-prob convention with each "
                "transition (see README 'Sampling parameters'); next warning in "
                f"{every} steps at the earliest",
            )
        unknown = metrics.get("data/unknown_temperature_tokens", 0.0)
        if unknown and not self._warned_unknown_sampling:
            self._warned_unknown_sampling = True
            logger.warning(
                "trainer.unknown_sampling", step=self.step + 1, tokens=int(unknown),
                rule="tokens whose sampling temperature is unknown are scored at the "
                "backend's configured temperature (metric data/unknown_temperature_tokens)",
            )

    # ------------------------------------------------------------------ checkpoints

    async def save(self) -> Path:
        """Write a checkpoint of the current step (see the module docstring)."""
        if self.checkpoint_dir is None:
            raise ConfigError("this trainer has no checkpoint_dir")
        for i in self.batcher.take_set_aside():
            self.consumed.add(i)
        final = self.checkpoint_dir / f"step-{self.step:06d}"
        tmp = self.checkpoint_dir / f".step-{self.step:06d}.tmp"
        state = {
            "format": _FORMAT,
            "step": self.step,
            "policy_version": self.version,
            "consumed": self.consumed.to_dict(),
            "counters": dict(self.batcher.stats()),
            "saved_at": time.time(),
        }

        def write() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.backend.save(str(tmp / "backend"))
            (tmp / _STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

        t0 = time.perf_counter()
        await anyio.to_thread.run_sync(write, limiter=self._limiter)
        self._last_saved = self.step
        if self.consumed.through >= 0:
            self.daemon.buffer.commit(self.consumed.through)
        old = sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir())
        for p in old[: -self.config.keep_checkpoints]:
            shutil.rmtree(p, ignore_errors=True)
        logger.info(
            "trainer.checkpoint", path=str(final), step=self.step, policy_version=self.version,
            seconds=round(time.perf_counter() - t0, 2),
        )
        return final

    async def resume(self, path: str | os.PathLike | None = None) -> bool:
        """Load ``path`` (default: the newest checkpoint in ``checkpoint_dir``); False if
        there is none. Call before :meth:`run`, with the engine serving."""
        if path is None:
            if self.checkpoint_dir is None:
                return False
            found = latest_checkpoint(self.checkpoint_dir)
            if found is None:
                return False
            path = found
        root = Path(path)
        try:
            state = json.loads((root / _STATE).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{str(root)!r} is not a trainer checkpoint: {exc}") from exc
        if state.get("format") != _FORMAT:
            raise ConfigError(
                f"checkpoint {str(root)!r} has format {state.get('format')}, expected {_FORMAT}"
            )
        await anyio.to_thread.run_sync(self.backend.load, str(root / "backend"))
        self.step = int(state["step"])
        self.consumed = ConsumedSet.from_dict(state["consumed"])
        version = int(state["policy_version"])
        if self.engine is not None:
            weights = await anyio.to_thread.run_sync(self.backend.export_weights)
            if version > self.engine.policy_version:
                self.version = await self.engine.update_weights(weights, version=version)
            else:
                self.version = await self.engine.update_weights(weights)
        else:
            self.version = version
        self._last_saved = self.step
        logger.info(
            "trainer.resumed", path=str(root), step=self.step, policy_version=self.version,
            consumed_through=self.consumed.through,
        )
        return True


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` without NaN/inf values (for JSON lines)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
