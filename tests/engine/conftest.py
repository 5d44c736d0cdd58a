"""Fixtures for engine tests: the tiny random model (real SmolLM2 tokenizer) and engines.

``tiny_model_dir`` is the reusable fixture: a cached checkpoint directory built offline by
``lightning.models.tiny_model_path()`` (first build ~5 s, then instant).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")  # shared CI machines: before torch loads
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf", reason="building the tiny model reads SmolLM2's GGUF tokenizer")

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


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture
def load_tiny_model(tiny_model_dir: Path) -> Callable[[], Any]:
    """A fresh fp32 CPU copy of the tiny model per call (tests may change its weights)."""
    from transformers import AutoModelForCausalLM

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            str(tiny_model_dir), dtype=torch.float32, local_files_only=True
        ).eval()

    return load


@pytest.fixture
def make_engine(
    load_tiny_model: Callable[[], Any], tiny_tokenizer: Any
) -> Callable[..., TorchEngine]:
    """``make_engine(**kwargs)`` builds a TorchEngine over a fresh tiny model."""

    def make(model: Any = None, **kwargs: Any) -> TorchEngine:
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("seed", 0)
        return TorchEngine(
            model if model is not None else load_tiny_model(), tiny_tokenizer, **kwargs
        )

    return make


@pytest.fixture
async def engine(make_engine: Callable[..., TorchEngine]) -> AsyncIterator[TorchEngine]:
    """A running TorchEngine over the tiny model (max_model_len 512)."""
    async with make_engine() as eng:
        yield eng
