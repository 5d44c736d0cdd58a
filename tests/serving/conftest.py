from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="the tiny model's tokenizer comes from SmolLM2's GGUF")
httpx = pytest.importorskip("httpx")

import anyio  # noqa: E402

from lightning import DaemonConfig  # noqa: E402
from lightning.engine.torch_engine import TorchEngine  # noqa: E402
from lightning.models import tiny_model_path  # noqa: E402
from lightning.serving import PolicyServer  # noqa: E402
from lightning.testing import Daemon, MemoryHub  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dir():
    return tiny_model_path(seed=0)


@pytest.fixture
async def stack(tiny_dir, tmp_path):
    """A daemon (in-memory transport) + torch engine on the tiny model + policy server."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                                 local_files_only=True).eval()
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=1024, seed=0) as engine:
            server = PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture,
                                  aliases=("gpt-4o-mini",))
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                       base_url="http://test")
            server.ready = True
            yield server, daemon, client
            await client.aclose()
        tg.cancel_scope.cancel()
