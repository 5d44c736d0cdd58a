"""End to end on the tiny model: the policy server's token ids travel through OTLP.

An app with ``@lightning.rollout`` calls the daemon's policy server with the ``openai``
client, exports its spans with the real OTLP/HTTP exporter to the daemon's
``/v1/traces`` (no ZeroMQ runtime at all), and the daemon stores the exact token ids and
log-probs the engine sampled.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import anyio
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the tiny model's tokenizer comes from SmolLM2's GGUF")
openai = pytest.importorskip("openai")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: E402

import lightning  # noqa: E402
import lightning.otel  # noqa: E402
from lightning import DaemonConfig, _capture  # noqa: E402
from lightning._protocol import unpack_ids, unpack_logprobs  # noqa: E402
from lightning.testing import Daemon, MemoryHub  # noqa: E402


@pytest.fixture
async def policy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning.engine.torch_engine import TorchEngine
    from lightning.models import tiny_model_path
    from lightning.serving import PolicyServer

    torch.set_num_threads(1)
    path = str(tiny_model_path(seed=0))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 local_files_only=True).eval()
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=512, seed=0) as engine:
            server = PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture)
            base_url = await tg.start(server.serve)
            yield daemon, base_url
            tg.cancel_scope.cancel()


async def test_sampled_token_ids_round_trip_through_otlp(policy):
    daemon, base_url = policy
    responses = []

    def app() -> None:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=base_url.removesuffix("/v1") + "/v1/traces")))
        lightning.otel.instrument(provider, include_token_ids=True, include_content=True)
        _capture.install(token_id_base_urls=[base_url])
        try:
            client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)

            @lightning.rollout(group_key="q")
            def agent() -> float:
                for q in ("2+2?", "3+3?"):
                    r = client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": q}], max_tokens=6)
                    responses.append(r)
                lightning.emit_reward(0.5)
                return 1.0

            agent()
            client.close()
        finally:
            _capture.uninstall()
            provider.force_flush(10_000)
            provider.shutdown()

    await anyio.to_thread.run_sync(app)
    with anyio.fail_after(10):
        t = await daemon.buffer.get()
    assert t.metadata["source"] == "otlp" and t.group_key == "q" and t.final_reward == 1.0
    assert len(t.transitions) == 2
    for x, r in zip(t.transitions, responses):
        extra = r.model_extra
        assert list(unpack_ids(x.prompt_ids)) == extra["prompt_token_ids"]
        assert list(unpack_ids(x.response_ids)) == r.choices[0].model_extra["token_ids"]
        sampled = [e.logprob for e in r.choices[0].logprobs.content]
        assert list(unpack_logprobs(x.logprobs)) == pytest.approx(sampled, abs=1e-6)
        assert x.trainable and x.policy_version == extra["policy_version"]
        assert x.metadata["text"] == (r.choices[0].message.content or "")
    assert [(w.value, w.after) for w in t.rewards] == [(0.5, 2)]
