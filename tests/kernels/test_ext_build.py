"""Build glue of lightning/_ext: setup.py with and without torch, CUDA sources with nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "lightning" / "_ext" / "csrc"


def _setup_py(block_torch: bool) -> subprocess.CompletedProcess:
    code = f"""
        import runpy, sys
        if {block_torch}:
            sys.modules["torch"] = None  # import torch -> ImportError, as under build isolation
        sys.argv = ["setup.py", "--name"]
        runpy.run_path("setup.py", run_name="__main__")
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


def test_setup_py_without_torch_skips_the_extension_with_one_line():
    out = _setup_py(block_torch=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lightning-rl"
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("lightning-rl:")]
    assert len(lines) == 1 and "torch is not importable at build time" in lines[0], out.stderr


def test_setup_py_with_torch_declares_the_extension():
    out = _setup_py(block_torch=False)
    assert out.returncode == 0, out.stderr
    assert "not importable" not in out.stderr


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    for root in (os.environ.get("CUDA_HOME"), Path(nvcc).resolve().parent.parent, "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    out = subprocess.run(
        ["nvcc", "-c", "-std=c++17", "-O3", "-arch=sm_80", "-I", str(CSRC / "cuda"),
         str(CSRC / "cuda" / "gae_kernel.cu"), "-o", str(tmp_path / "gae_kernel.o")],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "gae_kernel.o").stat().st_size > 0


@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers (nvcc) not found")
def test_cuda_torch_glue_compiles(tmp_path):
    # The torch side of the CUDA op against torch's headers. A CPU torch wheel lacks the
    # generated c10/cuda macros header; C10_USING_CUSTOM_GENERATED_MACROS stands in.
    torch_inc = Path(__import__("torch").__file__).parent / "include"
    cxx = os.environ.get("CXX", "c++")
    out = subprocess.run(
        [cxx, "-fsyntax-only", "-std=c++20", "-DC10_USING_CUSTOM_GENERATED_MACROS",
         "-I", str(torch_inc), "-I", str(torch_inc / "torch" / "csrc" / "api" / "include"),
         "-I", str(_cuda_include()), str(CSRC / "cuda" / "gae_cuda.cpp")],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stderr


def test_a_killed_builders_lock_file_does_not_hang_the_next_build(tmp_path, monkeypatch):
    """torch's cpp_extension waits forever on a lock file a killed builder left behind;
    under our flock the file is known stale and removed before building."""
    import threading

    import torch.utils.cpp_extension as cpp_extension

    import lightning._ext as ext

    monkeypatch.setenv("LIGHTNING_EXT_CACHE", str(tmp_path))
    calls = []
    active = threading.Semaphore(1)

    def fake_load(*, build_directory, **_):
        assert active.acquire(blocking=False), "two builds ran at once in one directory"
        try:
            assert not (Path(build_directory) / "lock").exists(), "the stale lock was not removed"
            calls.append(build_directory)
            (Path(build_directory) / "lock").write_text("")  # this build is killed too
        finally:
            active.release()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    threads = [threading.Thread(target=ext._jit) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 3 and len(set(calls)) == 1
