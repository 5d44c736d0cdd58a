"""The bridge: an OpenTelemetry SpanProcessor that turns GenAI spans into rollouts.

For apps that already emit GenAI spans (OpenTelemetry GenAI instrumentations,
OpenInference, OpenLLMetry, the OpenAI Agents SDK's OTel processors...) and do not want
``@lightning.rollout``: add :class:`LightningSpanProcessor` to the app's TracerProvider
next to its exporter, call ``lightning.init()``, and each trace (or each span marked with
``lightning.rollout.*`` attributes) becomes a rollout, sent to the daemon over ZeroMQ by
the runtime with its acknowledgements, retries and spill log. Grouping and mapping are
the OTLP receiver's (:mod:`lightning.otel._mapping`): a trace becomes a rollout when its
root span ends (or after ``idle_s`` without new spans); put ``lightning.rollout.group_key``
(and ``lightning.reward.final``) on the root span, or emit ``lightning.reward.value`` spans
or ``gen_ai.evaluation.result`` events for rewards.

Token ids: GenAI spans of other instrumentations carry text only. With
``capture_calls=True`` (default) calls made with the ``openai`` package outside any rollout
also get a ``chat {model}`` span of ours, a child of the span current at the call (the
instrumentation's own LLM span), with the token ids and log-probs the policy server
returned; the mapping keeps the innermost LLM span of a call, so the call is counted once
and trains. The runtime's capture must be installed (``lightning.init()`` does it) for the
policy server to be asked for token ids.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from .. import _rollout
from .._capture import openai as _capture_openai
from ._export import Exporter
from ._mapping import Assembler, to_events
from ._model import from_sdk_span

logger = structlog.get_logger()

__all__ = ["LightningSpanProcessor"]


class _CallSpans:
    """The capture's sink for calls outside rollouts: GenAI spans with token ids."""

    def __init__(self, tracer_provider: Any, include_content: bool) -> None:
        self._exporter = Exporter(tracer_provider, include_token_ids=True,
                                  include_content=include_content)

    def context(self) -> Any:
        return otel_context.get_current()

    def call(self, parent: Any, transition: Any) -> None:
        self._exporter.transition(None, transition, parent=parent)


class LightningSpanProcessor(SpanProcessor):
    """Forwards the GenAI spans of finished traces to the daemon as rollouts.

    Args:
        idle_s: a trace whose root span has not ended becomes a rollout after this long
            without new spans (checked as spans end and on ``force_flush``).
        capture_calls: record ``openai`` calls made outside rollouts as GenAI spans with
            token ids (see the module docstring).
        tracer_provider: where those call spans go (default: the global provider; it
            must be the one this processor is added to for them to come back here).
        include_content: put messages on those call spans too.
        max_buffered_spans: spans held for unfinished traces; more are dropped (logged).
    """

    def __init__(self, *, idle_s: float = 30.0, capture_calls: bool = True,
                 tracer_provider: Any = None, include_content: bool = False,
                 max_buffered_spans: int = 100_000) -> None:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0, got {idle_s}")
        self._assembler = Assembler(idle_s=idle_s, max_spans=max_buffered_spans)
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._capture = capture_calls
        self.rollouts_sent = 0
        if capture_calls:
            _capture_openai.set_call_spans(_CallSpans(tracer_provider, include_content))

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        try:
            s = from_sdk_span(span)
            with self._lock:
                groups = self._assembler.add([s])
                groups += self._assembler.expire()
            self._send(groups)
        except Exception as exc:  # noqa: BLE001 - never break the app's tracing
            self._once("failed", "otel.bridge_failed", error=f"{type(exc).__qualname__}: {exc}")

    def _send(self, groups: list[Any]) -> None:
        if self._assembler.dropped_overflow:
            self._once("overflow", "otel.bridge_overflow",
                       dropped=self._assembler.dropped_overflow,
                       hint="traces stay open until their root span ends: end them, or lower "
                       "idle_s")
        for g in groups:
            mapped = to_events(g, source="otel-bridge")
            if mapped is None:
                continue  # recorded by @lightning.rollout and sent by the runtime already
            for ev in mapped.events:
                _rollout._submit(ev)
            self.rollouts_sent += 1
            if mapped.untrainable:
                self._once("untrainable", "otel.no_token_ids", rollout_id=mapped.rollout_id,
                           consequence="LLM spans without lightning.*_token_ids are sent as "
                           "text and are NOT trainable",
                           fix="call lightning.init() (it installs the openai capture) and "
                           "point the openai client at the policy server")

    def _once(self, key: str, event: str, **fields: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(event, **fields)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send the rollouts of traces idle for ``idle_s``; open traces stay buffered."""
        with self._lock:
            groups = self._assembler.expire()
        self._send(groups)
        return True

    def shutdown(self) -> None:
        """Send every buffered trace as a rollout and stop capturing calls as spans."""
        if self._capture:
            _capture_openai.set_call_spans(None)
        with self._lock:
            groups = self._assembler.expire(everything=True)
        self._send(groups)
