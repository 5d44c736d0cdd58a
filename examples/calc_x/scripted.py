"""A scripted policy for the Calc-X example: ``--engine scripted --script calc_x.scripted:reply``.

For CI and demos of the whole loop without a model that can call tools: each rollout calls
the MCP calculator once, then answers with the result, through AutoGen's real tool loop.
Half of the calls (decided by the request's seed, so a group of samples gets both
outcomes and GRPO has something to learn from) carry the problem's gold expression, found
by matching the question against :data:`make_data.TEMPLATES`; the other half add the
question's first two numbers, which is almost always wrong (for 4 of the 400 bundled
problems it happens to be right).

    lightning train --agent examples/calc_x/agent.py:agent --model tiny \\
        --engine scripted --script calc_x.scripted:reply --steps 2 --group-size 4 \\
        --batch-size 8 --eval-tasks 8
"""

from __future__ import annotations

import random
import re
from typing import Any

from .make_data import TEMPLATES

__all__ = ["expression_for", "reply"]


def _pattern(text: str) -> re.Pattern[str]:
    rx = re.escape(text)
    rx = rx.replace(r"\{name\}", r"\w+").replace(r"\{item\}", r"\w+")
    for key in "abcd":
        rx = rx.replace(rf"\{{{key}\}}", rf"(?P<{key}>\d+)")
    return re.compile(rx)


_PATTERNS = [(_pattern(t.text), t.expression) for t in TEMPLATES]


def expression_for(question: str) -> str | None:
    """The gold expression of a generated problem, or None for any other text."""
    for pattern, expression in _PATTERNS:
        m = pattern.fullmatch(question.strip())
        if m:
            return expression.format(**m.groupdict())
    return None


def reply(req: Any) -> Any:
    """One scripted model reply: a calculator call on the first turn, then the answer."""
    from lightning.engine.scripted import Reply, ToolCall

    if req.tool_results:
        return f"The answer is {req.tool_results[-1]}."
    numbers = re.findall(r"\d+", req.last_user)
    gold = expression_for(req.last_user)
    if gold is not None and random.Random(req.seed).random() < 0.5:
        expression = gold
    else:
        expression = " + ".join(numbers[:2]) or "1 + 1"
    return Reply(text="", tool_calls=[ToolCall("calculator", {"expression": expression})])
