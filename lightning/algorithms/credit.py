"""Credit assignment: one trajectory's rewards -> one return per transition.

Pure Python (no torch): it runs once per finished trajectory in the daemon.

Attribution of a reward (or an AIR step reward) with ``after = k``
    ``after`` is the number of transitions the rollout had recorded when the reward was
    emitted, so the reward follows transition ``k - 1`` and is credited to it. Out-of-range
    values are clamped, never dropped:

    - ``after == 0`` (emitted before the first LLM call) -> transition 0: the trajectory
      earned it, and the first action is the earliest one that can carry it;
    - ``after > n`` (cannot happen with a well-behaved client) -> transition ``n - 1``.

    The final reward (the rollout's return value) is credited to the last transition.
    A trajectory with no transitions has no returns (``[]``).

Methods (registry :data:`CREDIT`, all ``(n, rewards, final_reward, *, gamma) -> list[float]``)
    - ``final``: every transition gets the *outcome*: ``final_reward``, or, when the rollout
      returned no number, the sum of its emitted rewards (agents that ``emit_reward`` once at
      the end). Intermediate rewards are otherwise ignored.
    - ``discounted``: transition ``i`` of ``n`` gets ``gamma ** (n - 1 - i) * outcome``.
    - ``returns_to_go``: per-transition rewards ``r_i`` (attributed as above, plus the final
      reward on the last transition) summed as ``G_i = r_i + gamma * G_{i+1}``.

Failed trajectories (``status`` other than ``"completed"``: ``failed`` or ``cancelled``)
    ``on_failure="drop"`` -> :func:`assign_credit` returns ``None`` (no training sample);
    ``on_failure="zero"`` -> the final reward is replaced by ``failure_reward`` (default
    0.0), intermediate rewards (e.g. AIR's tool-error penalties) still count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

__all__ = [
    "CREDIT",
    "CreditFn",
    "assign_credit",
    "attribute",
    "discounted",
    "final",
    "get_credit",
    "per_transition_rewards",
    "returns_to_go",
]


class CreditFn(Protocol):
    def __call__(
        self,
        n: int,
        rewards: Sequence[tuple[int, float]],
        final_reward: float | None,
        *,
        gamma: float = 1.0,
    ) -> list[float]: ...


def attribute(after: int, n: int) -> int:
    """Index of the transition a reward with ``after`` is credited to (``n >= 1``)."""
    return min(max(after, 1), n) - 1


def _pairs(rewards: Iterable[Any]) -> list[tuple[int, float]]:
    """Accept ``(after, value)`` tuples, :class:`StepReward`s or protocol ``Reward``s."""
    out = []
    for r in rewards:
        after, value = (r.after, r.value) if hasattr(r, "after") else (r[0], r[1])
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"reward values must be finite, got {value} (after={after})")
        out.append((int(after), value))
    return out


def per_transition_rewards(
    n: int, rewards: Iterable[Any], final_reward: float | None = None
) -> list[float]:
    """Rewards summed per transition (see the attribution rule above), length ``n``."""
    out = [0.0] * n
    if n == 0:
        return out
    for after, value in _pairs(rewards):
        out[attribute(after, n)] += value
    if final_reward is not None:
        out[-1] += float(final_reward)
    return out


def _outcome(rewards: Sequence[tuple[int, float]], final_reward: float | None) -> float:
    if final_reward is not None:
        return float(final_reward)
    return sum(v for _, v in _pairs(rewards))


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")


def final(
    n: int, rewards: Sequence[tuple[int, float]], final_reward: float | None, *, gamma: float = 1.0
) -> list[float]:
    """The outcome on every transition (``gamma`` is ignored)."""
    return [_outcome(rewards, final_reward)] * n


def discounted(
    n: int, rewards: Sequence[tuple[int, float]], final_reward: float | None, *, gamma: float = 1.0
) -> list[float]:
    """The outcome discounted back from the last transition: ``gamma ** (n - 1 - i) * outcome``."""
    _check_gamma(gamma)
    outcome = _outcome(rewards, final_reward)
    return [outcome * gamma ** (n - 1 - i) for i in range(n)]


def returns_to_go(
    n: int, rewards: Sequence[tuple[int, float]], final_reward: float | None, *, gamma: float = 1.0
) -> list[float]:
    """Discounted returns-to-go of the per-transition rewards, final reward included."""
    _check_gamma(gamma)
    r = per_transition_rewards(n, rewards, final_reward)
    out = [0.0] * n
    g = 0.0
    for i in reversed(range(n)):
        g = r[i] + gamma * g
        out[i] = g
    return out


CREDIT: dict[str, CreditFn] = {
    "final": final,
    "discounted": discounted,
    "returns_to_go": returns_to_go,
}


def get_credit(method: str | CreditFn) -> CreditFn:
    """A credit function by name (``final``, ``discounted``, ``returns_to_go``) or itself."""
    if callable(method):
        return method
    try:
        return CREDIT[method]
    except KeyError:
        raise ValueError(
            f"unknown credit method {method!r}: choose one of {sorted(CREDIT)}"
        ) from None


def assign_credit(
    trajectory: Any,
    method: str | CreditFn = "returns_to_go",
    *,
    gamma: float = 1.0,
    extra_rewards: Iterable[Any] = (),
    on_failure: Literal["drop", "zero"] = "drop",
    failure_reward: float = 0.0,
) -> list[float] | None:
    """One return per transition of ``trajectory`` (a :class:`lightning._ingest.Trajectory`).

    ``extra_rewards`` are added to the trajectory's own rewards: AIR step rewards, or any
    ``(after, value)`` pairs. Returns ``None`` for a failed trajectory when
    ``on_failure="drop"``.

    Raises:
        ValueError: unknown ``method`` or ``on_failure``, ``gamma`` outside [0, 1], a
            non-finite reward.
    """
    if on_failure not in ("drop", "zero"):
        raise ValueError(f"on_failure must be 'drop' or 'zero', got {on_failure!r}")
    fn = get_credit(method)
    fr = trajectory.final_reward
    if trajectory.status != "completed":
        if on_failure == "drop":
            return None
        fr = failure_reward
    rewards = _pairs(trajectory.rewards) + _pairs(extra_rewards)
    return fn(len(trajectory.transitions), rewards, fr, gamma=gamma)
