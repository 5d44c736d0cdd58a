"""AIR, Automatic Intermediate Rewarding: recorded spans and tool calls -> step rewards.

No agent code: the rules read what the runtime already records (``kind="tool"`` spans
from ``@lightning.tool`` / ``lightning.span``, the ``tool_calls`` and request ``tools`` the
OpenAI capture stores in each transition's metadata, the response ``text``).

A rule is a plain function ``(trajectory) -> list[StepReward]``. Built-in rules emit
+1.0 for a good event and -1.0 for a bad one; :class:`AIR` multiplies by a per-rule weight
(looked up by the rule's name, default 1.0) and aligns the result to transitions with the
attribution rule of :mod:`lightning.algorithms.credit` (``after = k`` -> transition
``k - 1``). User rules have the same signature.

Built-in rules (``after`` of each step reward in brackets):

- :func:`tool_call`: per ``kind="tool"`` span, +1 if ``status == "ok"``, -1 if it raised
  (``status == "error"``) [the span's ``after``].
- :func:`tool_error_output`: per tool span with ``status == "ok"`` whose output looks like
  an error (see :func:`looks_like_error`), -1 [the span's ``after``]. A tool that *returns*
  an error gets +1 from ``tool_call`` and -1 from this rule: weigh this one higher.
- :func:`tool_arguments`: per tool call the model made (``metadata["tool_calls"]``), +1 if
  its ``arguments`` string is a JSON object that satisfies the tool's schema from
  ``metadata["request"]["tools"]``, -1 if it is not valid JSON, not an object, names a tool
  absent from a non-empty ``tools`` list, or breaks the schema [``index + 1`` of the
  transition that made the call]. Calls to tools without a schema are only JSON-checked;
  custom (free-form) tools are skipped.
- :func:`sql_ok`: per tool span that ran SQL (an ``sql`` attribute, or ``sql`` in the span
  name, case-insensitive), +1 if ``status == "ok"`` and its output does not look like an
  error, else -1 [the span's ``after``].
- :func:`final_answer_format` ``(pattern)``: builds a rule giving +1 if the final answer
  matches the regex (``re.search``), else -1 [``n``, the last transition]. The final
  answer is the ``answer`` (else ``output``) attribute of the last span named
  ``final_answer``, else the last transition's ``metadata["text"]``.

JSON-schema subset checked by :func:`schema_errors`: ``type`` (object, array, string,
integer, number, boolean, null, or a list of them; a bool is not an integer/number),
``enum``, ``required``, ``properties`` (recursively), ``items`` (recursively), and
``additionalProperties: false``. Other keywords are ignored (accepted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from lightning.algorithms.credit import attribute

__all__ = [
    "AIR",
    "DEFAULT_RULES",
    "DEFAULT_WEIGHTS",
    "Rule",
    "StepReward",
    "final_answer_format",
    "looks_like_error",
    "schema_errors",
    "sql_ok",
    "tool_arguments",
    "tool_call",
    "tool_error_output",
]


class StepReward(NamedTuple):
    after: int
    """Transitions recorded before the event: credited to transition ``after - 1``."""
    value: float
    rule: str


Rule = Callable[[Any], list[StepReward]]
"""``(trajectory) -> list[StepReward]``."""

_ERROR_TEXT = re.compile(
    r"^\s*(?:error\b|exception\b|traceback \(most recent call last\))", re.IGNORECASE
)


def looks_like_error(output: Any) -> bool:
    """Heuristic: does a tool's (non-raising) output report an error?

    True for a dict with a truthy ``"error"`` key; a string starting (after whitespace,
    case-insensitive) with the word ``error`` or ``exception`` (``"Error: ..."``,
    ``"error: ..."``, ``"ERROR 42"``; not ``"errors: 0"``) or with ``"Traceback (most recent
    call last)"``; and a string holding a JSON object with a truthy ``"error"`` key.
    """
    if isinstance(output, dict):
        return bool(output.get("error"))
    if isinstance(output, str):
        if _ERROR_TEXT.match(output):
            return True
        s = output.strip()
        if s.startswith("{") and '"error"' in s:
            try:
                obj = json.loads(s)
            except ValueError:
                return False
            return isinstance(obj, dict) and bool(obj.get("error"))
    return False


def _tool_spans(trajectory: Any) -> list[Any]:
    return [s for s in trajectory.spans if s.kind == "tool"]


def _output(span: Any) -> Any:
    attrs = span.attributes
    return attrs.get("output", attrs.get("result"))


def tool_call(trajectory: Any) -> list[StepReward]:
    """+1 per tool span that succeeded, -1 per tool span that raised."""
    return [
        StepReward(s.after, 1.0 if s.status == "ok" else -1.0, "tool_call")
        for s in _tool_spans(trajectory)
    ]


def tool_error_output(trajectory: Any) -> list[StepReward]:
    """-1 per tool span that returned (did not raise) an error-looking output."""
    return [
        StepReward(s.after, -1.0, "tool_error_output")
        for s in _tool_spans(trajectory)
        if s.status == "ok" and looks_like_error(_output(s))
    ]


def _is_sql(span: Any) -> bool:
    return "sql" in span.attributes or "sql" in span.name.lower()


def sql_ok(trajectory: Any) -> list[StepReward]:
    """+1 per SQL tool span that ran without error, -1 per one that failed."""
    return [
        StepReward(
            s.after,
            1.0 if s.status == "ok" and not looks_like_error(_output(s)) else -1.0,
            "sql_ok",
        )
        for s in _tool_spans(trajectory)
        if _is_sql(s)
    ]


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (
        isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
    ),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Violations of the JSON-schema subset described in the module docstring (``[]`` = valid)."""
    errors: list[str] = []
    typ = schema.get("type")
    if typ is not None:
        allowed = [typ] if isinstance(typ, str) else list(typ)
        known = [t for t in allowed if t in _TYPES]
        if known and not any(_TYPES[t](value) for t in known):
            return [f"{path}: expected {'/'.join(known)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                errors.append(f"{path}: missing required property {key!r}")
        for key, sub in value.items():
            if key in props and isinstance(props[key], Mapping):
                errors.extend(schema_errors(sub, props[key], f"{path}.{key}"))
            elif key not in props and schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected property {key!r}")
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            errors.extend(schema_errors(item, schema["items"], f"{path}[{i}]"))
    return errors


def _tool_schemas(metadata: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """Tool name -> parameters schema (None: declared without one) from the request."""
    request = metadata.get("request")
    tools = request.get("tools") if isinstance(request, Mapping) else None
    out: dict[str, Mapping[str, Any] | None] = {}
    for t in tools or ():
        if not isinstance(t, Mapping):
            continue
        fn = t.get("function") if isinstance(t.get("function"), Mapping) else t
        name = fn.get("name")
        if isinstance(name, str):
            params = fn.get("parameters")
            out[name] = params if isinstance(params, Mapping) else None
    return out


def _call_ok(call: Mapping[str, Any], schemas: Mapping[str, Mapping[str, Any] | None]) -> bool:
    args = call.get("arguments")
    if not isinstance(args, str):
        return False
    try:
        obj = json.loads(args) if args.strip() else {}
    except ValueError:
        return False
    if not isinstance(obj, dict):
        return False
    name = call.get("name")
    if schemas and name not in schemas:
        return False
    schema = schemas.get(name) if isinstance(name, str) else None
    return schema is None or not schema_errors(obj, schema)


def tool_arguments(trajectory: Any) -> list[StepReward]:
    """+1 per model tool call with valid JSON arguments satisfying the tool's schema, else -1."""
    out = []
    for t in trajectory.transitions:
        calls = t.metadata.get("tool_calls") or ()
        if not calls:
            continue
        schemas = _tool_schemas(t.metadata)
        for call in calls:
            if not isinstance(call, Mapping) or call.get("type") == "custom":
                continue
            out.append(
                StepReward(t.index + 1, 1.0 if _call_ok(call, schemas) else -1.0, "tool_arguments")
            )
    return out


def final_answer_format(pattern: str | re.Pattern[str], *, flags: int = 0) -> Rule:
    """A rule: +1 if the final answer matches ``pattern`` (``re.search``), else -1."""
    rx = re.compile(pattern, flags) if isinstance(pattern, str) else pattern

    def final_answer_format(trajectory: Any) -> list[StepReward]:
        n = len(trajectory.transitions)
        answer: Any = None
        for s in reversed(trajectory.spans):
            if s.name == "final_answer":
                answer = s.attributes.get("answer", s.attributes.get("output"))
                break
        else:
            if n:
                answer = trajectory.transitions[-1].metadata.get("text")
        ok = isinstance(answer, str) and rx.search(answer) is not None
        return [StepReward(n, 1.0 if ok else -1.0, "final_answer_format")]

    return final_answer_format


DEFAULT_RULES: tuple[Rule, ...] = (tool_call, tool_error_output, tool_arguments, sql_ok)
"""Rules that need no configuration (``final_answer_format`` needs a pattern)."""

DEFAULT_WEIGHTS: dict[str, float] = {
    "tool_call": 0.1,
    "tool_error_output": 0.2,
    "tool_arguments": 0.1,
    "sql_ok": 0.1,
    "final_answer_format": 0.1,
}
"""Small next to an outcome reward in [0, 1]: shaping, not the objective."""


class AIR:
    """Runs rules over a trajectory and weighs their step rewards.

    Args:
        rules: rule functions (named by ``__name__``) or a ``{name: rule}`` mapping.
        weights: per-rule weight by name; rules not listed weigh ``DEFAULT_WEIGHTS`` for
            the built-ins and 1.0 otherwise. A weight of 0 disables a rule.
    """

    __slots__ = ("rules", "weights")

    def __init__(
        self,
        rules: Sequence[Rule] | Mapping[str, Rule] = DEFAULT_RULES,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        items = rules.items() if isinstance(rules, Mapping) else ((r.__name__, r) for r in rules)
        self.rules: dict[str, Rule] = dict(items)
        self.weights = {
            name: float((weights or {}).get(name, DEFAULT_WEIGHTS.get(name, 1.0)))
            for name in self.rules
        }
        unknown = set(weights or ()) - set(self.rules)
        if unknown:
            raise ValueError(
                f"weights given for unknown rules {sorted(unknown)}; rules are {sorted(self.rules)}"
            )

    def step_rewards(self, trajectory: Any) -> list[StepReward]:
        """Weighted step rewards of every rule (``rule`` = the rule's name), in rule order."""
        out = []
        for name, rule in self.rules.items():
            w = self.weights[name]
            if w == 0.0:
                continue
            out.extend(StepReward(r.after, w * r.value, name) for r in rule(trajectory))
        return out

    __call__ = step_rewards

    def per_transition(self, trajectory: Any) -> list[float]:
        """Weighted step rewards summed per transition (``after = k`` -> ``k - 1``)."""
        n = len(trajectory.transitions)
        out = [0.0] * n
        if n:
            for r in self.step_rewards(trajectory):
                out[attribute(r.after, n)] += r.value
        return out
