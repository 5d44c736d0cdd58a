"""The inference-engine interface: what the policy server needs from an engine.

An engine turns prompt token ids into sampled token ids with their log-probs and the
policy version that produced them, serves many requests concurrently, and swaps in new
weights from the trainer. Implementations (``torch_engine.TorchEngine``, later a vLLM
engine) satisfy :class:`InferenceEngine` structurally; :class:`EngineBase` holds the
properties, chat rendering and ``async with`` they share.

Weight updates and in-flight requests (the contract every engine keeps)
    A response is never produced by two policies. ``update_weights`` stops admitting new
    requests, lets every request already running *finish on the old weights*, then swaps
    and bumps ``policy_version``; requests that arrived meanwhile start on the new
    weights. Every :class:`Choice` and :class:`CompletionDelta` carries the version that
    produced all of its tokens. The cost: the update waits for the longest running
    request (bounded by its ``max_tokens``), and new requests wait for the update.

Errors::

    LightningError
    └── EngineError                     the engine failed or is unusable
        ├── EngineClosedError           used before start or after ``aclose()`` (RuntimeError)
        ├── InvalidRequestError         bad prompt or sampling parameters (ValueError)
        │   └── ContextLengthError      prompt (+ max_tokens) exceeds ``max_model_len``
        └── WeightUpdateError           weights do not fit the model (ValueError)
"""

from __future__ import annotations

import random
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal, Protocol, runtime_checkable

import anyio
import msgspec
from anyio.abc import TaskGroup

from lightning._errors import LightningError

__all__ = [
    "Choice",
    "CompletionDelta",
    "ContextLengthError",
    "EngineBase",
    "EngineClosedError",
    "EngineError",
    "FinishReason",
    "GenerationResult",
    "InferenceEngine",
    "InvalidRequestError",
    "SamplingParams",
    "WeightUpdateError",
    "Weights",
    "apply_weights",
    "check_request",
    "check_weight_shapes",
    "collect_stream",
    "eos_ids",
    "render_chat",
]

FinishReason = Literal["stop", "length"]

#: What ``update_weights`` accepts: a state dict (names as in ``model.state_dict()``, a
#: subset is fine) or a function that changes the model in place (called under no-grad).
Weights = Mapping[str, Any] | Callable[[Any], None]


class EngineError(LightningError):
    """The inference engine failed or cannot be used."""


class EngineClosedError(EngineError, RuntimeError):
    """The engine is not running: start it (``async with engine``) or stop using it after
    ``aclose()``."""


class InvalidRequestError(EngineError, ValueError):
    """A request's prompt or sampling parameters are invalid."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or prompt plus ``max_tokens``, does not fit in ``max_model_len``.

    ``limit`` is the engine's ``max_model_len``; ``requested`` is what the request needs.
    """

    def __init__(self, message: str, *, limit: int, requested: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.requested = requested


class WeightUpdateError(EngineError, ValueError):
    """New weights do not match the model (unknown names or wrong shapes); nothing was
    changed."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How to sample one request. Checked on construction (``InvalidRequestError``)."""

    max_tokens: int | None = 256
    """Most tokens to generate per choice; ``None`` means up to ``max_model_len``."""
    temperature: float = 1.0
    """Softmax temperature; ``0`` means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; ``0`` (or ``-1``) keeps all."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one; it is cut from ``text``."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (kept in ``token_ids``, like EOS)."""
    seed: int | None = None
    """Seed of this request's own random stream: same seed, same tokens, whatever else
    is batched with it. ``None`` draws a fresh seed."""
    n: int = 1
    """Number of choices sampled from the same prompt (they share the prefill)."""
    top_logprobs: int = 0
    """How many most likely alternatives to report per token (0: none)."""
    ignore_eos: bool = False
    """Keep generating past EOS (stop strings and stop_token_ids still apply)."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequestError(f"top_k must be >= 0 (or -1 for all), got {self.top_k}")
        if self.n < 1:
            raise InvalidRequestError(f"n must be >= 1, got {self.n}")
        if self.top_logprobs < 0:
            raise InvalidRequestError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Choice(msgspec.Struct, frozen=True, kw_only=True):
    """One sampled continuation of a prompt."""

    index: int
    token_ids: list[int]
    """Every sampled token, including a final EOS/stop token and the token that completed
    a stop string (``text`` is cut before the stop string, the ids are not)."""
    logprobs: list[float]
    """Log-prob of each sampled token under the *processed* distribution: log-softmax of
    the logits after temperature and top-k/top-p masking (vLLM's processed_logprobs). For
    greedy requests: at temperature 1 over the full vocabulary."""
    top_logprobs: list[list[tuple[int, float]]] | None
    """Per token, the ``top_logprobs`` most likely ``(token_id, logprob)`` of the processed
    distribution, most likely first; ``None`` when not requested."""
    text: str
    finish_reason: FinishReason
    stop_reason: str | int | None
    """The stop string or stop token id that ended the choice; ``None`` for EOS/length."""
    policy_version: int


class GenerationResult(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to one ``generate`` call."""

    prompt_token_ids: list[int]
    choices: list[Choice]
    policy_version: int
    """The version that produced every token of every choice."""


class CompletionDelta(msgspec.Struct, frozen=True, kw_only=True):
    """An increment of one choice from ``generate_stream``.

    Concatenating a choice's deltas gives its :class:`Choice`. Token ids are sent as soon
    as they are sampled; text may lag behind them (incomplete UTF-8, or a possible prefix
    of a stop string, is held back until it is certain). The last delta of a choice has
    ``finish_reason`` set.
    """

    index: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    text: str
    policy_version: int
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None


@runtime_checkable
class InferenceEngine(Protocol):
    """What the policy server and the trainer use. Implementations: ``TorchEngine``.

    Lifecycle: ``async with engine:`` (or ``await tg.start(engine.serve)`` inside a task
    group, then ``await engine.aclose()``). ``generate``/``generate_stream`` before start
    or after close raise :class:`EngineClosedError`.
    """

    @property
    def policy_version(self) -> int:
        """Version of the weights new requests are served with."""
        ...

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt + generated) one sequence may hold."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (``PreTrainedTokenizerBase``) of the served model."""
        ...

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end a choice unless ``ignore_eos`` is set."""
        ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Render an OpenAI-style conversation (and tools) with the model's chat template
        and tokenize it. Raises ``InvalidRequestError`` if tools are given but the
        template cannot render them."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        ...

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> GenerationResult:
        """Sample ``params.n`` continuations of the prompt."""
        ...

    def generate_stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[CompletionDelta]:
        """Like ``generate``, yielding increments as they are sampled. Closing the
        iterator early cancels the request."""
        ...

    async def update_weights(self, weights: Weights, *, version: int | None = None) -> int:
        """Swap in new weights in place and return the new ``policy_version`` (``version``,
        which must exceed the current one, or current + 1). Requests in flight finish on
        the old weights first; see the module docstring."""
        ...

    async def serve(self, *, task_status: Any = ...) -> None:
        """Run the engine until ``aclose()``; calls ``task_status.started()`` once ready."""
        ...

    async def aclose(self) -> None:
        """Stop: waiting and running requests fail with ``EngineClosedError``."""
        ...


class EngineBase:
    """What every engine's protocol surface shares: the read-only properties, chat
    rendering, decoding and ``async with`` (``serve`` in a task group of its own, then
    ``aclose``). A subclass sets ``_version``, ``_max_model_len``, ``_tokenizer`` and
    ``_eos`` and implements ``serve``/``aclose``/``generate``...; ``_check_started`` is the
    hook for an engine whose tokenizer exists only once it has started."""

    _version: int
    _max_model_len: int
    _tokenizer: Any
    _eos: frozenset[int]
    _tg: TaskGroup | None = None

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self) -> Any:
        """The engine's own copy of the tokenizer it was given: encode and decode with it
        freely, but do not call it with truncation or padding (that reconfigures it)."""
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def _check_started(self) -> None:
        """Raise :class:`EngineClosedError` where the engine cannot render yet."""

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        self._check_started()
        return render_chat(
            self._tokenizer,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        self._check_started()
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Any:
        """``serve`` started in a task group of its own (closed again if the start fails)."""
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self.serve)
        except BaseException:
            await tg.__aexit__(*sys.exc_info())
            raise
        self._tg = tg
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        """``aclose()``, then the task group of ``__aenter__`` ends."""
        tg, self._tg = self._tg, None
        await self.aclose()
        assert tg is not None
        return await tg.__aexit__(*exc_info)


async def collect_stream(
    engine: Any, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
) -> GenerationResult:
    """``generate`` for an engine that streams: gathers ``engine.generate_stream``'s deltas
    into one :class:`Choice` per sample (the iterator is closed on every exit)."""
    params = SamplingParams() if params is None else params
    prompt = [int(t) for t in prompt_token_ids]
    parts: list[list[CompletionDelta]] = [[] for _ in range(params.n)]
    async with aclosing(engine.generate_stream(prompt, params)) as stream:
        async for delta in stream:
            parts[delta.index].append(delta)
    choices = []
    for index, deltas in enumerate(parts):
        last = deltas[-1]
        assert last.finish_reason is not None
        top = None
        if params.top_logprobs:
            top = [t for d in deltas for t in (d.top_logprobs or [])]
        choices.append(
            Choice(
                index=index,
                token_ids=[t for d in deltas for t in d.token_ids],
                logprobs=[lp for d in deltas for lp in d.logprobs],
                top_logprobs=top,
                text="".join(d.text for d in deltas),
                finish_reason=last.finish_reason,
                stop_reason=last.stop_reason,
                policy_version=last.policy_version,
            )
        )
    return GenerationResult(
        prompt_token_ids=prompt, choices=choices, policy_version=choices[0].policy_version
    )


# ------------------------------------------------------------ shared by the engines


def check_request(
    prompt_token_ids: Sequence[int],
    params: SamplingParams | None,
    *,
    vocab_size: int,
    max_model_len: int,
    max_num_seqs: int,
    max_top_logprobs: int,
    seed_rng: random.Random | None,
) -> tuple[list[int], SamplingParams, int, int]:
    """Validate a request: ``(prompt, params, max_tokens, seed)``.

    ``max_tokens`` defaults to what fits in ``max_model_len``; ``seed`` to a fresh one
    (from ``seed_rng`` when the engine was seeded).

    Raises:
        InvalidRequestError: wrong params type, empty prompt, ids outside the vocabulary,
            too many top log-probs or choices.
        ContextLengthError: the prompt (+ ``max_tokens``) does not fit.
    """
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
    params = _typed(params)
    prompt = [int(t) for t in prompt_token_ids]
    if not prompt:
        raise InvalidRequestError("the prompt is empty: send at least one token id")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(f"stop_token_ids out of range [0, {vocab_size}): {bad[:5]}")
    if params.top_logprobs > max_top_logprobs:
        raise InvalidRequestError(
            f"top_logprobs={params.top_logprobs} exceeds the most this engine returns "
            f"({max_top_logprobs})"
        )
    if params.n > max_num_seqs:
        raise InvalidRequestError(
            f"n={params.n} exceeds max_num_seqs={max_num_seqs}; lower n or raise max_num_seqs"
        )
    limit = max_model_len
    if len(prompt) >= limit:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but max_model_len is {limit} (room for at "
            "least one generated token is needed); shorten the prompt",
            limit=limit,
            requested=len(prompt) + 1,
        )
    if params.max_tokens is None:
        max_tokens = limit - len(prompt)
    else:
        max_tokens = params.max_tokens
        if len(prompt) + max_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
                f"{len(prompt) + max_tokens} exceeds max_model_len {limit}; lower max_tokens "
                f"to at most {limit - len(prompt)} or shorten the prompt",
                limit=limit,
                requested=len(prompt) + max_tokens,
            )
    seed = params.seed
    if seed is None:
        seed = seed_rng.getrandbits(63) if seed_rng else secrets.randbits(63)
    return prompt, params, max_tokens, seed


def _typed(params: SamplingParams) -> SamplingParams:
    """``params`` with every field of its declared type (a Struct built in Python is not
    type-checked): a ``seed=1.5`` must fail its own request here, not the engine step it
    would share with others.

    Raises:
        InvalidRequestError: a field of the wrong type, naming it.
    """
    try:
        return msgspec.convert(msgspec.structs.asdict(params), SamplingParams)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid sampling parameters: {exc}") from exc


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """The prompt token ids of ``messages`` through ``tokenizer``'s chat template.

    Raises:
        InvalidRequestError: no chat template, or tools given to a template without them.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidRequestError(
            "the tokenizer has no chat template: send token ids (completions) or load a "
            "checkpoint whose tokenizer_config/chat_template.jinja defines one"
        )
    if tools and isinstance(template, str) and "tools" not in template:
        raise InvalidRequestError(
            "this model's chat template does not render tools, so they would be dropped "
            "silently; use a template that does (lightning.models.CHAT_TEMPLATE)"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tools=[dict(t) for t in tools] if tools else None,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **template_kwargs,
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def eos_ids(sources: Iterable[Any]) -> frozenset[int]:
    """Every ``eos_token_id`` (an int or a list) of ``sources`` (configs, tokenizer)."""
    ids: set[int] = set()
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def apply_weights(model: Any, weights: Weights) -> None:
    """Load ``weights`` into a torch ``model`` in place (under no-grad): a state dict (a
    subset of ``state_dict()`` names, shapes checked) or a function of the model.

    Raises:
        WeightUpdateError: an unknown name or shape, or the function failed.
    """
    import torch

    with torch.no_grad():
        if callable(weights):
            try:
                weights(model)
            except Exception as exc:
                raise WeightUpdateError(
                    f"the weight-update function failed ({exc!r}); the model may be "
                    "partially updated and the version was not bumped"
                ) from exc
            return
        targets = dict(model.named_parameters(remove_duplicate=False))
        targets.update(model.named_buffers(remove_duplicate=False))
        tensors = {k: torch.as_tensor(v) for k, v in weights.items()}
        check_weight_shapes(tensors, {k: tuple(t.shape) for k, t in targets.items()})
        for k, t in tensors.items():
            targets[k].copy_(t)


def check_weight_shapes(given: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every name of ``given`` is a model weight (``state_dict()`` names) of its shape.

    Raises:
        WeightUpdateError: an unknown name, or a shape that differs.
    """
    unknown = [k for k in given if k not in shapes]
    if unknown:
        raise WeightUpdateError(
            f"{len(unknown)} weight name(s) are not in the model, e.g. {unknown[:3]}; "
            f"use the Hugging Face state_dict() names such as {list(shapes)[:2]}"
        )
    wrong = [
        f"{k}: got {tuple(t.shape)}, expected {tuple(shapes[k])}"
        for k, t in given.items()
        if tuple(t.shape) != tuple(shapes[k])
    ]
    if wrong:
        raise WeightUpdateError(f"weight shapes do not match the model: {wrong[:3]}")
