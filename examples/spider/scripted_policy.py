"""A scripted policy for the Spider agent: a wrong query first, the gold one on rewrite.

    lightning train --agent examples/spider/agent.py:agent --model tiny --engine scripted \\
        --script spider.scripted_policy:alternating --steps 2 --group-size 2 --batch-size 4

For CI and demos of the whole loop without a model that can write SQL: on the first call
it answers with a query on a column that does not exist (the database errors, the ``run_sql``
span fails), and on the rewrite with the gold query of the bundled question it was asked
(looked up by the question's text), so every rollout takes two LLM calls and scores 1.0.
A question it does not know gets ``SELECT 1`` (a wrong answer that runs).

:func:`script` always rewrites to the gold query (every rollout scores 1.0). Training needs
groups whose rewards differ (GRPO sets uniform groups aside, so a run on :func:`script`
never reaches a step): :func:`alternating` makes a script whose rewrites of the same
question alternate between the gold query and ``SELECT 1``, so the two samples of a
group score 1 and 0.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from .data import DATA_DIR

__all__ = ["WRONG_QUERY", "alternating", "gold_for", "script"]

WRONG_QUERY = "SELECT no_such_column FROM sqlite_master"
_QUESTION = re.compile(r"^Question: (.*)$", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def _gold() -> dict[str, str]:
    data = json.loads((DATA_DIR / "questions.json").read_text(encoding="utf-8"))
    return {q["question"]: q["query"] for q in data["train"] + data["test"]}


def gold_for(messages: list[dict[str, Any]]) -> str | None:
    """The gold SQL of the last question asked in ``messages`` (None if not bundled)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            found = _QUESTION.findall(m.get("content") or "")
            if found:
                return _gold().get(found[-1].strip())
    return None


def script(req: Any) -> str:
    """ScriptedEngine script: ``req.messages`` holds the few-shot turns too, so the
    rewrite is recognised by the feedback the agent appends (the last user message does
    not start with ``Schema:``)."""
    if (req.last_user or "").startswith("Schema:"):
        return f"```sql\n{WRONG_QUERY}\n```"
    return gold_for(req.messages) or "SELECT 1"


def alternating() -> Any:
    """A zero-argument factory (what ``--script`` accepts): a stateful script whose
    rewrites of each question alternate between the gold query and a wrong one."""
    import threading

    counts: dict[str, int] = {}
    lock = threading.Lock()

    def alternating_script(req: Any) -> str:
        if (req.last_user or "").startswith("Schema:"):
            return script(req)
        gold = gold_for(req.messages)
        with lock:
            k = counts.get(gold or "", 0)
            counts[gold or ""] = k + 1
        return (gold or "SELECT 1") if k % 2 == 0 else "SELECT 1"

    return alternating_script
