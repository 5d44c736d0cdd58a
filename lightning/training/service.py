"""Wire a backend and a :class:`Trainer` into a running daemon (used by both CLIs)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import structlog

from lightning._errors import ConfigError
from lightning.algorithms.air import AIR
from lightning.training.batcher import Batcher, BatcherConfig
from lightning.training.trainer import Trainer, TrainerConfig

logger = structlog.get_logger()

__all__ = ["load_backend", "start_trainer"]


async def load_backend(name: str, model_path: str | Path, config: Any) -> Any:
    """Import backend ``name`` and set it up on ``model_path`` (in a worker thread).

    Raises:
        ConfigError: unknown backend, a missing optional dependency (naming the extra to
            install), or a config the backend refuses.
    """
    from lightning_backends import get_backend

    try:
        cls = get_backend(name)
    except LookupError as exc:
        raise ConfigError(str(exc)) from exc
    backend = cls()
    try:
        await anyio.to_thread.run_sync(backend.setup, str(model_path), config)
    except (ValueError, TypeError, LookupError) as exc:
        raise ConfigError(f"backend {name!r}: {exc}") from exc
    return backend


async def start_trainer(
    tg: Any,
    daemon: Any,
    backend: Any,
    engine: Any,
    *,
    batcher_config: BatcherConfig,
    trainer_config: TrainerConfig,
    air: bool | AIR = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    on_step: Any = None,
) -> Trainer:
    """Build the trainer, resume from the newest checkpoint (when ``resume``), start it."""
    air_obj = AIR() if air is True else (air or None)
    if air_obj is not None and "opentelemetry" in sys.modules:
        # the daemon process traces: export AIR's step rewards as spans too
        from lightning.otel import traced_air

        air_obj = traced_air(air_obj)
    trainer = Trainer(
        daemon,
        backend,
        engine,
        batcher=Batcher(batcher_config, air=air_obj),
        config=trainer_config,
        checkpoint_dir=checkpoint_dir,
        on_step=on_step,
    )
    if resume:
        await trainer.resume()
    await tg.start(trainer.run)
    logger.info(
        "trainer.started", backend=type(backend).__name__, step=trainer.step,
        policy_version=trainer.version, estimator=batcher_config.estimator,
        group_size=batcher_config.group_size, batch_size=batcher_config.batch_size,
    )
    return trainer
