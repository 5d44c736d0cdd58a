"""Turn OpenAI-shaped responses into transition records (pure functions, no I/O).

Input is either a decoded JSON body (dicts and lists, from the raw bytes of the HTTP
response) or the SDK's parsed pydantic model (its unknown fields such as
``prompt_token_ids`` are kept as extras): :func:`_get` reads both the same way, so there
is one code path per endpoint.

Streams are accumulated per choice by :class:`ChatStream`, :class:`CompletionStream`
and :class:`ResponsesStream`; ``records(aborted=...)`` gives what to record when the
stream ends.

Nothing here guesses: token ids and log-probs are recorded exactly as the server sent
them; when they are absent, malformed or misaligned the record is marked untrainable with
a reason, and the text is kept.
"""

from __future__ import annotations

import math
import struct
from array import array
from typing import Any

from .._protocol import _struct, pack_logprobs, unpack_ids, unpack_logprobs

__all__ = [
    "ChatStream",
    "CompletionStream",
    "Record",
    "ResponsesStream",
    "chat_records",
    "completion_records",
    "response_records",
]

NO_TOKEN_IDS = "no_token_ids"


class Record:
    """One transition to record (the call-level fields are added by the hook)."""

    __slots__ = (
        "choice_index",
        "extra",
        "finish_reason",
        "logprobs",
        "prompt_ids",
        "reason",
        "response_ids",
        "text",
        "tool_calls",
    )

    def __init__(
        self,
        *,
        prompt_ids: Any,
        response_ids: Any,
        logprobs: Any,
        finish_reason: str,
        text: str,
        tool_calls: list[dict[str, Any]],
        choice_index: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        # Token ids and log-probs are kept packed (the wire format, see _protocol.pack_ids):
        # packing is also the check, and they are not converted again when recorded.
        self.prompt_ids = b""
        self.response_ids = b""
        self.logprobs: bytes | None = None
        self.reason: str | None = None
        self.finish_reason = finish_reason or ""
        self.text = text
        self.tool_calls = tool_calls
        self.choice_index = choice_index
        self.extra = extra or {}
        self._set_tokens(prompt_ids, response_ids, logprobs)

    @property
    def trainable(self) -> bool:
        return self.reason is None

    def _set_tokens(self, prompt_ids: Any, response_ids: Any, logprobs: Any) -> None:
        if prompt_ids is None or response_ids is None:
            missing = "prompt_token_ids" if prompt_ids is None else "token_ids"
            self.reason = f"{NO_TOKEN_IDS}: the response has no {missing}"
            return
        try:
            prompt = _packed_ids(prompt_ids, "prompt_token_ids")
            response = _packed_ids(response_ids, "token_ids")
        except (TypeError, ValueError) as exc:
            self.reason = f"malformed_token_ids: {exc}"
            return
        self.prompt_ids, self.response_ids = prompt, response
        if logprobs is None:
            return  # the sampler's ids without log-probs: trainable, log-probs unknown
        try:
            lp = _packed_logprobs(logprobs)
        except (TypeError, ValueError) as exc:
            self.reason = f"malformed_logprobs: {exc}"
            return
        if len(lp) != len(response):
            self.reason = (
                f"logprobs_misaligned: {len(lp) // 4} log-probs for {len(response) // 4} token ids"
            )
            return
        self.logprobs = lp


# ------------------------------------------------------------------ helpers


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` for dicts, ``obj.key`` for SDK models (extras included)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _packed_ids(value: Any, what: str) -> bytes:
    """Token ids packed as little-endian int32 (checked in C: integers, int32, not negative).

    One ``struct`` pack of the list (the ids of a long prompt are the largest thing a call
    returns): about 5x faster than ``array('i', list)`` plus ``min``. An id is negative
    iff its last byte has the high bit set, so the sign check is one ``isascii`` of
    every fourth byte.
    """
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what} is {type(value).__name__}, not a list of integers")
    try:
        packed = _struct("i", len(value)).pack(*value)
    except struct.error as exc:
        raise ValueError(f"{what} holds a value that is not a token id ({exc})") from None
    if not packed[3::4].isascii():
        raise ValueError(f"{what} holds a negative id {min(unpack_ids(packed))}")
    return packed


def _ids(value: Any, what: str) -> array:
    """Token ids as ``array('i')``, checked as :func:`_packed_ids` does."""
    return unpack_ids(_packed_ids(value, what))


def _packed_logprobs(values: Any) -> bytes:
    """Log-probs packed as little-endian float32; None, strings and NaN are rejected."""
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"log-probs are {type(values).__name__}, not a list")
    fmt = _struct("f", len(values))
    try:
        packed = fmt.pack(*values)
    except struct.error as exc:
        raise ValueError(f"a log-prob is not a number ({exc})") from None
    except OverflowError:  # beyond float32 range: stored as infinity, as array('f') does
        packed = pack_logprobs(array("d", values))
    if math.isnan(sum(fmt.unpack(packed))):  # log-probs are <= 0: only a NaN makes it NaN
        raise ValueError("a log-prob is NaN")
    return packed


def _floats(values: Any) -> array:
    """Log-probs as ``array('f')``, checked as :func:`_packed_logprobs` does."""
    return unpack_logprobs(_packed_logprobs(values))


def _chat_logprobs(lp: Any) -> list[float] | None:
    """Per-token log-probs of a chat choice (``logprobs.content[*].logprob``)."""
    content = _get(lp, "content")
    if content is None:
        return None
    if not isinstance(content, (list, tuple)):
        return content  # rejected as malformed by Record
    try:  # the hot loop of a long response: one attribute or key read per token
        if content and isinstance(content[0], dict):
            return [e["logprob"] for e in content]
        return [e.logprob for e in content]
    except (KeyError, AttributeError, TypeError):
        return [_get(e, "logprob") for e in content]


def _legacy_logprobs(lp: Any) -> list[float] | None:
    """Per-token log-probs of a completions choice (``logprobs.token_logprobs``)."""
    return _get(lp, "token_logprobs")


def _policy_version(obj: Any) -> int | None:
    v = _get(obj, "policy_version")
    return v if type(v) is int else None


def _tool_call(tc: Any) -> dict[str, Any]:
    fn = _get(tc, "function")
    if fn is not None:
        return {"id": _get(tc, "id"), "name": _get(fn, "name"), "arguments": _get(fn, "arguments")}
    custom = _get(tc, "custom")
    if custom is not None:  # custom (free-form) tools: input instead of arguments
        return {
            "id": _get(tc, "id"),
            "name": _get(custom, "name"),
            "arguments": _get(custom, "input"),
            "type": "custom",
        }
    return {"id": _get(tc, "id"), "name": None, "arguments": None, "type": _get(tc, "type")}


def _n(request: dict[str, Any]) -> int:
    n = request.get("n")
    return n if type(n) is int and n > 0 else 1


def _usage(obj: Any) -> Any:
    usage = _get(obj, "usage")
    if usage is None or isinstance(usage, dict):
        return usage
    dump = getattr(usage, "model_dump", None)
    return dump() if dump is not None else None


# ------------------------------------------------------------------ non-streaming


def chat_records(resp: Any) -> list[Record]:
    """One record per choice of a ``chat.completion`` (dict or SDK model)."""
    prompt = _get(resp, "prompt_token_ids")
    out = []
    for pos, choice in enumerate(_get(resp, "choices") or ()):
        msg = _get(choice, "message")
        extra = {}
        refusal = _get(msg, "refusal")
        if refusal:
            extra["refusal"] = refusal
        calls = [_tool_call(tc) for tc in _get(msg, "tool_calls") or ()]
        fc = _get(msg, "function_call")  # deprecated single function call
        if fc is not None:
            calls.append({"id": None, "name": _get(fc, "name"), "arguments": _get(fc, "arguments")})
        index = _get(choice, "index")
        out.append(
            Record(
                prompt_ids=prompt,
                response_ids=_get(choice, "token_ids"),
                logprobs=_chat_logprobs(_get(choice, "logprobs")),
                finish_reason=_get(choice, "finish_reason") or "",
                text=_get(msg, "content") or "",
                tool_calls=calls,
                choice_index=index if type(index) is int else pos,
                extra=extra,
            )
        )
    return out


def _completion_prompt(resp_prompt: Any, choice_prompt: Any, index: int, n: int) -> Any:
    if choice_prompt is not None:  # vLLM puts prompt ids on each choice
        return choice_prompt
    if isinstance(resp_prompt, list) and resp_prompt and isinstance(resp_prompt[0], list):
        k = index // n  # a batch of prompts: choices are grouped n per prompt
        return resp_prompt[k] if k < len(resp_prompt) else None
    return resp_prompt


def completion_records(resp: Any, request: dict[str, Any]) -> list[Record]:
    """One record per choice of a ``text_completion`` (dict or SDK model)."""
    prompt = _get(resp, "prompt_token_ids")
    n = _n(request)
    out = []
    for pos, choice in enumerate(_get(resp, "choices") or ()):
        index = _get(choice, "index")
        index = index if type(index) is int else pos
        out.append(
            Record(
                prompt_ids=_completion_prompt(prompt, _get(choice, "prompt_token_ids"), index, n),
                response_ids=_get(choice, "token_ids"),
                logprobs=_legacy_logprobs(_get(choice, "logprobs")),
                finish_reason=_get(choice, "finish_reason") or "",
                text=_get(choice, "text") or "",
                tool_calls=[],
                choice_index=index,
            )
        )
    return out


_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}


def response_records(resp: Any) -> list[Record]:
    """The one record of a Responses API ``response`` object (dict or SDK model)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    text_logprobs: list[Any] = []
    for item in _get(resp, "output") or ():
        kind = _get(item, "type")
        if kind == "message":
            for part in _get(item, "content") or ():
                if _get(part, "type") == "output_text":
                    texts.append(_get(part, "text") or "")
                    for e in _get(part, "logprobs") or ():
                        text_logprobs.append(_get(e, "logprob"))
                elif _get(part, "type") == "refusal":
                    texts.append(_get(part, "refusal") or "")
        elif kind == "function_call":
            calls.append(
                {
                    "id": _get(item, "call_id"),
                    "name": _get(item, "name"),
                    "arguments": _get(item, "arguments"),
                }
            )
        elif kind == "custom_tool_call":
            calls.append(
                {
                    "id": _get(item, "call_id"),
                    "name": _get(item, "name"),
                    "arguments": _get(item, "input"),
                    "type": "custom",
                }
            )
    status = _get(resp, "status") or ""
    if status == "completed" or not status:
        finish = "tool_calls" if calls else "stop"
    elif status == "incomplete":
        reason = _get(_get(resp, "incomplete_details"), "reason") or "incomplete"
        finish = _INCOMPLETE.get(reason, reason)
    elif status == "failed":
        finish = "error"
    else:
        finish = status
    logprobs = _get(resp, "output_token_logprobs")
    if logprobs is None and text_logprobs:
        # Only the text's log-probs: aligned only if the output is text alone (else the
        # count check marks it misaligned; we never guess which ids they belong to).
        logprobs = text_logprobs
    return [
        Record(
            prompt_ids=_get(resp, "prompt_token_ids"),
            response_ids=_get(resp, "output_token_ids"),
            logprobs=logprobs,
            finish_reason=finish,
            text="".join(texts),
            tool_calls=calls,
            choice_index=0,
        )
    ]


# ------------------------------------------------------------------ streaming


class _Choice:
    __slots__ = ("calls", "finish_reason", "ids", "logprobs", "prompt", "refusal", "text")

    def __init__(self) -> None:
        self.ids: list[Any] | None = None
        self.logprobs: list[Any] | None = None
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.prompt: Any = None
        self.refusal: list[str] = []

    def add_ids(self, ids: Any) -> None:
        if ids is None:
            return
        if not isinstance(ids, list):
            ids = [ids]  # kept as is: Record rejects it as malformed
        if self.ids is None:
            self.ids = []
        self.ids.extend(ids)

    def add_logprobs(self, lps: Any) -> None:
        if lps is None:
            return
        if not isinstance(lps, list):
            lps = [lps]
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.extend(lps)


class _Stream:
    """Shared state of a chat or completions stream."""

    def __init__(self) -> None:
        self.prompt: Any = None
        self.version: int | None = None
        self.version_max: int | None = None
        self.sampling: Any = None
        self.model: str = ""
        self.usage: Any = None
        self.choices: dict[int, _Choice] = {}
        self.events = 0

    def _common(self, chunk: dict[str, Any]) -> None:
        self.events += 1
        if self.prompt is None and chunk.get("prompt_token_ids") is not None:
            self.prompt = chunk["prompt_token_ids"]
        v = chunk.get("policy_version")
        if type(v) is int:
            # The oldest version that sampled any token of the response (the engine can
            # swap weights mid-generation); the newest is kept in metadata if different.
            self.version = v if self.version is None else min(self.version, v)
            self.version_max = v if self.version_max is None else max(self.version_max, v)
        if self.sampling is None and isinstance(chunk.get("sampling"), dict):
            self.sampling = chunk["sampling"]  # the server's report (lightning's server)
        if not self.model and isinstance(chunk.get("model"), str):
            self.model = chunk["model"]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]

    def _choice(self, c: dict[str, Any], pos: int) -> tuple[int, _Choice]:
        index = c.get("index")
        index = index if type(index) is int else pos
        acc = self.choices.get(index)
        if acc is None:
            acc = self.choices[index] = _Choice()
        return index, acc

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.version_max is not None and self.version_max != self.version:
            out["policy_version_max"] = self.version_max
        return out


class ChatStream(_Stream):
    """Accumulates ``chat.completion.chunk`` events."""

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        self._common(chunk)
        for pos, c in enumerate(chunk.get("choices") or ()):
            if not isinstance(c, dict):
                continue
            _, acc = self._choice(c, pos)
            acc.add_ids(c.get("token_ids"))
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                acc.add_logprobs(_chat_logprobs(lp))
            delta = c.get("delta") or {}
            if isinstance(delta, dict):
                if isinstance(delta.get("content"), str):
                    acc.text.append(delta["content"])
                if isinstance(delta.get("refusal"), str):
                    acc.refusal.append(delta["refusal"])
                for pos_tc, tc in enumerate(delta.get("tool_calls") or ()):
                    if isinstance(tc, dict):
                        self._tool_delta(acc, tc, pos_tc)
            if c.get("finish_reason"):
                acc.finish_reason = c["finish_reason"]

    @staticmethod
    def _tool_delta(acc: _Choice, tc: dict[str, Any], pos: int) -> None:
        i = tc.get("index")
        i = i if type(i) is int else pos
        call = acc.calls.get(i)
        if call is None:
            call = acc.calls[i] = {"id": None, "name": None, "arguments": []}
        if tc.get("id"):
            call["id"] = tc["id"]
        fn = tc.get("function") or {}
        if isinstance(fn, dict):
            if fn.get("name"):
                call["name"] = fn["name"]
            if isinstance(fn.get("arguments"), str):
                call["arguments"].append(fn["arguments"])

    def records(self, *, aborted: bool) -> list[Record]:
        out = []
        for index in sorted(self.choices):
            acc = self.choices[index]
            extra = self.extra()
            if acc.refusal:
                extra["refusal"] = "".join(acc.refusal)
            out.append(
                Record(
                    prompt_ids=self.prompt,
                    response_ids=acc.ids,
                    logprobs=acc.logprobs,
                    finish_reason=acc.finish_reason or ("abort" if aborted else ""),
                    text="".join(acc.text),
                    tool_calls=[
                        {"id": c["id"], "name": c["name"], "arguments": "".join(c["arguments"])}
                        for _, c in sorted(acc.calls.items())
                    ],
                    choice_index=index,
                    extra=extra,
                )
            )
        return out


class CompletionStream(_Stream):
    """Accumulates streamed ``text_completion`` events."""

    def __init__(self, request: dict[str, Any]) -> None:
        super().__init__()
        self.n = _n(request)

    def feed(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        self._common(chunk)
        for pos, c in enumerate(chunk.get("choices") or ()):
            if not isinstance(c, dict):
                continue
            _, acc = self._choice(c, pos)
            if acc.prompt is None and c.get("prompt_token_ids") is not None:
                acc.prompt = c["prompt_token_ids"]
            acc.add_ids(c.get("token_ids"))
            lp = c.get("logprobs")
            if isinstance(lp, dict):
                acc.add_logprobs(lp.get("token_logprobs"))
            if isinstance(c.get("text"), str):
                acc.text.append(c["text"])
            if c.get("finish_reason"):
                acc.finish_reason = c["finish_reason"]

    def records(self, *, aborted: bool) -> list[Record]:
        return [
            Record(
                prompt_ids=_completion_prompt(self.prompt, acc.prompt, index, self.n),
                response_ids=acc.ids,
                logprobs=acc.logprobs,
                finish_reason=acc.finish_reason or ("abort" if aborted else ""),
                text="".join(acc.text),
                tool_calls=[],
                choice_index=index,
                extra=self.extra(),
            )
            for index, acc in sorted(self.choices.items())
        ]


_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesStream:
    """Accumulates Responses API stream events; token ids come with the final one."""

    def __init__(self) -> None:
        self.final: Any = None
        self.text: list[str] = []
        self.model: str = ""
        self.events = 0

    def feed(self, event: Any) -> None:
        if not isinstance(event, dict):
            return
        self.events += 1
        kind = event.get("type")
        if kind == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self.text.append(event["delta"])
        elif kind in _FINAL_EVENTS and isinstance(event.get("response"), dict):
            self.final = event["response"]
        elif kind == "response.created" and isinstance(event.get("response"), dict):
            model = event["response"].get("model")
            if isinstance(model, str):
                self.model = model

    @property
    def policy_version(self) -> int | None:
        return _policy_version(self.final)

    def records(self, *, aborted: bool) -> list[Record]:
        if self.final is not None:
            return response_records(self.final)
        if not self.events:
            return []
        rec = Record(
            prompt_ids=None,
            response_ids=None,
            logprobs=None,
            finish_reason="abort",
            text="".join(self.text),
            tool_calls=[],
            choice_index=0,
        )
        rec.reason = (
            "stream_aborted: the stream ended before response.completed (token ids come with it)"
        )
        return [rec]
