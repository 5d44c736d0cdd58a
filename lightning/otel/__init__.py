"""OpenTelemetry in and out (the ``otel`` extra; never imported by ``import lightning``).

Out
    :func:`instrument` exports rollouts, LLM calls (GenAI semantic conventions), tool
    calls and rewards as spans through the app's TracerProvider, nested in its current
    trace. Automatic once an SDK TracerProvider is set globally. AIR step rewards are
    exported daemon-side with :func:`export_step_rewards` (or :func:`traced_air` around
    the batcher's AIR).
In
    :class:`TraceReceiver` serves ``POST /v1/traces`` (OTLP/HTTP, protobuf or JSON) in
    the daemon and stores the rollouts it finds; the policy server mounts it.
Bridge
    :class:`LightningSpanProcessor` (needs opentelemetry-sdk) sends the GenAI spans of an
    app's traces to the daemon through the runtime, without ``@lightning.rollout``.

Attribute names: :mod:`lightning.otel._attributes` (table in its docstring).
"""

from __future__ import annotations

from typing import Any

from ._export import Exporter, export_step_rewards, instrument, traced_air, uninstrument
from ._model import OtelSpan, OtlpDecodeError, decode_otlp
from ._receiver import TraceReceiver

__all__ = [
    "Exporter",
    "LightningSpanProcessor",
    "OtelSpan",
    "OtlpDecodeError",
    "TraceReceiver",
    "decode_otlp",
    "export_step_rewards",
    "instrument",
    "traced_air",
    "uninstrument",
]


def __getattr__(name: str) -> Any:
    # The bridge subclasses the SDK's SpanProcessor: import opentelemetry-sdk only if used.
    if name == "LightningSpanProcessor":
        try:
            from ._bridge import LightningSpanProcessor
        except ImportError as exc:
            raise ImportError(
                "lightning.otel.LightningSpanProcessor needs opentelemetry-sdk: pip install "
                "'lightning-rl[otel]'"
            ) from exc
        return LightningSpanProcessor
    raise AttributeError(f"module 'lightning.otel' has no attribute {name!r}")
