"""Typed request bodies of the policy server, checked before any work starts.

In the style of vLLM's ``entrypoints/openai/protocol.py``, with msgspec: every route's
body is a ``Struct`` whose fields carry their types and bounds (``Meta(ge=..., le=...)``),
so a wrong type, an out-of-range number or an oversized list is a 400 that names the
field, before anything is allocated, tokenised or stored. Unknown fields are ignored
(OpenAI clients send many this server has no use for).

:func:`parse_body` is the one entry: size-limited bytes -> JSON -> nesting-depth check
-> the route's ``Struct``. Free-form parts (tool schemas, metadata, content parts) are
``Any`` to the types, so the depth check walks the decoded document first: code further
on (the chat template, ``json.dumps``, the write-ahead log's encoder) recurses into them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from ._chat import RequestError

__all__ = [
    "MAX_CHOICES",
    "MAX_DEPTH",
    "ChatCompletionRequest",
    "CompletionRequest",
    "ResponsesRequest",
    "RewardRequest",
    "RolloutEndRequest",
    "RolloutStartRequest",
    "parse_body",
]

MAX_CHOICES = 128
"""Most choices one request may ask for (``n``, times the prompts of a completion)."""
MAX_DEPTH = 64
"""Deepest nesting of JSON arrays/objects a request body may have."""
_MAX_ID = 256
_MAX_STOP = 8

Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Tokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
TopLogprobs = Annotated[int, Meta(ge=0, le=20)]
Id = Annotated[str, Meta(min_length=1, max_length=_MAX_ID, pattern=r"^[^/\x00-\x1f\x7f]+$")]
"""A rollout id: it becomes a URL path segment (escaped), so no ``/`` or control chars."""
Name = Annotated[str, Meta(max_length=_MAX_ID)]
Json = dict[str, Any]


class _Body(Struct, kw_only=True, omit_defaults=True):
    pass


class StreamOptions(_Body, kw_only=True):
    include_usage: bool = False


class _Sampling(_Body, kw_only=True):
    """Fields every generation route shares."""

    model: str = ""
    """Required: checked by the server, which names the models it serves."""
    temperature: Annotated[float, Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=2**31 - 1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=_MAX_STOP)] | None = None
    seed: Seed | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class FunctionCall(_Body, kw_only=True):
    name: str
    arguments: str | Json = "{}"


class ToolCall(_Body, kw_only=True):
    function: FunctionCall
    id: str = ""
    type: str = "function"


class NamedFunction(_Body, kw_only=True):
    name: str


class ToolChoice(_Body, kw_only=True, omit_defaults=False):
    """``{"type": "function", "function": {"name": ...}}`` (chat) or ``{"type":
    "function", "name": ...}`` (responses)."""

    type: str = "function"
    function: NamedFunction | None = None
    name: str | None = None


class ChatMessage(_Body, kw_only=True):
    role: str
    content: str | list[str | Json] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = []
    """Required, non-empty (checked with the messages' contents)."""
    tools: list[Json] | None = None
    tool_choice: str | ToolChoice | None = None
    response_format: Json | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is checked by the server (four shapes)."""

    prompt: str | Annotated[list[Any], Meta(max_length=MAX_CHOICES)] = []
    """Required: checked by the server (a string, strings, token ids, token-id lists)."""
    logprobs: TopLogprobs | None = None
    max_tokens: Tokens | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = None


class ResponsesText(_Body, kw_only=True):
    format: Json | None = None


class ResponsesRequest(_Sampling, kw_only=True):
    """``POST /v1/responses``."""

    input: str | list[Json] = []
    """Required: a string or a non-empty list of items (checked with the items)."""
    instructions: str | None = None
    tools: list[Json] | None = None
    tool_choice: str | ToolChoice | None = None
    text: ResponsesText | None = None
    max_output_tokens: Tokens | None = None
    metadata: Json | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: Annotated[str, Meta(min_length=1, max_length=_MAX_ID)] | None = None
    """Continue the stored response of this id: its input and output come before
    ``input`` (its ``instructions`` do not carry over, as with OpenAI)."""
    store: bool | None = None
    """Keep this response for a later ``previous_response_id`` (None: yes, OpenAI's
    default). The response says whether it was kept (``"store"``)."""


class RolloutStartRequest(_Body, kw_only=True):
    """``POST /v1/rollouts``."""

    rollout_id: Id | None = None
    name: Name | None = None
    group_key: Name | None = None
    attempt: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    metadata: Json = {}


class RewardRequest(_Body, kw_only=True):
    """``POST /v1/rollouts/{id}/rewards``: one number, or named numbers and a primary."""

    value: float | dict[str, float]
    name: Name | None = None
    primary: Name | None = None


class RolloutEndRequest(_Body, kw_only=True):
    """``POST /v1/rollouts/{id}/end``."""

    status: Literal["completed", "failed", "cancelled"] = "completed"
    final_reward: float | None = None
    error: Annotated[str, Meta(max_length=1 << 16)] | None = None


T = TypeVar("T", bound=Struct)

_AT = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `([^`]*)`")


def parse_body(raw: bytes, kind: type[T], *, max_depth: int = MAX_DEPTH) -> T:
    """The request ``kind`` in ``raw`` (an empty body means an empty object).

    Raises:
        RequestError: not JSON, not an object, nested deeper than ``max_depth``, or a
            field of the wrong type or out of bounds (``param`` names it).
    """
    try:
        doc = msgspec.json.decode(raw) if raw.strip() else {}
    except RecursionError as exc:
        raise RequestError(f"request body is nested too deeply (at most {max_depth} levels)",
                           code="too_deep") from exc
    except msgspec.DecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RequestError("request body must be a JSON object")
    check_depth(doc, max_depth)
    try:
        return msgspec.convert(doc, kind)
    except msgspec.ValidationError as exc:
        raise RequestError(str(exc), param=_param_of(str(exc))) from exc


def check_depth(doc: Any, max_depth: int) -> None:
    """Raise :class:`RequestError` if arrays/objects in ``doc`` nest deeper than
    ``max_depth`` (iterative: a deep document cannot exhaust the stack here)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise RequestError(f"request body is nested too deeply (at most {max_depth} "
                               "levels of arrays and objects)", code="too_deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _param_of(message: str) -> str | None:
    at = _AT.search(message)
    missing = _MISSING.search(message)
    path = at.group(1) if at else ""
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None
