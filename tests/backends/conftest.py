"""Fixtures for backend tests: the tiny random model, engines, and ``lightning_backends``.

``backends/`` installs as the package ``lightning_backends`` (pyproject ``package-dir``).
When the repository is not pip-installed, the package is registered here from the source
tree, so ``import lightning_backends`` works either way.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")  # shared CI machines: before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="building the tiny model reads SmolLM2's GGUF tokenizer")

if importlib.util.find_spec("lightning_backends") is None:  # not pip-installed
    _src = Path(__file__).resolve().parents[2] / "backends"
    _spec = importlib.util.spec_from_file_location(
        "lightning_backends", _src / "__init__.py", submodule_search_locations=[str(_src)]
    )
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["lightning_backends"] = _module
    _spec.loader.exec_module(_module)

from lightning.engine.torch_engine import TorchEngine
from lightning.models import tiny_model_path

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {"debug": True})


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny random Llama (hidden 64, 2 layers, SmolLM2 tokenizer)."""
    return tiny_model_path(seed=0)


@pytest.fixture
async def engine(tiny_model_dir: Path) -> AsyncIterator[TorchEngine]:
    """A running fp32 CPU TorchEngine over the tiny model."""
    async with TorchEngine.from_pretrained(
        tiny_model_dir, device="cpu", max_model_len=256, seed=0
    ) as eng:
        yield eng
