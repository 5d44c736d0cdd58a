"""Real third-party GenAI instrumentation (OpenInference) together with lightning."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import lightning
import lightning.otel
from lightning import RuntimeConfig, _capture, _lifecycle
from lightning._protocol import Transition, unpack_ids

openai = pytest.importorskip("openai")
oi = pytest.importorskip("openinference.instrumentation.openai")

from fake_openai import FakeOpenAI, _flatten, mock_handler, prompt_ids, sdk_httpx  # noqa: E402

BASE = "http://fake.test/lightning/v1"
MSGS = [{"role": "user", "content": "hi"}]


class Recorder:
    def __init__(self):
        self.config = RuntimeConfig()
        self.events = []

    def submit(self, e):
        self.events.append(e)


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(_lifecycle, "_current", r)
    return r


@pytest.fixture
def client():
    hx = sdk_httpx()
    fake = FakeOpenAI()
    with openai.OpenAI(base_url=BASE, api_key="x", max_retries=0, http_client=hx.Client(
            transport=hx.MockTransport(mock_handler(fake, hx)))) as c:
        yield c, fake


@pytest.fixture(params=["instrumented_first", "captured_first"])
def instrumented(request):
    """OpenInference's OpenAI instrumentation, applied before or after lightning's capture
    (it wraps ``OpenAI.request``, the method lightning's capture hooks on the base class)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    inst = oi.OpenAIInstrumentor()
    if request.param == "instrumented_first":
        inst.instrument(tracer_provider=provider)
        _capture.install(token_id_base_urls=[BASE])
    else:
        _capture.install(token_id_base_urls=[BASE])
        inst.instrument(tracer_provider=provider)
    try:
        yield provider, exporter
    finally:
        _capture.uninstall()
        inst.uninstrument()
        provider.shutdown()


def test_decorator_capture_works_whatever_the_instrumentation_order(instrumented, client, rec):
    c, fake = client

    @lightning.rollout
    def agent():
        c.chat.completions.create(model="m", messages=MSGS)
        for _ in c.chat.completions.create(model="m", messages=MSGS, stream=True):
            pass

    agent()
    ts = [e for e in rec.events if isinstance(e, Transition)]
    assert len(ts) == 2 and all(t.trainable for t in ts)
    _, exporter = instrumented
    assert [s.attributes["openinference.span.kind"] for s in exporter.get_finished_spans()] == [
        "LLM", "LLM"]


def test_bridge_counts_each_call_once_with_token_ids_and_text(instrumented, client, rec):
    provider, _ = instrumented
    bridge = lightning.otel.LightningSpanProcessor(tracer_provider=provider)
    provider.add_span_processor(bridge)
    c, fake = client
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("task", attributes={"lightning.rollout.group_key": "g"}):
        c.chat.completions.create(model="m", messages=MSGS)
        for _ in c.chat.completions.create(model="m", messages=MSGS, stream=True):
            pass
    assert bridge.rollouts_sent == 1
    ts = [e for e in rec.events if isinstance(e, Transition)]
    assert len(ts) == 2  # OpenInference's span and the capture's are one call
    for t in ts:
        assert t.trainable
        assert list(unpack_ids(t.prompt_ids)) == prompt_ids(_flatten(MSGS))
        assert t.metadata["text"] == "Hello world!", (t.metadata, [e for e in rec.events])
    bridge.shutdown()
