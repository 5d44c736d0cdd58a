"""Kernel parity tests: every implementation against the pure-torch reference (the spec).

Without CUDA, Triton kernels run on CPU under the interpreter: ``TRITON_INTERPRET=1`` is
set here, before anything imports triton (triton reads it when a kernel is decorated).
The C++ ops are JIT-built once per source tree into ``$LIGHTNING_EXT_CACHE`` (default
``~/.cache/lightning/ext``) by the first test that needs them (~20 s on 2 cores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The tests import `lightning` from the checkout and `kernels_testutil` from this folder,
# also when pytest is started as `pytest` (which does not put the working directory on
# sys.path) and whatever top-level `tests` package an environment may have installed.
for _p in (Path(__file__).resolve().parents[2], Path(__file__).resolve().parent):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from kernels_testutil import HAS_CUDA

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
