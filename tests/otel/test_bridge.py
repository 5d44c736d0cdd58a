"""Bridge: GenAI spans of an app without @lightning.rollout -> rollouts over ZeroMQ."""

from __future__ import annotations

import pytest
from lightning_test_helpers import wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Status, StatusCode
from structlog.testing import capture_logs

import lightning
import lightning.otel
from lightning._protocol import unpack_ids
from lightning.testing import recover

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fake_openai import (  # noqa: E402
    VERSION,
    FakeOpenAI,
    _flatten,
    mock_handler,
    prompt_ids,
    sdk_httpx,
)

BASE = "http://fake.test/lightning/v1"


def test_genai_spans_become_trainable_rollouts_over_zeromq(daemon_process, tmp_path):
    d = daemon_process().start()
    lightning.init(daemon=d.address, spill_dir=str(tmp_path / "spill"), policy_url=BASE)
    provider = TracerProvider()
    bridge = lightning.otel.LightningSpanProcessor(tracer_provider=provider)
    provider.add_span_processor(bridge)
    tracer = provider.get_tracer("app")
    hx = sdk_httpx()
    fake = FakeOpenAI()
    http = hx.Client(transport=hx.MockTransport(mock_handler(fake, hx)))
    client = openai.OpenAI(base_url=BASE, api_key="x", max_retries=0, http_client=http)
    try:
        with capture_logs() as logs:
            for task in ("a", "b"):
                with tracer.start_as_current_span(
                        "solve", attributes={"lightning.rollout.group_key": task}) as root:
                    # what an instrumentation (OpenLLMetry here) wraps around the SDK call
                    with tracer.start_as_current_span(
                            "openai.chat", attributes={"llm.request.type": "chat",
                                                       "gen_ai.system": "openai"}):
                        client.chat.completions.create(
                            model="m", messages=[{"role": "user", "content": "hi " + task}])
                    with tracer.start_as_current_span(
                            "execute_tool search",
                            attributes={"gen_ai.operation.name": "execute_tool",
                                        "gen_ai.tool.name": "search"}) as tool:
                        tool.set_status(Status(StatusCode.ERROR, "timeout"))
                    # an LLM span of a provider without token ids: stored, not trainable
                    with tracer.start_as_current_span(
                            "chat gpt-4o", attributes={"gen_ai.operation.name": "chat",
                                                       "gen_ai.request.model": "gpt-4o"}):
                        pass
                    root.set_attribute("lightning.reward.final", 1.0 if task == "a" else 0.0)
        assert bridge.rollouts_sent == 2
        assert fake.requests[0][1]["return_token_ids"] is True
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["otel.no_token_ids"]
    finally:
        provider.shutdown()
        lightning.shutdown(grace_s=10)
    assert wait_until(lambda: len(recover(d.data_dir)[1]) == 2, timeout=10)
    d.stop()
    _, trajs, _ = recover(d.data_dir)
    by_group = {t.group_key: t for t in trajs}
    assert set(by_group) == {"a", "b"}
    t = by_group["a"]
    assert t.final_reward == 1.0 and t.metadata["source"] == "otel-bridge"
    assert t.name == "solve"
    x0, x1 = t.transitions  # the instrumentation's wrapper span did not count twice
    assert x0.trainable and x0.policy_version == VERSION
    body = fake.requests[0][1]
    assert list(unpack_ids(x0.prompt_ids)) == prompt_ids(_flatten(body["messages"]))
    assert x0.metadata["text"] == ""  # messages only with include_content=True
    assert not x1.trainable and x1.model == "gpt-4o"
    (s,) = t.spans
    assert (s.kind, s.name, s.status, s.error, s.after) == ("tool", "search", "error", "timeout", 1)
    assert by_group["b"].final_reward == 0.0


def test_spans_recorded_by_the_decorator_are_not_sent_twice(monkeypatch):
    from lightning import _lifecycle, _rollout

    sent = []
    monkeypatch.setattr(_lifecycle, "_current", type("R", (), {"submit": staticmethod(sent.append),
                                                               "config": None})())
    provider = TracerProvider()
    bridge = lightning.otel.LightningSpanProcessor(capture_calls=False)
    provider.add_span_processor(bridge)
    lightning.otel.instrument(provider)

    @lightning.rollout
    def agent():
        lightning.record_transition([1], [2])
        return 1.0

    agent()
    provider.shutdown()
    assert bridge.rollouts_sent == 0
    assert [type(e).__name__ for e in sent] == ["RolloutStart", "Transition", "RolloutEnd"]
    assert _rollout._observer is not None


def test_a_remote_parent_makes_the_local_span_the_root(monkeypatch):
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from lightning import _lifecycle

    sent = []
    monkeypatch.setattr(_lifecycle, "_current", type("R", (), {"submit": staticmethod(sent.append),
                                                               "config": None})())
    provider = TracerProvider()
    bridge = lightning.otel.LightningSpanProcessor(capture_calls=False)
    provider.add_span_processor(bridge)
    tracer = provider.get_tracer("svc")
    upstream = SpanContext(0xAB, 0xCD, is_remote=True, trace_flags=TraceFlags(1))
    with tracer.start_as_current_span("handle", context=trace.set_span_in_context(
            NonRecordingSpan(upstream))):
        with tracer.start_as_current_span("chat m", attributes={"gen_ai.operation.name": "chat"}):
            pass
    assert bridge.rollouts_sent == 1  # cut when the local root ended, not after idle_s
    assert [type(e).__name__ for e in sent] == ["RolloutStart", "Transition", "RolloutEnd"]
    provider.shutdown()
