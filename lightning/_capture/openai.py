"""Capture of LLM calls made with the official ``openai`` package.

Hook point
    ``openai._base_client.SyncAPIClient.request`` and ``AsyncAPIClient.request``, patched
    on the classes. Every resource call of the SDK funnels through this one method
    (``chat.completions.create``/``parse``/``stream``, ``completions.create``,
    ``responses.create``/``parse``/``stream``, ``with_raw_response``,
    ``with_streaming_response``), and so does every framework built on the SDK: LangChain's
    ``ChatOpenAI`` (which calls ``with_raw_response``), the OpenAI Agents SDK (Responses or
    chat completions), AutoGen's ``OpenAIChatCompletionClient``. Patching the class, not
    an instance, covers clients created before and after :func:`install`. Subclasses that
    define their own ``request`` are patched too: an instrumentation applied earlier
    (OpenInference wraps ``OpenAI.request``) would otherwise shadow the base's method; a
    call seen by two of our wrappers (a subclass delegating to the base) is recorded once,
    and an instrumentation's wrapper bound to ours after :func:`uninstall` passes through.
    ``request`` is the SDK's generic entry point since 1.0 and sees the request *options*
    before the HTTP request is built (so token-id fields can be added to the JSON body,
    once, whatever the retries) and the value returned to the caller. An httpx transport
    wrapper was the alternative; it is rejected because the SDK accepts user-supplied HTTP
    clients (httpx or httpx2, any transport) that we would have to rewrap, it cannot tell
    which endpoint a request is for without re-parsing URLs, and it would have to
    re-serialise the body to inject fields.

What is read
    Non-streaming calls return the SDK's pydantic model, which keeps unknown fields
    (``prompt_token_ids``, ``token_ids``, ``policy_version``) as extras: read directly,
    no copy. Raw responses (``with_raw_response``) are read from the body bytes already in
    memory. Streams (``stream=True``, ``with_streaming_response``) are observed by wrapping
    the ``httpx`` response's byte stream (a ``SyncByteStream``/``AsyncByteStream``, httpx's
    own extension point) *before* the SDK reads it: the bytes pass through unchanged, a
    small SSE parser feeds an accumulator, and the transition is recorded when the SDK
    closes the response (end of stream, ``break`` + ``close()``, context-manager exit).
    An early close records what was received with ``finish_reason="abort"``; a stream that
    is never read records nothing. The app always gets the SDK's own objects, unchanged.

Token ids
    Only for clients whose base URL starts with one of ``token_id_base_urls`` (the
    lightning policy server, a vLLM server), the JSON body gets ``return_token_ids`` and
    log-probs requests (see :func:`_inject`); other servers (api.openai.com rejects
    unknown fields) get the request exactly as the app built it. A response without token
    ids is recorded as text only, ``trainable=False``, and said once per process.

Contract with the policy server (vLLM field names)
    Request (only for ``token_id_base_urls``): ``"return_token_ids": true``; chat
    completions also ``"logprobs": true`` (the app's ``top_logprobs`` is kept);
    completions ``"logprobs": 1`` unless the app gave an int; responses append
    ``"message.output_text.logprobs"`` to ``include``.
    Response, read wherever the server gives it (with or without the request fields):

    - chat (JSON): top-level ``prompt_token_ids`` and ``policy_version``; per choice
      ``token_ids`` and ``logprobs.content[*].logprob``, one per token id.
    - chat (SSE): ``prompt_token_ids`` in some chunk (the first), ``policy_version`` in
      every chunk (the smallest seen is recorded), per choice ``token_ids`` (the new ids)
      and ``logprobs.content`` for them; accumulated by ``choices[].index``.
    - completions: top-level ``prompt_token_ids`` (a list of lists for a batch of prompts,
      choice ``i`` belonging to prompt ``i // n``) or, as vLLM does, per choice;
      ``token_ids`` and ``logprobs.token_logprobs`` per choice. Streams alike.
    - responses: top-level ``prompt_token_ids``, ``output_token_ids``,
      ``output_token_logprobs`` and ``policy_version``; for a stream, on the
      ``response`` of the final ``response.completed`` (or ``.incomplete``/``.failed``)
      event. Without ``output_token_logprobs`` the ``output_text`` parts' log-probs are
      used, which only align when the output is text alone.

    No ``policy_version`` (vLLM) records -1. A log-prob count that differs from the token
    id count records the ids without log-probs, ``trainable=False`` and
    ``untrainable_reason``; nothing is re-tokenized or guessed.

Calls that name their rollout
    A call whose client is pointed at a per-rollout URL of the policy server
    (``/rollouts/{id}/v1``, :attr:`lightning.RolloutContext.base_url`) or that sends the
    ``X-Lightning-Rollout-Id`` header (``default_headers``/``extra_headers``) is not
    recorded here: the server captures it into the rollout it names (or refuses it with a
    404), so it is stored exactly once, in that rollout, whichever rollout the app is in.
    The daemon numbers and orders such calls with the app's own (see
    :mod:`lightning._ingest`).

Outside a rollout
    Nothing is recorded, unless an OpenTelemetry bridge
    (:class:`lightning.otel.LightningSpanProcessor`) registered a call-span sink with
    :func:`set_call_spans`: then each call (token ids requested as above) becomes a GenAI
    ``chat``/``text_completion`` span with ``lightning.*`` token-id attributes, a child of
    the span current when the call was made (the instrumentation's own LLM span, if any),
    which the bridge turns into a transition.

Robustness
    Outside a rollout the hook costs one context-variable read and one global read. Any
    failure of the capture itself is logged once (``capture.failed``) and the call goes
    on; exceptions raised by the SDK or the server reach the app unchanged and record
    nothing.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import re
import sys
import threading
import time
import types
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import structlog

from .. import _rollout
from .._protocol import Transition
from .._sampling import sampling_from_request
from . import _records
from ._records import ChatStream, CompletionStream, Record, ResponsesStream

logger = structlog.get_logger()

__all__ = ["install", "installed", "set_call_spans", "uninstall"]

_MARK = "__lightning_capture__"
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
_JSON = msgspec.json.Decoder()

_lock = threading.Lock()
_prefixes: tuple[str, ...] = ()
_originals: dict[type, Any] = {}
_wrappers: dict[type, Any] = {}
_stream_types: tuple[type, ...] = ()
_model_types: tuple[type, ...] = ()
_logged: set[str] = set()
_call_spans: Any = None
_inside: contextvars.ContextVar[bool] = contextvars.ContextVar("lightning_capture_inside",
                                                              default=False)


def set_call_spans(sink: Any) -> None:
    """Record calls made outside rollouts as spans through ``sink`` (None: stop).

    ``sink.context()`` is called when the request starts (returns the OTel context to
    parent the span on); ``sink.call(parent, transition)`` when it is recorded.
    """
    global _call_spans
    _call_spans = sink


def _once(key: str) -> bool:
    """True the first time ``key`` is seen in this process."""
    if key in _logged:
        return False
    _logged.add(key)
    return True


def _failed(where: str, exc: BaseException) -> None:
    if _once(f"failed:{where}"):
        logger.warning(
            "capture.failed",
            where=where,
            error=f"{type(exc).__qualname__}: {exc}",
            hint="the LLM call went on unchanged; it was not recorded (or recorded "
            "partially). Please report this with the openai version.",
            exc_info=exc,
        )
    else:
        logger.debug("capture.failed", where=where, error=repr(exc))


# ------------------------------------------------------------------ install


def _norm(url: str) -> str:
    return url.rstrip("/") + "/"


def install(token_id_base_urls: Sequence[str] = ()) -> bool:
    """Patch the SDK (once); later calls only replace the token-id base URLs.

    Returns False when the SDK's layout is not the one this module knows.
    """
    global _prefixes, _stream_types, _model_types
    if isinstance(token_id_base_urls, str):
        token_id_base_urls = (token_id_base_urls,)
    with _lock:
        _prefixes = tuple(_norm(_public_url(str(u))) for u in token_id_base_urls if u)
        if _originals:
            return True
        import openai
        from openai import _base_client

        sync_cls = getattr(_base_client, "SyncAPIClient", None)
        async_cls = getattr(_base_client, "AsyncAPIClient", None)
        if not all(c is not None and "request" in c.__dict__ for c in (sync_cls, async_cls)):
            logger.warning(
                "capture.unsupported_openai",
                version=getattr(openai, "__version__", "?"),
                hint="LLM calls made with this openai version are not captured; record "
                "them with lightning.record_transition or upgrade openai",
            )
            return False
        _stream_types = tuple(
            t for t in (getattr(openai, "Stream", None), getattr(openai, "AsyncStream", None)) if t
        )
        _model_types = tuple(t for t in (getattr(openai, "BaseModel", None),) if t)
        for base, make in ((sync_cls, _sync_request), (async_cls, _async_request)):
            # The base class, and subclasses that define their own ``request``: an
            # instrumentation applied before us (OpenInference wraps ``OpenAI.request``)
            # would otherwise shadow the base's method and bypass the capture.
            for cls in (base, *_subclasses(base)):
                orig = cls.__dict__.get("request")
                if orig is None:
                    continue
                if _ours(orig):  # patched by an earlier copy of this module
                    orig = getattr(orig, "__wrapped__", orig)
                _originals[cls] = orig
                wrapper = make(orig)
                setattr(wrapper, _MARK, True)
                _wrappers[cls] = wrapper
                cls.request = wrapper
        logger.debug("capture.installed", library="openai", token_id_base_urls=list(_prefixes))
        return True


def _ours(fn: Any) -> bool:
    # type(): a wrapt proxy (an instrumentation wrapping our wrapper) forwards getattr
    return type(fn) is types.FunctionType and getattr(fn, _MARK, False)


def _subclasses(cls: type) -> list[type]:
    out: list[type] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def uninstall() -> None:
    """Restore the SDK's own methods (idempotent)."""
    global _prefixes
    with _lock:
        for cls, orig in _originals.items():
            # Only where our wrapper is still the class's own: an instrumentation applied
            # on top keeps its wrapper (ours below it passes calls through from now on).
            if cls.__dict__.get("request") is _wrappers.get(cls):
                cls.request = orig
        _originals.clear()
        _wrappers.clear()
        _prefixes = ()


def installed() -> bool:
    return bool(_originals)


# ------------------------------------------------------------------ the hooks


def _as_function(orig: Any) -> Any:
    """``orig`` callable as ``orig(self, ...)``: a plain function is; another descriptor
    (an instrumentation's wrapt wrapper) is bound first, so it sees its instance."""
    if type(orig) is types.FunctionType:  # not isfunction(): wrapt proxies claim to be
        return orig

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return orig.__get__(self, type(self))(*args, **kwargs)

    return call


def _sync_request(wrapped: Any) -> Any:
    orig = _as_function(wrapped)

    @functools.wraps(wrapped)
    def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = _rollout._current.get()
        if ctx is None and _call_spans is None:
            return orig(self, cast_to, options, *args, **kwargs)
        # a subclass's request delegating to the base's (seen once), or uninstalled while
        # an instrumentation's wrapper still holds this one
        if _inside.get() or not _originals:
            return orig(self, cast_to, options, *args, **kwargs)
        call = _begin(self, options, kwargs, ctx, False)
        if call is None:
            return orig(self, cast_to, options, *args, **kwargs)
        token = _inside.set(True)
        try:
            result = orig(self, cast_to, call.options, *args, **kwargs)
        finally:
            _inside.reset(token)
        _observe(call, result)
        return result

    return request


def _async_request(wrapped: Any) -> Any:
    orig = _as_function(wrapped)

    @functools.wraps(wrapped)
    async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = _rollout._current.get()
        if ctx is None and _call_spans is None:
            return await orig(self, cast_to, options, *args, **kwargs)
        if _inside.get() or not _originals:
            return await orig(self, cast_to, options, *args, **kwargs)
        call = _begin(self, options, kwargs, ctx, True)
        if call is None:
            return await orig(self, cast_to, options, *args, **kwargs)
        token = _inside.set(True)
        try:
            result = await orig(self, cast_to, call.options, *args, **kwargs)
        finally:
            _inside.reset(token)
        _observe(call, result)
        return result

    return request


def _endpoint(options: Any) -> str | None:
    if str(getattr(options, "method", "")).lower() != "post":
        return None
    url = str(getattr(options, "url", "")).split("?", 1)[0].rstrip("/")
    if url.endswith("/chat/completions"):
        return "chat.completions"
    if url.endswith("/completions"):
        return "completions"
    if url.endswith("/responses"):
        return "responses"
    return None


class _Call:
    """One captured call, from ``request`` to the recording of its transitions."""

    __slots__ = (
        "base_url",
        "ctx",
        "endpoint",
        "is_async",
        "options",
        "otel_parent",
        "request",
        "stream",
        "t0",
        "ttft",
    )

    def __init__(self, ctx, endpoint, request, base_url, options, stream, is_async) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.request = request
        self.base_url = base_url
        self.options = options
        self.stream = stream
        self.is_async = is_async
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.otel_parent: Any = None


def _begin(
    client: Any, options: Any, kwargs: dict[str, Any], ctx: Any, is_async: bool
) -> _Call | None:
    try:
        endpoint = _endpoint(options)
        if endpoint is None:
            return None
        body = options.json_data
        if not isinstance(body, dict):
            return None
        extra = options.extra_json
        request = {**body, **extra} if isinstance(extra, dict) and extra else body
        stream = bool(kwargs.get("stream", False) or request.get("stream"))
        if stream:
            # Recorded later, after the app may have changed its own lists: snapshot now.
            request = msgspec.to_builtins(request, enc_hook=repr, str_keys=True)
        base_url, token_ids = _target(client.base_url)
        if _names_rollout(base_url, options, client):
            return None  # the server that serves it captures it: once
        if token_ids:
            options = options.model_copy() if hasattr(options, "model_copy") else copy.copy(options)
            options.json_data = _inject(endpoint, body)
        call = _Call(ctx, endpoint, request, base_url, options, stream, is_async)
        if ctx is None:
            sink = _call_spans
            if sink is None:
                return None
            call.otel_parent = sink.context()
        return call
    except Exception as exc:  # noqa: BLE001 - never break the app's call
        _failed("request", exc)
        return None


_targets: dict[int, tuple[Any, tuple[str, ...], str, bool]] = {}
_ROLLOUT_URL = re.compile(r"/rollouts/[^/]+/v1(/|$)")
_ROLLOUT_HEADER = "x-lightning-rollout-id"


def _names_rollout(base_url: str, options: Any, client: Any) -> bool:
    """Whether the request names its rollout on the wire: a per-rollout base URL
    (``/rollouts/{id}/v1``, or such an absolute request URL) or the
    ``X-Lightning-Rollout-Id`` header (the client's or the call's). The policy server
    captures such a call itself (or refuses it): recording it here too would store it
    twice."""
    if "/rollouts/" in base_url and _ROLLOUT_URL.search(base_url):
        return True
    url = str(getattr(options, "url", ""))
    if "/rollouts/" in url and _ROLLOUT_URL.search(url):
        return True
    for headers in (getattr(options, "headers", None), getattr(client, "_custom_headers", None)):
        if isinstance(headers, Mapping) and headers:
            for k, v in headers.items():
                if isinstance(k, str) and k.lower() == _ROLLOUT_HEADER and isinstance(v, str):
                    return True
    return False


def _target(url: Any) -> tuple[str, bool]:
    """(``url`` without credentials, whether its server is asked for token ids).

    Cached per URL object (a client keeps its own; httpx URLs are immutable): turning an
    httpx URL into a string costs more than the rest of the hook's request side.
    """
    hit = _targets.get(id(url))
    if hit is not None and hit[0] is url and hit[1] is _prefixes:
        return hit[2], hit[3]
    public = _public_url(str(url))
    token_ids = bool(_prefixes) and _norm(public).startswith(_prefixes)
    if len(_targets) >= 64:
        _targets.clear()
    _targets[id(url)] = (url, _prefixes, public, token_ids)  # holds url: its id stays its own
    return public, token_ids


def _inject(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The body with token-id and log-prob requests added (a copy; nothing else changes)."""
    body = dict(body)
    body["return_token_ids"] = True
    if endpoint == "chat.completions":
        body["logprobs"] = True  # the app's top_logprobs, if any, is kept
    elif endpoint == "completions":
        if type(body.get("logprobs")) is not int:
            body["logprobs"] = 1
    else:
        include = list(body.get("include") or ())
        if _LOGPROBS_INCLUDE not in include:
            include.append(_LOGPROBS_INCLUDE)
        body["include"] = include
    return body


def _public_url(url: str) -> str:
    """``url`` without credentials (``https://user:pass@host`` -> ``https://host``)."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    if sep and "@" in host:
        return f"{scheme}://{host.rsplit('@', 1)[1]}{slash}{path}"
    return url


# ------------------------------------------------------------------ reading results


def _observe(call: _Call, result: Any) -> None:
    """Record a finished call, or attach a stream observer to its HTTP response."""
    try:
        if _model_types and isinstance(result, _model_types):
            _finish_json(call, result)  # the common case: the SDK's parsed response
            return
        if _stream_types and isinstance(result, _stream_types):
            _watch(call, result.response)
            return
        raw = getattr(result, "http_response", None)  # with_raw_response / streaming_response
        if raw is None and _is_http_response(result):
            raw = result
        if raw is not None:
            content = _read_content(raw)
            if content is None:
                _watch(call, raw)
            elif not _is_sse(raw):
                _finish_json(call, _JSON.decode(content))
            else:
                sink = _Sink(call, raw, decoded=True)
                sink.feed(content)
                sink.eof()
                sink.finish()
            return
        _finish_json(call, result)
    except Exception as exc:  # noqa: BLE001
        _failed("response", exc)


def _is_http_response(obj: Any) -> bool:
    mod = type(obj).__module__
    return mod.startswith(("httpx2", "httpx")) and hasattr(obj, "stream")


def _read_content(raw: Any) -> bytes | None:
    """The body if it was already read, else None (never triggers a read)."""
    content = raw.__dict__.get("_content")
    return content if isinstance(content, bytes) else None


def _is_sse(raw: Any) -> bool:
    return "text/event-stream" in raw.headers.get("content-type", "")


def _finish_json(call: _Call, resp: Any) -> None:
    if call.endpoint == "chat.completions":
        records = _records.chat_records(resp)
    elif call.endpoint == "completions":
        records = _records.completion_records(resp, call.request)
    else:
        records = _records.response_records(resp)
    model = _records._get(resp, "model")
    _record(call, records, _records._policy_version(resp), model, _records._usage(resp),
            _records._get(resp, "sampling"))


def _record(
    call: _Call,
    records: list[Record],
    version: int | None,
    model: Any,
    usage: Any,
    reported: Any = None,
) -> None:
    """Record one transition per choice; ``reported`` is the server's ``"sampling"``
    report, if the response has one (see :mod:`lightning._sampling`)."""
    if not records:
        return
    ctx = call.ctx
    if ctx is None:
        _record_spans(call, records, version, model, usage)
        return
    if ctx.finished:
        if _once("after_rollout"):
            logger.warning(
                "capture.after_rollout",
                rollout_id=ctx.rollout_id,
                endpoint=call.endpoint,
                hint="a streamed response was read after its rollout returned; finish "
                "reading streams inside the @lightning.rollout function",
            )
        return
    latency = time.perf_counter() - call.t0
    model = model if isinstance(model, str) and model else str(call.request.get("model") or "")
    several = len(records) > 1 or _records._n(call.request) > 1
    sampling = sampling_from_request(call.request, reported=reported)
    for rec in records:
        meta: dict[str, Any] = {
            "endpoint": call.endpoint,
            "base_url": call.base_url,
            "request": call.request,
            "stream": call.stream,
            "text": rec.text,
        }
        if rec.tool_calls:
            meta["tool_calls"] = rec.tool_calls
        if several:
            meta["choice_index"] = rec.choice_index
        if usage is not None:
            meta["usage"] = usage
        if call.ttft is not None:
            meta["ttft_s"] = call.ttft
        if rec.extra:
            meta.update(rec.extra)
        if not rec.trainable:
            meta["untrainable_reason"] = rec.reason
            if rec.reason.startswith(_records.NO_TOKEN_IDS):
                _warn_no_token_ids(call)
        _rollout._record_packed(
            ctx,
            rec.prompt_ids,
            rec.response_ids,
            rec.logprobs or b"",
            policy_version=-1 if version is None else version,
            model=model,
            finish_reason=rec.finish_reason,
            trainable=rec.trainable,
            latency_s=latency,
            metadata=meta,
            sampling=sampling,
        )


def _record_spans(
    call: _Call, records: list[Record], version: int | None, model: Any, usage: Any
) -> None:
    """A call outside any rollout: one span per choice through the bridge's sink."""
    sink = _call_spans
    if sink is None:
        return
    latency = time.perf_counter() - call.t0
    model = model if isinstance(model, str) and model else str(call.request.get("model") or "")
    for rec in records:
        meta: dict[str, Any] = {"endpoint": call.endpoint, "base_url": call.base_url,
                                "request": call.request, "text": rec.text}
        if rec.tool_calls:
            meta["tool_calls"] = rec.tool_calls
        if usage is not None:
            meta["usage"] = usage
        if not rec.trainable:
            meta["untrainable_reason"] = rec.reason
        sink.call(call.otel_parent, Transition(
            rollout_id="",
            index=0,
            prompt_ids=rec.prompt_ids,
            response_ids=rec.response_ids,
            logprobs=rec.logprobs or b"",
            policy_version=-1 if version is None else version,
            model=model,
            finish_reason=rec.finish_reason,
            trainable=rec.trainable,
            latency_s=latency,
            created_at=time.time(),
            metadata=msgspec.to_builtins(meta, enc_hook=repr, str_keys=True),
        ))


def _warn_no_token_ids(call: _Call) -> None:
    if _once("no_token_ids"):
        logger.warning(
            "capture.no_token_ids",
            base_url=call.base_url,
            endpoint=call.endpoint,
            consequence="LLM calls to this server are recorded as text only and are NOT "
            "trainable (no token ids, no log-probs)",
            fix="point the OpenAI client at the lightning daemon's policy server "
            "(base_url=lightning.llm() / the daemon's /v1 URL) or at a vLLM server "
            "listed in token_id_base_urls, which returns token ids (return_token_ids)",
            token_id_base_urls=list(_prefixes),
        )


# ------------------------------------------------------------------ streams


class _Sink:
    """Parses the bytes of one response as they pass, and records at the end."""

    __slots__ = (
        "acc",
        "at_eof",
        "broken",
        "buf",
        "call",
        "data",
        "decomp",
        "done",
        "finished",
        "parts",
        "sse",
    )

    def __init__(self, call: _Call, raw: Any, *, decoded: bool = False) -> None:
        self.call = call
        self.sse = _is_sse(raw) or (
            call.stream and "json" not in raw.headers.get("content-type", "")
        )
        if call.endpoint == "chat.completions":
            self.acc: Any = ChatStream()
        elif call.endpoint == "completions":
            self.acc = CompletionStream(call.request)
        else:
            self.acc = ResponsesStream()
        self.buf = b""
        self.data: list[bytes] = []
        self.parts: list[bytes] = []
        self.done = False
        self.at_eof = False
        self.finished = False
        self.broken = False
        # The byte stream is the body as sent: decompress it the way httpx does.
        encoding = "" if decoded else raw.headers.get("content-encoding", "").strip().lower()
        self.decomp = None
        if encoding in ("gzip", "x-gzip"):
            self.decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self.decomp = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            raise ValueError(f"unsupported content-encoding {encoding!r}")

    def feed(self, chunk: bytes) -> None:
        if self.broken or not chunk:
            return
        if self.decomp is not None:
            chunk = self.decomp.decompress(chunk)
        if not self.sse:
            self.parts.append(chunk)
            return
        if self.call.ttft is None:
            self.call.ttft = time.perf_counter() - self.call.t0
        lines = (self.buf + chunk).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(b" ") else value)

    def _dispatch(self) -> None:
        if not self.data:
            return
        data = b"\n".join(self.data) if len(self.data) > 1 else self.data[0]
        self.data = []
        if data.startswith(b"[DONE]"):
            self.done = True
            return
        self.acc.feed(_JSON.decode(data))

    def eof(self) -> None:
        self.at_eof = True

    def finish(self) -> None:
        if self.finished or self.broken:
            return
        self.finished = True
        call = self.call
        if not self.sse:
            if self.at_eof and self.parts:
                _finish_json(call, _JSON.decode(b"".join(self.parts)))
            return
        if self.buf:
            self._line(self.buf)
            self.buf = b""
        self._dispatch()
        acc = self.acc
        aborted = not (self.done or self.at_eof)
        records = acc.records(aborted=aborted)
        if isinstance(acc, ResponsesStream):
            final = acc.final
            _record(
                call,
                records,
                acc.policy_version,
                _records._get(final, "model") or acc.model,
                _records._usage(final),
                _records._get(final, "sampling"),
            )
        else:
            _record(call, records, acc.version, acc.model, acc.usage, acc.sampling)

    def fail(self, where: str, exc: BaseException) -> None:
        self.broken = True
        _failed(where, exc)


def _watch(call: _Call, raw: Any) -> None:
    """Replace ``raw.stream`` by a pass-through that feeds a :class:`_Sink`."""
    stream = raw.stream
    base = _byte_stream_base(stream, call.is_async)
    if base is None:
        raise TypeError(f"unknown response stream type {type(stream).__qualname__}")
    raw.stream = _tee_class(base)(stream, _Sink(call, raw))


def _byte_stream_base(stream: Any, is_async: bool) -> type | None:
    """The httpx or httpx2 byte-stream class to subclass (the response checks it)."""
    for name in ("httpx2", "httpx"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        base = mod.AsyncByteStream if is_async else mod.SyncByteStream
        if isinstance(stream, base):
            return base
    return None


@functools.cache
def _tee_class(base: type) -> type:
    if hasattr(base, "aclose"):

        class _AsyncTee(base):  # type: ignore[misc, valid-type]
            def __init__(self, inner: Any, sink: _Sink) -> None:
                self._inner = inner
                self._sink = sink

            async def __aiter__(self) -> Any:
                sink = self._sink
                async for chunk in self._inner:
                    try:
                        sink.feed(chunk)
                    except Exception as exc:  # noqa: BLE001
                        sink.fail("stream", exc)
                    yield chunk
                sink.eof()

            async def aclose(self) -> None:
                try:
                    await self._inner.aclose()
                finally:
                    _finish(self._sink)

            def __getattr__(self, name: str) -> Any:
                if name.startswith("_"):
                    raise AttributeError(name)
                return getattr(self._inner, name)

        return _AsyncTee

    class _SyncTee(base):  # type: ignore[misc, valid-type]
        def __init__(self, inner: Any, sink: _Sink) -> None:
            self._inner = inner
            self._sink = sink

        def __iter__(self) -> Any:
            sink = self._sink
            for chunk in self._inner:
                try:
                    sink.feed(chunk)
                except Exception as exc:  # noqa: BLE001
                    sink.fail("stream", exc)
                yield chunk
            sink.eof()

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                _finish(self._sink)

        def __getattr__(self, name: str) -> Any:
            if name.startswith("_"):
                raise AttributeError(name)
            return getattr(self._inner, name)

    return _SyncTee


def _finish(sink: _Sink) -> None:
    try:
        sink.finish()
    except Exception as exc:  # noqa: BLE001
        sink.fail("stream_end", exc)
