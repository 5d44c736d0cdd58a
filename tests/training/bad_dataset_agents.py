"""An agent module whose dataset() returns the wrong shape (tests/training/test_fail_fast.py)."""

import lightning


@lightning.rollout
async def agent(task: dict) -> float:
    return 1.0


def dataset():  # takes no seed (allowed), returns one list instead of a pair (not allowed)
    return [{"id": 1}, {"id": 2}, {"id": 3}]
