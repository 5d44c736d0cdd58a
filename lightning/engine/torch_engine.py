"""Continuous-batching inference engine over a Hugging Face causal LM (CPU or CUDA).

Usage::

    engine = TorchEngine.from_pretrained(path)          # or (None) for SmolLM2-135M
    async with engine:
        ids = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
        result = await engine.generate(ids, SamplingParams(temperature=0.7, seed=1))

Scheduling
    One scheduler task (``serve``) owns the batch. Each iteration it either applies a
    pending weight update (only when nothing is running), or *prefills* the requests that
    arrived (FIFO, as many as fit ``max_num_seqs`` rows and ``max_prefill_tokens``), or
    runs one *decode step*: a single batched forward over every running sequence, one new
    token each. Prefill has priority, so a request waits at most one decode step to start.
    The blocking work of an iteration (forward, sampling, detokenization, stop checks)
    runs in a worker thread behind a ``CapacityLimiter(1)``; the event loop only hands out
    the results, so it stays responsive.

KV cache: a slab of rows, one row per running sequence
    Each layer's keys and values live in one preallocated tensor ``[rows, kv_heads,
    columns, head_dim]``. Row ``r`` holds one sequence, left-aligned: column ``c`` is
    position ``c``, so the RoPE position of every cached token is simply its column, and
    sequences of different lengths need no left padding or realignment. A decode step
    writes each sequence's new key/value at its own column (its current length), and
    attends over ``columns[:max_len + 1]`` with a per-row mask that hides columns beyond
    the row's own length. The slab is plugged into the model through a transformers
    ``Cache`` whose layers write in place instead of concatenating, so a decode step
    copies no cache memory (``DynamicCache`` re-allocates the whole cache every step).
    - Join: new prompts are prefilled together in one right-padded forward with a fresh
      ``DynamicCache``; their keys/values are copied into free rows (``n > 1`` choices
      copy the same prefill into ``n`` rows: the prompt is computed once).
    - Leave: a finished row is refilled by moving the *last* running row into it, so the
      running rows stay the prefix ``[0, B)`` and a step's batch is a view, never a
      gather. Cost per finished sequence: one copy of one row (``len`` columns).
    - Growth: rows and columns double when needed (one copy of the slab); the slab is
      freed when the engine goes idle.
    - Waste: attention in a step reads ``max_len + 1`` columns for every row (masked), so
      mixing very short and very long sequences costs attention work (not weight reads,
      which dominate at these batch sizes).

Sampling (per row, vectorised)
    logits (fp32) / temperature → top-k and top-p masks (only for rows that ask) → the
    *processed* log-probs (``x - logsumexp(x)``) returned for the sampled tokens. A draw
    descends a three-level tree over the vocabulary (blocks of 64 x 64 tokens, then 64,
    then one): at each level an inverse CDF over the children's mass picks one child,
    with a uniform from the request's own ``torch.Generator`` (on the CPU whatever the
    device), so a seeded request samples the same tokens whatever else is in the batch.
    Each choice compares one uniform against at most 64 boundaries, so the last-bit
    logit differences between batch shapes practically never change a token (one flat
    inverse CDF over the whole vocabulary would: its boundaries are closer than fp32
    noise). Cost per row: a few passes over the logits and three uniforms, where a
    Gumbel/exponential race needs a random number per vocabulary entry (that was 70% of
    a batch-16 decode step on the tiny model). Greedy (temperature 0) takes the argmax
    and reports log-probs at temperature 1 over the full vocabulary (its top-k/top-p
    cannot change the argmax and are not applied).

CPU threads: forwards run on the anyio worker thread. Once another thread (say a trainer on
the main thread) has also run torch ops, libgomp manages more OpenMP threads than there
are cores and throttles its spin-waiting: decode gets ~25% slower on a 2-core machine.
Keep heavy torch work on worker threads, or size ``torch.set_num_threads`` so the teams
fit the cores.

Weight updates: in-flight requests finish on the old weights (see ``base``): admission
pauses, running sequences complete, the weights are copied in place, the version bumps,
admission resumes. Every result reports the version that produced all of its tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import structlog
import torch
from anyio.abc import TaskGroup, TaskStatus
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lightning.engine.base import (
    CompletionDelta,
    EngineBase,
    EngineClosedError,
    EngineError,
    FinishReason,
    GenerationResult,
    SamplingParams,
    Weights,
    WeightUpdateError,
    apply_weights,
    check_request,
    collect_stream,
    eos_ids,
)
from lightning.kernels.logprobs.reference import truncation_threshold as _threshold

__all__ = ["EngineStats", "TorchEngine"]

logger = structlog.get_logger()

_MASK64 = (1 << 64) - 1


def _choice_seed(seed: int, index: int) -> int:
    """Seed of choice ``index``: choice 0 uses the request seed itself, so ``n=1`` and the
    first choice of ``n>1`` agree; the others are decorrelated with splitmix64."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was built (read ``engine.stats`` for a copy)."""

    forward_calls: int = 0
    prefill_forwards: int = 0
    decode_forwards: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_decode_batch: int = 0
    decode_rows_total: int = 0
    """Sum over decode steps of the batch size (mean batch = this / decode_forwards)."""
    requests_finished: int = 0
    weight_updates: int = 0
    running: int = 0
    """Sequences (choices) decoding now."""
    waiting: int = 0
    """Requests queued for admission now."""


# --------------------------------------------------------------------------- KV slab


class _Slab:
    """Keys/values of every running sequence: per layer ``[rows, heads, columns, dim]``."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        # Set before each decode forward, read by the cache layers.
        self.batch = 0
        self.rows_index: torch.Tensor | None = None  # [B]
        self.write_pos: torch.Tensor | None = None  # [B]
        self.width = 0
        self.cache = Cache(layers=[_SlabLayer(self, i) for i in range(len(keys))])

    @classmethod
    def like(cls, prefill: DynamicCache, rows: int, cols: int) -> _Slab:
        keys, values = [], []
        for layer in prefill.layers:
            k, v = layer.keys, layer.values  # [b, H, P, D]
            keys.append(k.new_zeros((rows, k.shape[1], cols, k.shape[3])))
            values.append(v.new_zeros((rows, v.shape[1], cols, v.shape[3])))
        return cls(keys, values)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def cols(self) -> int:
        return self.keys[0].shape[2]

    def grow(self, rows: int, cols: int, used_rows: int, used_cols: int) -> None:
        """Reallocate to at least ``rows`` x ``cols``, keeping ``[:used_rows, :, :used_cols]``."""
        rows, cols = max(rows, self.rows), max(cols, self.cols)
        if rows == self.rows and cols == self.cols:
            return
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((rows, old.shape[1], cols, old.shape[3]))
                new[:used_rows, :, :used_cols] = old[:used_rows, :, :used_cols]
                store[i] = new

    def load_prefill(self, prefill: DynamicCache, src: torch.Tensor, dst: int, cols: int) -> None:
        """Copy prefill rows ``src`` (columns ``[:cols]``) into slab rows ``[dst, dst+len(src))``."""
        n = src.numel()
        for store, layers in ((self.keys, "keys"), (self.values, "values")):
            for i, layer in enumerate(prefill.layers):
                store[i][dst : dst + n, :, :cols] = getattr(layer, layers).index_select(0, src)

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, cols: int) -> None:
        """Copy rows ``src`` onto rows ``dst`` (disjoint), columns ``[:cols]``."""
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :cols] = t[src, :, :cols]


class _SlabLayer(DynamicLayer):
    """A cache layer writing decode keys/values in place into the slab (see module doc)."""

    def __init__(self, slab: _Slab, index: int) -> None:
        super().__init__()
        self.slab = slab
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slab
        k, v = s.keys[self.index], s.values[self.index]
        # key_states: [B, H, 1, D]; each row writes at its own column.
        k[s.rows_index, :, s.write_pos] = key_states[:, :, 0].to(k.dtype)
        v[s.rows_index, :, s.write_pos] = value_states[:, :, 0].to(v.dtype)
        self.keys, self.values = k[: s.batch, :, : s.width], v[: s.batch, :, : s.width]
        return self.keys, self.values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        # Tokens already cached before this step's query, in slab columns.
        return self.slab.width - 1

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.slab.width, 0

    def get_max_length(self) -> int:
        return -1


# --------------------------------------------------------------------------- requests


class _Detokenizer:
    """Incremental detokenization (prefix/read offsets, as in vLLM) with stop strings.

    Text ending in an incomplete UTF-8 sequence (U+FFFD) is held back until the next token
    completes it. With stop strings, the last ``max(len(stop)) - 1`` characters are held
    back too, since they may be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, prompt: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        context = prompt[-6:]
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str | None:
        """Add a token; return the stop string it completed, if any (text is cut there)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            before = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return self._find_stop(before)
        return None

    def flush(self) -> None:
        """Append text still pending (possibly ending in U+FFFD) at the end of a choice."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _find_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        start = max(0, before - self.hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def take(self, final: bool) -> str:
        """Text not yet handed out that is certain (all of it when ``final``)."""
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out


class _Seq:
    """One choice of one request while it runs (one slab row)."""

    __slots__ = (
        "cache_len",
        "detok",
        "finish",
        "generator",
        "index",
        "last_token",
        "req",
        "stop_reason",
        "tokens",
    )  # fmt: skip

    def __init__(self, req: _Request, index: int, tokenizer: Any, device: torch.device) -> None:
        self.req = req
        self.index = index
        self.generator = torch.Generator().manual_seed(_choice_seed(req.seed, index))
        self.detok = _Detokenizer(tokenizer, req.prompt, req.params.stop)
        self.tokens = 0
        self.cache_len = 0  # tokens of this sequence in its slab row
        self.last_token = -1  # sampled, not yet in the cache
        self.finish: FinishReason | None = None
        self.stop_reason: str | int | None = None


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Request:
    def __init__(self, prompt: list[int], params: SamplingParams, max_tokens: int, seed: int):
        self.prompt = prompt
        self.params = params
        self.max_tokens = max_tokens
        self.seed = seed
        self.send, self.receive = anyio.create_memory_object_stream[object](math.inf)
        self.cancelled = False
        self.done = False
        self.version = -1
        self.unfinished = params.n


class _Update:
    def __init__(self, weights: Weights, version: int | None) -> None:
        self.weights = weights
        self.version = version
        self.done = anyio.Event()
        self.started = False
        self.result: int | None = None
        self.error: BaseException | None = None


# --------------------------------------------------------------------------- engine


class TorchEngine(EngineBase):
    """Continuous-batching engine over a transformers causal LM. See the module docstring.

    Args:
        model: a causal LM (``AutoModelForCausalLM``) with full attention in every layer;
            it is put in eval mode and used on its current device and dtype.
        tokenizer: its tokenizer (with a chat template for ``apply_chat_template``).
        max_model_len: most tokens per sequence; default and upper bound
            ``config.max_position_embeddings``. KV memory for a full slab is
            ``max_num_seqs * max_model_len * layers * 2 * kv_heads * head_dim`` elements.
        max_num_seqs: most sequences decoded together (a request with ``n`` choices
            counts ``n``).
        max_prefill_tokens: most (padded) prompt tokens prefilled in one forward; a
            longer single prompt is still admitted alone.
        seed: seeds the per-request seeds drawn for requests without one (reproducible
            runs); ``None`` draws them from the OS.
        limiter: the ``CapacityLimiter`` the blocking steps run under; pass the trainer's
            to keep training and inference forwards off the device at the same time.
            Default: a private ``CapacityLimiter(1)``.
        policy_version: the version of the weights ``model`` holds now (a trainer that
            resumes from a checkpoint passes its version).

    Raises:
        EngineError: the model has sliding-window or non-attention layers.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        max_prefill_tokens: int = 8192,
        seed: int | None = None,
        limiter: anyio.CapacityLimiter | None = None,
        policy_version: int = 0,
    ) -> None:
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types) or getattr(
            text_config, "use_sliding_window", False
        ):
            raise EngineError(
                f"TorchEngine supports full-attention models only; {type(model).__name__} "
                f"has layer types {sorted(set(layer_types))}"
            )
        limit = getattr(text_config, "max_position_embeddings", None)
        if max_model_len is None:
            if limit is None:
                raise EngineError(
                    "the model config has no max_position_embeddings: pass max_model_len"
                )
            max_model_len = int(limit)
        if max_model_len < 2:
            raise EngineError(f"max_model_len must be >= 2, got {max_model_len}")
        if limit is not None and max_model_len > limit:
            raise EngineError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={limit}"
            )
        if max_num_seqs < 1 or max_prefill_tokens < 1:
            raise EngineError("max_num_seqs and max_prefill_tokens must be >= 1")
        self._model = model.eval()
        # The engine encodes on the event loop and decodes on its worker thread. A fast
        # tokenizer call with other truncation/padding settings reconfigures the shared
        # Rust tokenizer for the duration of the call, silently cutting another thread's
        # encoding: the engine works on a private copy, so the caller's tokenizer can be
        # used (and reconfigured) from any thread meanwhile. The server uses this copy too.
        self._tokenizer = copy.deepcopy(tokenizer)
        self._max_model_len = max_model_len
        self._max_num_seqs = max_num_seqs
        self._max_prefill_tokens = max_prefill_tokens
        self._seed_rng = random.Random(seed) if seed is not None else None
        self._limiter = limiter
        self._device = next(model.parameters()).device
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._eos = self._find_eos(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if pad is not None else min(self._eos, default=0)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params

        self._version = policy_version
        self._stats = EngineStats()
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Seq] = []
        self._slab: _Slab | None = None
        self._updates: deque[_Update] = deque()
        self._state = "new"  # new -> running -> closing -> closed
        self._wake: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._tg: TaskGroup | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        local_files_only: bool = True,
        **kwargs: Any,
    ) -> TorchEngine:
        """Load a checkpoint directory (default: SmolLM2-135M-Instruct) and build an engine.

        ``device`` defaults to CUDA when available, else CPU; ``dtype`` to bfloat16 on
        CUDA (float16 where bf16 is unsupported) and float32 on CPU. Loading is blocking
        (run it in a thread from async code). ``kwargs`` go to :class:`TorchEngine`.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if path is None:
            from lightning.models import default_model_path

            path = default_model_path()
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            if device.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only)
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=local_files_only
            )
        except OSError as exc:
            raise EngineError(
                f"cannot load a model from {str(path)!r}: pass a local checkpoint directory "
                f"(config.json, weights, tokenizer), e.g. lightning.models.default_model_path() ({exc})"
            ) from exc
        return cls(model.to(device), tokenizer, **kwargs)

    @staticmethod
    def _find_eos(model: Any, tokenizer: Any) -> frozenset[int]:
        return eos_ids((getattr(model, "generation_config", None), model.config, tokenizer))

    # ------------------------------------------------------------------ properties

    @property
    def model(self) -> Any:
        """The served model. Change its weights only through ``update_weights``."""
        return self._model

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters plus the current queue sizes."""
        return dataclasses.replace(self._stats, running=len(self._rows), waiting=len(self._waiting))

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the scheduler until :meth:`aclose` (or cancellation)."""
        if self._state != "new":
            raise EngineClosedError(f"the engine cannot be started: it is {self._state}")
        self._state = "running"
        self._wake = anyio.Event()
        self._stopped = anyio.Event()
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        logger.info(
            "engine.started",
            model=type(self._model).__name__,
            device=str(self._device),
            max_model_len=self._max_model_len,
            max_num_seqs=self._max_num_seqs,
        )
        task_status.started()
        try:
            while self._state == "running":
                if not (self._waiting or self._rows or self._updates):
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                await self._iteration()
        finally:
            self._shutdown()  # synchronous: nothing to shield
            self._state = "closed"
            self._stopped.set()

    async def aclose(self) -> None:
        if self._state == "new":
            self._state = "closed"
            return
        if self._state == "running":
            self._state = "closing"
            assert self._wake is not None
            self._wake.set()
        if self._stopped is not None:
            await self._stopped.wait()

    def _shutdown(self) -> None:
        for req in list(self._waiting) + [s.req for s in self._rows]:
            self._fail(
                req, EngineClosedError("the engine was closed while this request was pending")
            )
        self._waiting.clear()
        self._rows.clear()
        self._slab = None
        while self._updates:
            upd = self._updates.popleft()
            upd.error = EngineClosedError("the engine was closed before the weight update")
            upd.done.set()
        logger.info("engine.stopped")

    # ------------------------------------------------------------------ requests

    def _check_running(self) -> None:
        if self._state != "running":
            raise EngineClosedError(
                "the engine is not running: use `async with engine:` or start `engine.serve` "
                "in a task group (`await tg.start(engine.serve)`)"
                if self._state == "new"
                else f"the engine is {self._state}: it cannot take requests after aclose()"
            )

    def _submit(self, prompt_token_ids: Sequence[int], params: SamplingParams | None) -> _Request:
        self._check_running()
        prompt, params, max_tokens, seed = check_request(
            prompt_token_ids,
            params,
            vocab_size=self._vocab_size,
            max_model_len=self._max_model_len,
            max_num_seqs=self._max_num_seqs,
            max_top_logprobs=self._vocab_size,
            seed_rng=self._seed_rng,
        )
        req = _Request(prompt, params, max_tokens, seed)
        self._waiting.append(req)
        assert self._wake is not None
        self._wake.set()
        return req

    def _cancel(self, req: _Request) -> None:
        """The consumer went away: drop the request at the next step."""
        if not req.done:
            req.cancelled = True
            req.done = True
            req.send.close()
            if self._wake is not None:
                self._wake.set()

    async def generate_stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[CompletionDelta]:
        """Yield :class:`CompletionDelta` increments; close the iterator (``aclosing``) to
        cancel early."""
        req = self._submit(prompt_token_ids, params)
        try:
            async with req.receive:
                async for item in req.receive:
                    if isinstance(item, _Failed):
                        raise item.error
                    yield item  # type: ignore[misc]
        finally:
            self._cancel(req)

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> GenerationResult:
        return await collect_stream(self, prompt_token_ids, params)

    # ------------------------------------------------------------------ weights

    async def update_weights(self, weights: Weights, *, version: int | None = None) -> int:
        self._check_running()
        if version is not None and version <= self._version:
            raise WeightUpdateError(
                f"version {version} is not newer than the current policy_version {self._version}"
            )
        upd = _Update(weights, version)
        self._updates.append(upd)
        assert self._wake is not None
        self._wake.set()
        try:
            await upd.done.wait()
        except BaseException:
            if not upd.started and upd in self._updates:
                self._updates.remove(upd)
            raise
        if upd.error is not None:
            raise upd.error
        assert upd.result is not None
        return upd.result

    def _apply_weights(self, weights: Weights) -> None:
        apply_weights(self._model, weights)

    async def _apply_update(self, upd: _Update) -> None:
        upd.started = True
        new = upd.version if upd.version is not None else self._version + 1
        t0 = time.perf_counter()
        try:
            if new <= self._version:
                raise WeightUpdateError(
                    f"version {new} is not newer than the current policy_version {self._version}"
                )
            await anyio.to_thread.run_sync(self._apply_weights, upd.weights, limiter=self._limiter)
        except Exception as exc:  # noqa: BLE001 - handed to the caller of update_weights
            upd.error = exc
            logger.warning("engine.weight_update_failed", error=repr(exc), version=self._version)
        else:
            self._version = new
            upd.result = new
            self._stats.weight_updates += 1
            logger.info("engine.weights_updated", version=new, seconds=time.perf_counter() - t0)
        finally:
            upd.done.set()

    # ------------------------------------------------------------------ scheduler

    async def _iteration(self) -> None:
        self._drop_cancelled_waiting()
        if self._updates and not self._rows:
            await self._apply_update(self._updates.popleft())
            return
        admitted = [] if self._updates else self._admit()
        if not admitted and not self._rows:
            return
        try:
            if admitted:
                events = await anyio.to_thread.run_sync(
                    self._prefill_step, admitted, limiter=self._limiter
                )
            else:
                events = await anyio.to_thread.run_sync(self._decode_step, limiter=self._limiter)
        except Exception as exc:
            logger.exception("engine.step_failed")
            affected = {id(s.req): s.req for s in self._rows}
            affected.update((id(r), r) for r in admitted)
            for req in affected.values():
                error = EngineError(
                    f"the engine failed while generating ({exc!r}); the request was dropped, "
                    "the engine keeps serving: retry it"
                )
                error.__cause__ = exc
                self._fail(req, error)
            self._rows.clear()
            self._slab = None
            return
        self._dispatch(events)
        if not self._rows and not self._waiting:
            self._slab = None  # idle: give the KV memory back

    def _drop_cancelled_waiting(self) -> None:
        if any(r.cancelled for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        rows = len(self._rows)
        longest = 0
        while self._waiting:
            req = self._waiting[0]
            if rows + req.params.n > self._max_num_seqs:
                break
            longest_after = max(longest, len(req.prompt))
            if admitted and longest_after * (len(admitted) + 1) > self._max_prefill_tokens:
                break
            self._waiting.popleft()
            admitted.append(req)
            rows += req.params.n
            longest = longest_after
        return admitted

    def _fail(self, req: _Request, error: BaseException) -> None:
        if req.done:
            return
        req.done = True
        try:
            req.send.send_nowait(_Failed(error))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        req.send.close()

    def _dispatch(self, events: list[tuple[_Request, CompletionDelta]]) -> None:
        for req, delta in events:
            if req.done:
                continue
            try:
                req.send.send_nowait(delta)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                req.cancelled = True
            if delta.finish_reason is not None:
                req.unfinished -= 1
                if req.unfinished == 0:
                    req.done = True
                    req.send.close()
                    self._stats.requests_finished += 1

    # ------------------------------------------------------------------ worker thread

    def _forward(self, **inputs: Any) -> Any:
        self._stats.forward_calls += 1
        return self._model(**inputs, use_cache=True)

    def _prefill_step(self, reqs: list[_Request]) -> list[tuple[_Request, CompletionDelta]]:
        """Prefill new requests in one right-padded forward, move them into the slab and
        sample their first tokens. Runs in the worker thread."""
        with torch.inference_mode():
            self._remove_finished()
            dev = self._device
            lengths = [len(r.prompt) for r in reqs]
            longest = max(lengths)
            ids = torch.full((len(reqs), longest), self._pad_id, dtype=torch.long)
            mask = torch.zeros((len(reqs), longest), dtype=torch.long)
            for i, r in enumerate(reqs):
                ids[i, : lengths[i]] = torch.tensor(r.prompt)
                mask[i, : lengths[i]] = 1
            positions = torch.arange(longest).expand(len(reqs), -1)
            cache = DynamicCache(config=self._model.config)
            last = torch.tensor(lengths) - 1  # [b]
            inputs: dict[str, Any] = {
                "input_ids": ids.to(dev),
                "attention_mask": mask.to(dev),
                "position_ids": positions.to(dev),
                self._cache_kwarg: cache,
            }
            if self._logits_to_keep:
                keep = torch.unique(last)  # sorted
                inputs["logits_to_keep"] = keep.to(dev)
                column = torch.searchsorted(keep, last)
            else:
                column = last
            logits = self._forward(**inputs).logits  # [b, k, V]
            logits = logits[torch.arange(len(reqs), device=logits.device), column.to(logits.device)]
            self._stats.prefill_forwards += 1
            self._stats.prompt_tokens += sum(lengths)

            # Rows for every choice; the prefill row i is copied into n_i slab rows.
            seqs: list[_Seq] = []
            src: list[int] = []
            for i, r in enumerate(reqs):
                r.version = self._version
                for c in range(r.params.n):
                    seq = _Seq(r, c, self._tokenizer, self._device)
                    seq.cache_len = lengths[i]
                    seqs.append(seq)
                    src.append(i)
            start = len(self._rows)
            need_cols = max([longest + 1] + [s.cache_len + 1 for s in self._rows])
            self._ensure_slab(cache, start + len(seqs), need_cols)
            assert self._slab is not None
            self._slab.load_prefill(cache, torch.tensor(src, device=dev), start, longest)
            self._rows.extend(seqs)
            src_t = torch.tensor(src, device=logits.device)
            events = self._sample_and_emit(seqs, logits.index_select(0, src_t))
            self._remove_finished()
            return events

    def _decode_step(self) -> list[tuple[_Request, CompletionDelta]]:
        """One batched forward over every running sequence. Runs in the worker thread."""
        with torch.inference_mode():
            self._remove_finished()
            rows = self._rows
            if not rows:
                return []
            slab = self._slab
            assert slab is not None
            dev = self._device
            b = len(rows)
            lens = torch.tensor([s.cache_len for s in rows])  # [B] = write column = position
            width = int(lens.max()) + 1
            if width > slab.cols:
                self._grow(b, width)
            slab.batch = b
            slab.rows_index = torch.arange(b, device=dev)
            slab.write_pos = lens.to(dev)
            slab.width = width
            mask = (torch.arange(width)[None, :] <= lens[:, None]).long()  # [B, W]
            ids = torch.tensor([[s.last_token] for s in rows])  # [B, 1]
            out = self._forward(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=lens[:, None].to(dev),
                **{self._cache_kwarg: slab.cache},
            )
            logits = out.logits[:, -1]  # [B, V]
            for s in rows:
                s.cache_len += 1
            self._stats.decode_forwards += 1
            self._stats.decode_rows_total += b
            self._stats.max_decode_batch = max(self._stats.max_decode_batch, b)
            events = self._sample_and_emit(rows, logits)
            self._remove_finished()
            return events

    def _ensure_slab(self, prefill: DynamicCache, rows: int, cols: int) -> None:
        if self._slab is None:
            r = min(self._max_num_seqs, max(rows, 4, 1 << (rows - 1).bit_length()))
            c = min(self._max_model_len, max(cols, 256))
            self._slab = _Slab.like(prefill, r, c)
        elif rows > self._slab.rows or cols > self._slab.cols:
            self._grow(rows, cols)

    def _grow(self, rows: int, cols: int) -> None:
        slab = self._slab
        assert slab is not None
        if rows > slab.rows:
            rows = min(self._max_num_seqs, max(rows, 2 * slab.rows))
        if cols > slab.cols:
            cols = min(self._max_model_len, max(cols, 2 * slab.cols))
        used_cols = max((s.cache_len for s in self._rows), default=0)
        slab.grow(rows, cols, len(self._rows), used_cols)

    def _remove_finished(self) -> None:
        """Drop finished and cancelled rows, moving the last rows into the holes."""
        rows = self._rows
        gone = [i for i, s in enumerate(rows) if s.finish is not None or s.req.cancelled]
        if not gone:
            return
        keep = len(rows) - len(gone)
        holes = [i for i in gone if i < keep]
        movers = [
            i
            for i in range(keep, len(rows))
            if rows[i].finish is None and not rows[i].req.cancelled
        ]
        assert len(holes) == len(movers)
        if holes:
            assert self._slab is not None
            cols = max(rows[i].cache_len for i in movers)
            dev = self._device
            self._slab.move_rows(
                torch.tensor(movers, device=dev), torch.tensor(holes, device=dev), cols
            )
            for h, m in zip(holes, movers):
                rows[h] = rows[m]
        del rows[keep:]

    def _sample_and_emit(
        self, seqs: list[_Seq], logits: torch.Tensor
    ) -> list[tuple[_Request, CompletionDelta]]:
        tokens, logprobs, tops = _sample(logits, seqs)
        events = []
        for s, token, lp, top in zip(seqs, tokens, logprobs, tops):
            req = s.req
            params = req.params
            s.tokens += 1
            s.last_token = token
            if token in params.stop_token_ids:
                s.finish, s.stop_reason = "stop", token
            elif token in self._eos and not params.ignore_eos:
                s.finish = "stop"
            else:
                stop = s.detok.add(token)
                if stop is not None:
                    s.finish, s.stop_reason = "stop", stop
            if s.finish is None and s.tokens >= req.max_tokens:
                s.finish = "length"
            if s.finish is not None and not isinstance(s.stop_reason, str):
                s.detok.flush()  # a stop string already cut the text; otherwise emit the rest
            events.append(
                (
                    req,
                    CompletionDelta(
                        index=s.index,
                        token_ids=[token],
                        logprobs=[lp],
                        top_logprobs=[top] if params.top_logprobs else None,
                        text=s.detok.take(final=s.finish is not None),
                        policy_version=req.version,
                        finish_reason=s.finish,
                        stop_reason=s.stop_reason,
                    ),
                )
            )
        self._stats.generated_tokens += len(seqs)
        return events


#: Top-p rows look for their nucleus among this many most likely tokens (``topk``,
#: cheap), tier after tier; only rows whose nucleus is wider sort their whole row.
_CANDIDATES = (1024, 8192)


#: Sampling descends a tree over the vocabulary with _FANOUT children per node and
#: _LEVELS levels (leaves padded to a multiple of _FANOUT ** (_LEVELS - 1)).
_FANOUT = 64
_LEVELS = 3


def _pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF choice of one child per row: weights [R, K] >= 0 with a positive sum,
    u [R] in [0, 1). A child of weight 0 is never chosen."""
    cum = weights.cumsum(dim=-1)  # [R, K]
    target = u * cum[:, -1]  # [R]
    idx = (cum <= target[:, None]).sum(dim=-1)  # first child whose cumulative mass > target
    # u * total can round up to total: clamp to the last child with mass.
    last = weights.shape[1] - 1 - (weights.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return torch.minimum(idx, last)


def _tree_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One exact draw per row of ``probs`` [R, V] (non-negative, positive row sums), using
    the _LEVELS uniforms of ``u`` [R, _LEVELS]; returns [R] token ids.

    Hierarchical inverse-CDF: pick a top-level block by its mass, then a child within it,
    down to a token: P(token) = product of (child mass / parent mass) = p(token). One
    flat inverse CDF over the whole vocabulary would be as exact but not robust: its V
    boundaries move with the last-bit logit differences between batch shapes, so a
    seeded request would change tokens with the company it keeps (~V x 1e-7 per token).
    Here each level compares one uniform against at most _FANOUT boundaries within one
    node, so a token changes only when a uniform falls within rounding noise of one of
    them. It is also cheap: two reductions over the probabilities and three small
    cumulative sums, against V random numbers per row for a Gumbel/exponential race.
    """
    rows, vocab = probs.shape
    f = _FANOUT
    block = f ** (_LEVELS - 1)
    n_top = -(-vocab // block)
    if n_top * block != vocab:
        probs = torch.nn.functional.pad(probs, (0, n_top * block - vocab))  # zero mass
    leaves = probs.view(rows, n_top * f, f)  # [R, N*F, F]
    mid = leaves.sum(dim=-1)  # [R, N*F]
    top = mid.view(rows, n_top, f).sum(dim=-1)  # [R, N]
    r = torch.arange(rows, device=probs.device)
    i1 = _pick(top, u[:, 0])
    i2 = _pick(mid.view(rows, n_top, f)[r, i1], u[:, 1])
    j = i1 * f + i2
    i3 = _pick(leaves[r, j], u[:, 2])
    return j * f + i3


def _sample(
    logits: torch.Tensor, seqs: list[_Seq]
) -> tuple[list[int], list[float], list[list[tuple[int, float]]]]:
    """Sample one token per row. Returns ids, processed log-probs and top alternatives."""
    x = logits.float()  # [B, V]
    vocab = x.shape[1]
    dev = x.device
    params = [s.req.params for s in seqs]
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    x = x / temps[:, None]
    # greedy rows skip truncation: it never changes the argmax, and their log-probs are
    # then those of the temperature-1 distribution (vLLM's for greedy requests too)
    filtered = [i for i, p in enumerate(params)
                if p.temperature > 0 and (0 < p.top_k < vocab or p.top_p < 1.0)]
    if filtered:
        idx = torch.tensor(filtered, device=dev)
        sub = x.index_select(0, idx)  # [F, V]
        top_k = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in filtered]
        ks = torch.tensor(top_k, device=dev)
        ps = torch.tensor([params[i].top_p for i in filtered], device=dev)
        lse = torch.logsumexp(sub, dim=-1, keepdim=True)  # [F, 1]
        largest_k = max([k for k in top_k if k < vocab], default=0)
        if all(params[i].top_p >= 1.0 for i in filtered):
            tiers = [largest_k]  # top-k only: the k most likely tokens are all we need
        else:
            tiers = sorted({min(vocab, max(c, largest_k)) for c in (*_CANDIDATES, vocab)})
        threshold = torch.empty((len(filtered), 1), device=dev)
        rows = torch.arange(len(filtered), device=dev)  # rows still without a threshold
        for k_cand in tiers:
            part = sub.index_select(0, rows)
            if k_cand < vocab:
                values = part.topk(k_cand, dim=-1).values  # [R, K] sorted
            else:
                values = part.sort(dim=-1, descending=True).values
            r_ks, r_ps, r_lse = ks[rows], ps[rows], lse[rows]
            threshold[rows] = _threshold(values, r_lse, r_ks, r_ps, vocab)
            if k_cand == vocab:
                break
            # Without top-k, the nucleus fits in the candidates iff their mass reaches
            # top_p; rows with a wider nucleus try the next tier.
            wide = (r_ks >= vocab) & ((values - r_lse).exp().sum(dim=-1) < r_ps)
            rows = rows[wide]
            if rows.numel() == 0:
                break
        x[idx] = sub.masked_fill(sub < threshold, -math.inf)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [B, 1]
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(sampled) < len(params):
        chosen = x.argmax(dim=-1)  # greedy rows
    if sampled:
        # Each row draws _LEVELS uniforms from its request's own generator (on the CPU,
        # whatever the device, so a seed means the same tokens everywhere).
        u = torch.empty((len(sampled), _LEVELS), dtype=torch.float32)
        for row, i in enumerate(sampled):
            u[row].uniform_(generator=seqs[i].generator)
        if len(sampled) == len(params):
            chosen = _tree_sample((x - lse).exp_(), u.to(dev))  # probs [B, V]
        else:
            idx = torch.tensor(sampled, device=dev)
            probs = (x.index_select(0, idx) - lse.index_select(0, idx)).exp_()  # [S, V]
            chosen[idx] = _tree_sample(probs, u.to(dev))
    chosen_lp = x.gather(1, chosen[:, None])[:, 0] - lse[:, 0]
    k = max(p.top_logprobs for p in params)
    tops: list[list[tuple[int, float]]] = [[] for _ in seqs]
    if k:
        values, ids = x.topk(k, dim=-1)
        values_l, ids_l = (values - lse).tolist(), ids.tolist()
        for i, p in enumerate(params):
            tops[i] = [
                (t, v)
                for t, v in zip(ids_l[i][: p.top_logprobs], values_l[i][: p.top_logprobs])
                if v > -math.inf
            ]
    return chosen.tolist(), chosen_lp.tolist(), tops
