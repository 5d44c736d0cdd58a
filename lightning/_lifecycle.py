"""Starting and stopping the process-wide runtime.

Two ways to run it:

Both also install the automatic capture of ``openai`` calls (``capture=False`` opts out),
asking the policy server (``policy_url``) and ``token_id_urls`` for token ids.

- ``lightning.init(...)``: the runtime's sender runs in a background thread with its own
  event loop. Works from sync and async code alike, and keeps delivery going even while
  the app's loop is busy. ``lightning.shutdown()`` (also registered with ``atexit``)
  flushes within the grace period.
- ``async with lightning.session(...)``: the sender runs as a task in the *current*
  event loop (asyncio; ZeroMQ's async support is asyncio-only), for services that want
  every task in their own loop. Leaving the block flushes.

Either way there is one current runtime per process; recording functions find it here.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import structlog

from ._config import RuntimeConfig, from_env
from ._errors import ConfigError
from ._runtime import Runtime
from ._transport.base import ClientTransport

logger = structlog.get_logger()

__all__ = ["LLMEndpoint", "get_runtime", "init", "llm", "session", "shutdown", "stats"]

_current: Runtime | None = None
_thread_runner: _ThreadRunner | None = None
_guard = threading.Lock()


class LLMEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where the agent's OpenAI client should point: the policy being trained."""

    base_url: str
    api_key: str
    model: str


def llm() -> LLMEndpoint:
    """The policy server's OpenAI base URL, API key and model name.

    ``OpenAI(base_url=lightning.llm().base_url, api_key=lightning.llm().api_key)``. From
    the running runtime's settings, or the ``LIGHTNING_POLICY_*`` environment variables
    before ``init``. The model name defaults to ``"default"``, which the policy server
    always answers to.
    """
    cfg = _current.config if _current is not None else from_env(RuntimeConfig, {})
    return LLMEndpoint(base_url=cfg.policy_url, api_key=cfg.policy_api_key,
                       model=cfg.policy_model or "default")


def get_runtime() -> Runtime | None:
    """The process's current runtime, or None before ``init``/``session``."""
    return _current


def stats() -> dict[str, Any]:
    """The runtime's counters and queue levels: events submitted, acknowledged, rejected,
    spilled, dropped (and why), spill bytes, whether connected... ``{"running": False}``
    before ``init``/``session`` (and after ``shutdown``)."""
    rt = _current
    if rt is None:
        return {"running": False}
    return {"running": True, **rt.stats()}


class _ThreadRunner:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._cm = anyio.from_thread.start_blocking_portal(
            backend="asyncio", name="lightning-runtime"
        )
        self.portal = self._cm.__enter__()
        self.future = self.portal.start_task_soon(runtime.serve)

    def stop(self, grace_s: float | None) -> None:
        try:
            if not self.future.done():
                self.portal.call(self.runtime.aclose, grace_s)
            try:
                self.future.result(timeout=10)
            except Exception as exc:  # noqa: BLE001 - report, never raise at exit
                logger.error("runtime.sender_failed", error=repr(exc))
        finally:
            self._cm.__exit__(None, None, None)


def _build(transport: ClientTransport | None, settings: dict[str, Any]) -> Runtime:
    config = settings.pop("config", None)
    if config is not None and settings:
        raise ConfigError("pass either config=RuntimeConfig(...) or keyword settings, not both")
    if config is None:
        config = from_env(RuntimeConfig, settings)
    return Runtime(config, transport=transport)


def _start_capture(config: RuntimeConfig) -> None:
    if config.capture:
        from ._capture import install

        install(token_id_base_urls=(config.policy_url, *config.token_id_urls))


def _stop_capture() -> None:
    from ._capture import uninstall

    uninstall()


def init(*, transport: ClientTransport | None = None, **settings: Any) -> Runtime:
    """Start the runtime in a background thread and make it the current one.

    Settings are :class:`RuntimeConfig` fields (``daemon="tcp://host:5555"``,
    ``spill_dir=...``), falling back to ``LIGHTNING_<FIELD>`` environment variables.
    Calling ``init`` again while a runtime runs raises :class:`ConfigError`: call
    :func:`shutdown` first.
    """
    global _current, _thread_runner
    with _guard:
        if _current is not None:
            raise ConfigError(
                "lightning.init() was already called: call lightning.shutdown() before "
                "initialising again"
            )
        runtime = _build(transport, settings)
        runner = _ThreadRunner(runtime)
        _current, _thread_runner = runtime, runner
    _start_capture(runtime.config)
    return runtime


def shutdown(grace_s: float | None = None) -> None:
    """Flush (at most ``grace_s``, default from the config) and stop the runtime.

    Unacknowledged events are written to the spill log and replayed by the next process.
    Safe to call twice or without ``init``.
    """
    global _current, _thread_runner
    with _guard:
        runner, _thread_runner = _thread_runner, None
        if runner is None:
            return
        _current = None
    _stop_capture()
    runner.stop(grace_s)


atexit.register(shutdown)


@contextlib.asynccontextmanager
async def session(
    *, transport: ClientTransport | None = None, **settings: Any
) -> AsyncIterator[Runtime]:
    """Run the runtime inside the current event loop for the duration of the block."""
    global _current
    runtime = _build(transport, settings)
    with _guard:
        if _current is not None:
            raise ConfigError(
                "a lightning runtime is already running in this process (lightning.init or "
                "another session): use that one"
            )
        _current = runtime
    _start_capture(runtime.config)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(runtime.serve)
            try:
                yield runtime
            finally:
                with anyio.CancelScope(shield=True):
                    await runtime.aclose()
    finally:
        _stop_capture()
        with _guard:
            if _current is runtime:
                _current = None
