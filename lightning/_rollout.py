"""The public recording API: ``@rollout``, rewards, spans and transitions.

Rollout context
    A decorated call opens a :class:`RolloutContext` held in a context variable, so
    concurrent rollouts in one event loop (each task has its own context) and in threads
    (``asyncio.to_thread``, ``anyio.to_thread`` and ``contextvars.copy_context().run``
    carry it; a bare ``threading.Thread`` does not) stay separate.

Nested rollouts
    A decorated call made inside another rollout is, by default, a *child* rollout: its
    own id, its own trajectory and reward, with ``parent_id`` naming the outer one; the
    outer rollout continues after it returns and records nothing of the child's calls.
    ``@rollout(nested="inline")`` makes the inner call part of the outer rollout instead
    (no new rollout is opened; its return value is not a reward).

Rewards
    ``emit_reward(0.7)`` or ``emit_reward({"correct": 1.0, "format": 0.5},
    primary="correct")``. A numeric (or bool) return value of the decorated function is
    the final reward; emitted rewards stay as intermediate rewards placed after the
    transition they follow. An exception marks the rollout failed and propagates to the
    caller unchanged; cancellation marks it cancelled.

Outside a rollout
    ``emit_reward``, ``record_transition``, ``span`` and ``emit_span`` called with no
    rollout active follow the ``outside_rollout`` setting: ``"warn"`` (default: a
    :class:`LightningWarning`, and the call records nothing), ``"ignore"`` or
    ``"raise"`` (:class:`~lightning.RolloutError`). Invalid input (a NaN reward, a reward
    dict without a primary key) raises ``ValueError``/``TypeError``: that is a bug in the
    caller, not a delivery problem.

Before ``lightning.init()`` the decorator still runs the function and tracks context,
but nothing is sent (logged once).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
import numbers
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, ParamSpec, TypeVar, overload

import msgspec
import structlog

from ._errors import RolloutError
from ._lifecycle import get_runtime
from ._protocol import (
    Reward,
    RolloutEnd,
    RolloutStart,
    Sampling,
    Span,
    Transition,
    pack_ids,
    pack_logprobs,
)
from ._sampling import make_sampling

logger = structlog.get_logger()

__all__ = [
    "LightningWarning",
    "RolloutContext",
    "SpanHandle",
    "current_rollout",
    "emit_reward",
    "emit_span",
    "record_transition",
    "rollout",
    "rollout_options",
    "span",
    "tool",
]

P = ParamSpec("P")
R = TypeVar("R")


class LightningWarning(UserWarning):
    """Something was not recorded (for example a reward emitted outside a rollout)."""


class RolloutContext:
    """The rollout a piece of code runs in (read it with :func:`current_rollout`)."""

    __slots__ = (
        "rollout_id",
        "name",
        "group_key",
        "attempt",
        "metadata",
        "parent",
        "_lock",
        "_n_transitions",
        "_finished",
        "_otel",
        "_shared",
    )

    def __init__(
        self,
        *,
        rollout_id: str,
        name: str,
        group_key: str | None,
        attempt: int,
        metadata: dict[str, Any],
        parent: RolloutContext | None,
    ) -> None:
        self.rollout_id = rollout_id
        self.name = name
        self.group_key = group_key
        self.attempt = attempt
        self.metadata = metadata
        self.parent = parent
        self._lock = threading.Lock()
        self._n_transitions = 0
        self._finished = False
        self._otel: Any = None
        self._shared = False

    @property
    def n_transitions(self) -> int:
        """Transitions this process recorded in the rollout (its ``openai`` calls and
        :func:`record_transition`); calls captured server-side are not counted here."""
        return self._n_transitions

    @property
    def headers(self) -> dict[str, str]:
        """``{"X-Lightning-Rollout-Id": rollout_id}``: the header that makes the policy
        server capture a call of any HTTP client (not the ``openai`` package: httpx,
        another language) into this rollout.

        Reading it (or :attr:`base_url`) sends the rollout's start to the daemon at once
        (within ``linger_s``) instead of with the rollout's other events (up to
        ``open_linger_s``), so the first such call need not wait for it. The server
        waits for a start that has not arrived yet anyway (``rollout_start_wait_s``), so
        naming :attr:`rollout_id` directly works too, only the first call may be slower.
        """
        self._share()
        return {"X-Lightning-Rollout-Id": self.rollout_id}

    @property
    def base_url(self) -> str:
        """The policy server's per-rollout OpenAI base URL for this rollout
        (``.../rollouts/{id}/v1``, from :func:`lightning.llm`): every call made to it is
        captured server-side into this rollout, once (an ``openai`` client pointed at it
        is not captured a second time in the app). See :attr:`headers`."""
        from urllib.parse import quote

        from ._lifecycle import llm

        self._share()
        root = llm().base_url.rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        return f"{root}/rollouts/{quote(self.rollout_id, safe='')}/v1"

    def _share(self) -> None:
        if not self._shared:
            self._shared = True
            rt = get_runtime()
            if rt is not None:
                rt.send_soon()

    @property
    def finished(self) -> bool:
        return self._finished

    def __repr__(self) -> str:
        return (
            f"RolloutContext(rollout_id={self.rollout_id!r}, name={self.name!r}, "
            f"group_key={self.group_key!r}, attempt={self.attempt})"
        )


_current: contextvars.ContextVar[RolloutContext | None] = contextvars.ContextVar(
    "lightning_rollout", default=None
)
_current_span: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lightning_span", default=None
)
_options: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "lightning_rollout_options", default=None
)
_warned_no_runtime = False

# OpenTelemetry export (lightning.otel): None costs one global read per recorded event.
# With "opentelemetry.trace" imported and an SDK TracerProvider set globally, the first
# rollout installs the exporter (LIGHTNING_OTEL_EXPORT=off disables that).
_observer: Any = None
_otel_auto = os.environ.get("LIGHTNING_OTEL_EXPORT", "auto").lower() not in ("0", "off", "false")
_auto_instrument: Any = None
_otel_logged: set[str] = set()


def _get_observer() -> Any:
    global _auto_instrument
    obs = _observer
    if obs is None and _otel_auto and "opentelemetry.trace" in sys.modules:
        try:
            if _auto_instrument is None:
                from .otel._export import auto_instrument as _auto_instrument
            obs = _auto_instrument()
        except Exception as exc:  # noqa: BLE001 - tracing must never break the app
            _otel_failed("install", exc)
    return obs


def _otel_failed(where: str, exc: BaseException) -> None:
    """Log a failure of the span export once per place; the app goes on."""
    key = "otel:" + where
    if key not in _otel_logged:
        _otel_logged.add(key)
        logger.warning("otel.export_failed", where=where,
                       error=f"{type(exc).__qualname__}: {exc}",
                       hint="rollouts are recorded as usual; only their spans are missing")



def current_rollout() -> RolloutContext | None:
    """The innermost active rollout, or None."""
    return _current.get()


def _submit(event: Any) -> None:
    rt = get_runtime()
    if rt is not None:
        rt.submit(event)
        return
    global _warned_no_runtime
    if not _warned_no_runtime:
        _warned_no_runtime = True
        logger.warning(
            "rollout.not_recorded",
            reason="lightning.init() was not called",
            hint="call lightning.init() (or use lightning.session()) at start-up",
        )


def _outside_policy() -> str:
    rt = get_runtime()
    if rt is not None:
        return rt.config.outside_rollout
    return os.environ.get("LIGHTNING_OUTSIDE_ROLLOUT", "warn")


def _resolve(what: str, rollout: RolloutContext | None) -> RolloutContext | None:
    """The rollout to record into, applying the outside-rollout policy."""
    ctx = rollout if rollout is not None else _current.get()
    if ctx is not None and not ctx._finished:
        return ctx
    if ctx is not None:
        msg = (
            f"{what} after rollout {ctx.rollout_id} ({ctx.name}) finished: nothing was "
            "recorded. Emit rewards before the decorated function returns."
        )
    else:
        msg = (
            f"{what} outside a rollout: nothing was recorded. Call it inside a function "
            "decorated with @lightning.rollout (or pass rollout=...)."
        )
    policy = _outside_policy()
    if policy == "raise":
        raise RolloutError(msg, rollout_id=ctx.rollout_id if ctx else None)
    if policy == "warn":
        warnings.warn(msg, LightningWarning, stacklevel=3)
    return None


def _builtins(value: Any) -> Any:
    """JSON-like copy of ``value``; objects msgpack cannot carry become their repr."""
    return msgspec.to_builtins(value, enc_hook=repr, str_keys=True)


# ------------------------------------------------------------------ the decorator


@contextlib.contextmanager
def rollout_options(
    *,
    group_key: str | None = None,
    attempt: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Set the group key, attempt and extra metadata of rollouts started in this block.

    Used by runners that call an unmodified agent ``group_size`` times per task. Applies
    to top-level rollouts only (nested children keep their own settings).
    """
    opts = dict(_options.get() or {})
    if group_key is not None:
        opts["group_key"] = str(group_key)
    if attempt is not None:
        opts["attempt"] = int(attempt)
    if metadata:
        opts["metadata"] = {**opts.get("metadata", {}), **metadata}
    token = _options.set(opts)
    try:
        yield
    finally:
        _options.reset(token)


class _RolloutSpec:
    __slots__ = ("name", "group_key", "metadata", "nested")

    def __init__(self, name, group_key, metadata, nested) -> None:
        self.name = name
        self.group_key = group_key
        self.metadata = metadata
        self.nested = nested

    def begin(self, args: tuple, kwargs: dict) -> tuple[RolloutContext | None, Any]:
        parent = _current.get()
        if parent is not None and self.nested == "inline":
            return None, None
        group_key = self.group_key
        if callable(group_key):
            group_key = group_key(*args, **kwargs)
        attempt = 0
        metadata = dict(self.metadata)
        if parent is None:
            opts = _options.get()
            if opts:
                group_key = opts.get("group_key", group_key)
                attempt = opts.get("attempt", attempt)
                metadata.update(opts.get("metadata", {}))
        ctx = RolloutContext(
            rollout_id=uuid.uuid4().hex,
            name=self.name,
            group_key=None if group_key is None else str(group_key),
            attempt=attempt,
            metadata=metadata,
            parent=parent,
        )
        token = _current.set(ctx)
        obs = _get_observer()
        if obs is not None:
            try:
                ids = obs.rollout_begin(ctx)
                if ids:
                    metadata = {**metadata, **ids}
            except Exception as exc:  # noqa: BLE001
                _otel_failed("rollout", exc)
        _submit(
            RolloutStart(
                rollout_id=ctx.rollout_id,
                name=ctx.name,
                group_key=ctx.group_key,
                attempt=attempt,
                parent_id=parent.rollout_id if parent else None,
                metadata=_builtins(metadata) if metadata else {},
                started_at=time.time(),
            )
        )
        return ctx, token

    def end(self, ctx: RolloutContext, token: Any, exc: BaseException | None, result: Any) -> None:
        _current.reset(token)
        final = None
        status: Literal["completed", "failed", "cancelled"] = "completed"
        error = None
        if exc is not None:
            status = "failed" if isinstance(exc, Exception) else "cancelled"
            error = f"{type(exc).__qualname__}: {exc}"[:4000]
        elif isinstance(result, (int, float)):
            final = float(result)
            if not math.isfinite(final):
                warnings.warn(
                    f"rollout {ctx.name!r} returned {result}: a non-finite final reward is "
                    "not recorded",
                    LightningWarning,
                    stacklevel=4,
                )
                final = None
        with ctx._lock:
            ctx._finished = True
            n = ctx._n_transitions
        _submit(
            RolloutEnd(
                rollout_id=ctx.rollout_id,
                status=status,
                final_reward=final,
                error=error,
                n_transitions=n,
                ended_at=time.time(),
            )
        )
        if ctx._otel is not None:  # ended by the exporter that began it
            try:
                ctx._otel[2].rollout_end(ctx, status, final, error)
            except Exception as err:  # noqa: BLE001 - tracing must never break the app
                _otel_failed("rollout", err)


@overload
def rollout(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def rollout(
    *,
    name: str | None = None,
    group_key: str | Callable[..., Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    nested: Literal["child", "inline"] = "child",
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def rollout(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    group_key: str | Callable[..., Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    nested: Literal["child", "inline"] = "child",
) -> Any:
    """Make each call of a sync or async function one rollout (one trajectory).

    ``name`` defaults to the function's qualified name. ``group_key`` groups rollouts
    of the same task for GRPO/RLOO: a string, or a callable receiving the function's
    arguments and returning one. ``metadata`` is attached to every rollout.
    The wrapped function keeps its signature and return value.
    """
    if nested not in ("child", "inline"):
        raise ValueError(f"nested must be 'child' or 'inline', got {nested!r}")
    _check_args("rollout", name=(name, (str, type(None)), "a str or None"),
                metadata=(metadata, (Mapping, type(None)), "a mapping or None"))

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"@lightning.rollout cannot wrap generator {func.__qualname__}: wrap the "
                "function that consumes it, so the rollout ends when the work does"
            )
        spec = _RolloutSpec(
            name or func.__qualname__, group_key, dict(metadata or {}), nested
        )
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                ctx, token = spec.begin(args, kwargs)
                if ctx is None:
                    return await func(*args, **kwargs)
                try:
                    result = await func(*args, **kwargs)
                except BaseException as exc:
                    spec.end(ctx, token, exc, None)
                    raise
                spec.end(ctx, token, None, result)
                return result

            async_wrapper.__lightning_rollout__ = spec.name  # type: ignore[attr-defined]
            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx, token = spec.begin(args, kwargs)
            if ctx is None:
                return func(*args, **kwargs)
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                spec.end(ctx, token, exc, None)
                raise
            spec.end(ctx, token, None, result)
            return result

        wrapper.__lightning_rollout__ = spec.name  # type: ignore[attr-defined]
        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate


# ------------------------------------------------------------------ recording


def emit_reward(
    value: float | Mapping[str, float],
    *,
    name: str | None = None,
    primary: str | None = None,
    rollout: RolloutContext | None = None,
) -> None:
    """Record a reward in the current rollout, after the last recorded transition.

    ``value`` is a number, or a mapping of named rewards; with several names,
    ``primary`` says which one is the reward (the others are kept as components).
    """
    _check_args("emit_reward", name=(name, (str, type(None)), "a str or None"))
    if isinstance(value, Mapping):
        if not value:
            raise ValueError("emit_reward got an empty mapping: give at least one reward")
        components = {}
        for k, v in value.items():
            components[str(k)] = _finite(v, f"reward {k!r}")
        if primary is None:
            if len(components) == 1:
                primary = next(iter(components))
            elif "reward" in components:
                primary = "reward"
            else:
                raise ValueError(
                    f"emit_reward got several rewards {sorted(components)}: say which one "
                    "is the reward with primary=NAME"
                )
        if primary not in components:
            raise ValueError(f"primary={primary!r} is not one of {sorted(components)}")
        reward_name, reward_value = primary, components[primary]
    else:
        if primary is not None:
            raise ValueError("primary= only applies when value is a mapping of rewards")
        reward_name = name or "reward"
        reward_value = _finite(value, f"reward {reward_name!r}")
        components = {}
    ctx = _resolve("emit_reward", rollout)
    if ctx is None:
        return
    with ctx._lock:
        after = ctx._n_transitions
    event = Reward(
        rollout_id=ctx.rollout_id,
        value=reward_value,
        name=reward_name,
        components=components,
        after=after,
        created_at=time.time(),
    )
    _submit(event)
    if _observer is not None:
        try:
            _observer.reward(ctx, event)
        except Exception as exc:  # noqa: BLE001
            _otel_failed("reward", exc)


def _finite(value: Any, what: str) -> float:
    if not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a real number, got {type(value).__name__} (convert it with float())"
        )
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{what} is {v}: rewards must be finite numbers")
    return v


def _check_args(what: str, **args: tuple[Any, Any, str]) -> None:
    """Raise TypeError naming the first argument whose value is not of its type.

    The daemon refuses an event with a field of the wrong type; checked here, the mistake
    reaches the caller at the call instead of a log line later. bool is not an int here.
    """
    for name, (value, types, expected) in args.items():
        bad_bool = isinstance(value, bool) and types in (int, numbers.Real)
        if bad_bool or not isinstance(value, types):
            raise TypeError(f"{what}: {name} must be {expected}, got {value!r}")


def record_transition(
    prompt_ids: Any,
    response_ids: Any,
    logprobs: Any = None,
    *,
    policy_version: int = -1,
    model: str = "",
    finish_reason: str = "",
    trainable: bool = True,
    latency_s: float = 0.0,
    metadata: Mapping[str, Any] | None = None,
    rollout: RolloutContext | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    logprob_convention: Literal["processed", "raw"] | None = None,
) -> int | None:
    """Record one LLM call directly: prompt and response token ids, sampler log-probs.

    For engines the automatic capture does not cover, and for tests. Token ids may be a
    list, ``array('i')``, numpy array, torch tensor or packed int32 bytes; ``logprobs``
    must have one entry per response token. Returns the transition's index in its
    rollout (None if nothing was recorded).

    ``temperature`` (0 = greedy), ``top_p`` and ``top_k`` are the sampling parameters
    that produced the response, and ``logprob_convention`` says what ``logprobs`` are:
    ``"processed"`` (after temperature and top-k/top-p, what vLLM's
    ``processed_logprobs`` and the policy server return) or ``"raw"``. ``None`` means
    unknown; the trainer then applies the rules in README "Sampling parameters" (it
    scores at its configured temperature, and recomputes log-probs it cannot trust).
    """
    _check_args(
        "record_transition",
        policy_version=(policy_version, int, "an int (-1 when unknown)"),
        model=(model, str, "a str ('' when unknown)"),
        finish_reason=(finish_reason, str, "a str such as 'stop' or 'length' ('' when unknown)"),
        trainable=(trainable, bool, "True or False"),
        latency_s=(latency_s, numbers.Real, "a number of seconds"),
        metadata=(metadata, (Mapping, type(None)), "a mapping or None"),
    )
    sampling = make_sampling(temperature=temperature, top_p=top_p, top_k=top_k,
                             logprobs=logprob_convention or "")
    prompt = pack_ids(prompt_ids)
    response = pack_ids(response_ids)
    lp = b"" if logprobs is None else pack_logprobs(logprobs)
    if lp and len(lp) != len(response):
        raise ValueError(
            f"logprobs has {len(lp) // 4} entries for {len(response) // 4} response tokens: "
            "give one log-prob per response token (or None)"
        )
    ctx = _resolve("record_transition", rollout)
    if ctx is None:
        return None
    return _record_packed(
        ctx,
        prompt,
        response,
        lp,
        policy_version=policy_version,
        model=model,
        finish_reason=finish_reason,
        trainable=trainable,
        latency_s=latency_s,
        metadata=metadata,
        sampling=sampling,
    )


def _record_packed(
    ctx: RolloutContext,
    prompt: bytes,
    response: bytes,
    logprobs: bytes,
    *,
    policy_version: int,
    model: str,
    finish_reason: str,
    trainable: bool,
    latency_s: float,
    metadata: Mapping[str, Any] | None,
    sampling: Sampling | None = None,
) -> int:
    """Record a transition whose ids and log-probs are already packed and checked.

    :func:`record_transition` after its checks; the capture of LLM calls comes here
    directly (its records are packed as they are read, once per call).
    """
    with ctx._lock:
        index = ctx._n_transitions
        ctx._n_transitions = index + 1
    event = Transition(
        rollout_id=ctx.rollout_id,
        index=index,
        prompt_ids=prompt,
        response_ids=response,
        logprobs=logprobs,
        policy_version=policy_version,
        model=model,
        finish_reason=finish_reason,
        trainable=trainable,
        latency_s=latency_s,
        created_at=time.time(),
        metadata=_builtins(metadata) if metadata else {},
        sampling=sampling,
    )
    _submit(event)
    if _observer is not None:
        try:
            _observer.transition(ctx, event)
        except Exception as exc:  # noqa: BLE001
            _otel_failed("transition", exc)
    return index


# ------------------------------------------------------------------ spans


class SpanHandle:
    """An open span; set attributes while it runs. Recorded when it ends."""

    __slots__ = (
        "name",
        "kind",
        "attributes",
        "span_id",
        "parent_span_id",
        "start_time",
        "status",
        "error",
        "_ctx",
        "_token",
        "_otel",
    )

    def __init__(self, name: str, kind: str, attributes: dict[str, Any], ctx) -> None:
        self.name = name
        self.kind = kind
        self.attributes = attributes
        self.span_id = uuid.uuid4().hex[:16]
        self.parent_span_id = _current_span.get()
        self.start_time = 0.0
        self.status: Literal["ok", "error"] = "ok"
        self.error: str | None = None
        self._ctx = ctx
        self._token = None
        self._otel: Any = None

    def set(self, **attributes: Any) -> None:
        self.attributes.update(attributes)

    def set_output(self, value: Any) -> None:
        self.attributes["output"] = value

    def set_error(self, error: BaseException | str) -> None:
        """Mark the span failed (a tool that returned an error without raising)."""
        self.status = "error"
        if isinstance(error, BaseException):
            self.error = f"{type(error).__qualname__}: {error}"[:4000]
        else:
            self.error = str(error)[:4000]

    def __enter__(self) -> SpanHandle:
        self.start_time = time.time()
        if self._ctx is not None:
            self._token = _current_span.set(self.span_id)
            if _observer is not None:
                try:
                    _observer.span_enter(self)
                except Exception as exc:  # noqa: BLE001
                    _otel_failed("span", exc)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._token is not None:
            _current_span.reset(self._token)
        if exc is not None:
            self.set_error(exc)
        if self._ctx is None:
            return
        with self._ctx._lock:
            after = self._ctx._n_transitions
        event = Span(
            rollout_id=self._ctx.rollout_id,
            span_id=self.span_id,
            parent_span_id=self.parent_span_id,
            name=self.name,
            kind=self.kind,
            start_time=self.start_time,
            end_time=time.time(),
            status=self.status,
            error=self.error,
            attributes=_builtins(self.attributes),
            after=after,
        )
        _submit(event)
        if self._otel is not None:
            try:
                self._otel[2].span_exit(self, event)
            except Exception as err:  # noqa: BLE001 - tracing must never break the app
                _otel_failed("span", err)

    async def __aenter__(self) -> SpanHandle:
        return self.__enter__()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.__exit__(exc_type, exc, tb)


def span(
    name: str,
    *,
    kind: str = "custom",
    rollout: RolloutContext | None = None,
    **attributes: Any,
) -> SpanHandle:
    """Record a step (``with lightning.span("search", kind="tool", query=q) as s:``).

    An exception inside the block marks the span failed and propagates. Works as a
    sync or async context manager. Outside a rollout the block still runs; nothing is
    recorded (see the outside-rollout policy).
    """
    _check_args("span", name=(name, str, "a str"),
                kind=(kind, str, "a str such as 'tool' or 'custom'"))
    ctx = _resolve("span", rollout)
    return SpanHandle(name, kind, dict(attributes), ctx)


def emit_span(
    name: str,
    *,
    kind: str = "custom",
    status: Literal["ok", "error"] = "ok",
    error: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
    rollout: RolloutContext | None = None,
) -> None:
    """Record an observation that already happened (a tool result, an error...)."""
    if status not in ("ok", "error"):
        raise ValueError(f"status must be 'ok' or 'error', got {status!r}")
    _check_args(
        "emit_span",
        name=(name, str, "a str"),
        kind=(kind, str, "a str such as 'tool' or 'custom'"),
        error=(error, (str, type(None)), "a str or None"),
        attributes=(attributes, (Mapping, type(None)), "a mapping or None"),
        start_time=(start_time, (numbers.Real, type(None)), "a Unix time in seconds or None"),
        end_time=(end_time, (numbers.Real, type(None)), "a Unix time in seconds or None"),
    )
    ctx = _resolve("emit_span", rollout)
    if ctx is None:
        return
    now = time.time()
    with ctx._lock:
        after = ctx._n_transitions
    event = Span(
        rollout_id=ctx.rollout_id,
        span_id=uuid.uuid4().hex[:16],
        parent_span_id=_current_span.get(),
        name=name,
        kind=kind,
        start_time=now if start_time is None else start_time,
        end_time=now if end_time is None else end_time,
        status=status,
        error=error,
        attributes=_builtins(dict(attributes or {})),
        after=after,
    )
    _submit(event)
    if _observer is not None:
        try:
            _observer.span_emitted(ctx, event)
        except Exception as exc:  # noqa: BLE001
            _otel_failed("span", exc)


def tool(fn: Callable[P, R] | None = None, /, *, name: str | None = None) -> Any:
    """Record each call of a (sync or async) tool function as a ``kind="tool"`` span.

    The span carries the arguments (``input``), the return value (``output``) or the
    exception (which propagates unchanged). Outside a rollout the tool just runs.
    """

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        tool_name = name or func.__name__
        sig = inspect.signature(func)

        def _open(args: tuple, kwargs: dict) -> SpanHandle:
            try:
                bound = sig.bind(*args, **kwargs)
                inputs: Any = dict(bound.arguments)
            except TypeError:
                inputs = {"args": list(args), "kwargs": kwargs}
            ctx = _current.get()
            ctx = ctx if ctx is not None and not ctx._finished else None
            return SpanHandle(tool_name, "tool", {"tool.name": tool_name, "input": inputs}, ctx)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with _open(args, kwargs) as s:
                    result = await func(*args, **kwargs)
                    s.set_output(result)
                return result

            return async_wrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with _open(args, kwargs) as s:
                result = func(*args, **kwargs)
                s.set_output(result)
            return result

        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate
