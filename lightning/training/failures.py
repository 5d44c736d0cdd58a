"""Stop a run whose agent fails systematically, and say why.

An agent that cannot run (a missing module, a wrong endpoint, a bug on every path) makes
every rollout raise. Without a check, a runner logs a warning per rollout and samples on
forever. :class:`FailureMonitor` watches the outcomes of a runner's rollouts and trips when

- every one of the first ``first_n`` rollouts failed, or
- over the last ``window`` finished rollouts, more than ``max_rate`` of them failed,

raising :class:`AgentFailingError`, which carries the first exception (with its traceback),
the counts, and a hint where one is obvious (a missing module names its pip command).

Pure Python: no torch, no I/O; the runner feeds it and the caller prints
:meth:`AgentFailingError.report`.
"""

from __future__ import annotations

import traceback
from collections import deque
from dataclasses import dataclass

from .._errors import LightningError

__all__ = ["AgentFailingError", "FailurePolicy", "FailureMonitor", "hint_for"]

# import name -> distribution name, where they differ (the common cases)
_PIP_NAMES = {
    "sklearn": "scikit-learn", "yaml": "pyyaml", "cv2": "opencv-python", "PIL": "pillow",
    "bs4": "beautifulsoup4", "dateutil": "python-dateutil", "attr": "attrs",
    "langchain_openai": "langchain-openai", "agents": "openai-agents",
    "autogen_agentchat": "autogen-agentchat", "autogen_ext": "autogen-ext[openai]",
    "google.generativeai": "google-generativeai", "dotenv": "python-dotenv",
}


def hint_for(exc: BaseException) -> str | None:
    """A fix for the common systematic failures, or None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return f"pip install {_PIP_NAMES.get(exc.name, _PIP_NAMES.get(top, top))}"
    if isinstance(exc, ImportError):
        return "an import in the agent fails: install or fix the package it names"
    name = type(exc).__name__
    if name in ("APIConnectionError", "ConnectError", "ConnectionRefusedError"):
        return ("the agent cannot reach its LLM endpoint: build its client from "
                "lightning.llm() (base_url, api_key, model)")
    if name == "NotFoundError" and "model" in str(exc):
        return ("the policy server does not know the model the agent asks for: use "
                "lightning.llm().model, or --model-alias / --accept-any-model on the daemon")
    return None


@dataclass(frozen=True)
class FailurePolicy:
    """When a runner gives up on a failing agent.

    Attributes:
        first_n: stop when each of the first ``first_n`` rollouts failed (0: never).
        window: the number of recent rollouts the failure rate is taken over (0: never).
        max_rate: stop when more than this share of the last ``window`` rollouts failed.
    """

    first_n: int = 8
    window: int = 64
    max_rate: float = 0.95

    def __post_init__(self) -> None:
        if self.first_n < 0 or self.window < 0:
            raise ValueError(f"first_n and window must be >= 0, got {self.first_n}, {self.window}")
        if not 0.0 <= self.max_rate <= 1.0:
            raise ValueError(f"max_rate must be in [0, 1], got {self.max_rate}")


class AgentFailingError(LightningError):
    """The agent's rollouts fail systematically; ``.first`` is the first exception."""

    def __init__(self, phase: str, failed: int, finished: int, first: BaseException,
                 rule: str) -> None:
        self.phase = phase
        self.failed = failed
        self.finished = finished
        self.first = first
        self.rule = rule
        self.hint = hint_for(first)
        msg = (f"the agent's rollouts fail systematically ({phase}): {failed} of {finished} "
               f"failed ({rule}); first error: {type(first).__name__}: {first}")
        if self.hint:
            msg += f"; hint: {self.hint}"
        super().__init__(msg)

    def report(self) -> str:
        """The message, then the first failure's traceback."""
        tb = "".join(traceback.format_exception(type(self.first), self.first,
                                                self.first.__traceback__))
        return f"{self}\n\nfirst failure:\n{tb.rstrip()}"


class FailureMonitor:
    """Counts a runner's rollout outcomes and raises when the policy's rule trips."""

    def __init__(self, policy: FailurePolicy | None = None, *, phase: str = "training") -> None:
        self.policy = policy or FailurePolicy()
        self.phase = phase
        self.finished = 0
        self.failed = 0
        self.first: BaseException | None = None
        self._recent: deque[bool] = deque(maxlen=max(self.policy.window, 1))
        self._recent_failed = 0

    def ok(self) -> None:
        self._add(False)

    def failure(self, exc: BaseException) -> None:
        """Record a failed rollout; raises :class:`AgentFailingError` when the rule trips."""
        if self.first is None:
            self.first = exc
        self._add(True)
        self.check()

    def _add(self, failed: bool) -> None:
        if self.policy.window and len(self._recent) == self._recent.maxlen:
            self._recent_failed -= self._recent[0]
        self._recent.append(failed)
        self._recent_failed += failed
        self.finished += 1
        self.failed += failed

    def check(self) -> None:
        p = self.policy
        if self.first is None:
            return
        if p.first_n and self.finished == self.failed >= p.first_n:
            self._trip(f"each of the first {p.first_n} failed")
        if (p.window and len(self._recent) == p.window
                and self._recent_failed > p.max_rate * p.window):
            self._trip(f"{self._recent_failed} of the last {p.window} failed, over "
                       f"the {p.max_rate:.0%} limit")

    def all_failed(self) -> None:
        """Raise when every finished rollout failed (the end of an evaluation)."""
        if self.first is not None and self.finished == self.failed:
            self._trip("every rollout failed")

    def _trip(self, rule: str) -> None:
        assert self.first is not None
        raise AgentFailingError(self.phase, self.failed, self.finished, self.first, rule)
