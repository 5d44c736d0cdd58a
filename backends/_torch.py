"""The embedded torch backend: one process, CPU or one GPU, a Hugging Face causal LM.

Usage::

    backend = TorchBackend()
    backend.setup(model_path, TorchBackendConfig(lr=1e-6, micro_batch_tokens=4096))
    metrics = backend.train_step(pack_sequences(seqs, advantages))
    await engine.update_weights(backend.export_weights())

A step
    The packed :class:`~lightning.training.TrainBatch` is cut into micro-batches of whole
    sequences (``micro_batch_tokens``). Each micro-batch is right-padded to ``[b, L]`` with
    an attention mask and the batch's own ``position_ids`` (so attention never crosses
    sequences) and run through the decoder *without* the LM head; the log-probs of the
    action tokens come from :func:`lightning.kernels.logprobs.logprobs_from_hidden` on the
    hidden state one position earlier and the output-embedding weight (tied or not), so
    the ``[T, V]`` logits are never materialised. The loss (PPO-clip or CISPO, plus an
    optional KL penalty to ``ref_logprobs``) is aggregated per micro-batch and scaled by
    the micro-batch's share of the whole batch's aggregation units (action tokens for
    ``token-mean``, sequences with an action for the ``seq-mean-*`` modes), so the summed
    gradients equal those of one big batch exactly. Then the gradient norm is clipped and
    AdamW steps once.

Errors from torch/transformers/peft during a step are wrapped in
:class:`lightning.BackendError` by :func:`map_torch_exceptions`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from lightning._errors import BackendError
from lightning.training.batch import TrainBatch, split_by_token_budget

from ._common import (
    StepSums,
    TrainSettings,
    action_logprobs,
    agg_units,
    as_settings,
    check_batch,
    check_optimizer_impl,
    make_adamw,
    micro_batch_loss,
    step_metrics,
)

__all__ = ["TorchBackend", "TorchBackendConfig", "backend_class", "map_torch_exceptions"]

_STATE_FILE = "trainer_state.json"
_OPTIM_FILE = "optimizer.pt"
_MODEL_DIR = "model"
_FORMAT = 1


class TorchBackendConfig(TrainSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of :class:`TorchBackend` (load with ``msgspec.toml.decode(data, type=...)``)."""

    lora_rank: int = 0
    """LoRA rank; 0 trains all weights. LoRA needs ``pip install peft``."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Module names that get LoRA adapters."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:1``...; ``None`` = CUDA when available, else CPU."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Parameter dtype; ``None`` = bfloat16 on a GPU that supports it (else float16), float32
    on CPU."""
    logprob_impl: str | None = None
    """Log-prob kernel (``reference``, ``cpp``, ``triton``); ``None`` = fastest available."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """AdamW's update kernel: ``auto`` = ``fused`` where torch supports it for the trained
    parameters (CPU and CUDA, floating point), else ``foreach`` on CUDA, else ``for-loop``.
    All compute the same update up to fp32 rounding; the choice is logged once at setup
    (``backend.optimizer``). SmolLM2-135M on 2 CPU cores: fused ~4x faster than for-loop
    (torch's own default on CPU)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer_impl(self.optimizer_impl)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")


@contextlib.contextmanager
def map_torch_exceptions(what: str) -> Iterator[None]:
    """Turn framework failures (torch, transformers, peft) into :class:`BackendError`."""
    try:
        yield
    except (BackendError, LookupError, ValueError, TypeError):
        raise
    except (RuntimeError, OSError, torch.cuda.OutOfMemoryError) as exc:
        hint = ""
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
            hint = "; lower micro_batch_tokens or enable gradient_checkpointing"
        raise BackendError(f"torch backend: {what} failed: {exc}{hint}") from exc


def _as_config(config: Any) -> TorchBackendConfig:
    return as_settings(config, TorchBackendConfig, "torch")


def _pick_device_dtype(cfg: TorchBackendConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.dtype is not None:
        return device, getattr(torch, cfg.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


class TorchBackend:
    """Single-process trainer over a Hugging Face causal LM. Satisfies ``Backend``."""

    def __init__(self) -> None:
        self._cfg = TorchBackendConfig()
        self._model: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._device = torch.device("cpu")
        self._lora = False
        self._reference: Any = None  # frozen copy of the initial weights (kl_coef > 0, no LoRA)
        self.step = 0
        """Optimizer steps taken (restored by :meth:`load`)."""
        self.optimizer_impl = ""
        """AdamW's update kernel chosen at setup (``fused``, ``foreach`` or ``for-loop``)."""

    # ------------------------------------------------------------------ setup

    @property
    def model(self) -> Any:
        """The trained module (a ``PeftModel`` when LoRA is on)."""
        self._check_ready()
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        self._check_ready()
        assert self._optimizer is not None
        return self._optimizer

    def setup(self, model_path: str, config: Any = None) -> None:
        """Load the checkpoint at ``model_path`` and build AdamW.

        ``config`` is a :class:`TorchBackendConfig`, a dict of its fields, or None.

        Raises:
            ValueError: an invalid config.
            LookupError: LoRA was asked for and ``peft`` is not installed.
            BackendError: the checkpoint cannot be loaded.
        """
        from transformers import AutoModelForCausalLM

        cfg = _as_config(config)
        self._cfg = cfg
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        device, dtype = _pick_device_dtype(cfg)
        if cfg.lora_rank > 0:
            try:
                import peft
            except ImportError as exc:
                raise LookupError(
                    "lora_rank > 0 needs the 'peft' package, which is not installed: pip install peft"
                ) from exc
        with map_torch_exceptions(f"loading {model_path!r}"):
            model = AutoModelForCausalLM.from_pretrained(
                str(model_path), dtype=dtype, local_files_only=True
            ).to(device)
        if cfg.gradient_checkpointing:
            if hasattr(
                model, "activation_checkpointing_enable"
            ):  # newer transformers; the old name warns
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            model.config.use_cache = False
        if cfg.lora_rank > 0:
            lora_cfg = peft.LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft <= 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`
                warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
                model = peft.get_peft_model(model, lora_cfg)
        model.train()
        self._model, self._device, self._lora = model, device, cfg.lora_rank > 0
        if cfg.kl_coef > 0 and not self._lora:
            # the reference policy: the initial weights, frozen (one more copy of the
            # model's weights in memory; LoRA needs none: the adapter is switched off)
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        self._optimizer, self.optimizer_impl = make_adamw(
            params, cfg, cfg.optimizer_impl, backend="torch"
        )
        self.step = 0

    def _check_ready(self) -> None:
        if self._model is None:
            raise BackendError(
                "the torch backend is not set up: call setup(model_path, config) first"
            )

    # ------------------------------------------------------------------ log-probs

    def _decoder_and_head(self) -> tuple[Any, torch.Tensor]:
        model = self._model.get_base_model() if self._lora else self._model
        return model.get_decoder(), model.get_output_embeddings().weight  # weight [V, H]

    def _action_logprobs(self, mb: TrainBatch, return_entropy: bool = False) -> Any:
        """Log-probs of ``mb``'s action tokens under the current weights, float32 ``[T_mb]``
        (0 off actions; with ``return_entropy``, and their entropy); differentiable when
        grad is enabled."""
        decoder, weight = self._decoder_and_head()
        return action_logprobs(
            decoder,
            weight,
            mb,
            temperature=self._cfg.temperature,
            impl=self._cfg.logprob_impl,
            return_entropy=return_entropy,
        )  # [T_mb] (, [T_mb])

    @torch.no_grad()
    def reference_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs of the action tokens under the reference policy (the initial weights;
        with LoRA, the model with its adapter disabled), float32 ``[T]`` on the training
        device, each token under its own sampling processing. Needs ``kl_coef > 0``."""
        self._check_ready()
        cfg = self._cfg
        if cfg.kl_coef <= 0:
            raise BackendError("reference_logprobs needs kl_coef > 0 (no reference is kept)")
        batch = batch.to(self._device)
        if self._lora:
            ctx: Any = self._model.disable_adapter()
            decoder, weight = self._decoder_and_head()
        else:
            ctx = contextlib.nullcontext()
            decoder = self._reference.get_decoder()
            weight = self._reference.get_output_embeddings().weight  # [V, H]
        was_training = self._model.training
        self._model.eval()  # no LoRA dropout in the reference
        parts = []
        try:
            with ctx, map_torch_exceptions("computing reference log-probs"):
                for mb in split_by_token_budget(batch, cfg.micro_batch_tokens):
                    parts.append(
                        action_logprobs(
                            decoder, weight, mb, temperature=cfg.temperature, impl=cfg.logprob_impl
                        )
                    )  # [T_mb]
        finally:
            self._model.train(was_training)
        return torch.cat(parts)  # [T]

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs of the action tokens under the current weights, float32 ``[T]`` on CPU
        (0 elsewhere). Use it for reference/old log-probs, or to compare with the sampler."""
        self._check_ready()
        batch = batch.to(self._device)
        parts = []
        with map_torch_exceptions("computing log-probs"):
            for mb in split_by_token_budget(batch, self._cfg.micro_batch_tokens):
                parts.append(self._action_logprobs(mb))  # [T_mb]
        return torch.cat(parts).cpu()  # [T]

    # ------------------------------------------------------------------ train

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` (gradients accumulated over micro-batches).

        Returns namespaced float metrics: ``loss/policy``, ``loss/kl``, ``loss/total``,
        ``actor/grad_norm``, ``actor/clip_frac``, ``actor/approx_kl``,
        ``actor/logprob_gap`` (mean ``|trainer - sampler|`` log-prob on action tokens,
        before the update), ``actor/lr``, ``perf/tokens``, ``perf/action_tokens``,
        ``perf/micro_batches``, ``perf/step_s``, ``train/step``. A batch without action
        tokens takes no optimizer step (``actor/skipped`` = 1).
        """
        self._check_ready()
        assert self._optimizer is not None
        cfg = self._cfg
        t0 = time.perf_counter()
        batch = batch.to(self._device)
        data = check_batch(batch, cfg.temperature)
        n_act = float(batch.action_mask.sum())
        total_units = agg_units(batch, cfg.loss_agg)
        use_kl = cfg.kl_coef > 0
        if use_kl and batch.ref_logprobs is None:
            batch = dataclasses.replace(batch, ref_logprobs=self.reference_logprobs(batch))
        micro = split_by_token_budget(batch, cfg.micro_batch_tokens)
        sums = StepSums()
        self._model.train()
        self._optimizer.zero_grad(set_to_none=True)
        with map_torch_exceptions("train_step"):
            for mb in micro:
                units = agg_units(mb, cfg.loss_agg)
                if units == 0:
                    continue
                w = units / total_units  # share of the big batch's aggregation
                tok_w = float(mb.action_mask.sum()) / n_act
                lp, ent = self._action_logprobs(mb, return_entropy=True)  # [T_mb], [T_mb]
                loss = micro_batch_loss(
                    lp, mb, cfg, w=w, tok_w=tok_w, use_kl=use_kl, sums=sums, entropy=ent
                )
                loss.backward()
            skipped = total_units == 0
            grad_norm = 0.0
            if not skipped:
                grad_norm = self._clip_grad_norm(cfg.max_grad_norm)
                self._optimizer.step()
                self.step += 1
            self._optimizer.zero_grad(set_to_none=True)
        return data | step_metrics(
            sums,
            kl_coef=cfg.kl_coef,
            grad_norm=grad_norm,
            lr=float(self._optimizer.param_groups[0]["lr"]),
            skipped=skipped,
            tokens=batch.num_tokens,
            action_tokens=n_act,
            micro_batches=len(micro),
            t0=t0,
            step=self.step,
        )

    def _clip_grad_norm(self, max_norm: float | None) -> float:
        """The global L2 norm of the gradients, which are scaled down to ``max_norm`` when it
        is larger: bit for bit ``clip_grad_norm_``, minus its pass over every gradient that
        multiplies by exactly 1.0 when the norm is within bounds (or ``max_norm`` is None)."""
        assert self._optimizer is not None
        params = [p for g in self._optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)  # []
        if max_norm is not None and not bool(max_norm / (norm + 1e-6) >= 1.0):
            # the coefficient torch's clip computes is < 1 (or NaN: as clip_grad_norm_ does,
            # the gradients are multiplied by it)
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    # ------------------------------------------------------------------ weights

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Detached copies of the full model's weights, named as in the plain HF model's
        ``state_dict()`` (LoRA merged in), on the training device: pass them to
        ``engine.update_weights``. Tied tensors are copied once and shared."""
        self._check_ready()
        with torch.no_grad(), map_torch_exceptions("export_weights"):
            if self._lora:
                return self._export_lora_merged()
            copies: dict[tuple[int, torch.Size, torch.dtype], torch.Tensor] = {}
            out = {}
            for name, t in self._model.state_dict().items():
                key = (t.data_ptr(), t.shape, t.dtype)
                if key not in copies:
                    copies[key] = t.detach().clone()
                out[name] = copies[key]
            return out

    def _export_lora_merged(self) -> dict[str, torch.Tensor]:
        """``W + delta`` per adapted layer, computed out of place: peft's merge_adapter /
        unmerge_adapter would round the trained base weights a little on every export."""
        from peft.tuners.lora import LoraLayer

        base = self._model.get_base_model()
        out = {
            name.replace(".base_layer.", "."): t.detach().clone()
            for name, t in base.state_dict().items()
            if "lora_" not in name
        }
        for mod_name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                key = f"{mod_name}.weight"
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        out[key] = out[key] + module.get_delta_weight(adapter).to(out[key].dtype)
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str) -> None:
        """Write ``path/model`` (``save_pretrained``: the model, or the LoRA adapter),
        ``path/optimizer.pt`` and ``path/trainer_state.json`` (the step)."""
        self._check_ready()
        assert self._optimizer is not None
        root = Path(path)
        with map_torch_exceptions(f"saving to {str(root)!r}"):
            root.mkdir(parents=True, exist_ok=True)
            self._model.save_pretrained(str(root / _MODEL_DIR))
            torch.save(self._optimizer.state_dict(), root / _OPTIM_FILE)
            state = {"format": _FORMAT, "step": self.step, "lora": self._lora}
            (root / _STATE_FILE).write_text(json.dumps(state, indent=1))

    def load(self, path: str) -> None:
        """Restore weights, optimizer state and step written by :meth:`save` into the set-up
        model (same architecture and LoRA setting).

        Raises:
            BackendError: the checkpoint is missing, incomplete or does not fit.
        """
        from safetensors.torch import load_file

        self._check_ready()
        assert self._optimizer is not None
        root = Path(path)
        with map_torch_exceptions(f"loading the checkpoint {str(root)!r}"):
            try:
                state = json.loads((root / _STATE_FILE).read_text())
            except FileNotFoundError as exc:
                raise BackendError(
                    f"{str(root)!r} is not a torch-backend checkpoint (no {_STATE_FILE}); "
                    "pass a directory written by TorchBackend.save"
                ) from exc
            if bool(state.get("lora")) != self._lora:
                raise BackendError(
                    f"checkpoint lora={state.get('lora')} but this backend has lora={self._lora}: "
                    "set up with the same lora_rank it was saved with"
                )
            model_dir = root / _MODEL_DIR
            if self._lora:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(
                    self._model, load_file(str(model_dir / "adapter_model.safetensors"))
                )
            else:
                tensors: dict[str, torch.Tensor] = {}
                for f in sorted(model_dir.glob("*.safetensors")):
                    tensors.update(load_file(str(f)))
                if not tensors:
                    raise BackendError(f"no safetensors weights in {str(model_dir)!r}")
                missing, unexpected = self._model.load_state_dict(tensors, strict=False)
                tied = {k for k in missing if k == "lm_head.weight"}
                if set(missing) - tied or unexpected:
                    raise BackendError(
                        f"checkpoint weights do not fit the model: missing {list(missing)[:3]}, "
                        f"unexpected {list(unexpected)[:3]}"
                    )
            self._optimizer.load_state_dict(
                torch.load(root / _OPTIM_FILE, map_location=self._device, weights_only=True)
            )
            self.step = int(state["step"])


backend_class = TorchBackend
