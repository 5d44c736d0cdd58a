"""The verl backend: our packed batches trained by verl's engine ``TrainingWorker`` (FSDP).

Usage::

    backend = VerlBackend()
    backend.setup(model_path, VerlBackendConfig(lr=1e-6, micro_batch_tokens=8192))
    metrics = backend.train_step(pack_sequences(seqs, advantages))
    await engine.update_weights(backend.export_weights())

The seam
    verl 0.9's engine ``TrainingWorker`` is its API for external producers ("Tinker-like":
    ``set_loss_fn``, ``train_mini_batch``, ``infer_batch``). A step turns the packed
    :class:`~lightning.training.TrainBatch` into verl's DataProto layout — per sequence
    ``prompts`` (left-padded: the tokens before its first action), ``responses``
    (right-padded: the rest), ``input_ids``, ``attention_mask``, ``position_ids``,
    ``response_mask`` (our action mask, so tool tokens inside a response are masked),
    ``old_log_probs`` = ``rollout_log_probs`` (the sampler's), ``advantages`` and
    optionally ``rollout_is_weights`` / ``ref_log_prob`` — converts it to verl's no-padding
    nested layout with verl's own ``left_right_2_no_padding``, and runs one
    ``train_mini_batch`` over the whole batch: one optimizer step, micro-batched by verl's
    dynamic batching (``micro_batch_tokens`` per micro-batch).

Losses
    ``loss="ppo"`` / ``"cispo"`` use :mod:`lightning.algorithms` (the same code as the
    torch backend) through :class:`LightningPolicyLoss`, scaled per micro-batch by its share
    of the global batch's aggregation units, so the accumulated gradient is that of one big
    batch. ``verl_policy_loss="<name>"`` uses verl's own ``ppo_loss`` with the policy loss
    registered under that name (``vanilla``, ``gspo``, ``cispo``, ``clip_cov``, ...).
    Advantage estimators run in the daemon; :func:`verl_advantages` computes them with verl's
    estimators by name for callers that want verl's.

Where it runs
    ``world_size == 1``: one rank, in this process (CPU or one GPU). ``world_size > 1``: a
    Ray worker group of ``TrainingWorker`` actors over ``nnodes`` x ``gpus_per_node`` GPUs
    (or CPU processes), data parallel (FSDP sharding); this process only converts batches
    and collects metrics and weights. On CPU the platform shim
    :mod:`lightning_backends._verl_platform` (a workaround of verl internals) makes verl's
    FSDP2 engine run over gloo, in this process and in Ray workers alike.

Errors from verl, torch and Ray during a step are wrapped in :class:`lightning.BackendError`
by :func:`map_verl_exceptions`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from lightning._errors import BackendError
from lightning.algorithms.aggregate import get_aggregator
from lightning.algorithms.cispo import cispo_loss
from lightning.algorithms.kl import kl_penalty_loss
from lightning.algorithms.ppo import ppo_clip_loss
from lightning.training.batch import TrainBatch, select_sequences

from ._common import (
    NoReferenceSettings,
    as_settings,
    check_batch,
    require_ref_logprobs,
    scalar_sampling_problem,
)

if importlib.util.find_spec("verl") is None:  # get_backend turns this into "pip install [verl]"
    raise ModuleNotFoundError("No module named 'verl'", name="verl")

__all__ = [
    "VERL_REQUIREMENT",
    "LightningPolicyLoss",
    "VerlBackend",
    "VerlBackendConfig",
    "backend_class",
    "check_verl_version",
    "map_verl_exceptions",
    "to_verl_tensordict",
    "verl_advantages",
]

#: The verl releases this backend is written against (checked at setup).
VERL_REQUIREMENT = ">=0.9,<0.10"

_STATE_FILE = "trainer_state.json"
_VERL_DIR = "verl"
_FORMAT = 1


class VerlBackendConfig(NoReferenceSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of :class:`VerlBackend` (load with ``msgspec.toml.decode(data, type=...)``)."""

    backend_name: ClassVar[str] = "verl"

    verl_policy_loss: str | None = None
    """Use verl's ``ppo_loss`` with this registered policy loss instead (``vanilla``,
    ``gspo``, ``cispo``, ``clip_cov``, ...). Clip ratios, ``loss_agg``, ``kl_*`` carry over."""
    device: Literal["cpu", "cuda"] | None = None
    """``cpu`` (through the platform shim) or ``cuda``; ``None`` = CUDA when available."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Compute dtype (FSDP mixed precision; master weights stay fp32). ``None`` = bfloat16
    on CUDA, float32 on CPU (CPU supports only float32)."""
    strategy: Literal["fsdp2", "fsdp"] = "fsdp2"
    """verl's FSDP engine flavour."""
    use_remove_padding: bool | None = None
    """Packed (varlen) attention; needs flash-attn. ``None`` = on for CUDA when flash-attn
    is installed, else off."""
    attn_implementation: str | None = None
    """Hugging Face attention; ``None`` = ``flash_attention_2`` with remove-padding, else
    ``sdpa``."""
    param_offload: bool = False
    """Keep parameters on the CPU between steps (FSDP offload)."""
    optimizer_offload: bool = False
    """Keep optimizer state on the CPU between steps."""
    nnodes: int = 1
    """Nodes of the Ray worker group (``world_size > 1`` only)."""
    gpus_per_node: int = 1
    """GPUs (on CPU: processes) per node; ``nnodes * gpus_per_node`` ranks. 1 x 1 runs in
    this process, more run as a Ray worker group."""
    ulysses_sp_size: int = 1
    """Ulysses sequence-parallel size (needs ``use_remove_padding``)."""
    ray_address: str | None = None
    """Ray cluster to join (``ray.init(address=...)``); ``None`` = start or reuse a local one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nnodes < 1 or self.gpus_per_node < 1:
            raise ValueError("nnodes and gpus_per_node must be >= 1")
        if self.device == "cpu" and self.dtype not in (None, "float32"):
            raise ValueError("the verl backend on CPU trains in float32 only")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.gpus_per_node


# ---------------------------------------------------------------------------- helpers


def check_verl_version() -> str:
    """The installed verl version; raises :class:`BackendError` outside
    :data:`VERL_REQUIREMENT` (before anything of verl is imported)."""
    from packaging.specifiers import SpecifierSet

    try:
        found = version("verl")
    except PackageNotFoundError as exc:
        raise LookupError(
            "backend 'verl' needs verl, which is not installed: pip install 'lightning-rl[verl]'"
        ) from exc
    if found not in SpecifierSet(VERL_REQUIREMENT, prereleases=True):
        raise BackendError(
            f"verl {found} is installed, but the verl backend supports verl{VERL_REQUIREMENT} "
            f"(its TrainingWorker seam and CPU shim are tested there): "
            f"pip install 'verl{VERL_REQUIREMENT}'"
        )
    return found


@contextlib.contextmanager
def map_verl_exceptions(what: str) -> Iterator[None]:
    """Turn verl, torch and Ray failures into :class:`BackendError`."""
    try:
        yield
    except (BackendError, LookupError):
        raise
    except Exception as exc:  # verl raises bare AssertionError/RuntimeError/Ray errors
        if isinstance(exc, (ValueError, TypeError)) and not _from_verl(exc):
            raise
        hint = ""
        if "out of memory" in str(exc).lower():
            hint = "; lower micro_batch_tokens, enable gradient_checkpointing or offload"
        raise BackendError(f"verl backend: {what} failed: {exc!r}{hint}") from exc


def _from_verl(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if "/verl/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _as_config(config: Any) -> VerlBackendConfig:
    return as_settings(config, VerlBackendConfig, "verl")

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _split_point(mask: torch.Tensor) -> int:
    """Index of the first action of one sequence (its length when it has none)."""
    idx = mask.nonzero()
    return int(idx[0]) if idx.numel() else int(mask.numel())


def to_verl_tensordict(
    batch: TrainBatch,
    *,
    temperature: float = 1.0,
    pad_token_id: int = 0,
    pad_to_multiple: int = 1,
) -> Any:
    """``batch`` in verl's DataProto layout, converted to its no-padding TensorDict.

    Sequence ``b`` splits at its first action into a prompt and a response; the response
    mask is the action mask (tokens inside a response that were not sampled, such as tool
    output, stay masked). Rows are padded with fully masked copies of the last row up to a
    multiple of ``pad_to_multiple`` (verl splits a batch evenly over data-parallel ranks).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    cu = batch.cu_seqlens.tolist()
    B = len(cu) - 1
    rows = list(range(B)) + [B - 1] * ((-B) % pad_to_multiple)
    splits = []
    for b in range(B):
        s, e = cu[b], cu[b + 1]
        splits.append((s, s + _split_point(batch.action_mask[s:e]), e))
    P = max(p - s for s, p, _ in splits)
    R = max(e - p for _, p, e in splits)
    n = len(rows)
    prompts = torch.full((n, P), pad_token_id, dtype=torch.int64)  # [n, P] left-padded
    responses = torch.full((n, R), pad_token_id, dtype=torch.int64)  # [n, R] right-padded
    attn = torch.zeros(n, P + R, dtype=torch.int64)  # [n, P + R]
    pos = torch.zeros(n, P + R, dtype=torch.int64)  # [n, P + R]
    resp_mask = torch.zeros(n, R, dtype=torch.int64)  # [n, R]
    per_tok = {"old_log_probs": batch.old_logprobs, "advantages": batch.advantages}
    if batch.is_weights is not None:
        per_tok["rollout_is_weights"] = batch.is_weights
    if batch.ref_logprobs is not None:
        per_tok["ref_log_prob"] = batch.ref_logprobs
    resp_vals = {k: torch.zeros(n, R, dtype=torch.float32) for k in per_tok}  # [n, R] each
    for i, b in enumerate(rows):
        s, p, e = splits[b]
        lp, lr = p - s, e - p
        prompts[i, P - lp :] = batch.input_ids[s:p]
        responses[i, :lr] = batch.input_ids[p:e]
        attn[i, P - lp : P + lr] = 1
        pos[i, P - lp : P + lr] = batch.position_ids[s:e]
        if i < B:  # padding rows keep an all-zero mask: no loss, no units
            resp_mask[i, :lr] = batch.action_mask[p:e].long()
            for k, v in per_tok.items():
                resp_vals[k][i, :lr] = v[p:e].float()
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),  # [n, P + R]
        "attention_mask": attn,
        "position_ids": pos,
        "response_mask": resp_mask,
        "rollout_log_probs": resp_vals["old_log_probs"].clone(),
        **resp_vals,
    }
    td = tu.get_tensordict(tensor_dict=tensors, non_tensor_dict={"temperature": float(temperature)})
    return left_right_2_no_padding(td)


def _units(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Aggregation units in a padded ``[b, R]`` response mask: action tokens, or rows
    with an action."""
    if agg == "token-mean":
        return mask.sum()  # []
    return (mask.sum(-1) > 0).sum()  # []


class LightningPolicyLoss:
    """Our policy loss as a verl ``loss_fn(model_output, data, dp_group) -> (loss, metrics)``.

    Each micro-batch's aggregated loss is scaled by its share of the global batch's units
    (``batch_num_tokens`` action tokens for ``token-mean``, ``global_batch_size`` rows with
    an action for the ``seq-mean-*`` modes) times the data-parallel size (FSDP averages
    gradients over ranks), so the accumulated gradient is that of one big batch. Metrics
    are verl ``Metric`` sums over micro-batches, each weighted the same way (token-weighted
    for the statistics). Picklable, so it travels to Ray workers.
    """

    def __init__(self, cfg: VerlBackendConfig) -> None:
        self.loss = cfg.loss
        self.agg = cfg.loss_agg
        self.clip_ratio_low = cfg.clip_ratio_low
        self.clip_ratio_high = cfg.clip_ratio_high
        self.clip_ratio_c = cfg.clip_ratio_c
        self.kl_coef = cfg.kl_coef
        self.kl_estimator = cfg.kl_estimator

    def __call__(self, model_output: Any, data: Any, dp_group: Any = None) -> tuple[Any, dict]:
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.padding import no_padding_2_padding

        lp = no_padding_2_padding(model_output["log_probs"], data)  # [b, R]
        fields = ["response_mask", "old_log_probs", "advantages"]
        fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
        d = data.select(*fields).to_padded_tensor()
        b, R = lp.shape
        mask = d["response_mask"].bool().reshape(-1)  # [b R]
        cu = torch.arange(b + 1, device=lp.device, dtype=torch.int32) * R  # [b + 1]
        flat = lp.reshape(-1).float()  # [b R]
        old = d["old_log_probs"].reshape(-1).float()  # [b R]
        adv = d["advantages"].reshape(-1).float()  # [b R]
        isw = d["rollout_is_weights"].reshape(-1) if "rollout_is_weights" in d else None
        agg = get_aggregator(self.agg)
        if self.loss == "cispo":
            loss, stats = cispo_loss(
                flat,
                old,
                adv,
                mask,
                cu,
                clip_ratio_low=1.0 if self.clip_ratio_low is None else self.clip_ratio_low,
                clip_ratio_high=self.clip_ratio_high,
                is_weights=isw,
                agg=agg,
            )  # [], CISPOStats
        else:
            loss, stats = ppo_clip_loss(
                flat,
                old,
                adv,
                mask,
                cu,
                clip_ratio_low=0.2 if self.clip_ratio_low is None else self.clip_ratio_low,
                clip_ratio_high=self.clip_ratio_high,
                clip_ratio_c=self.clip_ratio_c,
                is_weights=isw,
                agg=agg,
            )  # [], PPOStats
        m2 = mask.view(b, R)  # [b, R]
        dp = float(data["dp_size"])
        total = float(
            data["batch_num_tokens"] if self.agg == "token-mean" else data["global_batch_size"]
        )
        w = float(_units(m2, self.agg)) / max(total, 1.0) * dp  # this micro-batch's share
        tok_w = float(m2.sum()) / max(float(data["batch_num_tokens"]), 1.0) * dp
        out = loss
        kl_val = 0.0
        if self.kl_coef > 0 and "ref_log_prob" in d:
            kl, _ = kl_penalty_loss(
                flat,
                d["ref_log_prob"].reshape(-1).float(),
                mask,
                cu,
                estimator=self.kl_estimator,
                agg=agg,
            )  # [], KLStats
            out = out + self.kl_coef * kl
            kl_val = float(kl.detach())
        gap = ((flat.detach() - old).abs() * mask).sum() / mask.sum().clamp(min=1)  # []
        total_sum = AggregationType.SUM
        metrics = {
            "loss/policy": Metric(total_sum, float(loss.detach()) * w),
            "loss/kl": Metric(total_sum, kl_val * w),
            "actor/clip_frac": Metric(total_sum, float(stats.clip_frac) * tok_w),
            "actor/approx_kl": Metric(total_sum, float(stats.approx_kl) * tok_w),
            "actor/logprob_gap": Metric(total_sum, float(gap) * tok_w),
            "perf/micro_batches": Metric(total_sum, 1.0),
        }
        return out * w, metrics


def _verl_actor_config(cfg: VerlBackendConfig) -> Any:
    """verl ``ActorConfig`` carrying the loss settings verl's own ``ppo_loss`` reads."""
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    kl_types = {"k1": "k1", "k2": "mse", "k3": "low_var_kl"}
    return FSDPActorConfig(
        strategy=cfg.strategy,
        rollout_n=1,
        use_dynamic_bsz=True,
        ppo_max_token_len_per_gpu=cfg.micro_batch_tokens,
        clip_ratio=0.2 if cfg.clip_ratio_low is None else cfg.clip_ratio_low,
        clip_ratio_low=0.2 if cfg.clip_ratio_low is None else cfg.clip_ratio_low,
        clip_ratio_high=cfg.clip_ratio_high,
        clip_ratio_c=cfg.clip_ratio_c if cfg.clip_ratio_c is not None else 1e9,
        loss_agg_mode=cfg.loss_agg,
        policy_loss=PolicyLossConfig(loss_mode=cfg.verl_policy_loss or "vanilla"),
        use_kl_loss=cfg.kl_coef > 0,
        kl_loss_coef=cfg.kl_coef,
        kl_loss_type=kl_types[cfg.kl_estimator],
        use_torch_compile=False,
    )


class _VerlPolicyLoss:
    """verl's ``ppo_loss`` (its registered policy losses), reporting our metric names."""

    def __init__(self, cfg: VerlBackendConfig) -> None:
        self.actor_config = _verl_actor_config(cfg)

    def __call__(self, model_output: Any, data: Any, dp_group: Any = None) -> tuple[Any, dict]:
        from verl.utils.metric import AggregationType, Metric
        from verl.workers.utils.losses import ppo_loss
        from verl.workers.utils.padding import no_padding_2_padding

        loss, metrics = ppo_loss(self.actor_config, model_output, data, dp_group)
        with torch.no_grad():
            lp = no_padding_2_padding(model_output["log_probs"], data).float()  # [b, R]
            d = data.select("response_mask", "old_log_probs").to_padded_tensor()
            m = d["response_mask"].float()  # [b, R]
            gap = ((lp - d["old_log_probs"].float()).abs() * m).sum()  # []
            share = float(data["dp_size"]) / max(float(data["batch_num_tokens"]), 1.0)
        metrics["actor/logprob_gap"] = Metric(AggregationType.SUM, float(gap) * share)
        metrics["perf/micro_batches"] = Metric(AggregationType.SUM, 1.0)
        renamed = {
            "actor/pg_loss": "loss/policy",
            "kl_loss": "loss/kl",
            "actor/pg_clipfrac": "actor/clip_frac",
            "actor/ppo_kl": "actor/approx_kl",
        }
        return loss, {renamed.get(k, k): v for k, v in metrics.items()}


def verl_advantages(
    estimator: str,
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """Advantages ``[b, R]`` from verl's estimator registered as ``estimator`` (``grpo``,
    ``rloo``, ``reinforce_plus_plus``, ``opo``, ...), over padded ``[b, R]`` token rewards
    and response mask, with ``group_ids`` (one per row) as verl's ``index``. Extra keyword
    arguments go to the estimator (``norm_adv_by_std_in_grpo``, ``config``...)."""
    import numpy as np
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    fn = get_adv_estimator_fn(estimator)
    adv, _ = fn(
        token_level_rewards=token_rewards,
        response_mask=response_mask,
        index=np.asarray(group_ids, dtype=object),
        **kwargs,
    )
    return adv  # [b, R]


# ---------------------------------------------------------------------------- backend


def _worker_class() -> type:
    """verl's ``TrainingWorker`` plus one registered method that gathers the full weights
    (every rank joins the gather; only rank 0 sends its copy back)."""
    global _WORKER
    if _WORKER is None:
        from verl.single_controller.base.decorator import Dispatch, register
        from verl.workers.engine_workers import TrainingWorker

        class LightningTrainingWorker(TrainingWorker):
            def __init__(self, config: Any) -> None:
                from verl.utils.device import get_device_name

                # verl would ask for "cpu:gloo,cpu:gloo" on the CPU platform (a duplicate
                # torch rejects): start the world over plain gloo first, from the
                # RANK/WORLD_SIZE/MASTER_* that verl's worker group sets
                if get_device_name() == "cpu" and not torch.distributed.is_initialized():
                    torch.distributed.init_process_group(
                        "gloo",
                        rank=int(os.environ.get("RANK", "0")),
                        world_size=int(os.environ.get("WORLD_SIZE", "1")),
                    )
                super().__init__(config)

            @register(dispatch_mode=Dispatch.ONE_TO_ALL)
            def full_state_dict(self) -> dict[str, torch.Tensor] | None:
                gen, _ = self.engine.get_per_tensor_param()
                full = {k: v.detach().to("cpu", copy=True) for k, v in gen}  # all ranks gather
                return full if torch.distributed.get_rank() == 0 else None

        _WORKER = LightningTrainingWorker
    return _WORKER


_WORKER: type | None = None


class VerlBackend:
    """verl ``TrainingWorker`` (FSDP) trainer over a Hugging Face causal LM. Satisfies
    ``Backend``."""

    def __init__(self) -> None:
        self._cfg = VerlBackendConfig()
        self._worker: Any = None  # TrainingWorker (in-process) or RayWorkerGroup
        self._pad_token_id = 0
        self._device = "cpu"
        self.step = 0
        """Optimizer steps taken (restored by :meth:`load`)."""
        self.verl_version: str | None = None

    # ------------------------------------------------------------------ setup

    @property
    def worker(self) -> Any:
        """The verl ``TrainingWorker`` (one rank) or ``RayWorkerGroup`` (many)."""
        self._check_ready()
        return self._worker

    def setup(self, model_path: str, config: Any = None) -> None:
        """Check verl's version, build the ``TrainingWorker`` and load ``model_path``.

        Raises:
            ValueError: an invalid config.
            LookupError: verl (or Ray for many ranks) is not installed.
            BackendError: an unsupported verl version, a broken CPU shim, or a checkpoint
                verl cannot load.
        """
        cfg = _as_config(config)
        self.verl_version = check_verl_version()
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            from lightning_backends import _verl_platform

            _verl_platform.install()
            problems = _verl_platform.check_shim()
            if problems:
                raise BackendError(
                    f"verl {self.verl_version} no longer fits the CPU platform shim "
                    f"(lightning_backends._verl_platform): {'; '.join(problems)}"
                )
        if cfg.verl_policy_loss is not None:
            from verl.trainer.ppo.core_algos import get_policy_loss_fn

            try:
                get_policy_loss_fn(cfg.verl_policy_loss)
            except ValueError as exc:
                raise ValueError(f"invalid verl backend config: verl_policy_loss: {exc}") from exc
        self._cfg, self._device = cfg, device
        with map_verl_exceptions(f"setting up verl on {model_path!r}"):
            wcfg = self._training_worker_config(str(model_path), cfg, device)
            tok = wcfg.model_config.tokenizer
            if tok is not None and tok.pad_token_id is not None:
                self._pad_token_id = int(tok.pad_token_id)
            if cfg.world_size == 1:
                self._worker = self._local_worker(wcfg)
            else:
                self._worker = self._ray_worker_group(wcfg, cfg, device)
            self._call("set_loss_fn", self._loss_fn(cfg))
            self._call("reset")
        self.step = 0

    @staticmethod
    def _loss_fn(cfg: VerlBackendConfig) -> Any:
        return _VerlPolicyLoss(cfg) if cfg.verl_policy_loss else LightningPolicyLoss(cfg)

    @staticmethod
    def _training_worker_config(model_path: str, cfg: VerlBackendConfig, device: str) -> Any:
        from verl.trainer.config import CheckpointConfig
        from verl.workers.config import (
            FSDPEngineConfig,
            FSDPOptimizerConfig,
            HFModelConfig,
            TrainingWorkerConfig,
        )

        cpu = device == "cpu"
        if cfg.use_remove_padding is None:  # varlen packing needs flash-attn's kernels
            rmpad = not cpu and importlib.util.find_spec("flash_attn") is not None
        else:
            rmpad = cfg.use_remove_padding
        attn = cfg.attn_implementation or ("flash_attention_2" if rmpad else "sdpa")
        dtype = "fp32" if cpu or cfg.dtype == "float32" else "bf16"
        model = HFModelConfig(
            path=model_path,
            use_remove_padding=rmpad,
            enable_gradient_checkpointing=cfg.gradient_checkpointing,
            override_config={"attn_implementation": attn},
        )
        engine = FSDPEngineConfig(
            strategy=cfg.strategy,
            model_dtype="fp32",
            mixed_precision={"param_dtype": dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
            use_torch_compile=False,
            param_offload=cfg.param_offload,
            optimizer_offload=cfg.optimizer_offload,
            ulysses_sequence_parallel_size=cfg.ulysses_sp_size,
            use_dynamic_bsz=True,
            max_token_len_per_gpu=cfg.micro_batch_tokens,
            infer_max_token_len_per_gpu=cfg.micro_batch_tokens,
            use_remove_padding=rmpad,
            seed=0 if cfg.seed is None else cfg.seed,
        )
        optim = FSDPOptimizerConfig(
            lr=cfg.lr,
            betas=cfg.betas,
            weight_decay=cfg.weight_decay,
            clip_grad=math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm,
            total_training_steps=1 << 30,
            lr_warmup_steps=0,
            override_optimizer_config={"eps": cfg.eps},
        )
        return TrainingWorkerConfig(
            model_type="language_model",
            model_config=model,
            engine_config=engine,
            optimizer_config=optim,
            checkpoint_config=CheckpointConfig(),
        )

    @staticmethod
    def _local_worker(wcfg: Any) -> Any:
        """One rank in this process: a world of one over gloo (and NCCL on CUDA)."""
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for k, v in env.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if not torch.distributed.is_initialized():
            backend = "gloo" if not torch.cuda.is_available() else "cpu:gloo,cuda:nccl"
            torch.distributed.init_process_group(backend=backend, rank=0, world_size=1)
        return _worker_class()(config=wcfg)

    @staticmethod
    def _ray_worker_group(wcfg: Any, cfg: VerlBackendConfig, device: str) -> Any:
        """``nnodes`` x ``gpus_per_node`` ``TrainingWorker`` actors placed by verl's
        ``RayResourcePool`` (one GPU each; on CPU, one gloo rank per process)."""
        try:
            import ray
        except ImportError as exc:
            raise LookupError("world_size > 1 needs Ray: pip install 'ray[default]'") from exc
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

        cpu = device == "cpu"
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"address": cfg.ray_address}
            if cfg.ray_address is None and cpu:  # a local instance with a slot per rank
                kwargs["num_cpus"] = max(cfg.world_size, os.cpu_count() or 1)
            ray.init(ignore_reinit_error=True, include_dashboard=False, **kwargs)
        pool = RayResourcePool(
            process_on_nodes=[cfg.gpus_per_node] * cfg.nnodes,
            use_gpu=not cpu,
            # verl's default reserves 10 CPUs per GPU worker; a CPU rank takes one
            **({"max_colocate_count": 1} if cpu else {}),
        )
        worker_env = {}
        if cpu:  # what the platform shim exported, also for a Ray cluster started earlier
            names = ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_ENGINE_DEVICE")
            worker_env = {k: os.environ[k] for k in (*names, "OMP_NUM_THREADS")}
        cls = RayClassWithInitArgs(ray.remote(_worker_class()), config=wcfg)
        return RayWorkerGroup(
            resource_pool=pool, ray_cls_with_init=cls, device_name=device, worker_env=worker_env
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a worker method: directly in-process, or on every Ray rank (resolving a
        future and taking rank 0's answer where verl returns one per rank)."""
        out = getattr(self._worker, method)(*args, **kwargs)
        if self._cfg.world_size == 1:
            return out
        if hasattr(out, "get") and callable(out.get) and not isinstance(out, dict):
            out = out.get()  # a DataProtoFuture from a non-blocking method
        if isinstance(out, list):
            out = out[0]
        return out

    def _check_ready(self) -> None:
        if self._worker is None:
            raise BackendError(
                "the verl backend is not set up: call setup(model_path, config) first"
            )

    def _dp_size(self) -> int:
        return self._cfg.world_size // self._cfg.ulysses_sp_size

    # ------------------------------------------------------------------ log-probs

    def _check_sampling(self, batch: TrainBatch) -> None:
        problem = scalar_sampling_problem(batch, self._cfg.temperature)
        if problem is not None:
            raise BackendError(f"the verl backend cannot score this batch: {problem}")

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs of the action tokens under the current weights, float32 ``[T]`` on CPU
        (0 elsewhere), from verl's ``infer_batch``.

        verl's actor scores every row at one temperature over the full vocabulary: a batch
        with other temperatures or top-k/top-p truncation raises ``BackendError`` (see
        :func:`~lightning_backends._common.scalar_sampling_problem`) rather than training
        on biased ratios."""
        from verl.utils import tensordict_utils as tu

        self._check_ready()
        batch = batch.to("cpu")
        self._check_sampling(batch)
        with map_verl_exceptions("computing log-probs"):
            td = to_verl_tensordict(
                batch,
                temperature=self._cfg.temperature,
                pad_token_id=self._pad_token_id,
                pad_to_multiple=self._dp_size(),
            )
            tu.assign_non_tensor(td, compute_loss=False, calculate_entropy=False)
            out = self._call("infer_batch", td)
            nested = tu.get(out, "log_probs")  # nested [n, j]: position t scores token t + 1
            flat = nested.values()[: batch.num_tokens].float().cpu()  # [T]
        full = torch.zeros(batch.num_tokens, dtype=torch.float32)  # [T]
        full[1:] = flat[:-1]  # token t's log-prob comes from position t - 1
        return full * batch.action_mask  # [T]

    # ------------------------------------------------------------------ train

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` via ``TrainingWorker.train_mini_batch``.

        Returns the torch backend's metric names: ``loss/policy``, ``loss/kl``,
        ``loss/total``, ``actor/grad_norm``, ``actor/clip_frac``, ``actor/approx_kl``,
        ``actor/logprob_gap``, ``actor/lr``, ``actor/skipped``, ``perf/tokens``,
        ``perf/action_tokens``, ``perf/micro_batches`` (per rank), ``perf/step_s``,
        ``train/step``, plus verl's other metrics under ``verl/``. With
        ``verl_policy_loss``, ``actor/clip_frac`` and ``actor/approx_kl`` are verl's (means
        over micro-batches, not token-weighted). A batch without action tokens takes no
        step (``actor/skipped`` = 1).
        """
        from verl.utils import tensordict_utils as tu

        self._check_ready()
        cfg = self._cfg
        t0 = time.perf_counter()
        batch = batch.to("cpu")
        self._check_sampling(batch)
        require_ref_logprobs(batch, cfg.kl_coef, "verl")
        n_act = float(batch.action_mask.sum())
        base = {
            **check_batch(batch, cfg.temperature),
            "perf/tokens": float(batch.num_tokens),
            "perf/action_tokens": n_act,
        }
        if n_act == 0:
            return {
                "loss/policy": 0.0,
                "loss/kl": 0.0,
                "loss/total": 0.0,
                "actor/grad_norm": 0.0,
                "actor/clip_frac": 0.0,
                "actor/approx_kl": 0.0,
                "actor/logprob_gap": 0.0,
                "actor/lr": cfg.lr,
                "actor/skipped": 1.0,
                **base,
                "perf/micro_batches": 0.0,
                "perf/step_s": time.perf_counter() - t0,
                "train/step": float(self.step),
            }
        with map_verl_exceptions("train_step"):
            keep = _rows_with_actions(batch)
            td = to_verl_tensordict(
                keep,
                temperature=cfg.temperature,
                pad_token_id=self._pad_token_id,
                pad_to_multiple=self._dp_size(),
            )
            n_rows = int(td.batch_size[0])
            tu.assign_non_tensor(
                td,
                global_batch_size=keep.num_sequences,
                mini_batch_size=n_rows,
                epochs=1,
                seed=0 if cfg.seed is None else cfg.seed,
                dataloader_kwargs={"shuffle": False},
                compute_loss=True,
                calculate_entropy=False,
            )
            out = self._call("train_mini_batch", td)
            raw = tu.get(out, "metrics")
        self.step += 1
        metrics = _flatten_metrics(raw)
        policy = metrics.pop("loss/policy", metrics.get("loss", 0.0))
        kl = metrics.pop("loss/kl", 0.0)
        result = {
            "loss/policy": policy,
            "loss/kl": kl,
            "loss/total": policy + cfg.kl_coef * kl,
            "actor/grad_norm": metrics.pop("grad_norm", 0.0),
            "actor/clip_frac": metrics.pop("actor/clip_frac", 0.0),
            "actor/approx_kl": metrics.pop("actor/approx_kl", 0.0),
            "actor/logprob_gap": metrics.pop("actor/logprob_gap", 0.0),
            "actor/lr": metrics.pop("lr", cfg.lr),
            "actor/skipped": 0.0,
            **base,
            "perf/micro_batches": metrics.pop("perf/micro_batches", 0.0),
            "perf/step_s": time.perf_counter() - t0,
            "train/step": float(self.step),
        }
        for k, v in metrics.items():
            result[f"verl/{k}"] = v
        return result

    # ------------------------------------------------------------------ weights

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The full model's weights, gathered from the FSDP shards, named as in the plain
        HF model's ``state_dict()``, as CPU copies: pass them to ``engine.update_weights``."""
        self._check_ready()
        with map_verl_exceptions("export_weights"):
            return self._call("full_state_dict")

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str) -> None:
        """Write ``path/verl`` (verl's FSDP checkpoint: model, optimizer, scheduler, RNG)
        and ``path/trainer_state.json`` (the step)."""
        self._check_ready()
        root = Path(path)
        with map_verl_exceptions(f"saving to {str(root)!r}"):
            root.mkdir(parents=True, exist_ok=True)
            self._call(
                "save_checkpoint",
                str(root / _VERL_DIR),
                global_step=self.step,
                max_ckpt_to_keep=None,
            )
            state = {"format": _FORMAT, "step": self.step, "verl": self.verl_version}
            (root / _STATE_FILE).write_text(json.dumps(state, indent=1))

    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote into the set-up worker (same model and world size).

        Raises:
            BackendError: the checkpoint is missing or does not fit.
        """
        self._check_ready()
        root = Path(path)
        try:
            state = json.loads((root / _STATE_FILE).read_text())
        except FileNotFoundError as exc:
            raise BackendError(
                f"{str(root)!r} is not a verl-backend checkpoint (no {_STATE_FILE}); "
                "pass a directory written by VerlBackend.save"
            ) from exc
        with map_verl_exceptions(f"loading the checkpoint {str(root)!r}"):
            self._call("load_checkpoint", str(root / _VERL_DIR))
        self.step = int(state["step"])


def _rows_with_actions(batch: TrainBatch) -> TrainBatch:
    """``batch`` without its sequences that have no action token (they add nothing to the
    loss and no aggregation unit)."""
    from lightning.algorithms.tokens import seq_ids

    counts = torch.zeros(batch.num_sequences, dtype=torch.int64).index_add(
        0, seq_ids(batch.cu_seqlens).long(), batch.action_mask.long()
    )  # [B]
    if bool((counts > 0).all()):
        return batch
    return select_sequences(batch, (counts > 0).nonzero().squeeze(-1))[0]


def _flatten_metrics(raw: dict[str, Any]) -> dict[str, float]:
    """verl's step metrics (``Metric``s, lists over micro-batches or ranks, numbers) as
    floats."""
    from verl.utils.metric import Metric

    out: dict[str, float] = {}
    for k, v in raw.items():
        if isinstance(v, Metric):
            v = v.aggregate()
        elif isinstance(v, list):
            if v and isinstance(v[0], Metric):
                v = Metric.aggregate_dp(v)
            else:
                vals = [float(x) for x in v if isinstance(x, (int, float)) or hasattr(x, "item")]
                if not vals:
                    continue
                v = sum(vals) / len(vals)
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


backend_class = VerlBackend
