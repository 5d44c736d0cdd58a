"""An engine that answers from a script: real tokens, real server, no model needed.

Agent frameworks only run their tool loops when the model emits tool calls and stop
tokens, which a tiny random model never does and a 135M model rarely does. Tests (and
CI smoke runs of the examples) need the *frameworks'* real loops — several turns, tool
messages between them, handoffs, streaming — driven through the real
:class:`~lightning.serving.PolicyServer` and capture path. :class:`ScriptedEngine` is an
:class:`~lightning.engine.base.InferenceEngine` whose "sampling" is a Python function::

    def script(req: ScriptRequest) -> Reply | str:
        if not req.tool_results:
            return Reply(tool_calls=[ToolCall("search", {"query": req.last_user})])
        return f"The answer is {req.tool_results[-1]}."

    engine = ScriptedEngine(tokenizer, script)

Each request's prompt is parsed back into the conversation (``req.messages``, the tools
offered, the tool results since the last assistant turn), so a script answers the way a
model would, from what it was shown. The reply becomes token ids through the real
tokenizer, written exactly as the chat template renders that assistant message —
``content``, then one ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
block per call, then the end-of-turn token. The policy server parses the calls back into
OpenAI ``tool_calls`` as it does for a real model, and when the framework sends the
assistant message back, the template re-renders the very same tokens: multi-turn
sequences merge as they do in production.

Log-probs:
    ``model=None``: a deterministic synthetic value per token in ``[-3, -0.01]`` (a function
    of its position and id), enough to check alignment in capture tests.
    ``model=<causal LM>``: the model's teacher-forced log-probs of the scripted tokens under
    the request's processing (temperature, top-k, top-p; greedy at temperature 1 over the
    full vocabulary, as the other engines report), so a trainer holding the same weights
    sees ratio 1 on-policy. ``update_weights`` loads into that model.

Sampling parameters that the script makes moot (``seed``, the temperature's effect on the
choice of tokens) are reported on the sample as sent; ``max_tokens``, ``stop``,
``stop_token_ids`` and ``n`` act as they do on a real engine (a reply longer than
``max_tokens`` ends with ``finish_reason="length"``).

The script's format is the template used by :mod:`lightning.models` (ChatML with
Hermes-style tools, SmolLM2's tokenizer); other templates parse to a single user message
holding the whole prompt.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from lightning.engine.base import (
    CompletionDelta,
    EngineBase,
    EngineClosedError,
    GenerationResult,
    InvalidRequestError,
    SamplingParams,
    Weights,
    WeightUpdateError,
    apply_weights,
    check_request,
    collect_stream,
    eos_ids,
)

__all__ = ["Reply", "ScriptRequest", "ScriptedEngine", "ToolCall", "load_script", "parse_chatml"]

logger = structlog.get_logger()

_BLOCK = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>\n?|\Z)", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_TOOL_RESPONSE = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.DOTALL)
_TOOLS = re.compile(r"<tools>\n(.*?)\n</tools>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One tool call of a scripted reply: the function's name and its JSON arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """What the scripted model says: text, then tool calls, then (``finish="stop"``) the
    end-of-turn token; ``finish="length"`` ends without it, as a truncated sample."""

    text: str = ""
    tool_calls: Sequence[ToolCall] = ()
    finish: str = "stop"

    def __post_init__(self) -> None:
        if self.finish not in ("stop", "length"):
            raise ValueError(f"Reply.finish must be 'stop' or 'length', got {self.finish!r}")
        if not isinstance(self.text, str):
            raise TypeError(f"Reply.text must be a str, got {type(self.text).__name__}")
        for call in self.tool_calls:
            if not isinstance(call, ToolCall):
                raise TypeError(f"Reply.tool_calls holds ToolCall objects, got {call!r}")

    def render(self) -> str:
        """The assistant message as the chat template renders it (without end-of-turn)."""
        text = self.text.rstrip() if self.tool_calls else self.text
        parts = [text] if text else []
        for call in self.tool_calls:
            body = json.dumps({"name": call.name, "arguments": dict(call.arguments)})
            parts.append(f"<tool_call>\n{body}\n</tool_call>")
        return "\n".join(parts)


@dataclass(frozen=True)
class ScriptRequest:
    """One request, as the script sees it."""

    messages: list[dict[str, Any]]
    """The conversation parsed back from the prompt: ``role``, ``content`` and, on
    assistant messages that called tools, ``tool_calls`` (``{"name", "arguments"}``)."""
    tools: list[str]
    """Names of the tools offered (empty when none)."""
    params: SamplingParams
    index: int
    """Which choice of the request (``0 .. n-1``)."""
    prompt_token_ids: list[int]
    prompt_text: str
    policy_version: int
    seed: int
    """This choice's seed (the request's ``seed``, or one drawn as a real engine draws
    it, plus ``index``): ``random.Random(req.seed)`` makes a script stochastic and
    reproducible."""

    @property
    def turn(self) -> int:
        """Assistant messages already in the conversation (0 on the first call)."""
        return sum(1 for m in self.messages if m["role"] == "assistant")

    @property
    def last_user(self) -> str:
        """Content of the last user message (``""`` if none)."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return ""

    @property
    def tool_results(self) -> list[str]:
        """Contents of the tool messages after the last assistant message."""
        out: list[str] = []
        for m in reversed(self.messages):
            if m["role"] == "assistant":
                break
            if m["role"] == "tool":
                out.append(m["content"])
        return out[::-1]


Script = Callable[[ScriptRequest], "Reply | str"]


def parse_chatml(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """``(messages, tool_names)`` of a prompt rendered by :data:`lightning.models.CHAT_TEMPLATE`
    (the trailing generation prompt is not a message). Text in another format is one user
    message holding all of it."""
    blocks = list(_BLOCK.finditer(text))
    if not blocks:
        return [{"role": "user", "content": text}], []
    messages: list[dict[str, Any]] = []
    tools: list[str] = []
    for i, m in enumerate(blocks):
        role, body = m.group(1), m.group(2)
        last = i == len(blocks) - 1
        if last and role == "assistant" and not body and not m.group(0).endswith("<|im_end|>"):
            break  # the generation prompt
        if role == "system":
            found = _TOOLS.search(body)
            if found:
                for line in found.group(1).strip().splitlines():
                    try:
                        spec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    fn = spec.get("function", spec) if isinstance(spec, dict) else {}
                    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                        tools.append(fn["name"])
                body = body.split("\n\n# Tools\n", 1)[0]
            messages.append({"role": "system", "content": body})
        elif role == "user" and body.startswith("<tool_response>"):
            for r in _TOOL_RESPONSE.finditer(body):
                messages.append({"role": "tool", "content": r.group(1)})
        elif role == "assistant":
            calls = []
            for c in _TOOL_CALL.finditer(body):
                try:
                    parsed = json.loads(c.group(1))
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, dict) and isinstance(parsed.get("name"), str):
                    calls.append({"name": parsed["name"], "arguments": parsed.get("arguments", {})})
            msg: dict[str, Any] = {"role": "assistant",
                                   "content": _TOOL_CALL.sub("", body).strip() if calls else body}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        else:
            messages.append({"role": role, "content": body})
    return messages, tools


def load_script(spec: str) -> Script:
    """``MODULE:FUNCTION`` -> a script: the function itself when it takes a request, or
    what it returns when it takes no arguments (a factory of a stateful script).

    Raises:
        ValueError: a malformed spec, a missing module or attribute, or a non-callable.
    """
    import importlib

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"--script {spec!r} must look like 'package.module:function'")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--script {spec!r}: {exc}") from exc
    if not callable(obj):
        raise ValueError(f"--script {spec!r} is not callable")
    try:
        takes_none = not inspect.signature(obj).parameters
    except (TypeError, ValueError):
        takes_none = False
    if takes_none:
        obj = obj()
        if not callable(obj):
            raise ValueError(f"--script {spec!r}: the factory returned a non-callable {obj!r}")
    return obj


class ScriptedEngine(EngineBase):
    """An :class:`~lightning.engine.base.InferenceEngine` answering from ``script``.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template (the tiny model's or
            SmolLM2's from :mod:`lightning.models`).
        script: ``(ScriptRequest) -> Reply | str``, called once per choice.
        model: optional causal LM whose teacher-forced processed log-probs are reported
            (see the module docstring); its weights are what ``update_weights`` changes.
        max_model_len: most tokens of prompt plus reply.
        max_num_seqs: most choices per request (``n``).
    """

    def __init__(
        self,
        tokenizer: Any,
        script: Script,
        *,
        model: Any = None,
        max_model_len: int = 4096,
        max_num_seqs: int = 64,
        seed: int | None = None,
    ) -> None:
        if not callable(script):
            raise TypeError(f"script must be callable, got {type(script).__name__}")
        self._tokenizer = tokenizer
        self._script = script
        self._model = model
        self._max_model_len = int(max_model_len)
        self._max_num_seqs = int(max_num_seqs)
        self._seed_rng = random.Random(seed) if seed is not None else None
        sources: list[Any] = [tokenizer]
        if model is not None:
            sources += [getattr(model, "config", None), getattr(model, "generation_config", None)]
        self._eos = eos_ids(s for s in sources if s is not None)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(
            tokenizer, "convert_tokens_to_ids") else None
        self._end_of_turn = end if isinstance(end, int) and end >= 0 else (
            min(self._eos) if self._eos else None)
        if self._end_of_turn is None:
            raise ValueError("the tokenizer has neither <|im_end|> nor an EOS token to end a reply")
        self._eos = self._eos | {self._end_of_turn}
        self._version = 0
        self._running = False
        self._closed = False
        self._in_flight = 0
        self._updating = False
        self._idle: anyio.Event | None = None
        self._resume: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._tg: Any = None
        self._warned_no_model = False
        self.requests = 0
        """Choices answered so far (a test's probe)."""

    # ------------------------------------------------------------------ the protocol

    @property
    def model(self) -> Any:
        return self._model

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        if self._closed:
            raise EngineClosedError("the engine was closed; make a new one")
        self._stop = anyio.Event()
        self._running = True
        task_status.started()
        try:
            await self._stop.wait()
        finally:
            self._running = False
            self._closed = True

    async def aclose(self) -> None:
        self._closed = True
        self._running = False
        if self._stop is not None:
            self._stop.set()
        if self._resume is not None:
            self._resume.set()

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> GenerationResult:
        return await collect_stream(self, prompt_token_ids, params)

    async def generate_stream(
        self, prompt_token_ids: Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[CompletionDelta]:
        self._check_running()
        prompt, params, max_tokens, seed = check_request(
            prompt_token_ids, params, vocab_size=len(self._tokenizer),
            max_model_len=self._max_model_len, max_num_seqs=self._max_num_seqs,
            max_top_logprobs=20, seed_rng=self._seed_rng,
        )
        while self._updating:  # new requests wait for a weight update in progress
            assert self._resume is not None
            await self._resume.wait()
            self._check_running()
        self._in_flight += 1
        version = self._version
        try:
            prompt_text = self._tokenizer.decode(prompt, skip_special_tokens=False)
            messages, tools = parse_chatml(prompt_text)
            for index in range(params.n):
                request = ScriptRequest(messages=messages, tools=tools, params=params,
                                        index=index, prompt_token_ids=prompt,
                                        prompt_text=prompt_text, policy_version=version,
                                        seed=seed + index)
                ids, finish, stop_reason = self._reply_ids(request, max_tokens)
                logprobs = await self._logprobs(prompt, ids, params)
                self.requests += 1
                emitted = ""
                for pos, (tid, lp) in enumerate(zip(ids, logprobs, strict=True)):
                    await anyio.lowlevel.checkpoint()
                    self._check_running()
                    last = pos == len(ids) - 1
                    out = ""
                    # text lags the ids while it may still be cut by a stop string or
                    # ends in an incomplete UTF-8 sequence (as a real engine's does)
                    full = "" if params.stop and not last else self.decode(ids[: pos + 1])
                    if last or (full and not full.endswith("\ufffd")):
                        if last and isinstance(stop_reason, str):
                            full = full[: full.find(stop_reason)]
                        out, emitted = full[len(emitted):], full
                    yield CompletionDelta(
                        index=index, token_ids=[tid], logprobs=[lp],
                        top_logprobs=self._top(tid, lp, params.top_logprobs),
                        text=out, policy_version=version,
                        finish_reason=finish if last else None,
                        stop_reason=stop_reason if last else None,
                    )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._idle is not None:
                self._idle.set()

    async def update_weights(self, weights: Weights, *, version: int | None = None) -> int:
        self._check_running()
        new = self._version + 1 if version is None else int(version)
        if new <= self._version:
            raise WeightUpdateError(
                f"version {new} is not newer than the current policy_version {self._version}")
        while self._updating:
            assert self._resume is not None
            await self._resume.wait()
        self._updating = True
        self._resume = anyio.Event()
        try:
            while self._in_flight:  # requests in flight finish on the old weights
                self._idle = anyio.Event()
                await self._idle.wait()
            await anyio.to_thread.run_sync(self._apply, weights)
            self._version = new
        finally:
            self._updating = False
            self._resume.set()
        return self._version

    # ------------------------------------------------------------------ internals

    def _check_running(self) -> None:
        if not self._running:
            raise EngineClosedError("the scripted engine is not running: use `async with "
                                    "engine:` or start engine.serve in a task group")

    def _reply_ids(self, request: ScriptRequest, max_tokens: int) -> tuple[list[int], str, Any]:
        reply = self._script(request)
        if isinstance(reply, str):
            reply = Reply(text=reply)
        if not isinstance(reply, Reply):
            raise InvalidRequestError(
                f"the script returned {type(reply).__name__}; it must return a Reply or a str")
        ids = list(self._tokenizer.encode(reply.render(), add_special_tokens=False))
        finish, stop_reason = reply.finish, None
        if reply.finish == "stop":
            ids.append(self._end_of_turn)
        params = request.params
        # stop token ids and stop strings end the reply early, as on a real engine
        for pos, tid in enumerate(ids):
            if tid in params.stop_token_ids and tid not in self._eos:
                ids, finish, stop_reason = ids[: pos + 1], "stop", tid
                break
        if params.stop:
            for pos in range(len(ids)):
                text = self._tokenizer.decode(ids[: pos + 1], skip_special_tokens=True)
                hit = [s for s in params.stop if s in text]
                if hit:
                    ids, finish, stop_reason = ids[: pos + 1], "stop", min(hit, key=text.find)
                    break
        if len(ids) > max_tokens:
            ids, finish, stop_reason = ids[:max_tokens], "length", None
        if not ids:  # an empty reply without end-of-turn: one token, so a choice exists
            ids, finish = [self._end_of_turn], "stop"
        return ids, finish, stop_reason

    async def _logprobs(self, prompt: list[int], ids: list[int], params: SamplingParams
                        ) -> list[float]:
        if self._model is None:
            return [-0.01 - ((tid * 7 + pos * 13) % 300) / 100.0 for pos, tid in enumerate(ids)]
        return await anyio.to_thread.run_sync(self._score, prompt, ids, params)

    def _score(self, prompt: list[int], ids: list[int], params: SamplingParams) -> list[float]:
        import torch

        from lightning.kernels.logprobs.reference import processed_logits

        with torch.no_grad():
            device = next(self._model.parameters()).device
            seq = torch.tensor([prompt + ids], device=device)
            logits = self._model(seq).logits[0, len(prompt) - 1 : -1].float()  # [T, V]
            target = torch.tensor(ids, device=device)
            if params.greedy:
                z = logits
            else:
                z = logits / params.temperature
                n = len(ids)
                z = processed_logits(z, torch.full((n,), params.top_k), torch.full((n,), params.top_p),
                                     keep=target)
            return z.log_softmax(-1).gather(1, target[:, None])[:, 0].tolist()

    def _top(self, tid: int, lp: float, k: int) -> list[list[tuple[int, float]]] | None:
        if not k:
            return None
        vocab = len(self._tokenizer)
        return [[(tid, lp)] + [((tid + j) % vocab, lp - j) for j in range(1, k)]]

    def _apply(self, weights: Weights) -> None:
        if self._model is None:
            if not self._warned_no_model:
                self._warned_no_model = True
                logger.warning("scripted_engine.weights_not_applied",
                               reason="the scripted engine has no model; only the version moves")
            return
        apply_weights(self._model, weights)
