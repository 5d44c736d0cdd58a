"""Implementation selection, fallbacks, and what importing pulls in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from lightning.kernels import KernelUnavailableError, _dispatch, gae
from lightning.kernels.gae import reference

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_imports_stay_light():
    out = _run(
        """
        import sys
        import lightning._ext
        assert "torch" not in sys.modules, "lightning._ext imported torch"
        import lightning.kernels
        assert "triton" not in sys.modules, "lightning.kernels imported triton"
        """
    )
    assert out.returncode == 0, out.stderr


def test_auto_picks_cpp_on_cpu():
    assert _dispatch.select("gae", torch.device("cpu"), None, ("reference", "cpp", "triton", "cuda"), "gae") == "cpp"


def test_unknown_impl_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        gae(torch.zeros(2), None, None, torch.tensor([0, 2]), impl="fast")


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        gae(torch.zeros(2), None, None, torch.tensor([0, 2]), impl="triton")


def test_auto_falls_back_to_reference_and_logs_once(monkeypatch):
    real = _dispatch.unavailable_reason

    def no_cpp(impl, device, ext_op):
        return "simulated: no compiler" if impl == "cpp" else real(impl, device, ext_op)

    monkeypatch.setattr(_dispatch, "unavailable_reason", no_cpp)
    monkeypatch.setattr(_dispatch, "_logged", set())
    r, cu = torch.randn(10), torch.tensor([0, 4, 10])
    with capture_logs() as logs:
        a = gae(r, None, None, cu, gamma=0.9)
        b = gae(r, None, None, cu, gamma=0.9)
    falls = [e for e in logs if e["event"] == "kernels.fallback"]
    assert len(falls) == 1 and falls[0]["op"] == "gae" and "simulated" in falls[0]["skipped"]["cpp"]
    exp = reference.gae(r, None, None, cu, gamma=0.9, lam=1.0)
    torch.testing.assert_close(a, exp)
    torch.testing.assert_close(b, exp)
    with pytest.raises(KernelUnavailableError, match="simulated: no compiler"):
        gae(r, None, None, cu, impl="cpp")


def test_failed_jit_build_falls_back(tmp_path):
    # No prebuilt library and a compiler that fails: one `ext.unavailable` line, the
    # reference answers auto calls, and impl="cpp" raises with the build's reason.
    out = _run(
        """
        import torch, lightning._ext as ext
        ext._prebuilt = lambda v: (None, "prebuilt disabled for the test")
        from lightning.kernels import gae, KernelUnavailableError
        adv, _ = gae(torch.ones(3), None, None, torch.tensor([0, 3]), gamma=0.5)
        assert adv.tolist() == [1.75, 1.5, 1.0], adv
        try:
            gae(torch.ones(3), None, None, torch.tensor([0, 3]), impl="cpp")
        except KernelUnavailableError as exc:
            print("RAISED", exc)
        """,
        LIGHTNING_EXT_CACHE=str(tmp_path),
        CXX="/bin/false",
        PYTHONPATH=str(ROOT),
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.count("ext.unavailable") == 1, out.stdout
    assert out.stdout.count("kernels.fallback") == 1, out.stdout
    assert "RAISED gae: impl='cpp' cannot run on cpu: lightning C++ extension unavailable" in out.stdout
