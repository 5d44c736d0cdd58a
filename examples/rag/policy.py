"""A scripted policy for CI: ``lightning train ... --engine scripted --script rag.policy:script``.

It plays a noisy version of the intended behaviour, so a CI run has tool loops and groups
with different rewards: after the given first search it either answers at once with the
last name in the top result (right for one-hop questions) or, half the time, searches that
name and answers with the last name of what comes back (right for two-hop questions).
The choice alternates request by request (a counter), so the samples of a group differ.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

__all__ = ["script"]

_COUNTER = itertools.count()
_NAME = re.compile(r"(?:[A-Z][a-z]+)(?: [A-Z][a-z]+)?")


def _last_name(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    body = first.split(": ", 1)[-1]
    names = _NAME.findall(body.replace("Its ", "its ").replace("It ", "it "))
    return names[-1] if names else "unknown"


def script(req: Any) -> Any:
    from lightning.engine.scripted import Reply, ToolCall

    results = req.tool_results[-1] if req.tool_results else ""
    own = sum(1 for m in req.messages if m["role"] == "assistant" and m.get("tool_calls"))
    coin = next(_COUNTER) % 2
    if own <= 3 and coin and results:  # the worked example's 2 calls + the given search
        return Reply(text="", tool_calls=[ToolCall("search", {"query": _last_name(results)})])
    return f"Answer: {_last_name(results)}"
