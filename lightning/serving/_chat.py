"""OpenAI request shapes -> chat-template input, and generated text -> OpenAI messages.

Pure functions (no engine, no HTTP), so every conversion is unit-tested on its own.

Tool calls use the Hermes convention that the served chat templates render and most
open models are trained on: the template lists the tools and asks for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks; generated blocks are
parsed back into OpenAI ``tool_calls``; text outside them is the message content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "RequestError",
    "ToolCallStreamFilter",
    "normalize_chat_messages",
    "normalize_tools",
    "parse_tool_calls",
    "responses_input_to_messages",
    "responses_tools_to_chat",
]


class RequestError(ValueError):
    """A client error; becomes an OpenAI-shaped 4xx response."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status


_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPEN = "<tool_call>"


def _text_of(content: Any, where: str) -> str:
    """Text of an OpenAI content field: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, Mapping):
                raise RequestError(f"{where}[{i}] must be a content part object", param=where)
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                out.append(str(part.get("text", "")))
            elif kind == "refusal":
                out.append(str(part.get("refusal", "")))
            else:
                raise RequestError(
                    f"{where}[{i}] has content type {kind!r}: this server serves a text-only "
                    "model (use text parts)",
                    param=where,
                )
        return "".join(out)
    raise RequestError(f"{where} must be a string or a list of content parts", param=where)


def normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Validate chat-completions ``tools`` and return them in template form."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of tool objects", param="tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise RequestError(
                f"{where} must be {{'type': 'function', 'function': {{...}}}}: only function "
                "tools are supported",
                param=where,
            )
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RequestError(f"{where}.function.name must be a non-empty string", param=where)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object",
                               param=where)
        entry = {"name": fn["name"], "parameters": dict(params)}
        if fn.get("description"):
            entry["description"] = str(fn["description"])
        out.append({"type": "function", "function": entry})
    return out or None


def apply_tool_choice(
    tools: list[dict[str, Any]] | None, tool_choice: Any
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Tools to render, and an extra system instruction for forced choices."""
    if tool_choice is None or tool_choice == "auto":
        return tools, None
    if tool_choice == "none":
        return None, None
    if not tools:
        raise RequestError("tool_choice is set but no tools were given", param="tool_choice")
    if tool_choice == "required":
        return tools, "You must call at least one of the provided functions."
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise RequestError(
                f"tool_choice names function {name!r}, which is not among the tools",
                param="tool_choice",
            )
        return chosen, f"You must call the function {name}."
    raise RequestError(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', ...}",
        param="tool_choice",
    )


def normalize_chat_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages -> template messages (string content, tool calls as dicts)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise RequestError(f"{where}.role {role!r} is not supported", param=where)
        msg: dict[str, Any] = {"role": role, "content": _text_of(m.get("content"), f"{where}.content")}
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                    raise RequestError(
                        f"{where}.tool_calls[{j}] must have function.name and function.arguments",
                        param=where,
                    )
                args = fn.get("arguments", "{}")
                calls.append(
                    {"id": call.get("id", ""), "type": "function",
                     "function": {"name": fn["name"], "arguments": _args_object(args)}}
                )
            msg["tool_calls"] = calls
        if role == "tool":
            msg["tool_call_id"] = m.get("tool_call_id", "")
        out.append(msg)
    return out


def _args_object(args: Any) -> Any:
    """Tool-call arguments as an object for the template (keep a string that isn't JSON)."""
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def responses_tools_to_chat(tools: Any) -> list[dict[str, Any]] | None:
    """Responses-API function tools (flat) -> chat-completions tools."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list", param="tools")
    chat = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, Mapping) else type(t).__name__
            raise RequestError(
                f"tools[{i}] has type {kind!r}: only function tools are supported",
                param=f"tools[{i}]",
            )
        chat.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return normalize_tools(chat)


def responses_input_to_messages(input_: Any, instructions: str | None) -> list[dict[str, Any]]:
    """Responses-API ``input`` (+ ``instructions``) -> chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(input_, str):
        messages.append({"role": "user", "content": input_})
        return normalize_chat_messages(messages)
    if not isinstance(input_, list) or not input_:
        raise RequestError("input must be a string or a non-empty list of items", param="input")
    for i, item in enumerate(input_):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise RequestError(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id", ""), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and "_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call],
                                 "_calls": True})
        elif kind == "function_call_output":
            out = item.get("output", "")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id", ""),
                             "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            continue  # no reasoning state to carry for these models
        else:
            raise RequestError(f"{where} has unsupported item type {kind!r}", param=where)
    for m in messages:
        m.pop("_calls", None)
    return normalize_chat_messages(messages)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Split generated text into content and OpenAI ``tool_calls``.

    The content is the text outside the blocks, without trailing whitespace, exactly what
    :class:`ToolCallStreamFilter` streams for the same text.

    A block whose body is not a JSON object with a string ``name`` stays in the content
    (the agent sees what the model wrote; nothing is silently dropped).
    """
    calls = []
    kept: list[str] = []
    pos = 0
    for m in _TOOL_CALL.finditer(text):
        try:
            body = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        args = body.get("arguments", {})
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append({
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {
                "name": body["name"],
                "arguments": args if isinstance(args, str) else json.dumps(args),
            },
        })
    kept.append(text[pos:])
    # only the whitespace before the calls goes (the template writes its own "\n" there):
    # leading whitespace is the model's, and a streamed reply has already shown it
    content = "".join(kept).rstrip() if calls else text
    return (content or None) if calls else content, calls


class ToolCallStreamFilter:
    """Streams content text while holding back anything that may be a tool-call block.

    ``feed(delta)`` returns the text that is safe to show now; ``finish()`` returns the
    remaining content and the parsed tool calls.
    """

    def __init__(self) -> None:
        self._text = ""
        self._shown = 0
        self._in_call = False

    def feed(self, delta: str) -> str:
        self._text += delta
        if self._in_call:
            return ""
        start = self._text.find(_OPEN, self._shown)
        if start >= 0:
            self._in_call = True
            # whitespace before a call is not content (as in parse_tool_calls); it stays
            # unshown, so a block that turns out not to be a call still gets it back
            out = self._text[self._shown : start].rstrip()
            self._shown += len(out)
            return out
        # hold back a suffix that could be the start of "<tool_call>", and trailing
        # whitespace: streamed content must equal the non-streamed content, which ends
        # before the whitespace that precedes a call (a client sends it back, and the
        # chat template must re-render the tokens that were sampled)
        hold = 0
        for k in range(min(len(_OPEN) - 1, len(self._text) - self._shown), 0, -1):
            if self._text.endswith(_OPEN[:k]):
                hold = k
                break
        end = len(self._text) - hold
        while end > self._shown and self._text[end - 1].isspace():
            end -= 1
        out = self._text[self._shown : end]
        self._shown = end
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest = self._text[self._shown :]
        if not self._in_call:
            return rest, []
        content, calls = parse_tool_calls(rest)
        if not calls:
            return rest, []
        return (content or "").rstrip(), calls


def sampling_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    if isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        if len(stop) > 8:
            raise RequestError("at most 8 stop sequences are supported", param="stop")
        return tuple(s for s in stop if s)
    raise RequestError("stop must be a string or a list of strings", param="stop")


JSON_INSTRUCTION = (
    "Respond only with a JSON object{schema}. Do not write anything before or after it."
)


def response_format_instruction(fmt: Any, param: str = "response_format") -> str | None:
    """A system instruction for JSON modes (the best feasible without constrained decoding)."""
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise RequestError(f"{param} must be an object", param=param)
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return JSON_INSTRUCTION.format(schema="")
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt)  # chat nests it, responses' text.format is flat
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise RequestError(f"{param}.json_schema.schema must be a JSON schema object",
                               param=param)
        return JSON_INSTRUCTION.format(schema=" matching this JSON schema: " + json.dumps(schema))
    raise RequestError(f"{param}.type {kind!r} is not supported", param=param)


def with_system_instruction(messages: list[dict[str, Any]], instruction: str | None) -> list[dict[str, Any]]:
    if not instruction:
        return messages
    if messages and messages[0]["role"] == "system":
        first = dict(messages[0])
        first["content"] = (first["content"] + "\n\n" + instruction).strip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]
