"""bench/bench_train_step.py on a very small batch of the tiny model: our step runs and
reports what the bench divides by; where TRL is importable, its GRPOTrainer step takes the
same update as ours (same loss and gradient norm), so the bench compares like with like."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repo root: `bench` is not installed

from bench import bench_train_step as bts

# 4 sequences of 12 + 6 tokens, 2 per micro-batch; TRL only from the environment (no --trl-site)
ARGV = ["--batch", "4", "--prompt", "12", "--completion", "6", "--micro", "2", "--trl-site", ""]


def test_ours_step_on_tiny_model() -> None:
    args = bts._parse(ARGV)
    step, note = bts.make_step("ours", args)
    m = step()
    assert m["perf/tokens"] == 4 * (12 + 6)
    assert m["perf/action_tokens"] == 4 * 6
    assert m["perf/micro_batches"] == 2
    assert m["perf/step_s"] > 0
    assert "token-mean" in note


def test_trl_takes_the_same_update_as_ours() -> None:
    pytest.importorskip("trl", reason="TRL is installed for the bench only")
    args = bts._parse(ARGV)
    ours, _ = bts.make_step("ours", args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL/transformers deprecation noise
        trl, _ = bts.make_step("trl", args)
        for _ in range(2):  # the second step checks the optimizer step too
            a, b = ours(), trl()
            assert b["loss/policy"] == pytest.approx(a["loss/policy"], rel=1e-4, abs=1e-6)
            assert b["actor/grad_norm"] == pytest.approx(a["actor/grad_norm"], rel=1e-4)
