"""Helpers shared by the kernel tests (parametrisation over implementations, comparison)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def impl_params() -> list:
    """(impl, device) pairs to compare with the reference, with marks and skips."""
    params = [pytest.param("cpp", "cpu", id="cpp")]
    triton_dev = "cuda" if HAS_CUDA else "cpu"
    params.append(
        pytest.param(
            "triton",
            triton_dev,
            id=f"triton-{triton_dev}",
            marks=[pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")]
            + ([pytest.mark.gpu] if HAS_CUDA else []),
        )
    )
    params.append(
        pytest.param(
            "cuda",
            "cuda",
            id="cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
        )
    )
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """``torch.testing.assert_close`` on CPU fp32 copies, naming ``what`` on failure."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.detach().cpu().float(), expected.detach().cpu().float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )
