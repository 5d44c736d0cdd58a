"""lightning: train any LLM agent with reinforcement learning without rewriting it.

The app-side API is light (anyio, msgspec, pyzmq, structlog; never torch)::

    import lightning

    lightning.init()                      # connect to `lightning-daemon`

    @lightning.rollout
    async def agent(task): ...            # each call is one trajectory

Heavy parts (daemon training, kernels, engines) live in submodules imported on demand.
"""

from ._config import DaemonConfig, RuntimeConfig
from ._errors import (
    BackendError,
    ConfigError,
    LightningError,
    ProtocolError,
    ProtocolVersionError,
    RolloutError,
    TransportError,
    TransportTimeout,
)
from ._lifecycle import LLMEndpoint, get_runtime, init, llm, session, shutdown, stats
from ._rollout import (
    LightningWarning,
    RolloutContext,
    SpanHandle,
    current_rollout,
    emit_reward,
    emit_span,
    record_transition,
    rollout,
    rollout_options,
    span,
    tool,
)
from ._runtime import Runtime

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "DaemonConfig",
    "LLMEndpoint",
    "LightningError",
    "LightningWarning",
    "ProtocolError",
    "ProtocolVersionError",
    "RolloutContext",
    "RolloutError",
    "Runtime",
    "RuntimeConfig",
    "SpanHandle",
    "TransportError",
    "TransportTimeout",
    "current_rollout",
    "emit_reward",
    "emit_span",
    "get_runtime",
    "init",
    "llm",
    "record_transition",
    "rollout",
    "rollout_options",
    "session",
    "shutdown",
    "span",
    "stats",
    "tool",
]

for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("lightning._"):
        try:
            _obj.__module__ = "lightning"
        except (AttributeError, TypeError):
            pass
del _name, _obj
