"""The DeepSpeed backend: ZeRO stages 0-3 over one or many processes, CPU or GPU.

Usage (one process; several are started by ``deepspeed`` or ``torchrun``)::

    backend = DeepSpeedBackend()
    backend.setup(model_path, DeepSpeedBackendConfig(zero_stage=2, lr=1e-6))
    if not backend.is_primary:
        backend.serve_worker()          # blocks until rank 0 calls close()
    else:
        metrics = backend.train_step(pack_sequences(seqs, advantages))
        await engine.update_weights(backend.export_weights())
        backend.close()

Contract with the daemon (``lightning-daemon --backend deepspeed``)
    Every rank calls :meth:`DeepSpeedBackend.setup` (it joins the process group from
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, as set by
    the ``deepspeed`` launcher or ``torchrun``; a lone process without them becomes a world
    of one). Rank 0 (:attr:`~DeepSpeedBackend.is_primary`) runs the daemon: the one ingest
    point, the one serving endpoint, and every call to ``train_step``, ``export_weights``,
    ``compute_logprobs``, ``save``, ``load`` and finally ``close``. Every other rank calls
    :meth:`~DeepSpeedBackend.serve_worker`, which blocks, follows rank 0's commands (each
    arrives through torch.distributed: a wake-up key in the process group's store, then
    the command and its batch by ``broadcast_object_list``) and returns when rank 0 calls
    ``close()``. Calls on rank 0 are serialised by a lock, so the daemon may call them from
    any one thread at a time. Checkpoint paths must be visible to every rank (a shared
    file system on multi-node runs).

A step
    The same as the torch backend's (:mod:`lightning_backends._common`): the packed batch
    is cut into micro-batches of whole sequences (``micro_batch_tokens``); each loss is
    scaled by the micro-batch's share of the whole batch's aggregation units, so the
    accumulated gradient is that of one big batch. With ``N`` ranks, micro-batch ``i``
    runs on rank ``i mod N``, its loss multiplied by ``N`` (DeepSpeed averages gradients
    over ranks); ranks short of micro-batches run a zero-weight pass so every rank does the
    same number of forward/backward passes (ZeRO-2/3 communicate in each). DeepSpeed's
    gradient-accumulation boundary is set by hand on the last pass, then the engine steps
    once (clipping, optimizer, scheduler).

Configuration
    :class:`DeepSpeedBackendConfig` has the torch backend's loss fields plus
    ``zero_stage`` and ``deepspeed_config`` (a DeepSpeed JSON file path or dict). The JSON
    is the base and wins where it sets a key; the fields fill in what it leaves out
    (``zero_optimization.stage``, ``bf16``, ``gradient_clipping``, and, when it has no
    ``optimizer`` section, ``torch.optim.AdamW`` from ``lr``/``betas``/``eps``/
    ``weight_decay`` with the ``optimizer_impl`` kernel: the torch backend's optimizer,
    fused on CPU and CUDA, no JIT build). ``optimizer`` and
    ``scheduler`` sections are DeepSpeed's own (e.g. ``AdamW`` with ``torch_adam``,
    ``WarmupLR``, ``WarmupCosineLR``). Batch-size keys must be absent or ``"auto"``:
    micro-batching is by tokens. Everything is validated, DeepSpeed's parser included,
    before the model is loaded.

Weights
    ``export_weights`` returns the plain Hugging Face ``state_dict`` names. Under ZeRO-3
    the partitions are gathered one group of parameters at a time
    (``export_group_elements``); rank 0 keeps a copy of each group, the other ranks drop it,
    so no rank other than the serving one ever holds the full model twice.

Errors from DeepSpeed/torch during a step are wrapped in :class:`lightning.BackendError` by
:func:`map_deepspeed_exceptions`. LoRA is not supported here (use the torch backend).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from lightning._errors import BackendError, ConfigError
from lightning.training.batch import TrainBatch, split_by_token_budget

from ._common import (
    NoReferenceSettings,
    StepSums,
    action_logprobs,
    agg_units,
    as_settings,
    check_batch,
    check_optimizer_impl,
    make_adamw,
    micro_batch_loss,
    require_ref_logprobs,
    step_metrics,
)

try:
    import deepspeed
except ModuleNotFoundError as exc:  # get_backend turns this into a LookupError naming the extra
    raise ModuleNotFoundError(
        f"the deepspeed backend needs {exc.name!r}, which is not installed: "
        "pip install 'lightning-rl[deepspeed]'",
        name=exc.name,
    ) from exc

__all__ = [
    "DeepSpeedBackend",
    "DeepSpeedBackendConfig",
    "backend_class",
    "map_deepspeed_exceptions",
]

_STATE_FILE = "trainer_state.json"
_DS_DIR = "deepspeed"
_TAG = "lightning"
_FORMAT = 1
_CMD_KEY = "lightning/deepspeed/cmd/"
#: batch-size keys DeepSpeed would use for its own accumulation; ours is by tokens
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class DeepSpeedBackendConfig(
    NoReferenceSettings, frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Settings of :class:`DeepSpeedBackend` (load with ``msgspec.toml.decode(data, type=...)``).

    The loss fields mean the same as in ``TorchBackendConfig``.
    """

    backend_name: ClassVar[str] = "deepspeed"

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 = plain data parallel, 1 = optimizer states, 2 = + gradients,
    3 = + parameters partitioned over ranks. ``deepspeed_config``'s
    ``zero_optimization.stage`` wins when set."""
    deepspeed_config: str | dict[str, Any] | None = None
    """A DeepSpeed JSON config: a file path or the dict itself. It wins where it sets a key
    (``zero_optimization``, ``bf16``, ``optimizer``, ``scheduler``, ``gradient_clipping``,
    offload...); batch-size keys must be absent or ``"auto"``."""
    dtype: Literal["float32", "bfloat16"] | None = None
    """Training precision; ``None`` = bfloat16 on a GPU that supports it, else float32.
    bfloat16 keeps fp32 master weights in DeepSpeed's optimizer."""
    logprob_impl: str | None = None
    """Log-prob kernel (``reference``, ``cpp``, ``triton``); ``None`` = fastest available."""
    optimizer_impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """The update kernel of the ``torch.optim.AdamW`` this backend builds when
    ``deepspeed_config`` has no ``optimizer`` section (as ``TorchBackendConfig``'s: ``auto``
    = fused where torch supports it); with an ``optimizer`` section it must stay ``auto``."""
    export_group_elements: int = 50_000_000
    """ZeRO-3 weight export gathers at most about this many parameter elements at once."""
    export_device: Literal["train", "cpu"] = "train"
    """Where exported weights live: the training device, or CPU memory."""
    worker_poll_s: float = 0.05
    """Longest pause between a worker's checks for rank 0's next command (cheap lookups in
    the process group's store: idle workers never sit in a collective, so no process-group
    timeout fires while the daemon waits for rollouts)."""
    dist_timeout_s: float = 1800.0
    """Timeout of one collective operation (process-group timeout)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optimizer_impl(self.optimizer_impl)
        if self.export_group_elements < 1:
            raise ValueError(
                f"export_group_elements must be >= 1, got {self.export_group_elements}"
            )
        if not (self.worker_poll_s > 0 and self.dist_timeout_s > 0):
            raise ValueError("worker_poll_s and dist_timeout_s must be > 0")


@contextlib.contextmanager
def map_deepspeed_exceptions(what: str) -> Iterator[None]:
    """Turn framework failures (DeepSpeed, torch, transformers) into :class:`BackendError`."""
    try:
        yield
    except (BackendError, LookupError, ValueError, TypeError):
        raise
    except (RuntimeError, OSError, AssertionError, torch.cuda.OutOfMemoryError) as exc:
        hint = ""
        if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc):
            hint = (
                "; lower micro_batch_tokens, enable gradient_checkpointing, raise zero_stage "
                "or offload (zero_optimization.offload_optimizer in deepspeed_config)"
            )
        raise BackendError(f"deepspeed backend: {what} failed: {exc!r}{hint}") from exc


def _as_config(config: Any) -> DeepSpeedBackendConfig:
    return as_settings(config, DeepSpeedBackendConfig, "deepspeed")


def _bf16(cfg: DeepSpeedBackendConfig) -> bool:
    if cfg.dtype is not None:
        return cfg.dtype == "bfloat16"
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_deepspeed_config(cfg: DeepSpeedBackendConfig) -> dict[str, Any]:
    """The DeepSpeed JSON this backend runs with: ``cfg.deepspeed_config`` (read when a
    path) filled in from the fields, batch sizes set to one micro-batch per step.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key contradicts how this
            backend trains (batch sizes, fp16, a ZeRO stage outside 0-3).
    """
    src = cfg.deepspeed_config
    if isinstance(src, str):
        try:
            ds = json.loads(Path(src).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot read the DeepSpeed config {src!r}: {exc}; pass a JSON file path"
            ) from exc
        if not isinstance(ds, dict):
            raise ConfigError(f"the DeepSpeed config {src!r} must be a JSON object")
    else:
        ds = copy.deepcopy(src) if src is not None else {}
    for key in _BATCH_KEYS:
        if ds.get(key, "auto") != "auto":
            raise ConfigError(
                f'deepspeed_config sets {key}={ds[key]!r}; remove it (or set "auto"): the '
                "backend accumulates whole micro-batches of micro_batch_tokens tokens per step"
            )
        ds.pop(key, None)
    if "optimizer" in ds and cfg.optimizer_impl != "auto":
        raise ConfigError(
            f"optimizer_impl={cfg.optimizer_impl!r} sets the kernel of the backend's own AdamW, "
            "but deepspeed_config has an optimizer section, which DeepSpeed builds itself: "
            'remove one of the two (optimizer_impl = "auto" keeps the section)'
        )
    if (ds.get("fp16") or {}).get("enabled", False):
        raise ConfigError(
            "deepspeed_config enables fp16, which this backend does not support; "
            'use bf16 (dtype="bfloat16") or fp32'
        )
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("deepspeed_config's zero_optimization must be an object")
    stage = zero.setdefault("stage", cfg.zero_stage)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "bf16" not in ds:
        ds["bf16"] = {"enabled": _bf16(cfg)}
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.max_grad_norm or 0.0
    # one micro-batch per rank per step, as far as DeepSpeed's bookkeeping is concerned;
    # the real accumulation boundary is set by hand (see DeepSpeedBackend._train)
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds.setdefault("steps_per_print", 2**31 - 1)  # the daemon logs metrics itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _ensure_dist_env() -> None:
    """A lone process (no launcher) becomes a world of one on a free local port."""
    if "RANK" in os.environ or dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


@contextlib.contextmanager
def _zero3_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, let ``from_pretrained`` build the model partitioned
    (``deepspeed.zero.Init``) and load each weight into its partitions, so no rank holds the
    full model. Transformers reads this from a process-global config object: it is set only
    for the duration of the load, so models loaded later (the serving engine's) are plain."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # registers itself (a weak ref)
    try:
        yield
    finally:
        del hf_ds
        unset_hf_deepspeed_config()


class _PolicyLogprobs(torch.nn.Module):
    """The module DeepSpeed wraps: action log-probs of a micro-batch, ``[T_mb]``, from the
    decoder and the output-embedding weight (no ``[T, V]`` logits)."""

    def __init__(self, model: Any, *, temperature: float, impl: str | None) -> None:
        super().__init__()
        self.model = model
        self._temperature = temperature
        self._impl = impl

    def head_weight(self) -> torch.nn.Parameter:
        return self.model.get_output_embeddings().weight  # [V, H]

    def forward(self, mb: TrainBatch, return_entropy: bool = False) -> Any:
        return action_logprobs(
            self.model.get_decoder(),
            self.head_weight(),  # [V, H]
            mb,
            temperature=self._temperature,
            impl=self._impl,
            return_entropy=return_entropy,
        )  # [T_mb] (, [T_mb] entropy)


class DeepSpeedBackend:
    """Trainer over a Hugging Face causal LM wrapped in a DeepSpeed engine. Satisfies
    ``Backend``; see the module docstring for the multi-rank contract."""

    def __init__(self) -> None:
        self._cfg = DeepSpeedBackendConfig()
        self._ds_config: dict[str, Any] = {}
        self._engine: Any = None
        self._module: _PolicyLogprobs | None = None
        self._device = torch.device("cpu")
        self._rank, self._world = 0, 1
        self._store: Any = None
        self._seq = 0
        self._lock = threading.Lock()
        self._closed = False
        self.step = 0
        """Optimizer steps taken (restored by :meth:`load`)."""
        self.optimizer_impl = ""
        """AdamW's update kernel chosen at setup (``fused``, ``foreach``, ``for-loop``), or
        ``deepspeed_config`` when its ``optimizer`` section builds the optimizer."""

    # ------------------------------------------------------------------ setup

    @property
    def is_primary(self) -> bool:
        """True on rank 0 (or a single process): the rank that runs the daemon."""
        return self._rank == 0

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def engine(self) -> Any:
        """The ``deepspeed.DeepSpeedEngine``."""
        self._check_ready()
        return self._engine

    @property
    def model(self) -> Any:
        """The Hugging Face model (its parameters are partitioned under ZeRO-3)."""
        self._check_ready()
        assert self._module is not None
        return self._module.model

    @property
    def deepspeed_config(self) -> dict[str, Any]:
        """The resolved DeepSpeed config the engine runs with."""
        return copy.deepcopy(self._ds_config)

    def setup(self, model_path: str, config: Any = None) -> None:
        """Join the process group, load ``model_path`` and build the DeepSpeed engine. Call
        it on every rank with the same arguments.

        ``config`` is a :class:`DeepSpeedBackendConfig`, a dict of its fields (e.g. from a
        TOML file), or None.

        Raises:
            ConfigError: an invalid config, including one DeepSpeed's own parser rejects
                (raised before the model is loaded).
            BackendError: the process group, the checkpoint or the engine cannot be set up.
        """
        from transformers import AutoModelForCausalLM

        cfg = _as_config(config)
        ds_config = resolve_deepspeed_config(cfg)
        self._cfg, self._ds_config = cfg, ds_config
        _ensure_dist_env()
        accel = deepspeed.get_accelerator()
        with map_deepspeed_exceptions("joining the process group"):
            deepspeed.init_distributed(
                dist_backend=accel.communication_backend_name(),
                auto_mpi_discovery=False,
                verbose=False,
                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s),
            )
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if accel.device_name() == "cpu":
            self._device = torch.device("cpu")
        else:
            accel.set_device(local_rank)
            self._device = torch.device(accel.device_name(local_rank))
        self._validate_with_deepspeed(ds_config)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        bf16 = bool((ds_config.get("bf16") or {}).get("enabled", False))
        with map_deepspeed_exceptions(f"loading {model_path!r}"), _zero3_init(ds_config):
            model = AutoModelForCausalLM.from_pretrained(
                str(model_path),
                dtype=torch.bfloat16 if bf16 else torch.float32,
                local_files_only=True,
            )
        if cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            model.config.use_cache = False
        module = _PolicyLogprobs(model, temperature=cfg.temperature, impl=cfg.logprob_impl)
        module.train()
        optimizer, self.optimizer_impl = None, "deepspeed_config"
        if "optimizer" not in ds_config:
            optimizer, self.optimizer_impl = make_adamw(
                [p for p in module.parameters() if p.requires_grad],
                cfg,
                cfg.optimizer_impl,
                backend="deepspeed",
            )
        with map_deepspeed_exceptions("deepspeed.initialize"):
            engine, *_ = deepspeed.initialize(
                model=module,
                optimizer=optimizer,
                model_parameters=[p for p in module.parameters() if p.requires_grad],
                config=ds_config,
            )
        if self.zero_stage == 3:
            # the head weight is used outside its own module's forward (no logits layer)
            deepspeed.zero.register_external_parameter(module, module.head_weight())
        self._engine, self._module = engine, module
        if self._world > 1:
            self._store = dist.distributed_c10d._get_default_store()
        self._seq, self._closed, self.step = 0, False, 0

    def _validate_with_deepspeed(self, ds_config: dict[str, Any]) -> None:
        from deepspeed.runtime.config import DeepSpeedConfig

        try:
            DeepSpeedConfig(copy.deepcopy(ds_config))
        except Exception as exc:
            raise ConfigError(
                f"DeepSpeed rejects the config: {exc}; fix deepspeed_config (see "
                "https://www.deepspeed.ai/docs/config-json/)"
            ) from exc

    @property
    def zero_stage(self) -> int:
        return int(self._ds_config.get("zero_optimization", {}).get("stage", 0))

    def _check_ready(self) -> None:
        if self._engine is None:
            raise BackendError(
                "the deepspeed backend is not set up: call setup(model_path, config) first"
            )
        if self._closed:
            raise BackendError("the deepspeed backend is closed")

    def _check_primary(self, what: str) -> None:
        self._check_ready()
        if not self.is_primary:
            raise BackendError(
                f"{what} is called on rank 0 only; rank {self._rank} runs serve_worker()"
            )

    # ------------------------------------------------------------------ commands

    def _post(self, cmd: str, arg: Any = None) -> None:
        """Rank 0: wake the workers, then hand them the command (a collective)."""
        if self._world == 1:
            return
        seq = self._seq
        self._store.set(f"{_CMD_KEY}{seq}", b"1")
        if seq > 0:  # every worker read key seq-1 before joining the last broadcast
            self._store.delete_key(f"{_CMD_KEY}{seq - 1}")
        self._seq += 1
        payload = [(cmd, arg)]
        dist.broadcast_object_list(payload, src=0)

    def _receive(self) -> tuple[str, Any]:
        """Worker: wait for rank 0's next command (store lookups with a growing pause, never
        a pending collective), then join its broadcast."""
        key = f"{_CMD_KEY}{self._seq}"
        pause = 0.001
        while not self._store.check([key]):
            time.sleep(pause)
            pause = min(2 * pause, self._cfg.worker_poll_s)
        self._seq += 1
        payload: list[Any] = [None]
        dist.broadcast_object_list(payload, src=0)
        return payload[0]

    def serve_worker(self) -> None:
        """On a non-zero rank: follow rank 0's commands until it calls :meth:`close`.

        Raises:
            BackendError: called on rank 0, before setup, or a command failed (the error
                ends this worker; rank 0 sees its collective fail or time out).
        """
        self._check_ready()
        if self.is_primary:
            raise BackendError("serve_worker() runs on ranks > 0; rank 0 runs the daemon")
        while True:
            with map_deepspeed_exceptions("waiting for rank 0 (did it exit without close()?)"):
                cmd, arg = self._receive()
            with map_deepspeed_exceptions(f"worker command {cmd!r}"):
                if cmd == "close":
                    self._closed = True
                    self._leave_group()
                    return
                if cmd == "train_step":
                    self._train(arg)
                elif cmd == "logprobs":
                    self._logprobs(arg)
                elif cmd == "export":
                    self._export()
                elif cmd == "save":
                    self._save(arg)
                elif cmd == "load":
                    self._load(arg)
                else:
                    raise BackendError(f"unknown command {cmd!r} from rank 0")

    def close(self) -> None:
        """Rank 0: release the workers (their ``serve_worker()`` returns). Idempotent."""
        if self._engine is None or self._closed or not self.is_primary:
            return
        with self._lock:
            self._post("close")
            self._closed = True
            self._leave_group()

    def _leave_group(self) -> None:
        """Every rank, at close: meet, then tear the process group down together.

        A rank that exits with the group alive (gloo's threads running, rank 0's TCP store
        still serving the others) can abort at interpreter exit ("terminate called without an
        active exception"), and did on a loaded box. One process (world size 1) keeps its
        group: other backends in the process may share it.
        """
        if self._world == 1 or not dist.is_initialized():
            return
        with map_deepspeed_exceptions("leaving the process group"):
            dist.barrier()
            dist.destroy_process_group()

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Log-probs of the action tokens under the current weights, float32 ``[T]`` on CPU
        (0 elsewhere). Rank 0 only (under ZeRO-3 every rank takes part)."""
        self._check_primary("compute_logprobs")
        with self._lock, map_deepspeed_exceptions("computing log-probs"):
            if self.zero_stage == 3:
                self._post("logprobs", batch)
            return self._logprobs(batch)

    def _logprobs(self, batch: TrainBatch) -> torch.Tensor:
        batch = batch.to(self._device)
        parts = []
        with torch.no_grad():
            for mb in split_by_token_budget(batch, self._cfg.micro_batch_tokens):
                parts.append(self._engine(mb))  # [T_mb]
        return torch.cat(parts).cpu()  # [T]

    # ------------------------------------------------------------------ train

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on ``batch`` over all ranks. Rank 0 only.

        Returns the torch backend's metrics (``loss/policy``, ``loss/kl``, ``loss/total``,
        ``actor/grad_norm``, ``actor/clip_frac``, ``actor/approx_kl``,
        ``actor/logprob_gap``, ``actor/lr``, ``actor/skipped``, ``perf/tokens``,
        ``perf/action_tokens``, ``perf/micro_batches``, ``perf/step_s``, ``train/step``).

        Raises:
            BackendError: not set up, not rank 0, or the step failed.
        """
        self._check_primary("train_step")
        with self._lock, map_deepspeed_exceptions("train_step"):
            self._post("train_step", batch)
            return self._train(batch)

    def _train(self, batch: TrainBatch) -> dict[str, float]:
        cfg, engine = self._cfg, self._engine
        t0 = time.perf_counter()
        batch = batch.to(self._device)
        data = check_batch(batch, cfg.temperature)
        n_act = float(batch.action_mask.sum())
        total_units = agg_units(batch, cfg.loss_agg)
        require_ref_logprobs(batch, cfg.kl_coef, "deepspeed")
        use_kl = cfg.kl_coef > 0
        micro = split_by_token_budget(batch, cfg.micro_batch_tokens)
        work = [mb for mb in micro if agg_units(mb, cfg.loss_agg) > 0]
        sums = StepSums()
        skipped = not work  # the same decision on every rank: they all hold the batch
        grad_norm = 0.0
        engine.train()
        if not skipped:
            mine = work[self._rank :: self._world]
            rounds = math.ceil(len(work) / self._world)
            for i in range(rounds):
                # ranks short of micro-batches run a zero-weight pass (same collectives)
                mb, scale = (mine[i], float(self._world)) if i < len(mine) else (work[0], 0.0)
                units = agg_units(mb, cfg.loss_agg)
                w = units / total_units * scale  # share of the big batch; x N for DS's mean
                tok_w = float(mb.action_mask.sum()) / n_act * (scale > 0)
                engine.set_gradient_accumulation_boundary(i == rounds - 1)
                lp, ent = engine(mb, return_entropy=True)  # [T_mb], [T_mb]
                loss = micro_batch_loss(
                    lp, mb, cfg, w=w, tok_w=tok_w, use_kl=use_kl, sums=sums, entropy=ent
                )
                engine.backward(loss, scale_wrt_gas=False)
            own_norm = self._plain_grad_norm()
            engine.step()
            norm = engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else own_norm
            self.step += 1
            # the stats were weighted with the x N loss scale: undo it, then sum over ranks
            sums = dataclasses.replace(
                sums, policy=sums.policy / self._world, kl=sums.kl / self._world
            )
            if self._world > 1:  # the p99 stays this rank's own tokens'
                t = sums.to_tensor().to(self._device)  # [9]
                dist.all_reduce(t)
                sums = StepSums.from_tensor(t.cpu(), sums.gaps)
        return data | step_metrics(
            sums,
            kl_coef=cfg.kl_coef,
            grad_norm=grad_norm,
            lr=float(engine.get_lr()[0]),
            skipped=skipped,
            tokens=batch.num_tokens,
            action_tokens=n_act,
            micro_batches=len(micro),
            t0=t0,
            step=self.step,
        )

    def _plain_grad_norm(self) -> float:
        """Global gradient norm where DeepSpeed keeps plain (already all-reduced) ``.grad``
        tensors: ZeRO-0 without bf16, whose optimizer does not record the norm."""
        if self.zero_stage > 0 or (self._ds_config.get("bf16") or {}).get("enabled"):
            return 0.0
        assert self._module is not None
        norms = [
            torch.linalg.vector_norm(p.grad.float())  # []
            for p in self._module.parameters()
            if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0  # []

    # ------------------------------------------------------------------ weights

    def export_weights(self) -> dict[str, torch.Tensor]:
        """Detached copies of the full model's weights named as in the plain HF model's
        ``state_dict()``, for ``engine.update_weights``. Rank 0 only. Tied tensors are
        copied once and shared. Under ZeRO-3 the ranks gather one group of parameters at
        a time (``export_group_elements``).

        Raises:
            BackendError: not set up, not rank 0, or gathering failed.
        """
        self._check_primary("export_weights")
        with self._lock, torch.no_grad(), map_deepspeed_exceptions("export_weights"):
            if self.zero_stage == 3:
                self._post("export")
            return self._export()

    def _export(self) -> dict[str, torch.Tensor]:
        assert self._module is not None
        model = self._module.model
        dev = torch.device("cpu") if self._cfg.export_device == "cpu" else self._device
        named = model.state_dict(keep_vars=True)  # name -> Parameter / buffer
        out: dict[str, torch.Tensor] = {}
        if self.zero_stage != 3:
            copies: dict[int, torch.Tensor] = {}
            for name, t in named.items():
                if id(t) not in copies:
                    copies[id(t)] = t.detach().to(dev, copy=True)
                out[name] = copies[id(t)]
            return out
        # ZeRO-3: gather groups of unique parameters, copy them on rank 0, let go
        names_of: dict[int, list[str]] = {}
        tensors: dict[int, torch.Tensor] = {}
        for name, t in named.items():
            names_of.setdefault(id(t), []).append(name)
            tensors[id(t)] = t
        group: list[torch.Tensor] = []
        size = 0
        ids = list(tensors)
        for j, key in enumerate(ids):
            t = tensors[key]
            group.append(t)
            size += int(getattr(t, "ds_numel", t.numel()))
            if size < self._cfg.export_group_elements and j + 1 < len(ids):
                continue
            params = [p for p in group if hasattr(p, "ds_id")]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.is_primary:
                    for p in group:
                        copy_ = p.detach().to(dev, copy=True)
                        for name in names_of[id(p)]:
                            out[name] = copy_
            group, size = [], 0
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str) -> None:
        """Write ``path/deepspeed`` (DeepSpeed's checkpoint: weights, optimizer and
        scheduler state, per-rank ZeRO partitions) and ``path/trainer_state.json``. Every
        rank writes its part: ``path`` must be visible to all of them. Rank 0 only."""
        self._check_primary("save")
        with self._lock, map_deepspeed_exceptions(f"saving to {str(path)!r}"):
            self._post("save", str(path))
            self._save(str(path))

    def _save(self, path: str) -> None:
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._engine.save_checkpoint(
            str(root / _DS_DIR), tag=_TAG, client_state={"step": self.step}
        )
        if self.is_primary:
            state = {
                "format": _FORMAT,
                "step": self.step,
                "zero_stage": self.zero_stage,
                "world_size": self._world,
            }
            (root / _STATE_FILE).write_text(json.dumps(state, indent=1))

    def load(self, path: str) -> None:
        """Restore weights, optimizer and scheduler state and step written by :meth:`save`
        (same model, ZeRO stage and world size). Rank 0 only.

        Raises:
            BackendError: the checkpoint is missing or does not fit.
        """
        self._check_primary("load")
        root = Path(path)
        with self._lock, map_deepspeed_exceptions(f"loading the checkpoint {str(root)!r}"):
            try:
                state = json.loads((root / _STATE_FILE).read_text())
            except FileNotFoundError as exc:
                raise BackendError(
                    f"{str(root)!r} is not a deepspeed-backend checkpoint (no {_STATE_FILE}); "
                    "pass a directory written by DeepSpeedBackend.save"
                ) from exc
            if (state.get("zero_stage"), state.get("world_size")) != (self.zero_stage, self._world):
                raise BackendError(
                    f"the checkpoint was saved with ZeRO-{state.get('zero_stage')} on "
                    f"{state.get('world_size')} rank(s), this backend runs ZeRO-"
                    f"{self.zero_stage} on {self._world}: load it with the same setup"
                )
            self._post("load", str(root))
            self._load(str(root))

    def _load(self, path: str) -> None:
        load_path, client = self._engine.load_checkpoint(str(Path(path) / _DS_DIR), tag=_TAG)
        if load_path is None:
            raise BackendError(f"no DeepSpeed checkpoint under {path!r}")
        self.step = int(client["step"])


backend_class = DeepSpeedBackend
