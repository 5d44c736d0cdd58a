"""Calc-X: arithmetic word problems solved with a calculator tool.

The embedded default task of ``lightning train``. The model reads a word problem and
writes the calculation; the agent hands the first arithmetic expression in the reply to a
calculator tool (a ``@lightning.tool``, so its success or error is recorded for AIR) and
scores 1 when the tool's result is the answer, else 0. The model never has to do the
arithmetic itself; it has to pick the right numbers and operation and say so briefly.

The problems are generated from templates with a seeded RNG (no download): ``+``, ``-``,
``*`` and exact ``/`` over small integers. :func:`dataset` gives disjoint train and test
splits: no ``(template, numbers)`` pair of the test split is in the train split.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from typing import Any

import lightning

__all__ = ["FEW_SHOT", "SYSTEM_PROMPT", "agent", "calculator", "dataset", "extract_expression", "messages", "score"]

SYSTEM_PROMPT = "Write the calculation that answers the question."

#: Two solved examples put before the question (a 135M model needs to see the format).
FEW_SHOT: tuple[tuple[str, str], ...] = (
    ("Tom has 3 apples and buys 5 more. How many apples does Tom have?", "3 + 5"),
    ("A box has 20 pencils and 6 are taken out. How many pencils are left?", "20 - 6"),
)

# (operation, template); {a} and {b} are the operands, the answer is a OP b.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("+", "Sam has {a} marbles and finds {b} more. How many marbles does Sam have now?"),
    ("+", "A library had {a} books and got {b} new ones. How many books does it have now?"),
    ("+", "Mia ran {a} meters in the morning and {b} meters in the evening. How many meters did she run?"),
    ("-", "A shop had {a} apples and sold {b}. How many apples are left?"),
    ("-", "Leo had {a} stickers and gave {b} to a friend. How many stickers does Leo have left?"),
    ("-", "A bus had {a} passengers and {b} got off. How many passengers are still on the bus?"),
    ("*", "There are {a} boxes with {b} pens in each box. How many pens are there?"),
    ("*", "A farmer plants {a} rows with {b} trees in each row. How many trees are there?"),
    ("/", "{a} cookies are shared equally among {b} children. How many cookies does each child get?"),
    ("/", "A rope of {a} meters is cut into {b} equal pieces. How long is each piece in meters?"),
)

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_EXPR = re.compile(r"\(?\s*-?\d+(?:\.\d+)?(?:\s*[-+*/×x÷]\s*\(?\s*-?\d+(?:\.\d+)?\s*\)?)+")


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "+":
        return rng.randint(2, 99), rng.randint(2, 99)
    if op == "-":
        a, b = rng.randint(10, 99), rng.randint(2, 99)
        return (a, b) if a > b else (b + a, a)
    if op == "*":
        return rng.randint(2, 30), rng.randint(2, 9)
    b = rng.randint(2, 9)
    return b * rng.randint(2, 20), b


def dataset(
    n_train: int = 400, n_test: int = 100, *, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)`` problems: dicts with ``id``, ``question``, ``answer``, ``op``."""
    rng = random.Random(seed)
    seen: set[tuple[int, int, int]] = set()
    out: list[dict[str, Any]] = []
    while len(out) < n_train + n_test:
        t = rng.randrange(len(_TEMPLATES))
        op, text = _TEMPLATES[t]
        a, b = _operands(rng, op)
        if (t, a, b) in seen:
            continue
        seen.add((t, a, b))
        answer = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        out.append({"id": f"calc-{len(out)}", "question": text.format(a=a, b=b),
                    "answer": answer, "op": op})
    return out[:n_train], out[n_train:]


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Mult) and abs(left * right) > 1e12:
            raise ValueError("result too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression element {type(node).__name__}")


@lightning.tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression (+ - * / // % and parentheses); returns the
    result as text, or ``error: ...``."""
    expr = expression.replace("×", "*").replace("÷", "/").replace("x", "*")
    try:
        value = _eval_node(ast.parse(expr, mode="eval"))
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def extract_expression(text: str) -> str | None:
    """The first arithmetic expression (two or more numbers and operators) in ``text``."""
    m = _EXPR.search(text or "")
    return m.group(0).strip() if m else None


def score(result: str, answer: float) -> float:
    """1.0 when the calculator's ``result`` equals ``answer``, else 0.0."""
    try:
        return 1.0 if abs(float(result) - float(answer)) < 1e-6 else 0.0
    except ValueError:
        return 0.0


def messages(question: str) -> list[dict[str, str]]:
    """The chat: system prompt, the few-shot examples, then the question."""
    out = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in FEW_SHOT:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    out.append({"role": "user", "content": question})
    return out


@lightning.rollout(name="calc_x")
async def agent(task: dict[str, Any]) -> float:
    """Ask the policy for the calculation, run it on the calculator, score the result."""
    ep = lightning.llm()
    client = _client(ep.base_url, ep.api_key)
    response = await client.chat.completions.create(
        model=ep.model,
        messages=messages(task["question"]),
        max_tokens=int(task.get("max_tokens", 24)),
        temperature=float(task.get("temperature", 1.0)),
    )
    text = response.choices[0].message.content or ""
    expr = extract_expression(text)
    if expr is None:
        return 0.0
    return score(calculator(expr), task["answer"])


_clients: dict[tuple[str, str, int], Any] = {}


def _client(base_url: str, api_key: str) -> Any:
    """One ``AsyncOpenAI`` per endpoint and event loop (its connection pool is per loop)."""
    import asyncio

    import openai

    key = (base_url, api_key, id(asyncio.get_running_loop()))
    if key not in _clients:
        _clients[key] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none",
                                           max_retries=2, timeout=600.0)
    return _clients[key]
