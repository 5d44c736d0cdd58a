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
status for client mistakes (bad JSON, unknown model, context too long, malformed tools).

A request may also name its rollout with the header ``X-Lightning-Rollout-Id``: calls of
clients that are not Python, or do not use the ``openai`` package, land in the same
trajectory as the runtime's.
"""

from __future__ import annotations

import math
import time
import uuid
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

from ..engine.base import (
    ContextLengthError,
    EngineClosedError,
    GenerationResult,
    InferenceEngine,
    InvalidRequestError,
    SamplingParams,
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
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.host = host
        self.port = port
        self.api_key = api_key
        # "default" is what lightning.llm() asks for when no model name is configured.
        self.aliases = frozenset((model_name, "default", *aliases))
        self.accept_any_model = accept_any_model
        self.capture = capture
        self.max_top_logprobs = max_top_logprobs
        if traces is None and otlp:
            # The daemon's LocalCapture stores into the daemon: so do OTLP traces.
            daemon = getattr(capture, "daemon", None)
            if daemon is not None and hasattr(daemon, "ingest_local"):
                traces = TraceReceiver(daemon)
        self.traces = traces if otlp else None
        self.ready = False
        self._token_text: dict[int, str] = {}
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
        """Serve until cancelled; then stop accepting, finish (<= 2 s) and close sockets."""
        import uvicorn

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
            self.ready = True
            logger.info("server.listening", base_url=self.base_url, model=self.model_name)
            task_status.started(self.base_url)
            try:
                await anyio.sleep_forever()
            finally:
                self.ready = False
                server.should_exit = True
                with anyio.CancelScope(shield=True):
                    await done.wait()

    def _check_auth(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            return _error(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                          type_="authentication_error", code="invalid_api_key")
        return None

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise RequestError(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError("model is required", param="model")
        if model not in self.aliases and not self.accept_any_model:
            raise RequestError(
                f"model {model!r} does not exist: this server serves {self.model_name!r}",
                param="model", code="model_not_found", status=404,
            )

    def _rollout_of(self, request: Request) -> str | None:
        rid = request.path_params.get("rollout_id") or request.headers.get(ROLLOUT_HEADER)
        if rid and self.capture is None:
            raise RequestError("this server has no capture sink: rollout routes are off",
                               status=404)
        return rid or None

    async def _guard(self, request: Request, handler: Callable[..., Any], endpoint: str) -> Response:
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        try:
            body = await self._body(request)
            self._check_model(body)
            ctx = _Ctx(self._rollout_of(request), endpoint)
            return await handler(body, ctx)
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        except ContextLengthError as exc:
            return _error(400, str(exc), param="messages", code="context_length_exceeded")
        except InvalidRequestError as exc:
            return _error(400, str(exc))
        except EngineClosedError as exc:
            return _error(503, f"the engine is not serving: {exc}", type_="server_error",
                          code="engine_unavailable")

    # ------------------------------------------------------------------ sampling

    def _params(self, body: dict[str, Any], *, max_tokens_keys: tuple[str, ...],
                top_logprobs: int, n: int = 1) -> SamplingParams:
        for key in ("frequency_penalty", "presence_penalty"):
            v = body.get(key)
            if v not in (None, 0, 0.0):
                raise RequestError(f"{key} is not supported by this server (use 0)", param=key)
        if body.get("logit_bias"):
            raise RequestError("logit_bias is not supported by this server", param="logit_bias")
        max_tokens = None
        for key in max_tokens_keys:
            if body.get(key) is not None:
                max_tokens = body[key]
                break
        if top_logprobs > self.max_top_logprobs:
            raise RequestError(f"top_logprobs must be <= {self.max_top_logprobs}",
                               param="top_logprobs")
        temperature = body.get("temperature")
        top_p = body.get("top_p")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if temperature is None else float(temperature),
                top_p=1.0 if top_p is None else float(top_p),
                top_k=int(body.get("top_k") or 0),
                stop=sampling_stop(body.get("stop")),
                seed=body.get("seed"),
                n=n,
                top_logprobs=top_logprobs,
            )
        except (TypeError, ValueError) as exc:
            raise RequestError(str(exc)) from exc

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

    def _check_capture_target(self, ctx: _Ctx) -> None:
        if ctx.rollout_id is not None and self.capture is not None:
            if not self.capture.is_open(ctx.rollout_id):  # type: ignore[attr-defined]
                raise RequestError(
                    f"rollout {ctx.rollout_id} is not open: start it with POST /v1/rollouts "
                    "(and do not reuse finished rollouts)",
                    code="rollout_not_found", status=404,
                )

    # ------------------------------------------------------------------ routes

    async def _traces(self, request: Request) -> Response:
        denied = self._check_auth(request)
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
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "lightning",
            "policy_version": self.engine.policy_version,
            "max_model_len": self.engine.max_model_len,
        }]})

    # chat ------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._guard(request, self._chat_impl, "chat.completions")

    def _chat_prompt(self, body: dict[str, Any]) -> tuple[list[int], bool]:
        messages = normalize_chat_messages(body.get("messages"))
        tools = normalize_tools(body.get("tools"))
        tools, forced = apply_tool_choice(tools, body.get("tool_choice"))
        instruction = response_format_instruction(body.get("response_format"))
        messages = with_system_instruction(messages, "\n\n".join(filter(None, [forced, instruction])))
        return self.engine.apply_chat_template(messages, tools=tools), bool(tools)

    async def _chat_impl(self, body: dict[str, Any], ctx: _Ctx) -> Response:
        self._check_capture_target(ctx)
        prompt_ids, has_tools = self._chat_prompt(body)
        want_lp = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or 0) if want_lp else 0
        n = int(body.get("n") or 1)
        params = self._params(body, max_tokens_keys=("max_completion_tokens", "max_tokens"),
                              top_logprobs=top, n=n)
        report = _sampling(params, ctx)
        cid = "chatcmpl-" + uuid.uuid4().hex
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = self.engine.generate_stream(prompt_ids, params)
            return self._sse(self._chat_stream(stream, prompt_ids, params, has_tools, want_lp,
                                               include_usage, cid, ctx, body, report))
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
                          finish, {"request": _request_summary(body), "text": c.text,
                                   "tool_calls": calls, "choice_index": c.index})
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": _usage(result),
            "prompt_token_ids": result.prompt_token_ids, "policy_version": result.policy_version,
            "system_fingerprint": f"lightning-v{result.policy_version}", "sampling": report,
        })

    async def _chat_stream(self, stream: AsyncIterator[Any], prompt_ids: list[int],
                           params: SamplingParams, has_tools: bool, want_lp: bool,
                           include_usage: bool, cid: str, ctx: _Ctx,
                           body: dict[str, Any], report: dict[str, Any]) -> AsyncIterator[bytes]:
        created = int(time.time())
        model = body["model"]
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
                                  finish, {"request": _request_summary(body), "text": a.text,
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
            except (InvalidRequestError, EngineClosedError, RequestError) as exc:
                err = {"error": {"message": str(exc), "type": "invalid_request_error",
                                 "param": None, "code": None}}
                yield b"data: " + _json.encode(err) + b"\n\n"

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    # completions ---------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        return await self._guard(request, self._completions_impl, "completions")

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            return [tok.encode(prompt, add_special_tokens=False)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
                return [list(prompt)]
            if all(isinstance(p, str) for p in prompt):
                return [tok.encode(p, add_special_tokens=False) for p in prompt]
            if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                   for p in prompt):
                return [list(p) for p in prompt]
        raise RequestError(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (non-empty)", param="prompt")

    async def _completions_impl(self, body: dict[str, Any], ctx: _Ctx) -> Response:
        self._check_capture_target(ctx)
        if body.get("echo"):
            raise RequestError("echo is not supported", param="echo")
        if body.get("suffix"):
            raise RequestError("suffix is not supported", param="suffix")
        if body.get("best_of") not in (None, 1):
            raise RequestError("best_of is not supported", param="best_of")
        prompts = self._completion_prompts(body.get("prompt"))
        vocab = len(self.engine.tokenizer)
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
        lp_k = body.get("logprobs")
        want_lp = lp_k is not None
        params = self._params(body, max_tokens_keys=("max_tokens",),
                              top_logprobs=int(lp_k or 0), n=int(body.get("n") or 1))
        if body.get("max_tokens") is None:
            params = msgspec.structs.replace(params, max_tokens=16)  # OpenAI's default
        report = _sampling(params, ctx)
        cid = "cmpl-" + uuid.uuid4().hex
        if body.get("stream"):
            if len(prompts) != 1:
                raise RequestError("streaming supports a single prompt", param="prompt")
            return self._sse(self._completions_stream(prompts[0], params, want_lp, cid, ctx, body,
                                                      report))
        results: list[GenerationResult] = []
        async with anyio.create_task_group() as tg:
            slots: list[Any] = [None] * len(prompts)

            async def run(i: int, p: list[int]) -> None:
                slots[i] = await self.engine.generate(p, params)

            for i, p in enumerate(prompts):
                tg.start_soon(run, i, p)
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
                              {"request": _request_summary(body), "text": c.text,
                               "choice_index": idx})
        usage = {"prompt_tokens": sum(len(r.prompt_token_ids) for r in results),
                 "completion_tokens": sum(len(c.token_ids) for r in results for c in r.choices)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        prompt_ids: Any = results[0].prompt_token_ids if len(results) == 1 else [
            r.prompt_token_ids for r in results]
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": int(time.time()),
            "model": body["model"], "choices": choices, "usage": usage,
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
                                  want_lp: bool, cid: str, ctx: _Ctx, body: dict[str, Any],
                                  report: dict[str, Any]) -> AsyncIterator[bytes]:
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
                                           "created": created, "model": body["model"],
                                           "choices": [choice],
                                           "policy_version": d.policy_version}
                if first:
                    payload["prompt_token_ids"] = prompt_ids
                    payload["sampling"] = report
                    first = False
                yield b"data: " + _json.encode(payload) + b"\n\n"
                if d.finish_reason is not None:
                    self._capture(ctx, prompt_ids, a.token_ids, a.logprobs, a.policy_version,
                                  a.finish_reason, {"request": _request_summary(body),
                                                    "text": a.text, "choice_index": d.index,
                                                    "stream": True})
        yield b"data: [DONE]\n\n"

    # responses ------------------------------------------------------------------

    async def _responses(self, request: Request) -> Response:
        return await self._guard(request, self._responses_impl, "responses")

    async def _responses_impl(self, body: dict[str, Any], ctx: _Ctx) -> Response:
        self._check_capture_target(ctx)
        if body.get("previous_response_id"):
            raise RequestError(
                "previous_response_id is not supported (responses are not stored): send the "
                "whole conversation as input", param="previous_response_id")
        messages = responses_input_to_messages(body.get("input"), body.get("instructions"))
        tools = responses_tools_to_chat(body.get("tools"))
        tools, forced = apply_tool_choice(tools, _responses_tool_choice(body.get("tool_choice")))
        fmt = (body.get("text") or {}).get("format")
        instruction = response_format_instruction(fmt, "text.format")
        messages = with_system_instruction(messages, "\n\n".join(filter(None, [forced, instruction])))
        prompt_ids = self.engine.apply_chat_template(messages, tools=tools)
        params = self._params(body, max_tokens_keys=("max_output_tokens",), top_logprobs=0)
        report = _sampling(params, ctx)
        rid = "resp_" + uuid.uuid4().hex
        base = {
            "id": rid, "object": "response", "created_at": int(time.time()),
            "model": body["model"], "instructions": body.get("instructions"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": body.get("tools") or [], "temperature": params.temperature,
            "top_p": params.top_p, "max_output_tokens": body.get("max_output_tokens"),
            "text": body.get("text") or {"format": {"type": "text"}},
            "metadata": body.get("metadata") or {}, "error": None,
            "incomplete_details": None, "sampling": report,
        }
        if body.get("stream"):
            return self._sse(self._responses_stream(prompt_ids, params, bool(tools), base, ctx,
                                                    body))
        result = await self.engine.generate(prompt_ids, params)
        c = result.choices[0]
        output = self._responses_output(c.text, bool(tools))
        self._capture(ctx, result.prompt_token_ids, c.token_ids, c.logprobs, c.policy_version,
                      c.finish_reason, {"request": _request_summary(body), "text": c.text,
                                        "tool_calls": _calls_of(output)})
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
                                body: dict[str, Any]) -> AsyncIterator[bytes]:
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
        final = self._response_object(base, output, prompt_ids, c, "completed")
        self._capture(ctx, prompt_ids, c.token_ids, c.logprobs, c.policy_version,
                      c.finish_reason, {"request": _request_summary(body), "text": c.text,
                                        "tool_calls": _calls_of(output), "stream": True})
        yield event("response.completed" if final["status"] == "completed"
                    else "response.incomplete", response=final)

    # server-side rollouts ----------------------------------------------------------

    async def _rollout_start(self, request: Request) -> Response:
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        if self.capture is None:
            return _error(404, "this server has no capture sink: rollout routes are off")
        try:
            body = await self._body(request) if await request.body() else {}
        except RequestError as exc:
            return _error(400, str(exc))
        rid = body.get("rollout_id") or uuid.uuid4().hex
        attempt = body.get("attempt", 0)
        metadata = body.get("metadata") or {}
        if not isinstance(rid, str) or not isinstance(attempt, int) or not isinstance(metadata, dict):
            return _error(400, "rollout_id must be a string, attempt an integer, metadata an object")
        try:
            self.capture.start_rollout(rollout_id=rid, name=str(body.get("name") or "http"),
                                       group_key=body.get("group_key"), attempt=attempt,
                                       metadata=metadata)
        except ValueError as exc:
            return _error(409, str(exc), code="rollout_exists")
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"rollout_id": rid, "base_url": f"{base}/rollouts/{rid}/v1"},
                            status_code=201)

    async def _rollout_reward(self, request: Request) -> Response:
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        rid = request.path_params["rollout_id"]
        try:
            body = await self._body(request)
            value, name, components = _reward_of(body)
            self._require_open(rid)
            self.capture.record_reward(rid, value, name, components)  # type: ignore[union-attr]
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        return JSONResponse({"rollout_id": rid, "recorded": True})

    async def _rollout_end(self, request: Request) -> Response:
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        rid = request.path_params["rollout_id"]
        try:
            body = await self._body(request) if await request.body() else {}
            final = body.get("final_reward")
            if final is not None and (not isinstance(final, (int, float)) or isinstance(final, bool)
                                      or not math.isfinite(final)):
                raise RequestError("final_reward must be a finite number", param="final_reward")
            status = body.get("status", "completed")
            if status not in ("completed", "failed", "cancelled"):
                raise RequestError("status must be completed, failed or cancelled", param="status")
            self._require_open(rid)
            n = self.capture.end_rollout(  # type: ignore[union-attr]
                rid, status=status, final_reward=None if final is None else float(final),
                error=body.get("error"))
        except RequestError as exc:
            return _error(exc.status, str(exc), param=exc.param, code=exc.code)
        return JSONResponse({"rollout_id": rid, "n_transitions": n})

    def _require_open(self, rid: str) -> None:
        if self.capture is None:
            raise RequestError("this server has no capture sink: rollout routes are off",
                               status=404)
        if not self.capture.is_open(rid):  # type: ignore[attr-defined]
            raise RequestError(f"rollout {rid} is not open (unknown or already ended)",
                               code="rollout_not_found", status=404)


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


def _responses_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _request_summary(body: dict[str, Any]) -> dict[str, Any]:
    keep = ("messages", "prompt", "input", "instructions", "tools", "tool_choice", "n",
            "temperature", "top_p", "max_tokens", "max_completion_tokens", "max_output_tokens",
            "stop", "seed", "response_format")
    return {k: body[k] for k in keep if k in body}


def _reward_of(body: dict[str, Any]) -> tuple[float, str, dict[str, float]]:
    value = body.get("value")
    if isinstance(value, dict):
        comps = {}
        for k, v in value.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RequestError(f"reward {k!r} must be a finite number", param="value")
            comps[str(k)] = float(v)
        primary = body.get("primary") or (next(iter(comps)) if len(comps) == 1 else None)
        if primary not in comps:
            raise RequestError("several rewards need primary=NAME naming one of them",
                               param="primary")
        return comps[primary], primary, comps
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError("value must be a finite number (or an object of named rewards)",
                           param="value")
    return float(value), str(body.get("name") or "reward"), {}

