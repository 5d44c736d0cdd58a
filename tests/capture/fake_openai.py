"""A small deterministic OpenAI-compatible server for the capture tests.

Paths are ``/{mode}/v1/{chat/completions|completions|responses}``; the mode says how the
server behaves:

- ``lightning``: the lightning policy server: token ids (and ``policy_version``) when the
  body asks with ``return_token_ids``, log-probs when asked.
- ``vllm``: like vLLM: token ids when asked, no ``policy_version``; completions carry the
  prompt ids on each choice.
- ``external``: like api.openai.com: never token ids.
- ``malformed``: ``token_ids`` are strings.
- ``misaligned``: one log-prob fewer than token ids.

Every request body is kept in ``FakeOpenAI.requests`` as ``(path, body)``. The same logic
serves a real socket (``app``, a Starlette app run by uvicorn) and an in-process
``handler`` for ``httpx.MockTransport``.
"""

from __future__ import annotations

import json
import threading
from typing import Any

VERSION = 7
TOOL_ARGS = '{"city": "Paris"}'


def prompt_ids(text: str) -> list[int]:
    return [ord(c) % 500 + 1 for c in text]


def response_pieces(body: dict[str, Any], choice: int) -> tuple[list[str], dict | None]:
    """(text pieces, tool call or None) of one choice."""
    tools = body.get("tools")
    msgs = body.get("messages") or []
    answered = any(m.get("role") == "tool" for m in msgs if isinstance(m, dict))
    inputs = body.get("input")
    if isinstance(inputs, list):
        answered = answered or any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in inputs
        )
    if tools and not answered:
        return ["<call>", "get_weather", TOOL_ARGS], {"name": "get_weather", "arguments": TOOL_ARGS}
    fmt = body.get("response_format") or (body.get("text") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return ['{"answer": ', "42", "}"], None
    return ["Hello", " world", f" {choice}" if choice else "!"], None


def token_ids(choice: int, n: int) -> list[int]:
    return [1000 + 100 * choice + i for i in range(n)]


def logprobs(n: int) -> list[float]:
    return [-(i + 1) / 8 for i in range(n)]  # exact in float32


def _flatten(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "|".join(_flatten(v) for v in value)
    if isinstance(value, dict):
        return _flatten(value.get("content") or value.get("text") or value.get("output") or "")
    return ""


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------ dispatch

    def handle(self, path: str, body: dict[str, Any]) -> tuple[Any, list[Any] | None]:
        """(JSON body, None) or (None, SSE events)."""
        with self._lock:
            self.requests.append((path, body))
        parts = path.strip("/").split("/")
        mode, endpoint = parts[0], "/".join(parts[2:])
        ids = mode in ("lightning", "vllm", "malformed", "misaligned") and bool(
            body.get("return_token_ids")
        )
        stream = bool(body.get("stream"))
        if endpoint == "chat/completions":
            return self._chat(mode, body, ids, stream)
        if endpoint == "completions":
            return self._completions(mode, body, ids, stream)
        if endpoint == "responses":
            return self._responses(mode, body, ids, stream)
        raise KeyError(path)

    def _ids(self, mode: str, choice: int, n: int) -> Any:
        if mode == "malformed":
            return [str(i) for i in token_ids(choice, n)]
        return token_ids(choice, n)

    def _lps(self, mode: str, n: int) -> list[float]:
        return logprobs(n)[:-1] if mode == "misaligned" else logprobs(n)

    @staticmethod
    def _top(mode: str, top: dict[str, Any], ids: bool) -> dict[str, Any]:
        if ids and mode == "lightning":
            top["policy_version"] = VERSION
        return top

    # ------------------------------------------------------------ chat

    def _chat(self, mode, body, ids, stream):
        n = body.get("n") or 1
        p_ids = prompt_ids(_flatten(body.get("messages")))
        want_lp = bool(body.get("logprobs"))
        base = {"id": "chatcmpl-1", "created": 1, "model": body.get("model", "m")}
        if not stream:
            choices = []
            for k in range(n):
                pieces, call = response_pieces(body, k)
                msg: dict[str, Any] = {
                    "role": "assistant",
                    "content": None if call else "".join(pieces),
                }
                if call:
                    msg["tool_calls"] = [{"id": f"call_{k}", "type": "function", "function": call}]
                ch: dict[str, Any] = {
                    "index": k,
                    "message": msg,
                    "finish_reason": "tool_calls" if call else "stop",
                }
                if want_lp:
                    ch["logprobs"] = {
                        "content": [
                            {
                                "token": p,
                                "logprob": lp,
                                "bytes": list(p.encode()),
                                "top_logprobs": [],
                            }
                            for p, lp in zip(pieces, self._lps(mode, len(pieces)))
                        ]
                    }
                if ids:
                    ch["token_ids"] = self._ids(mode, k, len(pieces))
                choices.append(ch)
            out = {
                **base,
                "object": "chat.completion",
                "choices": choices,
                "usage": {
                    "prompt_tokens": len(p_ids),
                    "completion_tokens": 3,
                    "total_tokens": len(p_ids) + 3,
                },
            }
            if ids:
                out["prompt_token_ids"] = p_ids
            return self._top(mode, out, ids), None
        events = []
        chunk = {**base, "object": "chat.completion.chunk"}
        first = {
            **chunk,
            "choices": [
                {"index": k, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for k in range(n)
            ],
        }
        if ids:
            first["prompt_token_ids"] = p_ids
            for c in first["choices"]:
                c["token_ids"] = []
        events.append(self._top(mode, first, ids))
        for k in range(n):
            pieces, call = response_pieces(body, k)
            t_ids, lps = self._ids(mode, k, len(pieces)), self._lps(mode, len(pieces))
            for i, piece in enumerate(pieces):
                if call:
                    tc: dict[str, Any] = {"index": 0}
                    if i == 0:
                        tc.update(
                            id=f"call_{k}",
                            type="function",
                            function={"name": call["name"], "arguments": ""},
                        )
                    else:
                        tc["function"] = {"arguments": piece if i == 2 else ""}
                    delta: dict[str, Any] = {"tool_calls": [tc]}
                else:
                    delta = {"content": piece}
                c: dict[str, Any] = {"index": k, "delta": delta, "finish_reason": None}
                if want_lp:
                    c["logprobs"] = {
                        "content": [
                            {"token": piece, "logprob": lp, "bytes": [], "top_logprobs": []}
                            for lp in lps[i : i + 1]
                        ]
                    }
                if ids:
                    c["token_ids"] = t_ids[i : i + 1]
                events.append(self._top(mode, {**chunk, "choices": [c]}, ids))
            last = {"index": k, "delta": {}, "finish_reason": "tool_calls" if call else "stop"}
            if ids:
                last["token_ids"] = []
            events.append(self._top(mode, {**chunk, "choices": [last]}, ids))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(
                {
                    **chunk,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": len(p_ids),
                        "completion_tokens": 3 * n,
                        "total_tokens": len(p_ids) + 3 * n,
                    },
                }
            )
        return None, events

    # ------------------------------------------------------------ completions

    def _completions(self, mode, body, ids, stream):
        n = body.get("n") or 1
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) else [prompt]
        p_ids = [prompt_ids(str(p)) for p in prompts]
        want_lp = body.get("logprobs") is not None
        base = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": body.get("model", "m"),
        }
        choices = []
        for p in range(len(prompts)):
            for k in range(n):
                index = p * n + k
                pieces, _ = response_pieces(body, index)
                ch: dict[str, Any] = {
                    "index": index,
                    "text": "".join(pieces),
                    "finish_reason": "length",
                }
                if want_lp:
                    lps = self._lps(mode, len(pieces))
                    ch["logprobs"] = {
                        "tokens": pieces,
                        "token_logprobs": lps,
                        "top_logprobs": None,
                        "text_offset": [0, 5, 11],
                    }
                if ids:
                    ch["token_ids"] = self._ids(mode, index, len(pieces))
                    if mode == "vllm":
                        ch["prompt_token_ids"] = p_ids[p]
                ch["_pieces"] = pieces
                choices.append(ch)
        top: dict[str, Any] = {}
        if ids and mode != "vllm":
            top["prompt_token_ids"] = p_ids if isinstance(prompt, list) else p_ids[0]
        if not stream:
            for ch in choices:
                ch.pop("_pieces")
            return self._top(mode, {**base, **top, "choices": choices}, ids), None
        events = []
        for j, ch in enumerate(choices):
            pieces = ch.pop("_pieces")
            for i, piece in enumerate(pieces):
                c: dict[str, Any] = {
                    "index": ch["index"],
                    "text": piece,
                    "finish_reason": ch["finish_reason"] if i == len(pieces) - 1 else None,
                }
                if want_lp:
                    c["logprobs"] = {
                        "tokens": [piece],
                        "token_logprobs": ch["logprobs"]["token_logprobs"][i : i + 1],
                        "top_logprobs": None,
                        "text_offset": [0],
                    }
                if ids:
                    c["token_ids"] = ch["token_ids"][i : i + 1]
                    if mode == "vllm" and i == 0:
                        c["prompt_token_ids"] = ch["prompt_token_ids"]
                extra = top if (j == 0 and i == 0) else {}
                events.append(self._top(mode, {**base, **extra, "choices": [c]}, ids))
        return None, events

    # ------------------------------------------------------------ responses

    def _responses(self, mode, body, ids, stream):
        pieces, call = response_pieces(body, 0)
        p_ids = prompt_ids(_flatten(body.get("instructions") or "") + _flatten(body.get("input")))
        want_lp = "message.output_text.logprobs" in (body.get("include") or [])
        lps = self._lps(mode, len(pieces))
        if call:
            output = [
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_0",
                    "name": call["name"],
                    "arguments": call["arguments"],
                    "status": "completed",
                }
            ]
        else:
            part: dict[str, Any] = {
                "type": "output_text",
                "text": "".join(pieces),
                "annotations": [],
            }
            if want_lp:
                part["logprobs"] = [
                    {"token": p, "logprob": lp, "bytes": [], "top_logprobs": []}
                    for p, lp in zip(pieces, lps)
                ]
            output = [
                {
                    "type": "message",
                    "id": "msg_1",
                    "role": "assistant",
                    "status": "completed",
                    "content": [part],
                }
            ]
        resp: dict[str, Any] = {
            "id": "resp_1",
            "object": "response",
            "created_at": 1,
            "model": body.get("model", "m"),
            "status": "completed",
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": body.get("tools") or [],
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": {
                "input_tokens": len(p_ids),
                "output_tokens": len(pieces),
                "total_tokens": len(p_ids) + len(pieces),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        }
        if ids:
            resp.update(
                prompt_token_ids=p_ids,
                output_token_ids=self._ids(mode, 0, len(pieces)),
                output_token_logprobs=lps,
            )
            self._top(mode, resp, ids)
        if not stream:
            return resp, None
        created = {**resp, "status": "in_progress", "output": [], "usage": None}
        for key in ("prompt_token_ids", "output_token_ids", "output_token_logprobs"):
            created.pop(key, None)
        seq = iter(range(1000))
        events: list[Any] = [
            {"type": "response.created", "sequence_number": next(seq), "response": created}
        ]
        item = output[0]
        if call:
            events.append(
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                }
            )
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "sequence_number": next(seq),
                    "item_id": "fc_1",
                    "output_index": 0,
                    "delta": call["arguments"],
                }
            )
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "sequence_number": next(seq),
                    "item_id": "fc_1",
                    "output_index": 0,
                    "arguments": call["arguments"],
                    "name": call["name"],
                }
            )
        else:
            events.append(
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": {**item, "content": [], "status": "in_progress"},
                }
            )
            events.append(
                {
                    "type": "response.content_part.added",
                    "sequence_number": next(seq),
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }
            )
            for i, piece in enumerate(pieces):
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": next(seq),
                        "item_id": "msg_1",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                        "logprobs": [],
                    }
                )
            events.append(
                {
                    "type": "response.output_text.done",
                    "sequence_number": next(seq),
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "text": "".join(pieces),
                    "logprobs": [],
                }
            )
            events.append(
                {
                    "type": "response.content_part.done",
                    "sequence_number": next(seq),
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "part": item["content"][0],
                }
            )
        events.append(
            {
                "type": "response.output_item.done",
                "sequence_number": next(seq),
                "output_index": 0,
                "item": item,
            }
        )
        events.append(
            {"type": "response.completed", "sequence_number": next(seq), "response": resp}
        )
        return None, events


def sse_bytes(events: list[Any], *, done: bool) -> list[bytes]:
    """Server-sent events, one ``bytes`` per event (named for the Responses API)."""
    out = []
    for e in events:
        name = (
            e.get("type")
            if isinstance(e, dict) and str(e.get("type", "")).startswith("response.")
            else None
        )
        head = f"event: {name}\n" if name else ""
        out.append(f"{head}data: {json.dumps(e)}\n\n".encode())
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def make_app(fake: FakeOpenAI) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> Any:
        body = await request.json()
        path = request.url.path
        data, events = fake.handle(path, body)
        if events is None:
            return JSONResponse(data)
        chunks = sse_bytes(events, done="/responses" not in path)

        async def gen():
            for c in chunks:
                yield c

        return StreamingResponse(gen(), media_type="text/event-stream")

    return Starlette(routes=[Route("/{path:path}", endpoint, methods=["POST"])])


def sdk_httpx() -> Any:
    """The HTTP library the installed ``openai`` uses (httpx2 from openai 3, else httpx)."""
    from openai import _base_client

    return getattr(_base_client, "httpx2", None) or _base_client.httpx


def mock_handler(fake: FakeOpenAI, httpx_module: Any) -> Any:
    """A ``MockTransport`` handler (for ``httpx`` or ``httpx2``) serving ``fake``."""

    def handler(request: Any) -> Any:
        body = json.loads(request.content)
        data, events = fake.handle(request.url.path, body)
        if events is None:
            return httpx_module.Response(200, json=data)
        chunks = sse_bytes(events, done="/responses" not in request.url.path)
        return httpx_module.Response(
            200,
            headers={"content-type": "text/event-stream"},
            stream=httpx_module.ByteStream(b"".join(chunks)),
        )

    return handler
