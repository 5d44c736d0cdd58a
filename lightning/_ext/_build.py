"""Build description of ``lightning/_ext``, shared by ``setup.py`` and the runtime JIT build.

Standard library only at import time: ``setup.py`` loads this file by path, before the
package (and perhaps torch) can be imported. torch is imported inside the functions.

Environment switches:
- ``LIGHTNING_SKIP_CUDA_BUILD=1``: never compile the CUDA sources, even where nvcc and a
  CUDA build of torch are present.
- ``LIGHTNING_EXT_DEBUG=1``: ``-O0 -g`` and verbose compiler output.
- ``LIGHTNING_EXT_CACHE=DIR``: where the JIT build is cached (default
  ``~/.cache/lightning/ext``); each build lives in ``DIR/<hash>``, the hash covering the
  sources, the flags, torch's version and the Python version, so a change to any of them
  rebuilds and an unchanged tree loads in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

EXT_DIR = Path(__file__).resolve().parent
CSRC = EXT_DIR / "csrc"
#: File written next to a prebuilt library by ``setup.py``; holds :func:`sources_hash`.
HASH_SUFFIX = ".sources-hash"
NAMESPACE = "lightning_rl"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def debug() -> bool:
    return _flag("LIGHTNING_EXT_DEBUG")


def skip_cuda() -> bool:
    return _flag("LIGHTNING_SKIP_CUDA_BUILD")


def cpu_sources() -> list[Path]:
    """C++ sources of the CPU library (bindings first)."""
    return [CSRC / "bindings.cpp"] + sorted(p for p in CSRC.glob("*_cpu.cpp"))


def cuda_sources() -> list[Path]:
    """CUDA kernels (``.cu``, plain CUDA runtime) and their torch glue (``*_cuda.cpp``)."""
    return sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))


def headers() -> list[Path]:
    return sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh"))


def cxx_flags() -> list[str]:
    opt = ["-O0", "-g"] if debug() else ["-O3"]
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-trapping-math: lets selects in the softmax loops vectorise; IEEE results unchanged.
    # The C++ standard is cpp_extension's (C++17 or 20, as torch needs).
    return [*opt, *omp, "-fno-trapping-math"]


def nvcc_flags() -> list[str]:
    opt = ["-O0", "-g", "-lineinfo"] if debug() else ["-O3"]
    return opt


def ld_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def sources_hash(torch_version: str, with_cuda: bool = False) -> str:
    """Hash of everything that decides the binary: sources, flags, torch and Python."""
    h = hashlib.sha256()
    files = cpu_sources() + headers() + (cuda_sources() if with_cuda else [])
    for p in files:
        h.update(p.relative_to(CSRC).as_posix().encode())
        h.update(p.read_bytes())
    h.update(" ".join(cxx_flags() + ld_flags()).encode())
    if with_cuda:
        h.update(" ".join(nvcc_flags()).encode())
    h.update(f"torch={torch_version} py={sys.version_info[:2]} cuda={with_cuda}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("LIGHTNING_EXT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning" / "ext"
