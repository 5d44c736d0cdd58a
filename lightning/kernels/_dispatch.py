"""Choosing an implementation per call: ``impl=None`` (auto) or an explicit name.

Implementations, by name:
- ``reference``: pure torch, every device; the specification.
- ``cpp``: the C++ CPU ops of ``lightning/_ext`` (prebuilt or JIT-built), CPU tensors.
- ``triton``: Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``
  (the interpreter: for tests, slow). Auto-selection never picks the interpreter.
- ``cuda``: CUDA kernels of ``lightning/_ext``, when it was compiled with CUDA.

An explicit ``impl`` that cannot run raises :class:`KernelUnavailableError` saying why.
Auto-selection takes the first available of ``triton, cuda, reference`` on CUDA and
``cpp, reference`` on CPU; landing on the reference although a faster implementation
exists for the op is logged once per (op, device type) as ``kernels.fallback``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading

import structlog
import torch

logger = structlog.get_logger()

IMPLS = ("reference", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}
_logged: set[tuple[str, str]] = set()
_log_lock = threading.Lock()


class KernelUnavailableError(RuntimeError):
    """An explicitly requested kernel implementation cannot run here."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


_ext_reasons: dict[tuple[str, str], str | None] = {}


def _ext_reason(dispatch_key: str, op: str) -> str | None:
    # Cached: the extension loads (or fails to) once per process.
    key = (dispatch_key, op)
    if key not in _ext_reasons:
        _ext_reasons[key] = _ext_reason_uncached(dispatch_key, op)
    return _ext_reasons[key]


def _ext_reason_uncached(dispatch_key: str, op: str) -> str | None:
    from lightning import _ext

    try:
        _ext.load()
    except _ext.ExtensionUnavailable as exc:
        return str(exc)
    if not _ext.has_kernel(op, dispatch_key):
        return f"the lightning/_ext library has no {dispatch_key} kernel for {op}"
    return None


def unavailable_reason(impl: str, device: torch.device, ext_op: str) -> str | None:
    """None when ``impl`` can run on ``device``, else why not."""
    if impl == "reference":
        return None
    if impl == "cpp":
        if device.type != "cpu":
            return f"the C++ kernels take CPU tensors, got {device.type}"
        return _ext_reason("CPU", ext_op)
    if impl == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernels take CUDA tensors, got {device.type}"
        return _ext_reason("CUDA", ext_op)
    if impl == "triton":
        if not _triton_installed():
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return f"Triton needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; got {device.type}"
    raise AssertionError(impl)


def select(op: str, device: torch.device, impl: str | None, provided: tuple[str, ...], ext_op: str) -> str:
    """The implementation to run ``op`` with on ``device``.

    Args:
        op: public op name, for messages and logs.
        impl: ``None`` for auto, else one of :data:`IMPLS`.
        provided: the implementations this op has.
        ext_op: the ``lightning_rl::`` op whose kernels decide ``cpp``/``cuda`` availability.

    Raises:
        ValueError: ``impl`` is not a known name.
        KernelUnavailableError: ``impl`` was given but cannot run here.
    """
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
        if impl not in provided:
            raise KernelUnavailableError(f"{op} has no {impl!r} implementation (it has {provided})")
        reason = unavailable_reason(impl, device, ext_op)
        if reason is not None:
            raise KernelUnavailableError(f"{op}: impl={impl!r} cannot run on {device}: {reason}")
        return impl
    skipped: dict[str, str] = {}
    for cand in _AUTO_ORDER.get(device.type, ("reference",)):
        if cand not in provided:
            continue
        reason = unavailable_reason(cand, device, ext_op)
        if reason is None:
            if cand == "reference" and skipped:
                _log_fallback(op, device, skipped)
            return cand
        skipped[cand] = reason
    raise AssertionError("the reference is always available")


def _log_fallback(op: str, device: torch.device, skipped: dict[str, str]) -> None:
    key = (op, device.type)
    with _log_lock:
        if key in _logged:
            return
        _logged.add(key)
    logger.warning("kernels.fallback", op=op, device=device.type, impl="reference", skipped=skipped)
