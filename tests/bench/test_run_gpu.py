"""bench/run_gpu.sh, the prepared GPU check: its dry run (CPU, tiny sizes, Triton interpreter)
runs every step end to end here, so the script cannot rot while no GPU is at hand; the
guards (a failing step is recorded and the rest run, a wrong kernel fails parity) are
checked on the live runner with injected faults."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repo root: `bench` is not installed

from bench import gpu_check
from bench.harness import FIELDS, RESULTS_CSV

pytestmark = pytest.mark.timeout(900)  # a cold JIT build of lightning/_ext comes first
SHA = "test-sha-17"


def _run_script(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "run_gpu.sh"), str(out), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )


@pytest.fixture(scope="module")
def dry_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    out = tmp_path_factory.mktemp("gpu-check")
    before = RESULTS_CSV.stat().st_mtime_ns if RESULTS_CSV.exists() else None
    proc = _run_script(out, "--dry-run", LIGHTNING_GIT_SHA=SHA)
    assert (RESULTS_CSV.stat().st_mtime_ns if RESULTS_CSV.exists() else None) == before, (
        "the dry run wrote bench/data/results.csv"
    )
    rows = []
    if (out / "results.csv").exists():
        with (out / "results.csv").open() as f:
            rows = list(csv.DictReader(f))
    return proc, out, rows


def _metric(rows: list[dict], bench: str, metric: str, provider: str | None = None) -> list[dict]:
    return [
        r
        for r in rows
        if r["bench"] == bench and r["metric"] == metric and provider in (None, r["provider"])
    ]


def test_dry_run_passes_every_step(dry_run) -> None:
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"{len(gpu_check.STEPS)} of {len(gpu_check.STEPS)} steps ok" in proc.stdout
    report = (out / "results.md").read_text()
    for name in gpu_check.STEPS:
        assert f"| {name} | ok |" in report, report[:2000]
    log = (out / "log.txt").read_text()
    assert "===== gpu_check: engine ok" in log and "run_gpu: dry run" in log


def test_rows_have_the_results_csv_format_machine_and_sha(dry_run) -> None:
    _, out, rows = dry_run
    with (out / "results.csv").open() as f:
        assert next(csv.reader(f)) == FIELDS
    assert rows and all(r["git_sha"] == SHA and r["machine"] and r["device"] == "cpu" for r in rows)
    assert all(math.isfinite(float(r["value"])) for r in rows)
    assert len(rows) == (out / "results.md").read_text().count("\n|") - 2 - 2 - len(gpu_check.STEPS)


def test_parity_covers_every_kernel_in_both_dtypes_and_passes(dry_run) -> None:
    _, _, rows = dry_run
    parity = [r for r in rows if r["bench"] == "parity"]
    assert parity and all(r["note"].startswith("ok") for r in parity)
    cases = {(r["provider"], r["size"].split("/")[0], r["size"].split("/")[1]) for r in parity}
    for dtype in ("float32", gpu_check.DRY_PLAN.low_precision):
        assert {("gae", "triton", dtype), ("gae", gpu_check.DRY_PLAN.ext_impl, dtype)} <= cases
        assert {
            ("group_stats", "triton", dtype),
            ("masked_whiten", "triton", dtype),
            ("logprobs", "triton", dtype),
        } <= cases
    metrics = {r["metric"] for r in parity if r["provider"] == "logprobs"}
    assert {
        "logprobs_max_abs_err",
        "entropy_max_abs_err",
        "d_logits_max_abs_err",
        "d_hidden_max_abs_err",
        "d_weight_max_abs_err",
    } <= metrics


def test_kernel_timings_have_bounds_speedups_and_agree_with_naive(dry_run) -> None:
    _, _, rows = dry_run
    for mod, bench, size, providers in gpu_check._kernel_benches(
        gpu_check.Check(gpu_check.DRY_PLAN, Path("."))
    ):
        for p in providers:
            for metric in ("time_median", "time_min", "peak_mem", "x_bound"):
                assert len(_metric(rows, bench, metric, p)) == 1, (bench, p, metric)
            if gpu_check._naive(bench, p) != p:
                assert float(_metric(rows, bench, "speedup_vs_naive", p)[0]["value"]) > 0
                agree = _metric(rows, bench, "out0_max_abs_err_vs_naive", p)
                assert agree and agree[0]["note"].startswith("ok"), (bench, p)


def test_train_and_engine_report_throughput_memory_and_a_landed_update(dry_run) -> None:
    _, _, rows = dry_run
    for metric in (
        "step_time_median",
        "tokens_per_s",
        "action_tokens_per_s",
        "peak_mem_step_extra",
        "mfu_vs_matmul",
    ):
        assert len(_metric(rows, "train", metric)) == 1, metric
    assert float(_metric(rows, "train", "tokens_per_s")[0]["value"]) > 0
    rates = _metric(rows, "engine", "tokens_per_s")
    assert sorted(r["size"].rsplit("/b", 1)[1] for r in rates) == sorted(
        map(str, gpu_check.DRY_PLAN.engine_batches)
    )
    atol = gpu_check.LANDING_ATOL[gpu_check.DRY_PLAN.dtype]
    assert float(_metric(rows, "engine", "landing_gap_before")[0]["value"]) > atol
    assert float(_metric(rows, "engine", "landing_gap_after")[0]["value"]) <= atol


# --------------------------------------------------------------------------- the guards


def _fake_steps(calls: list[str]) -> dict:
    def ok(check: gpu_check.Check) -> None:
        calls.append("ok")
        check.row("fake", "p", "s", "m", 1.0, "x")

    def boom(check: gpu_check.Check) -> None:
        calls.append("boom")
        check.row("fake", "p", "s", "before_crash", 2.0, "x")
        raise RuntimeError("injected crash")

    def unmet(check: gpu_check.Check) -> None:
        calls.append("unmet")
        check.expect(False, "injected failed expectation")
        check.expect(True, "never recorded")

    return {"ok": ok, "boom": boom, "unmet": unmet, "ok2": ok}


def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gpu_check, "STEPS", _fake_steps(calls))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # main() sets it for the dry run; restored after
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--only", "ok,boom,unmet,ok2"]) == 1
    assert calls == ["ok", "boom", "unmet", "ok"]
    report = (tmp_path / "results.md").read_text()
    assert "| ok | ok |" in report and "| ok2 | ok |" in report
    assert "| boom | failed |" in report and "RuntimeError: injected crash" in report
    assert (
        "| unmet | failed |" in report
        and "injected failed expectation" in report
        and "never recorded" not in report
    )
    with (tmp_path / "results.csv").open() as f:
        metrics = [r["metric"] for r in csv.DictReader(f)]
    assert metrics == ["m", "before_crash", "m"]  # a crashing step's rows are kept, once each


def test_only_ok_steps_exit_zero_and_steps_past_the_budget_do_not_run(
    tmp_path, monkeypatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gpu_check, "STEPS", _fake_steps(calls))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(["--out", str(tmp_path / "a"), "--dry-run", "--only", "ok,ok2"]) == 0
    assert (
        gpu_check.main(
            ["--out", str(tmp_path / "b"), "--dry-run", "--only", "ok,ok2", "--budget-s", "-1"]
        )
        == 1
    )
    assert calls == ["ok", "ok"]
    assert "| ok2 | not run |" in (tmp_path / "b" / "results.md").read_text()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.sampled_from([*gpu_check.STEPS, "nope", "", "ENV"]), max_size=6))
def test_only_accepts_exactly_known_step_names(names: list[str]) -> None:
    arg = ",".join(names)
    known = [n for n in names if n]
    if known and all(n in gpu_check.STEPS for n in known):
        assert gpu_check._parse(["--out", "x", "--only", arg]).steps == known
    else:
        with pytest.raises(SystemExit):
            gpu_check._parse(["--out", "x", "--only", arg])


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(finite, finite), min_size=1, max_size=20),
    st.sampled_from([(1e-4, 1e-4), (0.0, 1e-2), (1e-2, 0.0)]),
)
def test_compare_fails_exactly_when_an_element_is_out_of_tolerance(pairs, tol) -> None:
    atol, rtol = tol
    got = torch.tensor([g for g, _ in pairs])  # [n] fp32
    exp = torch.tensor([e for _, e in pairs])  # [n]
    diffs = [abs(g - e) for g, e in zip(got.tolist(), exp.tolist())]
    margins = [d - (atol + rtol * abs(e)) for d, e in zip(diffs, exp.tolist())]
    # off the edge, where fp32 and float64 could round the comparison differently
    assume(all(d == 0 or abs(m) > 1e-3 * (d + 1e-6) for d, m in zip(diffs, margins)))
    check = gpu_check.Check(gpu_check.DRY_PLAN, Path("."))
    gpu_check._compare(check, ("b", "p", "s", "m"), got, exp, atol, rtol)
    assert bool(check.failures) == any(m > 0 for m in margins)
    assert float(check._pending[0].value) == pytest.approx(max(diffs), rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("fault", ["offset", "nan", "shape", "none"])
def test_parity_catches_a_wrong_kernel(fault, monkeypatch) -> None:
    from lightning import kernels
    from lightning.kernels.gae import reference

    def fake_gae(rewards, values, mask, cu, *, gamma, lam, impl):
        adv, ret = reference.gae(
            rewards.float(),
            None if values is None else values.float(),
            mask,
            cu,
            gamma=gamma,
            lam=lam,
        )
        if fault == "offset":
            adv = adv + 1e-3  # 10x the tolerance
        elif fault == "nan":
            ret = ret.clone()
            ret[-1] = math.nan
        elif fault == "shape":
            adv = adv[:-1]
        return adv, ret

    monkeypatch.setattr(kernels, "gae", fake_gae)
    check = gpu_check.Check(dataclasses.replace(gpu_check.DRY_PLAN, gae_lengths=(3, 50)), Path("."))
    gpu_check._parity_gae(check)
    cases = 2 * 3 * 2  # dtypes x (gae, returns, unmasked) x impls
    if fault == "none":
        assert check.failures == [] and len(check._pending) == 2 * cases
    else:
        assert len(check.failures) == cases, check.failures
        what = {"offset": "advantages", "nan": "returns", "shape": "advantages"}[fault]
        assert all(what in f for f in check.failures)


def test_without_cuda_the_gpu_run_stops_at_once_and_says_so(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run_script(tmp_path, LIGHTNING_GPU_WHEELS=str(tmp_path / "no-wheels"))
    assert proc.returncode == 2
    assert "torch sees no CUDA device; on CPU run with --dry-run" in proc.stdout
    assert "bash bench/fetch_gpu_wheels.sh fetches them" in proc.stdout
    assert (tmp_path / "log.txt").read_text() == proc.stdout


def test_usage_error_without_an_output_folder() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "run_gpu.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "usage: bash bench/run_gpu.sh OUTDIR" in proc.stderr


def test_a_missing_module_or_the_wrong_lightning_stops_the_run_before_any_step(
    tmp_path, monkeypatch, capsys
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gpu_check, "STEPS", _fake_steps(calls))
    monkeypatch.setattr(gpu_check, "REQUIRED", ("msgspec", "no_such_module_17"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--only", "ok"]) == 2
    assert calls == []
    err = capsys.readouterr().err
    assert (
        "no_such_module_17 (ModuleNotFoundError" in err and "msgspec" not in err.split("import")[1]
    )
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)  # as if `lightning` came from elsewhere
    monkeypatch.setattr(gpu_check, "REQUIRED", ("lightning",))
    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--only", "ok"]) == 2
    assert f"not from {tmp_path}" in capsys.readouterr().err
