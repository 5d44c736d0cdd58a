"""The OpenAI-compatible policy server (Starlette on uvicorn, inside the daemon's task group).

Endpoints::

    GET  /health                      liveness
    GET  /ready                       503 until the engine serves
    GET  /v1/models                   the served model (+ policy_version, max_model_len)
    POST /v1/chat/completions         messages, tools, n, sampling, logprobs, JSON modes, SSE
    POST /v1/completions              text or token-id prompts, SSE
    POST /v1/responses                enough of the Responses API for the Agents SDK, SSE
    POST /v1/rollouts                 start a server-side captured rollout
    POST /v1/rollouts/{id}/rewards    reward it
    POST /v1/rollouts/{id}/end        finish it
    /rollouts/{id}/v1/...             the OpenAI endpoints, captured into rollout {id}
    POST /v1/traces                   OTLP/HTTP traces (protobuf or JSON) -> rollouts
                                      (lightning.otel.TraceReceiver)

Every completion carries the token ids the engine sampled and the policy version that
sampled them, with vLLM's field names: ``prompt_token_ids`` at the top level,
``choices[].token_ids``, and log-probs after temperature/top-p processing aligned one per
token id (``choices[].logprobs.content``); plus ``policy_version``. The Responses API
carries ``prompt_token_ids``, ``output_token_ids``, ``output_token_logprobs``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status for client mistakes (bad JSON, unknown model, context too long, malformed tools);
a client error is never a 5xx. Before any work, a request is screened and parsed: 401
without the key (compared in constant time), 403 for a cross-origin browser request, 415
for a body that is not JSON, 413 over ``max_body_bytes``, 400 for JSON nested too deeply
or a field of the wrong type or out of bounds (the typed requests of
:mod:`lightning.serving._protocol`; ``param`` names the field). Tokenising runs in a
worker thread, one prompt at a time, and a stream's request is checked against the
context before its 200 is sent. Events captured server-side are validated by the daemon
before they are stored; a refusal is a 400 (409 for a rollout id in use, 404 for a
rollout that is not open). A host that is not loopback needs an ``api_key``.

A request may also name its rollout with the header ``X-Lightning-Rollout-Id``: calls of
clients that are not Python, or do not use the ``openai`` package, land in the same
trajectory as the runtime's (the daemon numbers each source's transitions apart and
interleaves them in call order when the rollout ends: :mod:`lightning._ingest`). The
runtime holds a rollout's start back with its other events (up to ``open_linger_s``), so
such a call can arrive before the daemon knows the rollout: a capture route (and
``/rewards``) then waits up to ``rollout_start_wait_s`` (default 5 s) for a start that may
be on its way, and only then answers 404 ``rollout_not_found``; a rollout that already
finished is refused at once. ``RolloutContext.headers``/``.base_url`` make the runtime
send the start at once. An ``openai`` client pointed at a per-rollout URL (or sending the
header) inside ``@lightning.rollout`` is captured here only, not in the app as well.

The Responses API keeps responses (``store``, default true, as OpenAI) for
``previous_response_id``: each turn's input and output items, at most
``max_stored_responses`` of them and ``max_stored_response_bytes`` bytes (least recently
used evicted first), each ``stored_response_ttl_s`` after its last use, and one made in a
rollout no longer than the rollout runs (:class:`ResponseStore`). A chained request's
prompt is the chain's items, then its own ``input``, under its own ``instructions`` (the
previous ones do not carry over). An unknown or expired id is a 400
``previous_response_not_found`` naming it; every response says whether it was kept
(``"store"``).
"""

from __future__ import annotations

import hmac
import math
import time
import uuid
from collections import Counter, OrderedDict
from urllib.parse import quote
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .._errors import ProtocolError
from .._http import cross_origin, is_json, require_key
from ..engine.base import (
    ContextLengthError,
    EngineClosedError,
    GenerationResult,
    InferenceEngine,
    InvalidRequestError,
    SamplingParams,
    check_request,
)
from .._protocol import Sampling
from ..otel._receiver import TraceReceiver
from ._chat import (
    RequestError,
    ToolCallStreamFilter,
    apply_tool_choice,
    normalize_chat_messages,
    normalize_tools,
    parse_tool_calls,
    response_format_instruction,
    responses_input_to_messages,
    responses_tools_to_chat,
    sampling_stop,
    with_system_instruction,
)
from ._protocol import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    ResponsesRequest,
    RewardRequest,
    RolloutEndRequest,
    RolloutStartRequest,
    parse_body,
)

logger = structlog.get_logger()

__all__ = ["CaptureSink", "PolicyServer"]

ROLLOUT_HEADER = "x-lightning-rollout-id"
_json = msgspec.json.Encoder()


class CaptureSink(Protocol):
    """Where server-side captured rollouts go (the daemon's local ingest)."""

    def start_rollout(self, *, rollout_id: str, name: str, group_key: str | None,
                      attempt: int, metadata: dict[str, Any]) -> None: ...

    def record_transition(self, rollout_id: str, **fields: Any) -> int: ...

    def record_reward(self, rollout_id: str, value: float, name: str,
                      components: dict[str, float]) -> None: ...

    def end_rollout(self, rollout_id: str, *, status: str, final_reward: float | None,
                    error: str | None) -> int: ...


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
    )


class _Ctx:
    """Per-request context: rollout to capture into, timing, the sampling it ran with."""

    __slots__ = ("rollout_id", "t0", "endpoint", "sampling")

    def __init__(self, rollout_id: str | None, endpoint: str) -> None:
        self.rollout_id = rollout_id
        self.t0 = time.perf_counter()
        self.endpoint = endpoint
        self.sampling: Sampling | None = None


def _sampling(params: SamplingParams, ctx: _Ctx) -> dict[str, Any]:
    """Record the request's resolved sampling on ``ctx`` (for server-side capture) and
    return the ``"sampling"`` report every response carries (the app-side capture reads
    it: a parameter the request left out is this server's default). The engines return
    processed log-probs (see ``Choice.logprobs``)."""
    ctx.sampling = Sampling(temperature=params.temperature, top_p=params.top_p,
                            top_k=max(0, params.top_k), logprobs="processed")
    return {"temperature": params.temperature, "top_p": params.top_p,
            "top_k": max(0, params.top_k), "logprobs": "processed"}


class PolicyServer:
    """Serves ``engine`` over HTTP. ``addr = await tg.start(server.serve)``."""

    def __init__(
        self,
        engine: InferenceEngine,
        *,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        aliases: tuple[str, ...] = (),
        accept_any_model: bool = False,
        capture: CaptureSink | None = None,
        max_top_logprobs: int = 20,
        traces: TraceReceiver | None = None,
        otlp: bool = True,
        max_body_bytes: int = 32 << 20,
        hold_ready: bool = False,
        rollout_start_wait_s: float = 5.0,
        max_stored_responses: int = 10_000,
        max_stored_response_bytes: int = 256 << 20,
        stored_response_ttl_s: float = 3600.0,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.host = host
        self.port = port
        self.api_key = api_key
        # "default" is what lightning.llm() asks for when no model name is configured.
        self.aliases = frozenset((model_name, "default", *aliases))
        self.accept_any_model = accept_any_model
        self._other_names: set[str] = set()  # names served by accept_any_model, said once each
        self.capture = capture
        self.max_top_logprobs = max_top_logprobs
        if traces is None and otlp:
            # The daemon's LocalCapture stores into the daemon: so do OTLP traces.
            daemon = getattr(capture, "daemon", None)
            if daemon is not None and hasattr(daemon, "ingest_local"):
                traces = TraceReceiver(daemon)
        self.traces = traces if otlp else None
        self.max_body_bytes = max_body_bytes
        self.ready = False
        # the owner sets ``ready`` itself (a daemon: once its checkpoint is loaded)
        self.hold_ready = hold_ready
        if not math.isfinite(rollout_start_wait_s) or rollout_start_wait_s < 0:
            raise ValueError(f"rollout_start_wait_s must be >= 0, got {rollout_start_wait_s}")
        self.rollout_start_wait_s = rollout_start_wait_s
        is_open = getattr(capture, "is_open", None)
        self.responses = ResponseStore(max_count=max_stored_responses,
                                       max_bytes=max_stored_response_bytes,
                                       ttl_s=stored_response_ttl_s, is_open=is_open)
        self._token_text: dict[int, str] = {}
        self._tokenizer_limiter = anyio.CapacityLimiter(1)
        self.app = self._build_app()
        self.base_url = f"http://{host}:{port}/v1"

    # ------------------------------------------------------------------ plumbing

    def _build_app(self) -> Starlette:
        api = [
            ("/chat/completions", self._chat, ["POST"]),
            ("/completions", self._completions, ["POST"]),
            ("/responses", self._responses, ["POST"]),
            ("/models", self._models, ["GET"]),
        ]
        routes = [
            Route("/health", self._health, methods=["GET"]),
            Route("/ready", self._ready, methods=["GET"]),
            Route("/v1/rollouts", self._rollout_start, methods=["POST"]),
            Route("/v1/rollouts/{rollout_id}/rewards", self._rollout_reward, methods=["POST"]),
            Route("/v1/rollouts/{rollout_id}/end", self._rollout_end, methods=["POST"]),
            Route("/v1/rollouts/{rollout_id}", self._rollout_get, methods=["GET"]),
        ]
        for path, fn, methods in api:
            routes.append(Route("/v1" + path, fn, methods=methods))
            routes.append(Route("/rollouts/{rollout_id}/v1" + path, fn, methods=methods))
        if self.traces is not None:
            routes.append(Route("/v1/traces", self._traces, methods=["POST"]))
        return Starlette(routes=routes, exception_handlers={404: self._not_found,
                                                           405: self._not_allowed})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return _error(404, f"no route {request.method} {request.url.path}", code="not_found")

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return _error(405, f"method {request.method} not allowed on {request.url.path}")

    async def serve(self, *, task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then stop accepting, finish (<= 2 s) and close sockets.

        Raises:
            ConfigError: ``host`` is not loopback and there is no ``api_key``.
        """
        import uvicorn

        require_key(self.host, self.api_key, "the policy server")

        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                access_log=False, lifespan="off", timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # the daemon owns signals
        done = anyio.Event()

        async def run() -> None:
            # Shielded: cancellation reaches uvicorn as should_exit, so it closes its
            # sockets and connections instead of being torn down mid-flight.
            with anyio.CancelScope(shield=True):
                try:
                    await server.serve()
                finally:
                    done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while not server.started:
                if done.is_set():
                    raise OSError(f"the policy server could not start on {self.host}:{self.port}")
                await anyio.sleep(0.01)
            sock = server.servers[0].sockets[0]
            self.port = sock.getsockname()[1]
            self.base_url = f"http://{self.host}:{self.port}/v1"
            if self.traces is not None:
                await tg.start(self.traces.run)
            self.ready = not self.hold_ready
            logger.info("server.listening", base_url=self.base_url, model=self.model_name)
            task_status.started(self.base_url)
            try:
                await anyio.sleep_forever()
            finally:
                self.ready = False
                server.should_exit = True
                with anyio.CancelScope(shield=True):
                    await done.wait()

    def _screen(self, request: Request, *, json_body: bool = True) -> Response | None:
        """Refuse a request before reading it: a missing or wrong key (401, compared in
        constant time), a cross-origin browser request (403), a body that is not JSON
        (415; an empty body is fine where the route allows one)."""
        if self.api_key is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return _error(401, "invalid or missing API key: send 'Authorization: Bearer "
                              "KEY'", type_="authentication_error", code="invalid_api_key")
        refused = cross_origin(request)
        if refused is not None:
            return _error(403, refused, type_="permission_error", code="cross_origin")
        if json_body and not is_json(request.headers.get("content-type")) and (
                request.headers.get("content-length", "0") != "0"
                or "transfer-encoding" in request.headers):
            return _error(415, "send the body as JSON with 'Content-Type: application/json'",
                          param="content-type", code="unsupported_media_type")
        return None

    async def _read(self, request: Request, kind: type[Any]) -> Any:
        """The body of ``request`` as ``kind``, at most ``max_body_bytes`` read (413)."""
        raw = await read_limited(request, self.max_body_bytes)
        if len(raw) < 1 << 16:
            return parse_body(raw, kind)
        return await anyio.to_thread.run_sync(parse_body, raw, kind)  # big: off the loop

    def _check_model(self, model: str) -> None:
        if not model:
            raise RequestError("model is required", param="model")
        if model in self.aliases:
            return
        if not self.accept_any_model:
            raise RequestError(
                f"model {model!r} does not exist: this server serves {self.model_name!r}; "
                f"send model={self.model_name!r} (lightning.llm().model), or start the daemon "
                f"with --model-alias {model} (repeatable) or --accept-any-model",
                param="model", code="model_not_found", status=404,
            )
        if model not in self._other_names and len(self._other_names) < 256:
            self._other_names.add(model)
            logger.info("server.model_name_accepted", requested=model, serving=self.model_name,
                        reason="accept_any_model: every model name gets the policy")

    def _rollout_of(self, request: Request) -> str | None:
        rid = request.path_params.get("rollout_id") or request.headers.get(ROLLOUT_HEADER)
        if rid and self.capture is None:
            raise RequestError("this server has no capture sink: rollout routes are off",
                               status=404)
        return rid or None

    async def _guard(self, request: Request, handler: Callable[..., Any], endpoint: str,
                     kind: type[Any]) -> Response:
        denied = self._screen(request)
        if denied is not None:
            return denied
        try:
            req = await self._read(request, kind)
            self._check_model(req.model)
            ctx = _Ctx(self._rollout_of(request), endpoint)
            return await handler(req, ctx)
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        except ContextLengthError as exc:
            return _error(400, str(exc), param=_PROMPT_FIELD[endpoint],
                          code="context_length_exceeded")
        except InvalidRequestError as exc:
            return _error(400, str(exc))
        except ProtocolError as exc:
            return _capture_refused(exc)
        except EngineClosedError as exc:
            return _error(503, f"the engine is not serving: {exc}", type_="server_error",
                          code="engine_unavailable")

    # ------------------------------------------------------------------ sampling

    def _params(self, req: Any, *, max_tokens: int | None, top_logprobs: int,
                n: int = 1) -> SamplingParams:
        for key in ("frequency_penalty", "presence_penalty"):
            if getattr(req, key) not in (None, 0.0):
                raise RequestError(f"{key} is not supported by this server (use 0)", param=key)
        if req.logit_bias:
            raise RequestError("logit_bias is not supported by this server", param="logit_bias")
        if top_logprobs > self.max_top_logprobs:
            raise RequestError(f"top_logprobs must be <= {self.max_top_logprobs}",
                               param="top_logprobs")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            stop=sampling_stop(req.stop),
            seed=req.seed,
            n=n,
            top_logprobs=top_logprobs,
        )

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """The engine's own request check, before a stream's 200 is sent (an error after
        it could only be an SSE event): vocabulary, context length, ``n``."""
        check_request(prompt_ids, params, vocab_size=len(self.engine.tokenizer),
                      max_model_len=self.engine.max_model_len, max_num_seqs=MAX_CHOICES,
                      max_top_logprobs=self.max_top_logprobs, seed_rng=None)

    def _refuse_overlong(self, texts: Any) -> None:
        """Refuse a text that cannot fit before tokenising all of it: a 10 MB prompt is
        told so in milliseconds instead of after seconds of CPU. A text longer than
        ``16 * max_model_len`` characters is over the context if its first that many
        characters alone already take more than ``max_model_len`` tokens (the prompt
        holds all of them; a margin covers the word cut at the end).

        Raises:
            ContextLengthError: such a text.
        """
        limit = self.engine.max_model_len
        head = 16 * limit
        for text in texts:
            if isinstance(text, str) and len(text) > head:
                n = len(self.engine.tokenizer.encode(text[:head], add_special_tokens=False))
                if n > limit + _CUT_MARGIN:
                    raise ContextLengthError(
                        f"the prompt has a text of {len(text)} characters whose first {head} "
                        f"alone are {n} tokens: more than max_model_len {limit}; shorten it",
                        limit=limit, requested=n)

    async def _tokenize(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a tokenising step off the event loop (one at a time: a 10 MB prompt then
        delays other prompts, not ZeroMQ acks or /health)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._tokenizer_limiter)

    def _token_str(self, tid: int) -> str:
        s = self._token_text.get(tid)
        if s is None:
            s = self.engine.tokenizer.decode([tid])
            if len(self._token_text) < 1_000_000:
                self._token_text[tid] = s
        return s

    def _logprob_entry(self, tid: int, lp: float, top: list[tuple[int, float]] | None) -> dict:
        tok = self._token_str(tid)
        entry = {"token": tok, "logprob": _finite(lp), "bytes": list(tok.encode())}
        entry["top_logprobs"] = [
            {"token": (t := self._token_str(i)), "logprob": _finite(v), "bytes": list(t.encode())}
            for i, v in (top or [])
        ]
        return entry

    def _capture(self, ctx: _Ctx, prompt_ids: list[int], token_ids: list[int],
                 logprobs: list[float], version: int, finish: str | None,
                 metadata: dict[str, Any]) -> None:
        """Called once per finished choice: log it (debug) and capture it server-side."""
        logger.debug("server.sampled", endpoint=ctx.endpoint, prompt_token_ids=prompt_ids,
                     token_ids=token_ids, policy_version=version, finish_reason=finish)
        if ctx.rollout_id is None or self.capture is None:
            return
        self.capture.record_transition(
            ctx.rollout_id,
            prompt_ids=prompt_ids,
            response_ids=token_ids,
            logprobs=logprobs,
            policy_version=version,
            model=self.model_name,
            finish_reason=finish or "",
            latency_s=time.perf_counter() - ctx.t0,
            metadata={"endpoint": ctx.endpoint, "source": "server", **metadata},
            sampling=ctx.sampling,
        )

    async def _check_capture_target(self, ctx: _Ctx) -> None:
        if ctx.rollout_id is not None:
            await self._await_open(ctx.rollout_id)

    async def _await_open(self, rid: str) -> None:
        """Return once rollout ``rid`` is open, waiting up to ``rollout_start_wait_s`` for
        a start that is on its way (see the module docstring); else a 404.

        Raises:
            RequestError: 404 ``rollout_not_found``: unknown after the wait, or finished.
        """
        capture = self.capture
        if capture is None:
            raise RequestError("this server has no capture sink: rollout routes are off",
                               status=404)
        if capture.is_open(rid):  # type: ignore[attr-defined]
            return
        wait = getattr(capture, "wait_open", None)
        if wait is not None and self.rollout_start_wait_s > 0:
            if await wait(rid, self.rollout_start_wait_s):
                return
        raise RequestError(
            f"rollout {rid} is not open (unknown, or already ended; waited "
            f"{self.rollout_start_wait_s:g} s for its start, rollout_start_wait_s): start it "
            "with POST /v1/rollouts, or name a rollout of the app's runtime while it runs "
            "(lightning.current_rollout().headers / .base_url); finished rollouts are not "
            "reused", code="rollout_not_found", status=404)

    # ------------------------------------------------------------------ routes

    async def _traces(self, request: Request) -> Response:
        denied = self._screen(request, json_body=False)  # the receiver checks its types
        if denied is not None:
            return denied
        return await self.traces.handle(request)  # type: ignore[union-attr]

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ready(self, request: Request) -> Response:
        if not self.ready:
            return _error(503, "not ready", type_="server_error", code="not_ready")
        return JSONResponse({"status": "ready", "policy_version": self.engine.policy_version})

    async def _models(self, request: Request) -> Response:
        denied = self._screen(request, json_body=False)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "lightning",
            "policy_version": self.engine.policy_version,
            "max_model_len": self.engine.max_model_len,
        }]})

    # chat ------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._guard(request, self._chat_impl, "chat.completions",
                                 ChatCompletionRequest)

    def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], bool]:
        messages = normalize_chat_messages(msgspec.to_builtins(req.messages))
        self._refuse_overlong(m["content"] for m in messages)
        tools = normalize_tools(req.tools)
        tools, forced = apply_tool_choice(tools, msgspec.to_builtins(req.tool_choice))
        instruction = response_format_instruction(req.response_format)
        messages = with_system_instruction(messages, "\n\n".join(filter(None, [forced, instruction])))
        return self.engine.apply_chat_template(messages, tools=tools), bool(tools)

    async def _chat_impl(self, req: ChatCompletionRequest, ctx: _Ctx) -> Response:
        await self._check_capture_target(ctx)
        want_lp = bool(req.logprobs)
        top = (req.top_logprobs or 0) if want_lp else 0
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = self._params(req, max_tokens=max_tokens, top_logprobs=top, n=req.n)
        prompt_ids, has_tools = await self._tokenize(self._chat_prompt, req)
        self._check_fits(prompt_ids, params)
        report = _sampling(params, ctx)
        cid = "chatcmpl-" + uuid.uuid4().hex
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = self.engine.generate_stream(prompt_ids, params)
            return self._sse(self._chat_stream(stream, prompt_ids, params, has_tools, want_lp,
                                               include_usage, cid, ctx, req, report))
        result = await self.engine.generate(prompt_ids, params)
        choices = []
        for c in result.choices:
            content, calls = parse_tool_calls(c.text) if has_tools else (c.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            finish = "tool_calls" if calls else c.finish_reason
            choice: dict[str, Any] = {
                "index": c.index, "message": message, "finish_reason": finish,
                "token_ids": c.token_ids, "stop_reason": c.stop_reason,
                "logprobs": None,
            }
            if want_lp:
                choice["logprobs"] = {"content": [
                    self._logprob_entry(t, lp, c.top_logprobs[i] if c.top_logprobs else None)
                    for i, (t, lp) in enumerate(zip(c.token_ids, c.logprobs))
                ]}
            choices.append(choice)
            self._capture(ctx, result.prompt_token_ids, c.token_ids, c.logprobs, c.policy_version,
                          finish, {"request": _request_summary(req), "text": c.text,
                                   "tool_calls": calls, "choice_index": c.index})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": _usage(result),
            "prompt_token_ids": result.prompt_token_ids, "policy_version": result.policy_version,
            "system_fingerprint": f"lightning-v{result.policy_version}", "sampling": report,
        })

    async def _chat_stream(self, stream: AsyncIterator[Any], prompt_ids: list[int],
                           params: SamplingParams, has_tools: bool, want_lp: bool,
                           include_usage: bool, cid: str, ctx: _Ctx,
                           req: Any, report: dict[str, Any]) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = req.model
        filters = {i: ToolCallStreamFilter() for i in range(params.n)} if has_tools else {}
        acc = {i: _StreamedChoice(-1) for i in range(params.n)}
        first = True

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            nonlocal first
            payload: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                                       "created": created, "model": model, "choices": choices}
            if first:
                payload["prompt_token_ids"] = prompt_ids
                payload["sampling"] = report
                first = False
            payload.update(extra)
            return b"data: " + _json.encode(payload) + b"\n\n"

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None, "token_ids": []}
                     for i in range(params.n)], policy_version=self.engine.policy_version)
        completion_tokens = 0
        async with _aclosing(stream):
            async for d in stream:
                a = acc[d.index]
                a.add(d)
                completion_tokens += len(d.token_ids)
                text = filters[d.index].feed(d.text) if has_tools else d.text
                delta: dict[str, Any] = {"content": text} if text else {}
                finish = d.finish_reason
                if finish is not None and has_tools:
                    rest, calls = filters[d.index].finish()
                    if rest:
                        delta["content"] = delta.get("content", "") + rest
                    if calls:
                        delta["tool_calls"] = [{**c, "index": k} for k, c in enumerate(calls)]
                        finish = "tool_calls"
                    a.calls = calls
                choice: dict[str, Any] = {"index": d.index, "delta": delta,
                                          "finish_reason": finish, "token_ids": d.token_ids,
                                          "logprobs": None}
                if finish is not None:
                    choice["stop_reason"] = d.stop_reason
                if want_lp:
                    choice["logprobs"] = {"content": [
                        self._logprob_entry(t, lp, d.top_logprobs[i] if d.top_logprobs else None)
                        for i, (t, lp) in enumerate(zip(d.token_ids, d.logprobs))
                    ]}
                yield chunk([choice], policy_version=d.policy_version)
                if finish is not None:
                    self._capture(ctx, prompt_ids, a.token_ids, a.logprobs, a.policy_version,
                                  finish, {"request": _request_summary(req), "text": a.text,
                                           "tool_calls": a.calls, "choice_index": d.index,
                                           "stream": True})
        if include_usage:
            yield chunk([], usage={"prompt_tokens": len(prompt_ids),
                                   "completion_tokens": completion_tokens,
                                   "total_tokens": len(prompt_ids) + completion_tokens})
        yield b"data: [DONE]\n\n"

    def _sse(self, gen: AsyncIterator[bytes]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for item in gen:
                    yield item
            except (InvalidRequestError, EngineClosedError, RequestError, ProtocolError) as exc:
                err = {"error": {"message": str(exc), "type": "invalid_request_error",
                                 "param": None, "code": None}}
                yield b"data: " + _json.encode(err) + b"\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    # completions ---------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        return await self._guard(request, self._completions_impl, "completions",
                                 CompletionRequest)

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt (runs in a worker thread: it may tokenise)."""
        tok = self.engine.tokenizer
        self._refuse_overlong([prompt] if isinstance(prompt, str) else prompt)
        if isinstance(prompt, str):
            return [tok.encode(prompt, add_special_tokens=False)]
        if all(_is_token_id(p) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [tok.encode(p, add_special_tokens=False) for p in prompt]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
        raise RequestError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (non-empty)", param="prompt")

    async def _completions_impl(self, req: CompletionRequest, ctx: _Ctx) -> Response:
        await self._check_capture_target(ctx)
        if req.echo:
            raise RequestError("echo is not supported", param="echo")
        if req.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        if req.best_of not in (None, 1):
            raise RequestError("best_of is not supported", param="best_of")
        if not req.prompt:
            raise RequestError("prompt is required (non-empty)", param="prompt")
        n_prompts = 1 if isinstance(req.prompt, str) or _is_token_id(req.prompt[0]) else len(
            req.prompt)
        if n_prompts * req.n > MAX_CHOICES:
            raise RequestError(f"{n_prompts} prompts x n={req.n} choices exceeds the "
                               f"{MAX_CHOICES} choices one request may ask for", param="n")
        want_lp = req.logprobs is not None
        params = self._params(req, max_tokens=req.max_tokens or 16,  # OpenAI's default
                              top_logprobs=req.logprobs or 0, n=req.n)
        prompts = await self._tokenize(self._completion_prompts, req.prompt)
        vocab = len(self.engine.tokenizer)
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
            self._check_fits(p, params)
        report = _sampling(params, ctx)
        cid = "cmpl-" + uuid.uuid4().hex
        if req.stream:
            if len(prompts) != 1:
                raise RequestError("streaming supports a single prompt", param="prompt")
            return self._sse(self._completions_stream(prompts[0], params, want_lp, cid, ctx, req,
                                                      report))
        results: list[GenerationResult] = []
        async with anyio.create_task_group() as tg:
            slots: list[Any] = [None] * len(prompts)

            async def run(i: int, p: list[int]) -> None:
                try:
                    slots[i] = await self.engine.generate(p, params)
                except Exception as exc:  # noqa: BLE001 - raised below, not as a group
                    slots[i] = exc

            for i, p in enumerate(prompts):
                tg.start_soon(run, i, p)
        for r in slots:
            if isinstance(r, Exception):
                raise r
        results = slots
        choices = []
        for pi, result in enumerate(results):
            for c in result.choices:
                idx = pi * params.n + c.index
                choices.append({
                    "index": idx, "text": c.text, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason, "token_ids": c.token_ids,
                    "logprobs": self._legacy_logprobs(c.token_ids, c.logprobs, c.top_logprobs)
                    if want_lp else None,
                })
                self._capture(ctx, result.prompt_token_ids, c.token_ids, c.logprobs,
                              c.policy_version, c.finish_reason,
                              {"request": _request_summary(req), "text": c.text,
                               "choice_index": idx})
        usage = {"prompt_tokens": sum(len(r.prompt_token_ids) for r in results),
                 "completion_tokens": sum(len(c.token_ids) for r in results for c in r.choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        prompt_ids: Any = results[0].prompt_token_ids if len(results) == 1 else [
            r.prompt_token_ids for r in results]
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": usage,
            "prompt_token_ids": prompt_ids,
            "policy_version": min(r.policy_version for r in results), "sampling": report,
        })

    def _legacy_logprobs(self, ids: list[int], lps: list[float],
                         top: list[list[tuple[int, float]]] | None) -> dict[str, Any]:
        tokens = [self._token_str(t) for t in ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_finite(v) for v in lps],
            "top_logprobs": [{self._token_str(i): _finite(v) for i, v in row} for row in top]
            if top else None,
            "text_offset": offsets,
        }

    async def _completions_stream(self, prompt_ids: list[int], params: SamplingParams,
                                  want_lp: bool, cid: str, ctx: _Ctx,
                                  req: Any, report: dict[str, Any]) -> AsyncIterator[bytes]:
        created = int(time.time())
        acc = {i: _StreamedChoice(-1) for i in range(params.n)}
        first = True
        stream = self.engine.generate_stream(prompt_ids, params)
        async with _aclosing(stream):
            async for d in stream:
                a = acc[d.index]
                a.add(d)
                choice = {"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
                          "token_ids": d.token_ids,
                          "logprobs": self._legacy_logprobs(d.token_ids, d.logprobs,
                                                            d.top_logprobs) if want_lp else None}
                payload: dict[str, Any] = {"id": cid, "object": "text_completion",
                                           "created": created, "model": req.model,
                                           "choices": [choice],
                                           "policy_version": d.policy_version}
                if first:
                    payload["prompt_token_ids"] = prompt_ids
                    payload["sampling"] = report
                    first = False
                yield b"data: " + _json.encode(payload) + b"\n\n"
                if d.finish_reason is not None:
                    self._capture(ctx, prompt_ids, a.token_ids, a.logprobs, a.policy_version,
                                  a.finish_reason, {"request": _request_summary(req),
                                                    "text": a.text, "choice_index": d.index,
                                                    "stream": True})
        yield b"data: [DONE]\n\n"

    # responses ------------------------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        return await self._guard(request, self._responses_impl, "responses", ResponsesRequest)

    def _responses_prompt(self, req: ResponsesRequest, items: list[dict[str, Any]],
                          n_before: int) -> tuple[list[int], bool]:
        """Token ids of ``items`` (the stored chain's ``n_before`` items, then this
        request's ``input``); errors name this request's own items."""
        if n_before:
            responses_input_to_messages(items[n_before:] or req.input, None)
        messages = responses_input_to_messages(items, req.instructions)
        self._refuse_overlong(m["content"] for m in messages)
        tools = responses_tools_to_chat(req.tools)
        choice = _responses_tool_choice(msgspec.to_builtins(req.tool_choice))
        tools, forced = apply_tool_choice(tools, choice)
        fmt = req.text.format if req.text is not None else None
        instruction = response_format_instruction(fmt, "text.format")
        messages = with_system_instruction(messages, "\n\n".join(filter(None, [forced, instruction])))
        return self.engine.apply_chat_template(messages, tools=tools), bool(tools)

    async def _responses_impl(self, req: ResponsesRequest, ctx: _Ctx) -> Response:
        await self._check_capture_target(ctx)
        params = self._params(req, max_tokens=req.max_output_tokens, top_logprobs=0)
        turn = _input_items(req.input)
        before = (self.responses.history(req.previous_response_id)
                  if req.previous_response_id is not None else [])
        prompt_ids, has_tools = await self._tokenize(self._responses_prompt, req,
                                                     [*before, *turn], len(before))
        self._check_fits(prompt_ids, params)
        report = _sampling(params, ctx)
        rid = "resp_" + uuid.uuid4().hex
        base = {
            "id": rid, "object": "response", "created_at": int(time.time()),
            "model": req.model, "instructions": req.instructions,
            "parallel_tool_calls": req.parallel_tool_calls in (None, True),
            "tool_choice": msgspec.to_builtins(req.tool_choice) or "auto",
            "tools": req.tools or [], "temperature": params.temperature,
            "top_p": params.top_p, "max_output_tokens": req.max_output_tokens,
            "text": msgspec.to_builtins(req.text) if req.text else {"format": {"type": "text"}},
            "metadata": req.metadata or {}, "error": None,
            "incomplete_details": None, "sampling": report,
            # what the request asked for; the final response says whether it was kept
            "previous_response_id": req.previous_response_id, "store": req.store is not False,
        }

        def remember(output: list[dict[str, Any]]) -> None:
            """Keep this turn (``store``, default true): the response says if it was."""
            if req.store is not False:
                base["store"] = self.responses.put(rid, req.previous_response_id,
                                                   [*turn, *output], ctx.rollout_id)
            else:
                self.responses.counters["not_kept_store_false"] += 1

        if req.stream:
            return self._sse(self._responses_stream(prompt_ids, params, has_tools, base, ctx,
                                                    req, remember))
        result = await self.engine.generate(prompt_ids, params)
        c = result.choices[0]
        output = self._responses_output(c.text, has_tools)
        self._capture(ctx, result.prompt_token_ids, c.token_ids, c.logprobs, c.policy_version,
                      c.finish_reason, {"request": _request_summary(req), "text": c.text,
                                        "tool_calls": _calls_of(output)})
        remember(output)
        return JSONResponse(self._response_object(base, output, result.prompt_token_ids, c,
                                                  "completed"))

    def _responses_output(self, text: str, has_tools: bool) -> list[dict[str, Any]]:
        content, calls = parse_tool_calls(text) if has_tools else (text, [])
        output: list[dict[str, Any]] = []
        if content or not calls:
            output.append({
                "type": "message", "id": "msg_" + uuid.uuid4().hex, "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content or "", "annotations": [],
                             "logprobs": []}],
            })
        for call in calls:
            output.append({"type": "function_call", "id": "fc_" + uuid.uuid4().hex,
                           "call_id": call["id"], "name": call["function"]["name"],
                           "arguments": call["function"]["arguments"], "status": "completed"})
        return output

    def _response_object(self, base: dict[str, Any], output: list[dict[str, Any]],
                         prompt_ids: list[int], c: Any, status: str) -> dict[str, Any]:
        incomplete = None
        if c.finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            **base, "status": status, "incomplete_details": incomplete, "output": output,
            "usage": {"input_tokens": len(prompt_ids),
                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                      "output_tokens": len(c.token_ids),
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": len(prompt_ids) + len(c.token_ids)},
            "prompt_token_ids": prompt_ids, "output_token_ids": c.token_ids,
            "output_token_logprobs": [_finite(v) for v in c.logprobs],
            "policy_version": c.policy_version,
        }

    async def _responses_stream(self, prompt_ids: list[int], params: SamplingParams,
                                has_tools: bool, base: dict[str, Any], ctx: _Ctx,
                                req: Any, remember: Callable[[list[dict[str, Any]]], None],
                                ) -> AsyncIterator[bytes]:
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            payload = {"type": kind, "sequence_number": seq, **fields}
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + _json.encode(payload) + b"\n\n"

        pending = {**base, "status": "in_progress", "output": [], "usage": None}
        yield event("response.created", response=pending)
        yield event("response.in_progress", response=pending)
        msg_id = "msg_" + uuid.uuid4().hex
        item = {"type": "message", "id": msg_id, "role": "assistant", "status": "in_progress",
                "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", item_id=msg_id, output_index=0,
                    content_index=0, part=part)
        filt = ToolCallStreamFilter() if has_tools else None
        c = _StreamedChoice(self.engine.policy_version)
        shown = ""
        stream = self.engine.generate_stream(prompt_ids, params)
        async with _aclosing(stream):
            async for d in stream:
                c.add(d)
                delta = filt.feed(d.text) if filt else d.text
                if delta:
                    shown += delta
                    yield event("response.output_text.delta", item_id=msg_id, output_index=0,
                                content_index=0, delta=delta, logprobs=[])
        calls: list[dict[str, Any]] = []
        if filt:
            rest, calls = filt.finish()
            if rest:
                shown += rest
                yield event("response.output_text.delta", item_id=msg_id, output_index=0,
                            content_index=0, delta=rest, logprobs=[])
        yield event("response.output_text.done", item_id=msg_id, output_index=0,
                    content_index=0, text=shown, logprobs=[])
        done_part = {**part, "text": shown}
        yield event("response.content_part.done", item_id=msg_id, output_index=0,
                    content_index=0, part=done_part)
        message = {**item, "status": "completed", "content": [done_part]}
        yield event("response.output_item.done", output_index=0, item=message)
        output = [message]
        for k, call in enumerate(calls, start=1):
            fc = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex, "call_id": call["id"],
                  "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                  "status": "in_progress"}
            yield event("response.output_item.added", output_index=k, item=fc)
            yield event("response.function_call_arguments.delta", item_id=fc["id"],
                        output_index=k, delta=fc["arguments"])
            yield event("response.function_call_arguments.done", item_id=fc["id"],
                        output_index=k, arguments=fc["arguments"])
            fc = {**fc, "status": "completed"}
            yield event("response.output_item.done", output_index=k, item=fc)
            output.append(fc)
        self._capture(ctx, prompt_ids, c.token_ids, c.logprobs, c.policy_version,
                      c.finish_reason, {"request": _request_summary(req), "text": c.text,
                                        "tool_calls": _calls_of(output), "stream": True})
        remember(output)  # before the final event: it says whether it was kept
        final = self._response_object(base, output, prompt_ids, c, "completed")
        yield event("response.completed" if final["status"] == "completed"
                    else "response.incomplete", response=final)

    # server-side rollouts ----------------------------------------------------------

    async def _rollout_route(self, request: Request, kind: type[Any],
                             act: Callable[[Any], dict[str, Any]], status: int = 200,
                             wait_for: str | None = None) -> Response:
        """Screen, parse as ``kind``, ``act`` on it (capture into the daemon): JSON reply.
        With ``wait_for``, that rollout is waited for first (:meth:`_await_open`)."""
        denied = self._screen(request)
        if denied is not None:
            return denied
        try:
            if self.capture is None:
                raise RequestError("this server has no capture sink: rollout routes are off",
                                   status=404)
            req = await self._read(request, kind)
            if wait_for is not None:
                await self._await_open(wait_for)
            return JSONResponse(act(req), status_code=status)
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        except ProtocolError as exc:
            return _capture_refused(exc)

    async def _rollout_start(self, request: Request) -> Response:
        def start(req: RolloutStartRequest) -> dict[str, Any]:
            rid = req.rollout_id or uuid.uuid4().hex
            self.capture.start_rollout(  # type: ignore[union-attr]
                rollout_id=rid, name=req.name or "http", group_key=req.group_key,
                attempt=req.attempt, metadata=req.metadata)
            base = str(request.base_url).rstrip("/")
            return {"rollout_id": rid, "base_url": f"{base}/rollouts/{quote(rid, safe='')}/v1"}

        return await self._rollout_route(request, RolloutStartRequest, start, status=201)

    async def _rollout_reward(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]

        def reward(req: RewardRequest) -> dict[str, Any]:
            value, name, components = _reward_of(req)
            self._require_open(rid)
            self.capture.record_reward(rid, value, name, components)  # type: ignore[union-attr]
            return {"rollout_id": rid, "recorded": True}

        return await self._rollout_route(request, RewardRequest, reward, wait_for=rid)

    async def _rollout_end(self, request: Request) -> Response:
        rid = request.path_params["rollout_id"]

        def end(req: RolloutEndRequest) -> dict[str, Any]:
            if req.final_reward is not None and not math.isfinite(req.final_reward):
                raise RequestError("final_reward must be a finite number", param="final_reward")
            self._require_open(rid)
            n = self.capture.end_rollout(  # type: ignore[union-attr]
                rid, status=req.status, final_reward=req.final_reward, error=req.error)
            return {"rollout_id": rid, "n_transitions": n}

        return await self._rollout_route(request, RolloutEndRequest, end)

    async def _rollout_get(self, request: Request) -> Response:
        """What the daemon holds of one rollout (``lightning-daemon inspect``'s record):
        its transitions' token counts, log-probs, versions, rewards, merge and split
        reasons; open ones as recorded so far."""
        denied = self._screen(request, json_body=False)
        if denied is not None:
            return denied
        rid = request.path_params["rollout_id"]
        find = getattr(self.capture, "find", None)
        if find is None:
            return _error(404, "this server has no daemon to look rollouts up in",
                          code="rollout_not_found")
        found = find(rid)
        if found is None:
            return _error(404, f"rollout {rid!r} is not held in memory (unknown, or used by "
                          "training and released): `lightning-daemon inspect DATA_DIR "
                          "--rollout ID` reads every stored rollout from disk",
                          code="rollout_not_found")
        from .._inspect import describe

        traj, used = found
        return JSONResponse(describe(traj, used))

    def _require_open(self, rid: str) -> None:
        if self.capture is None:
            raise RequestError("this server has no capture sink: rollout routes are off",
                               status=404)
        if not self.capture.is_open(rid):  # type: ignore[attr-defined]
            raise RequestError(f"rollout {rid} is not open (unknown or already ended)",
                               code="rollout_not_found", status=404)


class _Stored:
    __slots__ = ("previous", "items", "nbytes", "used_at", "rollout_id")

    def __init__(self, previous: str | None, items: list[dict[str, Any]], nbytes: int,
                 used_at: float, rollout_id: str | None) -> None:
        self.previous = previous
        self.items = items
        self.nbytes = nbytes
        self.used_at = used_at
        self.rollout_id = rollout_id


class ResponseStore:
    """Responses kept for ``previous_response_id`` (the Responses API's ``store``).

    Each entry holds one turn: the items its request added (its ``input``) and its
    ``output`` items, and the id of the response it continued; a chain is read back by
    walking those ids, so a conversation of N turns costs O(N) bytes, not O(N^2).
    Bounded three ways: at most ``max_count`` entries and ``max_bytes`` of items (the
    least recently used go first, counted ``evicted``), and ``ttl_s`` seconds after its
    last use an entry is gone (``expired``). An entry made inside a rollout (a
    per-rollout URL or header) lives no longer than the rollout: once it has ended, the
    entry is gone too. An unknown, evicted or expired id, or a chain missing a link, is
    a 400 ``previous_response_not_found`` naming the id and why (OpenAI's status and code).
    """

    def __init__(self, *, max_count: int, max_bytes: int, ttl_s: float,
                 is_open: Callable[[str], bool] | None = None) -> None:
        if max_count < 0 or max_bytes < 0 or not ttl_s >= 0:
            raise ValueError("max_stored_responses, max_stored_response_bytes and "
                             "stored_response_ttl_s must be >= 0 (0 keeps nothing)")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._is_open = is_open
        self._entries: OrderedDict[str, _Stored] = OrderedDict()
        self.nbytes = 0
        self.counters: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, rid: str, why: str) -> None:
        e = self._entries.pop(rid)
        self.nbytes -= e.nbytes
        self.counters[why] += 1

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            rid, e = next(iter(entries.items()))
            if now - e.used_at < self.ttl_s:
                break
            self._drop(rid, "expired")

    def put(self, response_id: str, previous: str | None, items: list[dict[str, Any]],
            rollout_id: str | None) -> bool:
        """Keep one turn; whether it was kept (a turn over ``max_bytes`` alone is not)."""
        now = time.monotonic()
        self._expire(now)
        nbytes = len(_json.encode(items))
        if self.max_count == 0 or self.ttl_s == 0 or nbytes > self.max_bytes:
            self.counters["not_kept_too_large" if nbytes > self.max_bytes else "not_kept"] += 1
            return False
        while self._entries and (len(self._entries) >= self.max_count
                                 or self.nbytes + nbytes > self.max_bytes):
            self._drop(next(iter(self._entries)), "evicted")
        self._entries[response_id] = _Stored(previous, items, nbytes, now, rollout_id)
        self.nbytes += nbytes
        self.counters["stored"] += 1
        return True

    def history(self, response_id: str) -> list[dict[str, Any]]:
        """The items of the chain ending at ``response_id``, oldest first.

        Raises:
            RequestError: 400 ``previous_response_not_found``: the id (or a response it
                continues) is unknown, evicted, expired or its rollout ended.
        """
        now = time.monotonic()
        self._expire(now)
        chain: list[_Stored] = []
        rid: str | None = response_id
        while rid is not None:
            e = self._entries.get(rid)
            if e is not None and e.rollout_id is not None and self._is_open is not None \
                    and not self._is_open(e.rollout_id):
                self._drop(rid, "rollout_ended")
                e = None
            if e is None:
                self.counters["not_found"] += 1
                link = "" if rid == response_id else f" (it continues {rid}, which is gone)"
                raise RequestError(
                    f"previous response {response_id!r} not found{link}: this server keeps "
                    f"responses made with store=true for {self.ttl_s:g} s after their last "
                    f"use, at most {self.max_count} of them and {self.max_bytes} bytes, and "
                    "one made in a rollout only while the rollout runs; send the whole "
                    "conversation as input instead", param="previous_response_id",
                    code="previous_response_not_found")
            chain.append(e)
            rid = e.previous
            if len(chain) > len(self._entries):  # cannot happen: ids are never reused
                raise RequestError(f"previous response {response_id!r} has a cyclic chain",
                                   param="previous_response_id")
        items: list[dict[str, Any]] = []
        for e in reversed(chain):
            e.used_at = now
            items.extend(e.items)
        for e_id in self._chain_ids(response_id):
            self._entries.move_to_end(e_id)
        return items

    def _chain_ids(self, response_id: str) -> list[str]:
        ids, rid = [], response_id
        while rid is not None and rid in self._entries:
            ids.append(rid)
            rid = self._entries[rid].previous
        return ids[::-1]


class _StreamedChoice:
    """One choice accumulated from streamed deltas (what capture and final events need)."""

    __slots__ = ("token_ids", "logprobs", "text", "finish_reason", "policy_version", "calls")

    def __init__(self, policy_version: int) -> None:
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.finish_reason: str = "stop"
        self.policy_version = policy_version
        self.calls: list[dict[str, Any]] = []

    def add(self, d: Any) -> None:
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.text += d.text
        self.policy_version = d.policy_version
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason


class _aclosing:
    """``async with`` closing an async generator even when the client disconnects."""

    def __init__(self, agen: Any) -> None:
        self._agen = agen

    async def __aenter__(self) -> Any:
        return self._agen

    async def __aexit__(self, *exc: Any) -> None:
        aclose = getattr(self._agen, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -9999.0


def _usage(result: GenerationResult) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in result.choices)
    prompt = len(result.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _calls_of(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": o["call_id"], "name": o["name"], "arguments": o["arguments"]}
            for o in output if o["type"] == "function_call"]


def _input_items(input_: Any) -> list[dict[str, Any]]:
    """A request's ``input`` as a list of items (a string is one user message)."""
    if isinstance(input_, str):
        return [{"type": "message", "role": "user", "content": input_}]
    return list(input_)


def _responses_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _request_summary(req: Any) -> dict[str, Any]:
    """The request fields kept with a captured transition (as sent: unset ones left out)."""
    keep = ("messages", "prompt", "input", "instructions", "tools", "tool_choice", "n",
            "temperature", "top_p", "max_tokens", "max_completion_tokens", "max_output_tokens",
            "stop", "seed", "response_format")
    sent = msgspec.to_builtins(req)
    return {k: sent[k] for k in keep if k in sent}


def _reward_of(req: RewardRequest) -> tuple[float, str, dict[str, float]]:
    if isinstance(req.value, dict):
        comps = req.value
        for k, v in comps.items():
            if not math.isfinite(v):
                raise RequestError(f"reward {k!r} must be a finite number", param="value")
        primary = req.primary or (next(iter(comps)) if len(comps) == 1 else None)
        if primary not in comps:
            raise RequestError("several rewards need primary=NAME naming one of them",
                               param="primary")
        return comps[primary], primary, comps
    if not math.isfinite(req.value):
        raise RequestError("value must be a finite number (or an object of named rewards)",
                           param="value")
    return req.value, req.name or "reward", {}


async def read_limited(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes before reading it all.

    Raises:
        RequestError: status 413 when the declared or actual size exceeds ``limit``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError(f"request body of {size}+ bytes exceeds the limit of {limit} bytes "
                        "(PolicyServer max_body_bytes)", code="body_too_large", status=413)


_CUT_MARGIN = 16  # tokens a text cut mid-word can take beyond its share of the whole
_PROMPT_FIELD = {"chat.completions": "messages", "completions": "prompt", "responses": "input"}
_CAPTURE_STATUS = {"duplicate_rollout": 409, "rollout_finished": 409, "unknown_rollout": 404}


def _capture_refused(exc: ProtocolError) -> JSONResponse:
    """The daemon refused a captured event: 409/404 for rollout state, 503 (retryable)
    when its disk is full, else 400."""
    if exc.code == "disk_full":  # the daemon's condition, not the client's: retry later
        r = _error(503, f"the daemon could not store the event: {exc}", code=exc.code,
                   type_="server_error")
        r.headers["Retry-After"] = "1"
        return r
    status = _CAPTURE_STATUS.get(exc.code, 400)
    return _error(status, f"the daemon refused the event: {exc}", code=exc.code)
