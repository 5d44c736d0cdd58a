"""Pure conversions: messages, tools, tool-call parsing, streaming filter."""

import json

import pytest

from lightning.serving._chat import (
    RequestError,
    ToolCallStreamFilter,
    apply_tool_choice,
    normalize_chat_messages,
    normalize_tools,
    parse_tool_calls,
    response_format_instruction,
    responses_input_to_messages,
    sampling_stop,
)

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]


def test_parse_tool_calls():
    text = 'Let me compute.\n<tool_call>\n{"name": "calc", "arguments": {"e": "1+2"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me compute."
    assert calls[0]["function"] == {"name": "calc", "arguments": '{"e": "1+2"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    # malformed blocks stay visible as content
    bad = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(bad) == (bad, [])
    assert parse_tool_calls("plain") == ("plain", [])
    two = '<tool_call>{"name":"a","arguments":{}}</tool_call><tool_call>{"name":"b"}</tool_call>'
    content, calls = parse_tool_calls(two)
    assert content is None and [c["function"]["name"] for c in calls] == ["a", "b"]


@pytest.mark.parametrize("chunks", [
    ["Hi ", "there <tool", '_call>{"name": "calc", "arguments": {}}</tool_call>'],
    ["Hi there <", "t", "ool_call>", '{"name": "calc", "arguments": {}}', "</tool_call>"],
])
def test_stream_filter_never_leaks_tool_markup(chunks):
    f = ToolCallStreamFilter()
    shown = "".join(f.feed(c) for c in chunks)
    rest, calls = f.finish()
    assert "<" not in shown and (shown + rest).strip() == "Hi there"
    assert calls[0]["function"]["name"] == "calc"


def test_stream_filter_releases_lookalikes():
    f = ToolCallStreamFilter()
    shown = f.feed("a <b> c <")
    rest, calls = f.finish()
    assert shown + rest == "a <b> c <" and calls == []


def test_messages_and_errors():
    msgs = normalize_chat_messages([
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": '{"e": 1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ])
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"e": 1}
    assert msgs[3]["tool_call_id"] == "c1"
    with pytest.raises(RequestError, match="non-empty list"):
        normalize_chat_messages([])
    with pytest.raises(RequestError, match="role 'robot'"):
        normalize_chat_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(RequestError, match="image_url"):
        normalize_chat_messages([{"role": "user", "content": [{"type": "image_url"}]}])


def test_tools_validation_and_choice():
    assert normalize_tools(TOOLS)[0]["function"]["name"] == "calc"
    with pytest.raises(RequestError, match="only function tools"):
        normalize_tools([{"type": "web_search"}])
    with pytest.raises(RequestError, match="name"):
        normalize_tools([{"type": "function", "function": {}}])
    assert apply_tool_choice(normalize_tools(TOOLS), "none") == (None, None)
    tools, forced = apply_tool_choice(normalize_tools(TOOLS), "required")
    assert tools and "must call" in forced
    with pytest.raises(RequestError, match="not among"):
        apply_tool_choice(normalize_tools(TOOLS), {"type": "function", "function": {"name": "x"}})


def test_responses_input():
    msgs = responses_input_to_messages([
        {"role": "user", "content": [{"type": "input_text", "text": "2+2?"}]},
        {"type": "function_call", "call_id": "c", "name": "calc", "arguments": '{"e":"2+2"}'},
        {"type": "function_call_output", "call_id": "c", "output": "4"},
    ], "You are helpful")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[2]["tool_calls"][0]["function"]["name"] == "calc"
    with pytest.raises(RequestError, match="unsupported item type"):
        responses_input_to_messages([{"type": "computer_call"}], None)


def test_formats_and_stops():
    assert response_format_instruction({"type": "text"}) is None
    assert "JSON" in response_format_instruction({"type": "json_object"})
    inst = response_format_instruction({"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}})
    assert json.dumps({"a": {"type": "integer"}}) in inst
    with pytest.raises(RequestError):
        response_format_instruction({"type": "json_schema", "json_schema": {}})
    assert sampling_stop("x") == ("x",) and sampling_stop(["a", "b"]) == ("a", "b")
    with pytest.raises(RequestError):
        sampling_stop([1])
