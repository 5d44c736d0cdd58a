"""Training backends, found by name and imported lazily (installed as ``lightning_backends``).

A backend is a module ending with ``backend_class = ...``; the class satisfies
:class:`Backend`. Built-in names map to ``lightning_backends._<name>``; other packages
add backends through the ``lightning.backends`` entry-point group. Importing this package
imports no framework: ``get_backend(name)`` imports the one asked for, and turns a missing
optional dependency into a :class:`LookupError` that names the extra to install.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

__all__ = ["BACKENDS", "Backend", "available_backends", "get_backend"]

#: Built-in backends and the extra that installs what each needs.
BACKENDS: dict[str, str] = {"torch": "daemon", "verl": "verl", "deepspeed": "deepspeed"}

_cache: dict[str, type] = {}


@runtime_checkable
class Backend(Protocol):
    """What the daemon needs from a trainer. No implementation inheritance: implement it."""

    def setup(self, model_path: str, config: Any) -> None:
        """Load the model and optimizer from ``model_path`` with the backend's config."""

    def train_step(self, batch: Any) -> dict[str, float]:
        """One optimizer step on a packed batch; returns detached metrics."""

    def export_weights(self) -> Any:
        """Updated weights for the serving engine (state dict, or a callable streaming it)."""

    def save(self, path: str) -> None: ...

    def load(self, path: str) -> None: ...


def available_backends() -> list[str]:
    names = set(BACKENDS)
    names.update(ep.name for ep in entry_points(group="lightning.backends"))
    return sorted(names)


def get_backend(name: str) -> type:
    """The backend class registered as ``name`` (imported on first use, then cached)."""
    if name in _cache:
        return _cache[name]
    if name in BACKENDS:
        module_name = f"lightning_backends._{name}"
    else:
        eps = [ep for ep in entry_points(group="lightning.backends") if ep.name == name]
        if not eps:
            raise LookupError(
                f"unknown backend {name!r}; available: {', '.join(available_backends())}"
            )
        module_name = eps[0].value
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise LookupError(
                f"backend {name!r} is not part of this installation yet ({module_name} "
                "is missing)"
            ) from exc
        extra = BACKENDS.get(name, name)
        raise LookupError(
            f"backend {name!r} needs {exc.name!r}, which is not installed: "
            f"pip install 'lightning-rl[{extra}]'"
        ) from exc
    cls = module.backend_class
    _cache[name] = cls
    return cls
