"""Build script.

Metadata lives in pyproject.toml. This file declares the packages (``backends/`` in the
source tree installs as ``lightning_backends``) and builds ``lightning/_ext``:

- torch importable at build time: the C++ CPU ops are compiled with torch's cpp_extension
  (plus the CUDA sources when torch is a CUDA build and nvcc is found, unless
  ``LIGHTNING_SKIP_CUDA_BUILD=1``). pip's default build isolation hides an installed
  torch, so prebuilding needs ``pip install --no-build-isolation -e .``.
- otherwise (or if that compile fails, or ``LIGHTNING_SKIP_EXT_BUILD=1``): one line says
  so, the package installs without it, and at run time ``lightning._ext`` JIT-builds it
  into a cache on first use (or the kernels fall back to their pure-torch references).

torch is never a build requirement, so no build can pull a (CUDA) torch wheel.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent

packages = find_packages(include=["lightning", "lightning.*"])
packages += ["lightning_backends"] + [
    "lightning_backends." + p for p in find_packages(where="backends")
]


def _say(msg: str) -> None:
    print(f"lightning-rl: {msg}", file=sys.stderr, flush=True)


def _ext_build_module():
    # By path: importing the `lightning` package here would need its runtime dependencies.
    spec = importlib.util.spec_from_file_location("_lightning_ext_build", ROOT / "lightning" / "_ext" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ext_kwargs() -> dict:
    if os.environ.get("LIGHTNING_SKIP_EXT_BUILD", "").strip() not in ("", "0"):
        _say("LIGHTNING_SKIP_EXT_BUILD is set: not prebuilding lightning/_ext (JIT build or reference at run time)")
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            "torch is not importable at build time (pip's build isolation hides an installed torch): "
            "not prebuilding lightning/_ext; it is JIT-built on first use, or the reference kernels run. "
            "To prebuild: pip install --no-build-isolation -e ."
        )
        return {}
    b = _ext_build_module()
    cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and not b.skip_cuda()
    sources = [str(p.relative_to(ROOT)) for p in b.cpu_sources() + (b.cuda_sources() if cuda else [])]
    ext_cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = ext_cls(
        "lightning._ext._C",
        sources,
        include_dirs=[str(b.CSRC)],
        extra_compile_args={"cxx": b.cxx_flags(), "nvcc": b.nvcc_flags()},
        extra_link_args=b.ld_flags(),
    )
    digest = b.sources_hash(torch.__version__, cuda)

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001  no compiler...: install anyway, JIT/reference at run time
                _say(f"building lightning/_ext failed ({type(exc).__name__}: {exc}); the runtime JIT build or the reference kernels take over")
                return
            for e in self.extensions:
                out = Path(self.get_ext_fullpath(e.name))
                (out.parent / ("_C" + b.HASH_SUFFIX)).write_text(digest + "\n")
            _say(f"built lightning/_ext ({'CPU + CUDA' if cuda else 'CPU'}, torch {torch.__version__})")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExt}}


setup(packages=packages, **_ext_kwargs())
