from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import anyio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from lightning import DaemonConfig, _rollout
from lightning.serving import PolicyServer
from lightning.testing import Daemon, MemoryHub

# fake_openai: the deterministic OpenAI-compatible server of the capture tests
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "capture"))


@pytest.fixture(autouse=True)
def _otel_off(monkeypatch):
    """Each test starts with no exporter installed and leaves none behind."""
    from lightning._capture import openai as capture_openai

    monkeypatch.setattr(_rollout, "_observer", None)
    monkeypatch.setattr(_rollout, "_otel_auto", False)
    yield
    _rollout._observer = None
    capture_openai.set_call_spans(None)  # a bridge a failed test did not shut down


@pytest.fixture
def memory_provider():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class OtlpDaemon:
    def __init__(self, daemon: Daemon, server: PolicyServer) -> None:
        self.daemon = daemon
        self.server = server
        self.root = server.base_url.removesuffix("/v1")
        self.endpoint = self.root + "/v1/traces"

    async def trajectory(self, timeout: float = 10.0):
        with anyio.fail_after(timeout):
            return await self.daemon.buffer.get()


@pytest.fixture
async def otlp_daemon(tmp_path):
    """A daemon and its HTTP server (no model: only the OTLP route matters here)."""
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        server = PolicyServer(None, model_name="none", port=0,  # type: ignore[arg-type]
                              capture=daemon.capture)
        await tg.start(server.serve)
        yield OtlpDaemon(daemon, server)
        tg.cancel_scope.cancel()
