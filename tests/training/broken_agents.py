"""Agents that fail, and agent modules whose dataset() breaks its contract (for
tests/training/test_fail_fast.py, run by ``lightning train --agent broken_agents:...``)."""

from __future__ import annotations

import itertools

import lightning

_calls = itertools.count()


@lightning.rollout(name="needs_a_missing_module")
async def missing_module(task: dict) -> float:
    import lightning_test_missing_module  # noqa: F401 - the point: it does not exist

    return 1.0


@lightning.rollout(name="mostly_fails")
async def mostly_fails(task: dict) -> float:
    if next(_calls) % 25:  # 24 of every 25 rollouts raise, the first one succeeds
        raise RuntimeError("the tool backend is down")
    return 1.0


def dataset(seed: int = 0) -> tuple[list[dict], list[dict]]:
    return [{"id": i} for i in range(8)], [{"id": 100 + i} for i in range(4)]
