"""Export: rollouts, LLM calls, tools and rewards as spans in the app's trace."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import lightning
import lightning.otel
from lightning import _rollout
from lightning.algorithms.air import StepReward


def by_name(exporter):
    return {s.name: s for s in exporter.get_finished_spans()}


@lightning.tool
def search(query: str) -> str:
    return f"results for {query}"


@lightning.rollout(group_key="task-1")
def agent(question: str) -> float:
    lightning.record_transition(
        [1, 2, 3], [4, 5], [-0.5, -0.25], policy_version=3, model="tiny", finish_reason="stop",
        latency_s=0.01, temperature=0.7, top_k=20, logprob_convention="processed",
        metadata={"endpoint": "chat.completions", "base_url": "http://127.0.0.1:8000/v1",
                  "request": {"model": "default", "temperature": 0.7,
                              "messages": [{"role": "user", "content": question}]},
                  "text": "hi", "tool_calls": [{"id": "c1", "name": "search",
                                                "arguments": '{"query": "x"}'}]},
    )
    search("x")
    lightning.emit_reward({"correct": 1.0, "format": 0.5}, primary="correct")
    with lightning.span("plan", kind="custom", step=1):
        pass
    return 0.75


def test_spans_follow_genai_conventions_and_nest_in_the_app_trace(memory_provider):
    provider, exporter = memory_provider
    lightning.otel.instrument(provider, include_token_ids=True, include_content=True)
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("http request") as app_span:
        assert agent("why?") == 0.75
    spans = by_name(exporter)
    assert set(spans) == {"http request", "invoke_agent agent", "chat tiny",
                          "execute_tool search", "reward correct", "plan"}
    root = spans["invoke_agent agent"]
    # linked to the app's current trace: the rollout span is a child of the app's span
    assert root.parent.span_id == app_span.get_span_context().span_id
    assert root.context.trace_id == app_span.get_span_context().trace_id
    rid = root.attributes["lightning.rollout.id"]
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["gen_ai.agent.name"] == "agent"
    assert root.attributes["lightning.rollout.group_key"] == "task-1"
    assert root.attributes["lightning.rollout.status"] == "completed"
    assert root.attributes["lightning.reward.final"] == 0.75
    assert "lightning.delivered" not in root.attributes  # no runtime running
    for name, s in spans.items():
        if name not in ("http request", "invoke_agent agent"):
            assert s.parent.span_id == root.context.span_id, name
            assert s.attributes["lightning.rollout.id"] == rid
    llm = spans["chat tiny"]
    a = llm.attributes
    assert llm.kind == SpanKind.CLIENT
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "default"
    assert a["gen_ai.response.model"] == "tiny"
    assert a["gen_ai.request.temperature"] == 0.7
    # the transition's own sampling (what OTLP ingest reads back)
    assert a["gen_ai.request.top_k"] == 20 and a["lightning.logprobs.convention"] == "processed"
    assert "gen_ai.request.top_p" not in a  # unknown stays unknown
    assert a["gen_ai.usage.input_tokens"] == 3 and a["gen_ai.usage.output_tokens"] == 2
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == 8000
    assert a["lightning.policy_version"] == 3 and a["lightning.transition.index"] == 0
    assert a["lightning.prompt_token_ids"] == (1, 2, 3)
    assert a["lightning.response_token_ids"] == (4, 5)
    assert a["lightning.response_logprobs"] == (-0.5, -0.25)
    out = json.loads(a["gen_ai.output.messages"])
    assert out[0]["parts"][0] == {"type": "text", "content": "hi"}
    assert out[0]["parts"][1]["type"] == "tool_call"
    assert json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"] == "why?"
    assert llm.end_time - llm.start_time == pytest.approx(0.01e9, rel=0.01)
    tool = spans["execute_tool search"].attributes
    assert tool["gen_ai.tool.name"] == "search" and tool["gen_ai.operation.name"] == "execute_tool"
    assert json.loads(tool["gen_ai.tool.call.result"]) == "results for x"
    assert tool["lightning.span.after"] == 1
    reward = spans["reward correct"].attributes
    assert reward["lightning.reward.value"] == 1.0
    assert reward["lightning.reward.component.format"] == 0.5
    assert reward["lightning.reward.after"] == 1
    assert spans["plan"].attributes["lightning.span.kind"] == "custom"


def test_content_and_token_ids_are_opt_in(memory_provider):
    provider, exporter = memory_provider
    lightning.otel.instrument(provider)
    agent("q")
    a = by_name(exporter)["chat tiny"].attributes
    assert not any(k in a for k in ("lightning.prompt_token_ids", "gen_ai.input.messages",
                                    "gen_ai.output.messages"))
    assert "gen_ai.tool.call.result" not in by_name(exporter)["execute_tool search"].attributes


async def test_failed_async_rollout_and_nested_child(memory_provider):
    provider, exporter = memory_provider
    lightning.otel.instrument(provider)

    @lightning.rollout
    async def child():
        return 1

    @lightning.rollout
    async def parent():
        await child()
        raise KeyError("boom")

    with pytest.raises(KeyError):
        await parent()
    spans = by_name(exporter)
    p, c = spans["invoke_agent test_failed_async_rollout_and_nested_child.<locals>.parent"], \
        spans["invoke_agent test_failed_async_rollout_and_nested_child.<locals>.child"]
    assert c.parent.span_id == p.context.span_id
    assert c.attributes["lightning.rollout.parent_id"] == p.attributes["lightning.rollout.id"]
    assert p.status.status_code == StatusCode.ERROR and "boom" in p.status.description
    assert p.attributes["lightning.rollout.status"] == "failed"


def test_rollout_metadata_carries_the_span_ids(memory_provider, monkeypatch):
    provider, exporter = memory_provider
    lightning.otel.instrument(provider)
    seen = []
    monkeypatch.setattr(_rollout, "_submit", seen.append)
    agent("q")
    start = seen[0]
    root = by_name(exporter)["invoke_agent agent"]
    assert start.metadata["otel.trace_id"] == f"{root.context.trace_id:032x}"
    assert start.metadata["otel.span_id"] == f"{root.context.span_id:016x}"


def test_spans_say_delivered_when_a_runtime_runs(memory_provider, monkeypatch):
    from lightning import _lifecycle

    provider, exporter = memory_provider
    lightning.otel.instrument(provider)
    monkeypatch.setattr(_lifecycle, "_current", SimpleNamespace(submit=lambda e: None))
    agent("q")
    assert all(s.attributes["lightning.delivered"] is True
               for s in exporter.get_finished_spans())


def test_export_failure_never_reaches_the_app(memory_provider):
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("exporter bug")

    _rollout._observer = Broken()
    assert agent("q") == 0.75  # the rollout still runs and returns


def test_air_step_rewards_join_the_rollout_trace(memory_provider):
    provider, exporter = memory_provider
    traj = SimpleNamespace(rollout_id="r1", metadata={"otel.trace_id": "ab" * 16,
                                                     "otel.span_id": "cd" * 8})
    n = lightning.otel.export_step_rewards(
        traj, [StepReward(1, 0.1, "tool_call"), StepReward(2, -0.2, "tool_arguments")],
        tracer_provider=provider)
    assert n == 2
    spans = by_name(exporter)
    s = spans["air.reward tool_arguments"]
    assert s.context.trace_id == int("ab" * 16, 16)
    assert s.parent.span_id == int("cd" * 8, 16)
    assert s.attributes["lightning.reward.value"] == -0.2
    assert s.attributes["lightning.air.rule"] == "tool_arguments"
    assert s.attributes["lightning.reward.after"] == 2


def test_traced_air_returns_the_rewards_and_exports_them(memory_provider):
    from lightning.algorithms.air import AIR

    provider, exporter = memory_provider
    span = SimpleNamespace(kind="tool", status="error", after=1, attributes={}, name="t")
    traj = SimpleNamespace(rollout_id="r2", metadata={}, spans=[span], transitions=[])
    air = lightning.otel.traced_air(AIR(), tracer_provider=provider)
    rewards = air(traj)
    assert rewards == AIR()(traj) and rewards
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == [f"air.reward {r.rule}" for r in rewards]


def test_automatic_export_with_a_global_sdk_provider_only():
    """In a fresh process: no span work without an SDK provider; automatic with one."""
    code = """
import sys
import lightning
from lightning import _rollout

@lightning.rollout
def f():
    return 1

f()
assert "opentelemetry" not in sys.modules and _rollout._observer is None
from opentelemetry import trace
f()
assert _rollout._observer is None  # imported, but no SDK provider configured
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exp = InMemorySpanExporter()
tp = TracerProvider()
tp.add_span_processor(SimpleSpanProcessor(exp))
trace.set_tracer_provider(tp)
f()
assert [s.name for s in exp.get_finished_spans()] == ["invoke_agent f"], exp.get_finished_spans()
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_uninstrument_mid_rollout_still_ends_and_detaches(memory_provider):
    from opentelemetry import trace

    provider, exporter = memory_provider
    lightning.otel.instrument(provider)

    @lightning.rollout(name="f")
    def f():
        with lightning.span("step"):
            lightning.otel.uninstrument()
        lightning.record_transition([1], [2])  # not exported any more
        return 1

    f()
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["invoke_agent f", "step"]
    assert not trace.get_current_span().get_span_context().is_valid  # nothing left attached
