from __future__ import annotations

import pytest
from algo_testutil import span, trajectory, transition

from lightning.algorithms.air import (
    AIR,
    DEFAULT_RULES,
    StepReward,
    final_answer_format,
    looks_like_error,
    schema_errors,
    sql_ok,
    tool_arguments,
    tool_call,
    tool_error_output,
)
from lightning.algorithms.credit import assign_credit

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
}


def call(args: str, name: str = "weather") -> dict:
    return {"id": "c1", "name": name, "arguments": args}


def test_tool_call_ok_and_raised():
    t = trajectory(3, spans=[span(1), span(2, status="error"), span(2, kind="retrieval")])
    assert tool_call(t) == [StepReward(1, 1.0, "tool_call"), StepReward(2, -1.0, "tool_call")]
    assert tool_call(trajectory(2)) == []


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({"error": "not found"}, True),
        ({"error": None, "result": 3}, False),
        ("Error: division by zero", True),
        ("error: bad input", True),
        ("  ERROR 42", True),
        ("Exception: x", True),
        ("Traceback (most recent call last):\n ...", True),
        ('{"error": "quota"}', True),
        ('{"error": ""}', False),
        ("errors: 0", False),
        ("no error here", False),
        ("42", False),
        (None, False),
        (["Error"], False),
    ],
)
def test_looks_like_error(output, expected):
    assert looks_like_error(output) is expected


def test_tool_error_output_only_for_ok_spans_with_error_output():
    t = trajectory(
        3,
        spans=[
            span(1, output="Error: no such city"),
            span(2, output="sunny"),
            span(3, status="error", output="Error: raised"),
        ],
    )
    assert tool_error_output(t) == [StepReward(1, -1.0, "tool_error_output")]


def test_schema_subset():
    schema = WEATHER["function"]["parameters"]
    assert schema_errors({"city": "Paris", "days": 3, "unit": "C"}, schema) == []
    assert schema_errors({"city": "Paris", "days": 3.0}, schema) == []  # JSON integer
    assert any("missing required" in e for e in schema_errors({"days": 3}, schema))
    assert any("expected integer" in e for e in schema_errors({"city": "x", "days": "3"}, schema))
    assert any("expected integer" in e for e in schema_errors({"city": "x", "days": True}, schema))
    assert any("not one of" in e for e in schema_errors({"city": "x", "unit": "K"}, schema))
    assert schema_errors([1, "a"], {"type": "array", "items": {"type": "number"}}) == [
        "$[1]: expected number, got str"
    ]
    assert schema_errors({"a": 1}, {"type": "object", "additionalProperties": False}) == [
        "$: unexpected property 'a'"
    ]
    assert schema_errors(None, {"type": ["string", "null"]}) == []


def test_tool_arguments_valid_invalid_json_and_schema():
    tools = [WEATHER]
    ts = [
        transition(
            0, tool_calls=[call('{"city": "Paris"}'), call('{"city": ')], tools=tools
        ),  # ok, bad JSON
        transition(
            1, tool_calls=[call('{"days": 2}'), call('{"city": "x"}', name="nope")], tools=tools
        ),
        transition(2, tool_calls=[call("[1, 2]")], tools=tools),  # not an object
        transition(
            3, tool_calls=[call('{"q": 1}', name="free")]
        ),  # no tools declared: JSON check only
        transition(
            4, tool_calls=[{"id": "c", "name": "raw", "arguments": "anything", "type": "custom"}]
        ),
        transition(5, text="done"),
    ]
    rewards = tool_arguments(trajectory(transitions=ts))
    assert [(r.after, r.value) for r in rewards] == [
        (1, 1.0),
        (1, -1.0),
        (2, -1.0),
        (2, -1.0),
        (3, -1.0),
        (4, 1.0),
    ]


def test_sql_ok():
    t = trajectory(
        3,
        spans=[
            span(1, "run_sql", output=[[1, 2]]),
            span(2, "query", sql="SELECT 1", output="Error: no such table"),
            span(3, "execute", status="error", sql="SELEC"),
            span(3, "search"),  # not SQL
        ],
    )
    assert [(r.after, r.value) for r in sql_ok(t)] == [(1, 1.0), (2, -1.0), (3, -1.0)]


def test_final_answer_format_from_text_and_span():
    rule = final_answer_format(r"\\boxed\{[^}]+\}")
    good = trajectory(transitions=[transition(0, text="x"), transition(1, text=r"so \boxed{42}")])
    bad = trajectory(transitions=[transition(0, text=r"\boxed{1}"), transition(1, text="42")])
    assert rule(good) == [StepReward(2, 1.0, "final_answer_format")]
    assert rule(bad) == [StepReward(2, -1.0, "final_answer_format")]
    from_span = trajectory(
        transitions=[transition(0, text="no")],
        spans=[span(1, "final_answer", kind="custom", output=None, answer=r"\boxed{7}")],
    )
    assert rule(from_span)[0].value == 1.0
    assert rule(trajectory(0))[0] == StepReward(0, -1.0, "final_answer_format")


def test_air_weights_user_rules_and_alignment():
    def always(t):
        return [StepReward(len(t.transitions), 1.0, "always")]

    t = trajectory(3, spans=[span(1), span(2, output="Error: x"), span(3, status="error")])
    air = AIR([tool_call, tool_error_output, always], weights={"tool_call": 0.5, "always": 2.0})
    got = air(t)
    assert [(r.after, r.value, r.rule) for r in got] == [
        (1, 0.5, "tool_call"),
        (2, 0.5, "tool_call"),
        (3, -0.5, "tool_call"),
        (2, -0.2, "tool_error_output"),  # default weight
        (3, 2.0, "always"),
    ]
    assert air.per_transition(t) == pytest.approx([0.5, 0.3, 1.5])
    # step rewards feed credit assignment directly
    # r = [0.5, 0.3, 1.5 + final 1.0]
    assert assign_credit(t, extra_rewards=got) == pytest.approx([3.3, 2.8, 2.5])
    assert AIR({"x": always}, weights={"x": 0.0})(t) == []
    with pytest.raises(ValueError, match="unknown rules"):
        AIR(DEFAULT_RULES, weights={"typo": 1.0})
    assert AIR().per_transition(trajectory(0)) == []
