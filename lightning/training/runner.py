"""Drive a ``@lightning.rollout`` agent over a dataset: training groups and evaluation.

The agent is the app's own function, unchanged: ``agent(task)`` (sync or async) returns a
reward (or emits one). :func:`run_training_rollouts` calls it ``group_size`` times per
task under :func:`lightning.rollout_options` with the group key ``"<epoch>:<task id>"``,
so the daemon's batcher can form groups, keeping ``concurrency`` rollouts in flight, task
after task (reshuffled each epoch), until ``stop`` is set. :func:`evaluate` runs held-out
tasks marked ``split="eval"``, which the batcher never trains on, and returns the rewards.

A rollout that raises is a failed rollout (the daemon's batcher applies its failure
policy); the runner logs it (repeats aggregate in the entry points' logging) and goes on,
unless failures are systematic: a :class:`~lightning.training.failures.FailureMonitor`
raises :class:`~lightning.training.failures.AgentFailingError` (the first exception with
its traceback, the counts, a hint) when the first rollouts all fail or the recent failure
rate passes its limit, and :func:`evaluate` raises it when every evaluation rollout failed.
Sync agents run in worker threads, with the caller's context (and so the rollout options)
copied in.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import structlog

from .failures import AgentFailingError, FailureMonitor, FailurePolicy

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency on Python 3.10

logger = structlog.get_logger()

__all__ = ["AgentFailingError", "EvalResult", "FailurePolicy", "evaluate", "run_training_rollouts",
           "task_id"]


def task_id(task: Any, position: int) -> str:
    """A task's id: its ``"id"`` field when it is a mapping with one, else its position."""
    if isinstance(task, dict) and "id" in task:
        return str(task["id"])
    return str(position)


async def _call(agent: Callable[..., Any], task: Any) -> Any:
    if inspect.iscoroutinefunction(agent):
        return await agent(task)
    result = await anyio.to_thread.run_sync(agent, task)
    if inspect.isawaitable(result):
        result = await result
    return result


_NEVER = FailurePolicy(first_n=0, window=0)


@contextlib.contextmanager
def _raise_agent_failing() -> Iterator[None]:
    """Out of a task group, an :class:`AgentFailingError` rises alone (not in a group)."""
    try:
        yield
    except BaseExceptionGroup as group:
        failing, _ = group.split(AgentFailingError)
        if failing is None:
            raise
        while isinstance(failing, BaseExceptionGroup):
            failing = failing.exceptions[0]
        raise failing from None


def _as_reward(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


async def run_training_rollouts(
    agent: Callable[..., Any],
    tasks: Sequence[Any],
    *,
    group_size: int,
    concurrency: int,
    stop: anyio.Event,
    seed: int = 0,
    on_result: Callable[[str, float | None], None] | None = None,
    consumed: Callable[[], int] | None = None,
    max_ahead: int | None = None,
    failure_policy: FailurePolicy | None = FailurePolicy(),
) -> int:
    """Run groups of rollouts until ``stop`` is set; returns how many rollouts finished.

    Pacing: with ``consumed`` (how many of this runner's rollouts the trainer is done
    with, e.g. ``trainer.consumed_trajectories``) and ``max_ahead``, a new group starts only
    while fewer than ``max_ahead`` rollouts are started and not yet consumed, so the
    runner does not sample far ahead of the policy it trains (staleness, wasted work).
    ``max_ahead = batch_size`` alternates sampling and training; larger overlaps them.

    Raises:
        ValueError: no tasks, or ``group_size``/``concurrency`` below 1.
        AgentFailingError: rollouts fail systematically (``failure_policy``; None never
            stops).
    """
    import lightning

    if not tasks:
        raise ValueError("the training dataset is empty")
    if group_size < 1 or concurrency < 1:
        raise ValueError(f"group_size and concurrency must be >= 1, got {group_size}, {concurrency}")
    rng = random.Random(seed)
    slots = anyio.Semaphore(concurrency)
    finished = started = 0
    monitor = FailureMonitor(failure_policy or _NEVER, phase="training")

    async def one(key: str, attempt: int, task: Any) -> None:
        nonlocal finished
        try:
            with lightning.rollout_options(group_key=key, attempt=attempt,
                                           metadata={"split": "train"}):
                value = await _call(agent, task)
        except Exception as exc:  # noqa: BLE001 - the daemon records the failure; go on
            finished += 1
            logger.warning("runner.rollout_failed", group_key=key, error=repr(exc))
            monitor.failure(exc)  # raises AgentFailingError when failures are systematic
            value = None
        else:
            finished += 1
            monitor.ok()
        finally:
            slots.release()
        if on_result is not None:
            on_result(key, _as_reward(value))

    with _raise_agent_failing():
        async with anyio.create_task_group() as tg:

            async def watch_stop() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_stop)
            epoch = 0
            while True:
                order = list(range(len(tasks)))
                rng.shuffle(order)
                for pos in order:
                    key = f"{epoch}:{task_id(tasks[pos], pos)}"
                    if consumed is not None and max_ahead is not None:
                        while started - consumed() + group_size > max(max_ahead, group_size):
                            await anyio.sleep(0.05)
                    started += group_size
                    for attempt in range(group_size):
                        await slots.acquire()
                        tg.start_soon(one, key, attempt, tasks[pos])
                epoch += 1
    return finished


class EvalResult:
    """Rewards of an evaluation: ``rewards[i][j]`` is sample ``j`` of task ``i``."""

    def __init__(self, rewards: list[list[float]]) -> None:
        self.rewards = rewards

    @property
    def per_task(self) -> list[float]:
        return [sum(r) / len(r) for r in self.rewards]

    @property
    def mean(self) -> float:
        per = self.per_task
        return sum(per) / len(per) if per else 0.0

    @property
    def stderr(self) -> float:
        """Standard error of :attr:`mean` over tasks."""
        per = self.per_task
        n = len(per)
        if n < 2:
            return 0.0
        m = sum(per) / n
        return math.sqrt(sum((x - m) ** 2 for x in per) / (n - 1) / n)

    @property
    def samples(self) -> int:
        return sum(len(r) for r in self.rewards)


async def evaluate(
    agent: Callable[..., Any],
    tasks: Sequence[Any],
    *,
    samples_per_task: int = 1,
    concurrency: int = 16,
    on_done: Callable[[], None] | None = None,
    failure_policy: FailurePolicy | None = FailurePolicy(),
) -> EvalResult:
    """Run every task ``samples_per_task`` times as evaluation rollouts (never trained on).

    A rollout that fails or returns no number scores 0.

    Raises:
        AgentFailingError: every evaluation rollout failed, or the ``failure_policy`` rule
            tripped on the way (None: only the every-rollout-failed check).
    """
    import lightning

    rewards = [[0.0] * samples_per_task for _ in tasks]
    slots = anyio.Semaphore(concurrency)
    monitor = FailureMonitor(failure_policy or _NEVER, phase="evaluation")

    async def one(i: int, j: int) -> None:
        async with slots:
            try:
                with lightning.rollout_options(group_key=f"eval:{task_id(tasks[i], i)}",
                                               attempt=j, metadata={"split": "eval"}):
                    value = await _call(agent, tasks[i])
            except Exception as exc:  # noqa: BLE001 - a failed eval rollout scores 0
                logger.warning("runner.eval_failed", task=i, error=repr(exc))
                monitor.failure(exc)  # raises AgentFailingError when failures are systematic
                value = None
            else:
                monitor.ok()
        rewards[i][j] = _as_reward(value) or 0.0
        if on_done is not None:
            on_done()

    with _raise_agent_failing():
        async with anyio.create_task_group() as tg:
            for i in range(len(tasks)):
                for j in range(samples_per_task):
                    tg.start_soon(one, i, j)
    monitor.all_failed()
    return EvalResult(rewards)
