"""The calculator, served over MCP on stdio (``python calc_server.py``).

One tool, ``calculator(expression: str) -> str``: the value of an arithmetic expression
over numbers with ``+ - * / // % **``, unary signs and parentheses. The expression is
parsed with :mod:`ast` and walked node by node (:func:`evaluate`); nothing is ever passed
to ``eval``. Names, attributes, calls, subscripts, strings and every other node are
refused, and so is anything that could make the server hang or eat memory: expressions
over :data:`MAX_CHARS` characters, exponents over :data:`MAX_EXPONENT`, and intermediate
values beyond :data:`MAX_MAGNITUDE`. A refused or failing expression becomes an MCP tool
error (``isError: true`` with the reason as text), never a crashed server.

This file imports only the standard library and ``mcp``, so the server process starts
fast and does not pull in ``lightning`` or torch. The server is ``mcp`` 2.x's
``MCPServer`` (the class 1.x called ``FastMCP``).
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_CHARS", "MAX_EXPONENT", "MAX_MAGNITUDE", "CalcError", "evaluate", "format_number",
           "main"]

MAX_CHARS = 200
"""Longest expression accepted (a word problem's calculation is a few dozen characters)."""
MAX_EXPONENT = 64
"""Largest ``|exponent|`` accepted for ``**`` (``9 ** 10 ** 9`` would never finish)."""
MAX_MAGNITUDE = 1e15
"""Largest ``|value|`` of any intermediate result."""


class CalcError(ValueError):
    """The expression is not one the calculator evaluates (the message says why)."""


_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
# what models write for the operators, mapped to Python's
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}


def _check(value: Any) -> int | float:
    if isinstance(value, complex) or not math.isfinite(value):
        raise CalcError("the result is not a finite real number")
    if abs(value) > MAX_MAGNITUDE:
        raise CalcError(f"a value exceeds {MAX_MAGNITUDE:g}")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise CalcError(f"{node.value!r} is not a number")
        return _check(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_EXPONENT:
                raise CalcError(f"exponent {right:g} is over {MAX_EXPONENT}")
            if left == 0 and right < 0:
                raise CalcError("zero to a negative power")
        try:
            return _check(_BINOPS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalcError("division by zero") from None
        except OverflowError:
            raise CalcError(f"a value exceeds {MAX_MAGNITUDE:g}") from None
    what = type(node).__name__
    if isinstance(node, ast.Name):
        what = f"the name {node.id!r}"
    elif isinstance(node, ast.Attribute):
        what = f"the attribute {node.attr!r}"
    elif isinstance(node, ast.Call):
        what = "a function call"
    raise CalcError(f"{what} is not allowed: use numbers, + - * / // % ** and parentheses")


def evaluate(expression: str) -> int | float:
    """The value of ``expression``; raises :class:`CalcError` for anything refused.

    Integers stay integers (``7 // 2`` is ``3``); a float that is whole (``12 / 4``) comes
    back as an ``int``. Commas between digits (``1,200``) are thousands separators.
    """
    if not isinstance(expression, str):
        raise CalcError("the expression must be a string")
    if len(expression) > MAX_CHARS:
        raise CalcError(f"the expression is longer than {MAX_CHARS} characters")
    text = expression.strip().rstrip("=").strip()
    for written, python in _SPELLINGS.items():
        text = text.replace(written, python)
    text = _thousands(text)
    if not text:
        raise CalcError("the expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as exc:  # ValueError: NUL bytes
        raise CalcError(f"not an arithmetic expression: {exc.msg if isinstance(exc, SyntaxError) else exc}") from None
    try:
        value = _eval(tree.body)
    except RecursionError:
        raise CalcError("the expression is nested too deeply") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _thousands(text: str) -> str:
    out = []
    for i, ch in enumerate(text):
        if (ch == "," and 0 < i < len(text) - 1 and text[i - 1].isdigit()
                and text[i + 1 : i + 4].isdigit() and not text[i + 4 : i + 5].isdigit()):
            continue
        out.append(ch)
    return "".join(out)


def format_number(value: float) -> str:
    """How results are written back to the model: integers plainly, floats to 6 places."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.6f}".rstrip("0").rstrip(".")


def build_server() -> Any:
    """The MCP server with its one tool (``mcp`` is imported here, not at module import)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    # WARNING: a refused expression is an expected tool error, not worth a log line each time
    server = MCPServer("calculator", log_level="WARNING")

    @server.tool(name="calculator", structured_output=False)
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression such as "3 * 12 - 7" (numbers, + - * / // % **,
        parentheses). Returns the result as a number."""
        try:
            return format_number(evaluate(expression))
        except CalcError as exc:
            raise ToolError(f"error: {exc}") from None

    return server


def main() -> None:
    build_server().run("stdio")


if __name__ == "__main__":
    main()
