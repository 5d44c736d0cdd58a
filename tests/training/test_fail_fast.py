"""A broken agent stops ``lightning train`` at once, with its first error, the counts and a hint.

The rule itself (:class:`lightning.training.failures.FailureMonitor`) is checked against a
plain re-statement of it on random outcome sequences; the CLI tests run the real
``lightning train`` on the tiny model with agents that fail (tests/training/broken_agents.py).
"""

import json
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning.models import tiny_model_path
from lightning.training.failures import (AgentFailingError, FailureMonitor, FailurePolicy,
                                         hint_for)

from test_train_cli import env


def _expected_trip(outcomes: list[bool], p: FailurePolicy) -> int | None:
    """The 1-based position where the rule trips (None: never), restated from its docs."""
    for n in range(1, len(outcomes) + 1):
        seen = outcomes[:n]
        if not seen[-1]:
            continue  # only a failure can trip it
        if p.first_n and n >= p.first_n and all(seen):
            return n
        if p.window and n >= p.window and sum(seen[-p.window:]) > p.max_rate * p.window:
            return n
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=120), st.integers(0, 10), st.integers(0, 30),
       st.floats(0.0, 1.0))
def test_the_monitor_trips_exactly_where_the_rule_says(outcomes, first_n, window, rate):
    policy = FailurePolicy(first_n=first_n, window=window, max_rate=rate)
    monitor = FailureMonitor(policy)
    tripped = None
    for n, failed in enumerate(outcomes, 1):
        try:
            monitor.failure(ValueError(n)) if failed else monitor.ok()
        except AgentFailingError as exc:
            tripped = n
            assert exc.failed == sum(outcomes[:n]) and exc.finished == n
            assert str(exc.first) == str(outcomes.index(True) + 1)  # the first failure
            break
    assert tripped == _expected_trip(outcomes, policy)


def test_all_failed_evaluation_and_its_report():
    m = FailureMonitor(FailurePolicy(first_n=0, window=0), phase="evaluation")
    for _ in range(3):
        try:
            import lightning_test_missing_module  # noqa: F401
        except ImportError as exc:
            m.failure(exc)
    with pytest.raises(AgentFailingError) as info:
        m.all_failed()
    report = info.value.report()
    assert "3 of 3 failed (every rollout failed)" in report
    assert "pip install lightning_test_missing_module" in report
    assert "Traceback" in report and "test_fail_fast.py" in report
    ok = FailureMonitor(FailurePolicy(first_n=0, window=0))
    ok.ok()
    ok.all_failed()  # one success: no error


@pytest.mark.parametrize("exc, hint", [
    (ModuleNotFoundError("x", name="openai"), "pip install openai"),
    (ModuleNotFoundError("x", name="yaml"), "pip install pyyaml"),
    (ModuleNotFoundError("x", name="langchain_openai.chat"), "pip install langchain-openai"),
    (ImportError("cannot import name 'x'"), "an import in the agent fails"),
    (RuntimeError("boom"), None),
])
def test_hints(exc, hint):
    got = hint_for(exc)
    assert (got is None) if hint is None else (hint in got)


@pytest.mark.parametrize("kwargs", [{"first_n": -1}, {"window": -2}, {"max_rate": 1.5}])
def test_bad_policy(kwargs):
    with pytest.raises(ValueError):
        FailurePolicy(**kwargs)


def _train(tmp_path, *args, timeout=120):
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train", "--model", str(tiny_model_path()),
         "--out", str(tmp_path / "run"), "--no-progress", "--steps", "2", "--group-size", "2",
         "--batch-size", "4", *args],
        capture_output=True, text=True, env=env(), timeout=timeout,
    )
    return proc, time.monotonic() - t0


def test_an_agent_missing_a_module_stops_the_run_before_training(tmp_path):
    proc, took = _train(tmp_path, "--agent", "broken_agents:missing_module")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert took < 60
    err = proc.stderr
    assert "fail systematically (evaluation)" in err and "4 of 4 failed" in err, err[-3000:]
    assert "ModuleNotFoundError: No module named 'lightning_test_missing_module'" in err
    assert "hint: pip install lightning_test_missing_module" in err
    assert "Traceback" in err and "broken_agents.py" in err  # the first failure's traceback
    assert not (tmp_path / "run" / "summary.json").exists()
    # the log says each failure once, then counts the repeats (no storm)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    failed = [r for r in log if r["event"] == "runner.eval_failed"]
    written = [r for r in failed if not r.get("summary")]
    assert 1 <= len(written) <= 2
    assert sum(r.get("repeated", 0) for r in failed) + len(written) == 4


def test_an_agent_missing_a_module_stops_training_when_there_is_no_evaluation(tmp_path):
    proc, took = _train(tmp_path, "--agent", "broken_agents:missing_module", "--eval-tasks", "0")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert took < 60
    assert "fail systematically (training): 8 of 8 failed (each of the first 8 failed)" \
        in proc.stderr, proc.stderr[-3000:]
    assert "hint: pip install lightning_test_missing_module" in proc.stderr


def test_a_high_failure_rate_stops_training(tmp_path):
    proc, _ = _train(tmp_path, "--agent", "broken_agents:mostly_fails", "--eval-tasks", "0",
                     "--fail-window", "50", "--fail-max-rate", "0.9", "--concurrency", "1")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "of the last 50 failed, over the 90% limit" in proc.stderr, proc.stderr[-3000:]
    assert "RuntimeError: the tool backend is down" in proc.stderr


@pytest.mark.parametrize("agent, message", [
    ("bad_dataset_agents:agent", "must return a pair (train_tasks, eval_tasks) of sequences "
     "(lists); it returned a list of 3"),
    ("broken_agents:missing_module", None),
])
def test_dataset_contract(tmp_path, agent, message):
    if message is None:  # dataset(seed=...) accepted: the run gets past it (then stops: exit 3)
        proc, _ = _train(tmp_path, "--agent", agent, "--eval-tasks", "0")
        assert proc.returncode == 3, proc.stderr[-2000:]
        return
    proc, _ = _train(tmp_path, "--agent", agent)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
