"""Export rollouts as OpenTelemetry spans through the application's TracerProvider.

:func:`instrument` installs an exporter into the recording API (``@lightning.rollout``,
``emit_reward``, ``span``/``tool``/``emit_span`` and every captured LLM call). Without it,
the hooks cost one global read per event. It is also installed automatically by the first
rollout that starts once ``opentelemetry`` is imported and an SDK TracerProvider is set as
the global one (``LIGHTNING_OTEL_EXPORT=off`` disables that), so an app that already
traces gets rollout spans without a line of code.

Spans (names and attributes follow the OpenTelemetry GenAI semantic conventions; ours are
``lightning.*``, see :mod:`lightning.otel._attributes`):

- ``invoke_agent {name}`` (INTERNAL): one per rollout, a child of the app's current span,
  and the current span while the rollout runs, so the app's own spans nest under it.
  ``gen_ai.operation.name=invoke_agent``, ``gen_ai.agent.name``, ``lightning.rollout.*``,
  final reward, status (ERROR with the exception for a failed rollout).
- ``chat {model}`` / ``text_completion {model}`` (CLIENT): one per LLM call (transition),
  with ``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
  ``gen_ai.usage.input_tokens``/``output_tokens``, ``gen_ai.response.finish_reasons``,
  request parameters, ``server.address``, ``lightning.policy_version``,
  ``lightning.transition.index``, ``lightning.trainable``. Token ids and log-probs with
  ``include_token_ids=True``; messages (``gen_ai.input.messages``/``output.messages``)
  with ``include_content=True`` (both opt-in: large, or sensitive).
- ``execute_tool {name}`` (INTERNAL) for ``@lightning.tool`` and ``span(kind="tool")``;
  other ``lightning.span`` blocks keep their name with ``lightning.span.kind``.
- ``reward {name}``: a zero-length span per ``emit_reward``.
- AIR step rewards are computed by the daemon: :func:`export_step_rewards` emits them
  there, as ``air.reward {rule}`` spans in the rollout's trace (the exporter puts the
  rollout span's ids in the rollout's metadata, ``otel.trace_id``/``otel.span_id``).

Every span carries ``lightning.rollout.id``; when a runtime is running the spans say
``lightning.delivered=true`` so the daemon's OTLP receiver does not store them again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from .. import _rollout
from .._lifecycle import get_runtime
from .._protocol import unpack_ids, unpack_logprobs
from . import _attributes as A

__all__ = [
    "Exporter",
    "auto_instrument",
    "export_step_rewards",
    "instrument",
    "traced_air",
    "uninstrument",
]

_OPS = {"chat.completions": "chat", "responses": "chat", "completions": "text_completion"}


def _dumps(value: Any) -> str:
    return json.dumps(value, default=repr, ensure_ascii=False)


def _ns(t: float) -> int:
    return int(t * 1e9)


class Exporter:
    """Turns recording-API calls into spans (installed by :func:`instrument`)."""

    def __init__(self, tracer_provider: Any = None, *, include_token_ids: bool = False,
                 include_content: bool = False) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        from .. import __version__

        self._context = context
        self._trace = trace
        self._kind = SpanKind
        self._status = Status
        self._code = StatusCode
        self.tracer = (trace.get_tracer("lightning", __version__) if tracer_provider is None
                       else tracer_provider.get_tracer("lightning", __version__))
        self.include_token_ids = include_token_ids
        self.include_content = include_content

    # --------------------------------------------------------------- helpers

    def _parent(self, ctx: Any) -> Any:
        """The rollout span's context unless the current span is in the same trace."""
        state = getattr(ctx, "_otel", None) if ctx is not None else None
        if state is None:
            return None
        rspan = state[0]
        cur = self._trace.get_current_span().get_span_context()
        if cur.is_valid and cur.trace_id == rspan.get_span_context().trace_id:
            return None
        return self._trace.set_span_in_context(rspan)

    def _base(self, rollout_id: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {A.ROLLOUT_ID: rollout_id}
        if get_runtime() is not None:
            attrs[A.DELIVERED] = True
        return attrs

    # --------------------------------------------------------------- rollouts

    def rollout_begin(self, ctx: Any) -> dict[str, str] | None:
        attrs = self._base(ctx.rollout_id)
        attrs.update({A.GEN_AI_OPERATION: "invoke_agent", A.GEN_AI_AGENT_NAME: ctx.name,
                      A.ROLLOUT_NAME: ctx.name, A.ROLLOUT_ATTEMPT: ctx.attempt})
        if ctx.group_key is not None:
            attrs[A.ROLLOUT_GROUP] = ctx.group_key
        if ctx.parent is not None:
            attrs[A.ROLLOUT_PARENT] = ctx.parent.rollout_id
        span = self.tracer.start_span(f"invoke_agent {ctx.name}", kind=self._kind.INTERNAL,
                                      attributes=attrs)
        token = self._context.attach(self._trace.set_span_in_context(span))
        ctx._otel = (span, token, self)
        sc = span.get_span_context()
        if not sc.is_valid:
            return None
        return {"otel.trace_id": f"{sc.trace_id:032x}", "otel.span_id": f"{sc.span_id:016x}"}

    def rollout_end(self, ctx: Any, status: str, final: float | None, error: str | None) -> None:
        state = ctx._otel
        if state is None:
            return
        ctx._otel = None
        span, token, _ = state
        try:
            span.set_attribute(A.ROLLOUT_STATUS, status)
            if final is not None:
                span.set_attribute(A.REWARD_FINAL, final)
            if status != "completed":
                span.set_status(self._status(self._code.ERROR, error or status))
            span.end()
        finally:
            self._detach(token)

    def _detach(self, token: Any) -> None:
        try:
            self._context.detach(token)
        except Exception:  # noqa: BLE001 - ended in another context: nothing to restore
            pass

    # --------------------------------------------------------------- LLM calls

    def transition(self, ctx: Any, ev: Any, parent: Any = None) -> None:
        meta = ev.metadata or {}
        endpoint = meta.get("endpoint")
        op = _OPS.get(endpoint, "text_completion")
        request = meta.get("request") if isinstance(meta.get("request"), dict) else {}
        attrs = self._base(ev.rollout_id) if ev.rollout_id else {}
        attrs[A.GEN_AI_OPERATION] = op
        if endpoint is not None:
            attrs[A.GEN_AI_PROVIDER] = "openai"
        req_model = request.get("model")
        if isinstance(req_model, str):
            attrs[A.GEN_AI_REQUEST_MODEL] = req_model
        if ev.model:
            attrs[A.GEN_AI_RESPONSE_MODEL] = ev.model
        sampling = ev.sampling
        if sampling is not None:  # what the transition knows beats the request's copy
            request = {**request, **{k: v for k in ("temperature", "top_p", "top_k")
                                     if (v := getattr(sampling, k)) is not None}}
            if sampling.logprobs:
                attrs[A.LOGPROB_CONVENTION] = sampling.logprobs
        for key, attr in (("temperature", A.GEN_AI_REQUEST_TEMPERATURE),
                          ("top_p", A.GEN_AI_REQUEST_TOP_P),
                          ("top_k", A.GEN_AI_REQUEST_TOP_K),
                          ("max_tokens", A.GEN_AI_REQUEST_MAX_TOKENS),
                          ("max_completion_tokens", A.GEN_AI_REQUEST_MAX_TOKENS),
                          ("max_output_tokens", A.GEN_AI_REQUEST_MAX_TOKENS)):
            v = request.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                attrs[attr] = v
        usage = meta.get("usage") if isinstance(meta.get("usage"), dict) else {}
        n_in = usage.get("prompt_tokens", usage.get("input_tokens"))
        n_out = usage.get("completion_tokens", usage.get("output_tokens"))
        if ev.trainable:  # exactly this choice's tokens (usage sums all n choices)
            n_in, n_out = len(ev.prompt_ids) // 4, len(ev.response_ids) // 4
        if isinstance(n_in, int):
            attrs[A.GEN_AI_USAGE_INPUT] = n_in
        if isinstance(n_out, int):
            attrs[A.GEN_AI_USAGE_OUTPUT] = n_out
        if ev.finish_reason:
            attrs[A.GEN_AI_RESPONSE_FINISH_REASONS] = [ev.finish_reason]
        base_url = meta.get("base_url")
        if isinstance(base_url, str) and base_url:
            parts = urlsplit(base_url)
            if parts.hostname:
                attrs["server.address"] = parts.hostname
            if parts.port:
                attrs["server.port"] = parts.port
        if ev.rollout_id:
            attrs[A.TRANSITION_INDEX] = ev.index
        attrs[A.POLICY_VERSION] = ev.policy_version
        attrs[A.TRAINABLE] = ev.trainable
        if not ev.trainable and meta.get("untrainable_reason"):
            attrs[A.UNTRAINABLE_REASON] = str(meta["untrainable_reason"])
        if self.include_token_ids and ev.response_ids:
            attrs[A.PROMPT_IDS] = unpack_ids(ev.prompt_ids).tolist()
            attrs[A.RESPONSE_IDS] = unpack_ids(ev.response_ids).tolist()
            if ev.logprobs:
                attrs[A.LOGPROBS] = unpack_logprobs(ev.logprobs).tolist()
        if self.include_content:
            self._content(attrs, request, meta, ev.finish_reason)
        model = ev.model or (req_model if isinstance(req_model, str) else "")
        end = time.time_ns()
        start = end - int(max(ev.latency_s, 0.0) * 1e9)
        context = parent if parent is not None else self._parent(ctx)
        span = self.tracer.start_span(f"{op} {model}".strip(), context=context,
                                      kind=self._kind.CLIENT, start_time=start, attributes=attrs)
        span.end(end_time=end)

    @staticmethod
    def _content(attrs: dict[str, Any], request: dict[str, Any], meta: dict[str, Any],
                 finish: str) -> None:
        msgs = request.get("messages")
        if isinstance(msgs, list):
            conv = []
            for m in msgs:
                if not isinstance(m, dict):
                    continue
                c = m.get("content")
                part = ({"type": "text", "content": c} if isinstance(c, str)
                        else {"type": "text", "content": _dumps(c)})
                conv.append({"role": m.get("role"), "parts": [part]})
            attrs[A.GEN_AI_INPUT_MESSAGES] = _dumps(conv)
        elif isinstance(request.get("prompt"), str):
            attrs[A.GEN_AI_INPUT_MESSAGES] = _dumps(
                [{"role": "user", "parts": [{"type": "text", "content": request["prompt"]}]}])
        parts: list[dict[str, Any]] = []
        if meta.get("text"):
            parts.append({"type": "text", "content": meta["text"]})
        for call in meta.get("tool_calls") or ():
            parts.append({"type": "tool_call", "id": call.get("id"), "name": call.get("name"),
                          "arguments": call.get("arguments")})
        attrs[A.GEN_AI_OUTPUT_MESSAGES] = _dumps(
            [{"role": "assistant", "parts": parts, "finish_reason": finish}])

    # --------------------------------------------------------------- rewards and spans

    def reward(self, ctx: Any, ev: Any) -> None:
        attrs = self._base(ev.rollout_id)
        attrs.update({A.REWARD_VALUE: ev.value, A.REWARD_NAME: ev.name, A.REWARD_AFTER: ev.after})
        for k, v in ev.components.items():
            attrs[A.REWARD_COMPONENT + k] = v
        now = time.time_ns()
        span = self.tracer.start_span(f"reward {ev.name}", context=self._parent(ctx),
                                      start_time=now, attributes=attrs)
        span.end(end_time=now)

    def _span_attrs(self, rollout_id: str, name: str, kind: str) -> dict[str, Any]:
        attrs = self._base(rollout_id)
        attrs[A.SPAN_KIND] = kind
        if kind == "tool":
            attrs.update({A.GEN_AI_OPERATION: "execute_tool", A.GEN_AI_TOOL_NAME: name,
                          A.GEN_AI_TOOL_TYPE: "function"})
        return attrs

    @staticmethod
    def _span_name(name: str, kind: str) -> str:
        return f"execute_tool {name}" if kind == "tool" else name

    def _finish_span(self, span: Any, ev: Any) -> None:
        span.set_attribute(A.SPAN_AFTER, ev.after)
        if self.include_content:
            span.set_attribute(A.SPAN_ATTRIBUTES, _dumps(ev.attributes))
            if ev.kind == "tool":
                if "input" in ev.attributes:
                    span.set_attribute(A.GEN_AI_TOOL_ARGUMENTS, _dumps(ev.attributes["input"]))
                if "output" in ev.attributes:
                    span.set_attribute(A.GEN_AI_TOOL_RESULT, _dumps(ev.attributes["output"]))
        if ev.status == "error":
            span.set_status(self._status(self._code.ERROR, ev.error or "error"))

    def span_enter(self, handle: Any) -> None:
        ctx = handle._ctx
        span = self.tracer.start_span(
            self._span_name(handle.name, handle.kind), context=self._parent(ctx),
            attributes=self._span_attrs(ctx.rollout_id, handle.name, handle.kind))
        token = self._context.attach(self._trace.set_span_in_context(span))
        handle._otel = (span, token, self)

    def span_exit(self, handle: Any, ev: Any) -> None:
        state = handle._otel
        if state is None:
            return
        handle._otel = None
        span, token, _ = state
        try:
            self._finish_span(span, ev)
            span.end(end_time=_ns(ev.end_time))
        finally:
            self._detach(token)

    def span_emitted(self, ctx: Any, ev: Any) -> None:
        span = self.tracer.start_span(
            self._span_name(ev.name, ev.kind), context=self._parent(ctx),
            start_time=_ns(ev.start_time), attributes=self._span_attrs(ev.rollout_id, ev.name,
                                                                       ev.kind))
        self._finish_span(span, ev)
        span.end(end_time=_ns(ev.end_time))


# ------------------------------------------------------------------ switching on and off


def instrument(tracer_provider: Any = None, *, include_token_ids: bool = False,
               include_content: bool = False) -> Exporter:
    """Export rollouts, LLM calls, tools and rewards as spans (replaces a previous call).

    ``tracer_provider`` defaults to the global one (``trace.set_tracer_provider``), looked
    up when each span starts. ``include_token_ids`` adds token ids and log-probs to LLM
    call spans (what the daemon's OTLP receiver needs to train on them when they reach it
    through a collector instead of the runtime); ``include_content`` adds messages, tool
    arguments and results.

    Raises:
        ImportError: opentelemetry-api is not installed (``pip install lightning-rl[otel]``).
    """
    try:
        exporter = Exporter(tracer_provider, include_token_ids=include_token_ids,
                            include_content=include_content)
    except ImportError as exc:
        raise ImportError(
            "lightning.otel needs OpenTelemetry: pip install 'lightning-rl[otel]'"
        ) from exc
    _rollout._observer = exporter
    return exporter


def uninstrument() -> None:
    """Stop exporting spans (and stop the automatic installation)."""
    _rollout._observer = None
    _rollout._otel_auto = False


def auto_instrument() -> Exporter | None:
    """Install the exporter if an SDK TracerProvider is the global one (else None)."""
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    if type(provider).__module__.startswith("opentelemetry.trace"):
        return None  # the API's own placeholders
    return instrument()


# ------------------------------------------------------------------ AIR (daemon side)


def export_step_rewards(trajectory: Any, step_rewards: Sequence[Any], *,
                        tracer_provider: Any = None) -> int:
    """Emit AIR step rewards as ``air.reward {rule}`` spans in the rollout's trace.

    ``trajectory`` is a stored :class:`~lightning._ingest.Trajectory`; ``step_rewards``
    what :meth:`lightning.algorithms.air.AIR.step_rewards` returned for it. The spans are
    children of the rollout's ``invoke_agent`` span when the exporter recorded its ids in
    the rollout's metadata, else roots. They carry ``lightning.air.rule`` and are never
    ingested back by the OTLP receiver. Returns the number of spans emitted.

    Raises:
        ImportError: opentelemetry-api is not installed.
    """
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from .. import __version__

    tracer = (trace.get_tracer("lightning.air", __version__) if tracer_provider is None
              else tracer_provider.get_tracer("lightning.air", __version__))
    meta = trajectory.metadata or {}
    context = None
    try:
        sc = SpanContext(int(meta["otel.trace_id"], 16), int(meta["otel.span_id"], 16),
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        context = trace.set_span_in_context(NonRecordingSpan(sc))
    except (KeyError, TypeError, ValueError):
        pass
    now = time.time_ns()
    for r in step_rewards:
        span = tracer.start_span(
            f"air.reward {r.rule}", context=context, start_time=now,
            attributes={A.ROLLOUT_ID: trajectory.rollout_id, A.AIR_RULE: r.rule,
                        A.REWARD_VALUE: float(r.value), A.REWARD_NAME: f"air.{r.rule}",
                        A.REWARD_AFTER: int(r.after)})
        span.end(end_time=now)
    return len(step_rewards)


def traced_air(air: Any, *, tracer_provider: Any = None) -> Any:
    """Wrap an AIR rule runner (``trajectory -> step rewards``) to also export its rewards.

    For the daemon's batcher: ``Batcher(config, air=traced_air(AIR()))``. The rewards are
    returned unchanged; a failing export is logged once and never stops training.
    """
    import structlog

    log = structlog.get_logger()
    failed = False

    def run(trajectory: Any) -> list[Any]:
        nonlocal failed
        rewards = list(air(trajectory))
        try:
            export_step_rewards(trajectory, rewards, tracer_provider=tracer_provider)
        except Exception as exc:  # noqa: BLE001 - tracing must never stop training
            if not failed:
                failed = True
                log.warning("otel.air_export_failed", error=f"{type(exc).__qualname__}: {exc}")
        return rewards

    return run
