"""Ingest: OTLP/HTTP traces from the real OTLP exporter (and hand-made JSON) into a daemon."""

from __future__ import annotations

import gzip
import json

import anyio
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from structlog.testing import capture_logs

import lightning
import lightning.otel
from lightning._protocol import unpack_ids, unpack_logprobs
from lightning.otel import TraceReceiver

TRACE = "5b8efff798038103d269b633813fc60c"


@lightning.tool
def lookup(key: str) -> str:
    if key == "bad":
        raise ValueError("no such key")
    return f"value of {key}"


@lightning.rollout(group_key=lambda task: f"task-{task}")
def agent(task: int) -> float:
    for i in range(2):
        lightning.record_transition(
            [1, 2, 3 + i], [10 + i, 11], [-0.1, -0.2], policy_version=5, model="tiny",
            finish_reason="stop", latency_s=0.002,
            metadata={"endpoint": "chat.completions", "text": f"answer {i}"})
        lightning.emit_reward(0.25 * (i + 1), name="step")
    lookup("k")
    try:
        lookup("bad")
    except ValueError:
        pass
    return 1.0


def run_app(endpoint: str, compression: Compression = Compression.NoCompression,
            tasks: tuple[int, ...] = (7,), api_key: str | None = None) -> None:
    """The app: its own TracerProvider, the real OTLP/HTTP exporter, lightning's spans."""
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=endpoint, compression=compression, headers=headers)))
    lightning.otel.instrument(provider, include_token_ids=True, include_content=True)
    tracer = provider.get_tracer("app")
    for task in tasks:
        with tracer.start_as_current_span("POST /solve"):
            agent(task)
    assert provider.force_flush(10_000)
    provider.shutdown()


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
async def test_exported_rollouts_train_like_any_other(otlp_daemon, compression):
    await anyio.to_thread.run_sync(run_app, otlp_daemon.endpoint, compression, (7, 8))
    t1 = await otlp_daemon.trajectory()
    t2 = await otlp_daemon.trajectory()
    assert {t1.group_key, t2.group_key} == {"task-7", "task-8"}
    t = t1
    assert t.name == "agent" and t.status == "completed" and t.final_reward == 1.0
    assert t.metadata["source"] == "otlp"
    assert t.metadata["otel.service.name"] == "shop"
    assert len(t.metadata["otel.trace_id"]) == 32 and len(t.metadata["otel.span_id"]) == 16
    assert [list(unpack_ids(x.prompt_ids)) for x in t.transitions] == [[1, 2, 3], [1, 2, 4]]
    assert [list(unpack_ids(x.response_ids)) for x in t.transitions] == [[10, 11], [11, 11]]
    assert list(unpack_logprobs(t.transitions[0].logprobs)) == pytest.approx([-0.1, -0.2])
    assert all(x.trainable and x.policy_version == 5 for x in t.transitions)
    assert t.transitions[1].metadata["text"] == "answer 1"
    assert [(r.name, r.value, r.after) for r in t.rewards] == [("step", 0.25, 1), ("step", 0.5, 2)]
    tools = sorted(t.spans, key=lambda s: s.start_time)
    assert [(s.kind, s.name, s.status) for s in tools] == [("tool", "lookup", "ok"),
                                                           ("tool", "lookup", "error")]
    assert tools[0].attributes["output"] == "value of k"  # what AIR reads
    assert "no such key" in tools[1].error
    assert all(s.after == 2 for s in tools)
    assert otlp_daemon.server.traces.counters["rollouts_stored"] == 2


OPENLLMETRY_LLM = {  # a GenAI span as OpenLLMetry's openai instrumentation writes it
    "traceId": TRACE, "spanId": "0000000000000002", "parentSpanId": "0000000000000001",
    "name": "openai.chat", "kind": 3,
    "startTimeUnixNano": "1700000000100000000", "endTimeUnixNano": "1700000000200000000",
    "attributes": [
        {"key": "llm.request.type", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.system", "value": {"stringValue": "openai"}},
        {"key": "gen_ai.request.model", "value": {"stringValue": "gpt-4o-mini"}},
        {"key": "gen_ai.usage.prompt_tokens", "value": {"intValue": "12"}},
        {"key": "gen_ai.completion.0.content", "value": {"stringValue": "Paris"}},
        {"key": "gen_ai.completion.0.finish_reason", "value": {"stringValue": "stop"}},
    ],
}


def body(*spans, resource=None):
    return {"resourceSpans": [{
        "resource": {"attributes": resource or [
            {"key": "service.name", "value": {"stringValue": "bot"}}]},
        "scopeSpans": [{"scope": {"name": "x"}, "spans": list(spans)}]}]}


def root_span(**attrs):
    return {"traceId": TRACE, "spanId": "0000000000000001", "name": "agent run", "kind": 1,
            "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000",
            "attributes": [{"key": k, "value": v} for k, v in attrs.items()],
            "events": [{"timeUnixNano": "1700000000900000000", "name": "gen_ai.evaluation.result",
                        "attributes": [
                            {"key": "gen_ai.evaluation.name", "value": {"stringValue": "judge"}},
                            {"key": "gen_ai.evaluation.score.value",
                             "value": {"doubleValue": 0.8}}]}]}


async def post(d, payload, *, ctype="application/json", encoding=None):
    headers = {"content-type": ctype}
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if encoding == "gzip":
        data = gzip.compress(data)
        headers["content-encoding"] = "gzip"
    async with httpx.AsyncClient() as c:
        return await c.post(d.endpoint, content=data, headers=headers)


async def test_json_without_token_ids_is_stored_untrainable_and_said_once(otlp_daemon):
    with capture_logs() as logs:
        r = await post(otlp_daemon, body(OPENLLMETRY_LLM, root_span(
            **{"lightning.rollout.group_key": {"stringValue": "q1"}})), encoding="gzip")
        assert r.status_code == 200 and r.json() == {}
        t = await otlp_daemon.trajectory()
        other = dict(OPENLLMETRY_LLM, traceId="1" * 32)
        r = await post(otlp_daemon, body(other, dict(root_span(), traceId="1" * 32)))
        assert r.status_code == 200
        await otlp_daemon.trajectory()
    assert t.rollout_id == f"otel-{TRACE}" and t.name == "agent run" and t.group_key == "q1"
    (x,) = t.transitions
    assert not x.trainable and x.prompt_ids == b"" and x.response_ids == b""
    assert x.metadata["untrainable_reason"].startswith("no_token_ids")
    assert x.metadata["text"] == "Paris" and x.model == "gpt-4o-mini" and x.finish_reason == "stop"
    assert x.metadata["usage"]["input_tokens"] == 12
    assert x.latency_s == pytest.approx(0.1, abs=1e-6)
    assert [(r.name, r.value, r.after) for r in t.rewards] == [("judge", 0.8, 1)]
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["otel.no_token_ids"]


async def test_openinference_spans_with_token_ids_are_trainable(otlp_daemon):
    llm = {"traceId": TRACE, "spanId": "0000000000000003", "parentSpanId": "0000000000000001",
           "name": "ChatOpenAI", "kind": "SPAN_KIND_CLIENT",
           "startTimeUnixNano": "1700000000100000000",
           "endTimeUnixNano": "1700000000300000000",
           "attributes": [
               {"key": "openinference.span.kind", "value": {"stringValue": "LLM"}},
               {"key": "llm.model_name", "value": {"stringValue": "tiny"}},
               {"key": "llm.output_messages.0.message.content", "value": {"stringValue": "4"}},
               {"key": "lightning.prompt_token_ids",
                "value": {"arrayValue": {"values": [{"intValue": "5"}, {"intValue": 6}]}}},
               {"key": "lightning.response_token_ids",
                "value": {"arrayValue": {"values": [{"intValue": "7"}]}}},
               {"key": "lightning.response_logprobs",
                "value": {"arrayValue": {"values": [{"doubleValue": -0.5}]}}},
               {"key": "lightning.policy_version", "value": {"intValue": "2"}}]}
    wrapper = dict(llm, spanId="0000000000000004", name="RunnableSequence",  # a chain's LLM span
                   attributes=llm["attributes"][:1])
    llm = dict(llm, parentSpanId="0000000000000004")
    tool = {"traceId": TRACE, "spanId": "0000000000000005", "parentSpanId": "0000000000000001",
            "name": "calc", "startTimeUnixNano": "1700000000400000000",
            "endTimeUnixNano": "1700000000500000000", "status": {"code": 2, "message": "div0"},
            "attributes": [{"key": "openinference.span.kind", "value": {"stringValue": "TOOL"}},
                           {"key": "tool.name", "value": {"stringValue": "calc"}},
                           {"key": "input.value", "value": {"stringValue": "{\"x\": 1}"}}]}
    r = await post(otlp_daemon, body(wrapper, llm, tool, root_span(
        **{"lightning.reward.final": {"doubleValue": 1.0}})))
    assert r.status_code == 200
    t = await otlp_daemon.trajectory()
    (x,) = t.transitions  # the wrapper span is not a second call
    assert x.trainable and list(unpack_ids(x.prompt_ids)) == [5, 6]
    assert x.policy_version == 2 and x.metadata["text"] == "4"
    (s,) = t.spans
    assert (s.kind, s.name, s.status, s.error, s.after) == ("tool", "calc", "error", "div0", 1)
    assert s.attributes["input"] == {"x": 1}
    assert t.final_reward == 1.0


async def test_delivered_rollouts_and_plain_traces_are_not_stored(otlp_daemon):
    plain = {"traceId": "2" * 32, "spanId": "0000000000000001", "name": "GET /health",
             "startTimeUnixNano": "1", "endTimeUnixNano": "2"}
    delivered = dict(root_span(**{"lightning.delivered": {"boolValue": True},
                                  "lightning.rollout.id": {"stringValue": "r-1"},
                                  "lightning.rollout.status": {"stringValue": "completed"}}))
    child = dict(OPENLLMETRY_LLM)
    r = await post(otlp_daemon, body(plain, child, delivered))
    assert r.status_code == 200
    counters = otlp_daemon.server.traces.counters
    assert counters["rollouts_skipped_delivered"] == 1 and counters["rollouts_stored"] == 0
    assert len(otlp_daemon.daemon.buffer) == 0


async def test_idle_traces_without_a_root_become_rollouts(otlp_daemon):
    receiver = otlp_daemon.server.traces
    receiver.assembler.idle_s = 0.05
    r = await post(otlp_daemon, body(OPENLLMETRY_LLM))  # the root never arrives
    assert r.status_code == 200
    t = await otlp_daemon.trajectory(timeout=5)  # the receiver's run loop cuts it
    assert len(t.transitions) == 1


async def test_retried_export_is_stored_once(otlp_daemon):
    payload = body(OPENLLMETRY_LLM, root_span())
    assert (await post(otlp_daemon, payload)).status_code == 200
    await otlp_daemon.trajectory()
    # the same trace again (an exporter retry after a lost response): late spans, no copy
    r = await post(otlp_daemon, payload)
    assert r.status_code == 200
    assert r.json()["partialSuccess"]["rejectedSpans"] == "2"
    assert len(otlp_daemon.daemon.buffer) == 0


@pytest.mark.parametrize(
    ("payload", "ctype", "status", "reason"),
    [
        (b"\xff\xff\xff", "application/x-protobuf", 400, "not a protobuf"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (json.dumps(body(dict(OPENLLMETRY_LLM, traceId="xyz"))).encode(), "application/json",
         400, "traceId must be 32 hex characters"),
        (json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [dict(
            OPENLLMETRY_LLM, attributes=[{"key": "a", "value": {"intValue": "ten"}}])]}]}]}
        ).encode(), "application/json", 400, "intValue 'ten' is not an integer"),
        (json.dumps(body(dict(OPENLLMETRY_LLM, kind="client"))).encode(), "application/json",
         400, "kind must be an integer"),
        (b"{}", "text/plain", 415, "unsupported Content-Type"),
    ],
)
async def test_malformed_otlp_gets_the_reason(otlp_daemon, payload, ctype, status, reason):
    r = await post(otlp_daemon, payload, ctype=ctype)
    assert r.status_code == status
    assert reason in r.content.decode(errors="replace")
    if ctype == "application/json":
        assert reason in r.json()["message"]
    # and the daemon goes on
    assert (await post(otlp_daemon, body(OPENLLMETRY_LLM, root_span()))).status_code == 200


async def test_protobuf_error_body_is_a_status_message(otlp_daemon):
    from google.rpc import status_pb2

    r = await post(otlp_daemon, b"\xff\xff", ctype="application/x-protobuf")
    st = status_pb2.Status.FromString(r.content)
    assert r.status_code == 400 and st.code == 3 and "malformed OTLP" in st.message


async def test_policy_server_api_key_guards_the_route(tmp_path):
    from lightning import DaemonConfig
    from lightning.serving import PolicyServer
    from lightning.testing import Daemon, MemoryHub

    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "d"), stats_interval_s=0),
                    transport=MemoryHub())
    server = PolicyServer(None, model_name="none", capture=daemon.capture,  # type: ignore[arg-type]
                          api_key="sekret")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                 base_url="http://t") as c:
        r = await c.post("/v1/traces", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 401
    assert PolicyServer(None, model_name="none", capture=daemon.capture,  # type: ignore[arg-type]
                        otlp=False).traces is None


async def test_standalone_receiver(tmp_path):
    """A daemon serving no model still takes OTLP through TraceReceiver.serve."""
    from lightning import DaemonConfig
    from lightning.testing import Daemon, MemoryHub

    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "d"), stats_interval_s=0),
                    transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        url = await tg.start(lambda task_status: TraceReceiver(daemon, api_key="k").serve(
            port=0, task_status=task_status))
        async with httpx.AsyncClient() as c:
            r = await c.post(url, content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 401 and "API key" in r.json()["message"]
        await anyio.to_thread.run_sync(run_app, url, Compression.NoCompression, (7,), "k")
        with anyio.fail_after(10):
            t = await daemon.buffer.get()
        assert len(t.transitions) == 2
        tg.cancel_scope.cancel()


async def test_compressed_bodies_are_bounded(otlp_daemon):
    otlp_daemon.server.traces.max_body_bytes = 10_000
    r = await post(otlp_daemon, b"{" + b" " * 100_000 + b"}", encoding="gzip")
    assert r.status_code == 413 and "exceeds the limit" in r.json()["message"]
    async with httpx.AsyncClient() as c:
        for data, reason in ((gzip.compress(b"{}")[:8], "truncated"),
                             (b"not gzip", "not valid gzip")):
            r = await c.post(otlp_daemon.endpoint, content=data, headers={
                "content-type": "application/json", "content-encoding": "gzip"})
            assert r.status_code == 400 and reason in r.json()["message"]
        r = await c.post(otlp_daemon.endpoint, content=b"{}", headers={
            "content-type": "application/json", "content-encoding": "br"})
        assert r.status_code == 400 and "unsupported Content-Encoding" in r.json()["message"]


def test_example_collector_config_is_coherent():
    """examples/otel/collector.yaml: every pipeline names defined components, and the
    lightning exporter posts protobuf (gzip) to the route the receiver serves."""
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples/otel/collector.yaml")
                         .read_text())
    for name, pipe in cfg["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipe.get(kind, ()):
                assert component in cfg[kind], (name, component)
    ours = cfg["exporters"]["otlphttp/lightning"]
    assert ours["traces_endpoint"].endswith("/v1/traces")
    assert ours["encoding"] == "proto" and ours["compression"] == "gzip"
    assert {tuple(p["exporters"]) for p in cfg["service"]["pipelines"].values()} == {
        ("otlp/backend",), ("otlphttp/lightning",)}
