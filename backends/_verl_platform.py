"""A "cpu" platform for verl, so its FSDP2 ``TrainingWorker`` runs real steps on CPU.

WORKAROUND OF VERL INTERNALS (verified against verl 0.9.1; see ``VERIFIED``). verl 0.9
ships platforms for CUDA, ROCm and Ascend NPU only, and its FSDP engine is registered for
the devices ``cuda`` and ``npu``. On a CPU-only machine this module:

- registers :class:`PlatformCPU` in ``verl.plugin.platform.PlatformRegistry`` under
  ``cpu`` and makes it the process's platform: device name ``cpu``, gloo collectives,
  ``current_device() == "cpu"`` (verl moves batches with ``.to(get_device_id())``, and an
  int there would mean ``cuda:N``), and a device module whose cache, stream and memory
  calls are no-ops or CPU equivalents (:class:`_CPUDeviceModule`);
- sets ``VERL_ENGINE_DEVICE=cuda``: ``EngineRegistry.get_engine_cls`` then finds the FSDP
  engine, which itself runs on whatever the platform says (here the CPU);
- sets ``VERL_USE_EXTERNAL_MODULES`` to this module (and ``VERL_PLATFORM=cpu``), which is
  how verl's ``__init__`` imports platform plugins, so a verl imported later (Ray workers,
  subprocesses) sees the platform too.

One more piece lives in :mod:`lightning_backends._verl` (its ``TrainingWorker`` subclass):
verl would start the process group with ``"cpu:gloo,<device>:<backend>"``, which on this
platform is the duplicate ``"cpu:gloo,cpu:gloo"`` torch rejects, so the worker starts a
plain gloo world first (verl skips its own when one exists).

The engine must then be configured for CPU: ``strategy="fsdp2"``, ``use_torch_compile=
False``, fp32 parameters and mixed precision, ``attn_implementation="sdpa"``,
``use_remove_padding=False`` (no flash-attn varlen kernels) and ``OMP_NUM_THREADS`` set
small. :mod:`lightning_backends._verl` does all of that when ``device="cpu"``. verl's
engine workers also import fastapi and uvicorn at module level: install both.

``tests/backends/test_verl.py::test_cpu_platform_shim_still_fits_verl`` checks every
verl internal this relies on and fails loudly, naming what moved, after a verl upgrade.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["VERIFIED", "PlatformCPU", "check_shim", "install"]

#: verl versions this shim was written and tested against (the backend's pinned range).
VERIFIED = ">=0.9,<0.10"

_PLATFORM_NAME = "cpu"


class _CPUDeviceModule(types.ModuleType):
    """Stands in for ``torch.cuda`` where verl calls ``get_torch_device().<fn>()``:
    cache and synchronisation calls do nothing, memory statistics are 0, RNG and streams
    map to the CPU ones. Anything else raises an AttributeError naming this shim."""

    def __init__(self) -> None:
        super().__init__("lightning_backends._verl_platform.cpu_device")

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    Stream = torch.cpu.Stream
    current_stream = staticmethod(torch.cpu.current_stream)
    stream = staticmethod(torch.cpu.stream)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"verl called get_torch_device().{name}, which the lightning CPU platform shim "
            "does not provide: this verl version uses a device call the shim does not know "
            "(add it to lightning_backends._verl_platform._CPUDeviceModule)"
        )


_DEVICE_MODULE = _CPUDeviceModule()


def _platform_base() -> type:
    from verl.plugin.platform import PlatformBase

    return PlatformBase


def _make_platform_class() -> type:
    base = _platform_base()

    class PlatformCPU(base):  # type: ignore[misc, valid-type]
        """verl platform for CPU-only processes (gloo, no device caches)."""

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> types.ModuleType:
            return _DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # only chosen explicitly (install() / VERL_PLATFORM=cpu), never auto-detected
            return False

        def current_device(self) -> str:  # type: ignore[override]
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: int | None = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextmanager
        def nvtx_range(self, msg: str):  # type: ignore[no-untyped-def]
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            return "CPU"

        def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
            return {"num_cpus": num_gpus}

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> None:
            return None

    return PlatformCPU


PlatformCPU: Any = None
"""The platform class (built on first :func:`install`, when verl is importable)."""


def install() -> None:
    """Make verl run on the CPU in this process (idempotent). Call before building a
    ``TrainingWorker``; the environment variables it sets reach child processes too."""
    global PlatformCPU
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    os.environ["VERL_PLATFORM"] = _PLATFORM_NAME
    mods = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if __name__ not in mods:
        os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join([*mods, __name__])
    from verl.plugin.platform import platform_manager

    if PlatformCPU is None:
        PlatformCPU = _make_platform_class()
    if platform_manager.PlatformRegistry.get(_PLATFORM_NAME) is not PlatformCPU:
        platform_manager.PlatformRegistry.register(platform=_PLATFORM_NAME)(PlatformCPU)
    current = platform_manager._current_platform
    if not isinstance(current, PlatformCPU):
        platform_manager._current_platform = PlatformCPU()


def check_shim() -> list[str]:
    """The verl internals the shim relies on that are missing or changed (empty: all fit).

    Used by the backend at start-up on CPU and by the upgrade test."""
    problems: list[str] = []
    try:
        from verl.plugin.platform import PlatformBase, platform_manager
    except ImportError as exc:
        return [f"verl.plugin.platform is gone ({exc})"]
    if not hasattr(platform_manager, "_current_platform"):
        problems.append("verl.plugin.platform.platform_manager._current_platform is gone")
    if not hasattr(platform_manager, "PlatformRegistry"):
        problems.append("verl.plugin.platform.platform_manager.PlatformRegistry is gone")
    abstract = set(getattr(PlatformBase, "__abstractmethods__", ()))
    cls = PlatformCPU if PlatformCPU is not None else _make_platform_class()
    missing = sorted(a for a in abstract if a not in cls.__dict__)
    if missing:
        problems.append(f"PlatformBase has abstract methods the shim lacks: {missing}")
    try:
        from verl.workers.engine import EngineRegistry
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    except ImportError as exc:
        problems.append(f"verl's FSDP engine cannot be imported ({exc})")
    else:
        registry = EngineRegistry._engines.get("language_model", {}).get("fsdp2", {})
        if registry.get("cuda") is not FSDPEngineWithLMHead and not any(
            v is FSDPEngineWithLMHead for k, v in registry.items() if "cuda" in k
        ):
            problems.append(
                "the FSDP2 language-model engine is no longer registered for device 'cuda' "
                "(VERL_ENGINE_DEVICE=cuda would not find it)"
            )
    try:
        import verl.workers.engine.base as engine_base

        if "VERL_ENGINE_DEVICE" not in Path(engine_base.__file__).read_text():
            problems.append("EngineRegistry no longer reads VERL_ENGINE_DEVICE")
        import verl

        if "VERL_USE_EXTERNAL_MODULES" not in Path(verl.__file__).read_text():
            problems.append("verl's __init__ no longer imports VERL_USE_EXTERNAL_MODULES")
    except (ImportError, OSError) as exc:
        problems.append(f"cannot read verl's sources ({exc})")
    return problems


# Imported by verl's own __init__ through VERL_USE_EXTERNAL_MODULES: register right away.
if os.environ.get("VERL_PLATFORM", "").strip().lower() == _PLATFORM_NAME:
    install()
