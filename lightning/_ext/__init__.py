"""C++ (and, where built, CUDA) kernels of :mod:`lightning.kernels`.

The ops are registered with ``TORCH_LIBRARY(lightning_rl, ...)`` in ``csrc/`` and called as
``torch.ops.lightning_rl.<op>``. :func:`load` makes them available, once per process:

1. a library prebuilt by ``setup.py`` (``_C*.so`` next to this file), used when the hash
   written beside it matches the current sources and torch version;
2. otherwise a JIT build with ``torch.utils.cpp_extension.load`` into a cached directory
   (see :mod:`lightning._ext._build`), compiled once per source tree and torch version;
3. otherwise nothing: :func:`load` raises :class:`ExtensionUnavailable` and the kernels
   fall back to their pure-torch references.

Exactly one log line says which of the three happened. Importing this module does not
import torch; :func:`load` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import structlog

from lightning._ext import _build

logger = structlog.get_logger()

__all__ = ["ExtInfo", "ExtensionUnavailable", "has_kernel", "load"]


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be loaded or built; the message says why."""


@dataclasses.dataclass(frozen=True)
class ExtInfo:
    source: str  # "prebuilt" or "jit"
    path: str
    cuda: bool  # CUDA kernels were compiled in


_lock = threading.Lock()
_result: ExtInfo | ExtensionUnavailable | None = None


def _prebuilt(torch_version: str) -> tuple[Path | None, str]:
    """Path of a usable prebuilt library, or None and why not."""
    spec = importlib.util.find_spec("lightning._ext._C")
    if spec is None or spec.origin is None:
        return None, "no prebuilt library"
    lib = Path(spec.origin)
    stamp = lib.parent / ("_C" + _build.HASH_SUFFIX)
    try:
        built = stamp.read_text().split()
    except OSError:
        return None, f"prebuilt {lib.name} has no {stamp.name}"
    wanted = {_build.sources_hash(torch_version, False), _build.sources_hash(torch_version, True)}
    if not built or built[0] not in wanted:
        return None, f"prebuilt {lib.name} is stale (sources or torch changed)"
    return lib, ""


def _want_cuda() -> tuple[bool, str]:
    import torch
    from torch.utils import cpp_extension

    if _build.skip_cuda():
        return False, "LIGHTNING_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None or not torch.cuda.is_available():
        return False, "torch has no CUDA device"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc / CUDA_HOME not found"
    return True, ""


def _jit() -> ExtInfo:
    import torch
    from torch.utils import cpp_extension

    cuda, _ = _want_cuda()
    digest = _build.sources_hash(torch.__version__, cuda)
    # ninja's build file holds the sources' absolute paths: two checkouts of the same
    # sources sharing one directory would rebuild each other's library on every load
    tree = hashlib.sha256(str(_build.CSRC.resolve()).encode()).hexdigest()[:8]
    build_dir = _build.cache_root() / f"{digest}-{tree}"
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = _build.cpu_sources() + (_build.cuda_sources() if cuda else [])
    with _build_lock(build_dir), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpp_extension.load(
            name=f"lightning_rl_ext_{digest}",
            sources=[str(s) for s in sources],
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=_build.nvcc_flags(),
            extra_ldflags=_build.ld_flags(),
            extra_include_paths=[str(_build.CSRC)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=_build.debug(),
        )
    for w in caught:
        logger.debug("ext.build_warning", message=str(w.message))
    return ExtInfo(source="jit", path=str(build_dir), cuda=cuda)


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the build directory for a JIT build.

    ``cpp_extension.load`` serialises builders with a lock *file* it deletes when done: a
    builder killed mid-build (a test timeout, kill -9, an OOM) leaves it behind, and every
    later process waits on it forever. The kernel releases a ``flock`` when its holder dies,
    so whoever holds ours is the only live builder in this directory, and a torch lock file
    it finds is stale: it is removed (and said once). Without ``fcntl`` (Windows), torch's
    own lock is all there is.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build_dir / ".lightning-build.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                stale.unlink(missing_ok=True)
                logger.warning("ext.stale_build_lock_removed", path=str(stale),
                               reason="a JIT build was killed mid-way; building again")
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load() -> ExtInfo:
    import torch

    lib, why_not = _prebuilt(torch.__version__)
    if lib is not None:
        try:
            torch.ops.load_library(str(lib))
            info = ExtInfo(source="prebuilt", path=str(lib), cuda=has_kernel("gae", "CUDA"))
            logger.info("ext.loaded", source=info.source, path=info.path, cuda=info.cuda)
            return info
        except OSError as exc:  # e.g. built against another torch ABI
            why_not = f"prebuilt {lib.name} failed to load: {exc}"
    try:
        info = _jit()
    except Exception as exc:  # compiler missing, ninja missing, build error...
        raise ExtensionUnavailable(
            f"lightning C++ extension unavailable ({why_not}; JIT build failed: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}). "
            "Install a C++ compiler and ninja (pip install ninja), or reinstall with "
            "`pip install --no-build-isolation -e .` to prebuild it; set "
            "LIGHTNING_EXT_DEBUG=1 for the full build log"
        ) from exc
    logger.info("ext.loaded", source=info.source, path=info.path, cuda=info.cuda, reason=why_not)
    return info


def load() -> ExtInfo:
    """Load the extension (prebuilt or JIT), once per process.

    Raises:
        ExtensionUnavailable: neither a prebuilt library nor a JIT build is possible; the
            reason is in the message (and was logged once as ``ext.unavailable``).
    """
    global _result
    with _lock:
        if _result is None:
            try:
                _result = _load()
                from lightning._ext import _fake

                _fake.register()
            except ExtensionUnavailable as exc:
                logger.warning("ext.unavailable", reason=str(exc))
                _result = exc
        if isinstance(_result, ExtensionUnavailable):
            raise _result
        return _result


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``lightning_rl::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    import torch

    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"lightning_rl::{op}", dispatch_key))
    except RuntimeError:
        return False
