"""The main job and the daemon's training loop, end to end on a tiny random model.

``lightning train`` runs a toy agent (tests/training/toy_agent.py: reward = share of
"favoured" tokens, ~0.5 for a random model) through the real stack: HTTP policy server,
ZeroMQ runtime, daemon, batcher, torch backend, weight publishing. The reward must rise.
Then ``lightning-daemon`` trains on rollouts from a client, is killed, and resumes from its
checkpoint with the same policy version.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from lightning.models import tiny_model_path
from lightning_test_helpers import ROOT, wait_until

HERE = Path(__file__).parent


def env():
    path = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_lightning_train_raises_the_reward(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning._train", "train", "--agent", "toy_agent:agent",
         "--model", str(tiny_model_path()), "--out", str(out), "--steps", "10",
         "--group-size", "8", "--batch-size", "32", "--lr", "0.02", "--eval-tasks", "8",
         "--eval-samples", "4", "--no-progress"],
        capture_output=True, text=True, env=env(), timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy (8 tasks x 4)" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["train/step"] for m in train] == list(range(1, 11))
    assert [m["train/policy_version"] for m in train] == list(range(1, 11))
    first = sum(m["reward/mean"] for m in train[:3]) / 3
    last = sum(m["reward/mean"] for m in train[-3:]) / 3
    assert 0.3 < first < 0.7, first  # the random model: about half
    assert last > first + 0.15, (first, last)
    # trainer and sampler agree on the log-probs of the sampled tokens
    assert max(m["actor/logprob_gap"] for m in train) < 0.02
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["after"] > summary["eval"]["before"] + 0.15
    assert summary["steps"] == 10 and summary["train_tokens_per_s"] > 0
    assert (out / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoints" / "step-000010" / "trainer.json").exists()


@pytest.mark.parametrize("agent, message", [
    ("nope_module:agent", "cannot import 'nope_module'"),
    ("toy_agent:nope", "'toy_agent' has no attribute 'nope'"),
    ("json:dumps", "is not a rollout: decorate it with @lightning.rollout"),
])
def test_lightning_train_reports_bad_arguments(tmp_path, agent, message):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train", "--agent", agent,
         "--out", str(tmp_path / "x")],
        capture_output=True, text=True, env=env(), timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize("flag, package", [("--backend=verl", "verl"), ("--engine=vllm", "vllm")])
def test_lightning_train_names_the_extra_of_a_missing_package(tmp_path, flag, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train", flag, "--agent", "toy_agent:agent",
         "--model", str(tiny_model_path()), "--out", str(tmp_path / "x"), "--eval-tasks", "0",
         "--no-progress"],
        capture_output=True, text=True, env=env(), timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install" in proc.stderr and package in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def _models(base_url: str) -> dict:
    return httpx.get(base_url + "/models", timeout=10).json()["data"][0]


async def _run_client(address: str, base_url: str, version: int) -> None:
    """Send groups of 2 rollouts until the served policy reaches ``version`` (a group whose
    two rewards happen to be equal carries no signal and is set aside, so count steps)."""
    import lightning
    import toy_agent

    async with lightning.session(daemon=address, policy_url=base_url, policy_model="default"):
        for round_ in range(20):
            async with anyio.create_task_group() as tg:
                for t in range(2):
                    for a in range(2):

                        async def one(t=t, a=a):
                            with lightning.rollout_options(group_key=f"{round_}-{t}", attempt=a):
                                await toy_agent.agent({"id": t})

                        tg.start_soon(one)
            with anyio.move_on_after(10):
                while _models(base_url)["policy_version"] < version:
                    await anyio.sleep(0.1)
            if _models(base_url)["policy_version"] >= version:
                return
        raise AssertionError(f"the policy never reached version {version}")


@pytest.mark.slow
def test_daemon_trains_checkpoints_and_resumes_after_kill(tmp_path, monkeypatch, daemon_process):
    monkeypatch.syspath_prepend(str(HERE))
    data = tmp_path / "data"
    args = ("--model", str(tiny_model_path()), "--http-port", "0", "--group-size", "2",
            "--batch-size", "4", "--save-every", "1", "--backend-config", "")
    cfg = tmp_path / "backend.toml"
    cfg.write_text("lr = 0.01\nmicro_batch_tokens = 512\n")
    args = (*args[:-1], str(cfg))
    d = daemon_process(*args, data_dir=data).start()
    base_url = d.proc.stdout.readline().decode().strip()
    assert _models(base_url)["policy_version"] == 0
    anyio.run(_run_client, d.address, base_url, 2)
    ckpt = data / "checkpoints"
    assert wait_until(lambda: (ckpt / "step-000002" / "trainer.json").exists(), timeout=60), \
        d.log.read_text()[-3000:]
    assert wait_until(lambda: _models(base_url)["policy_version"] == 2, timeout=30)
    d.kill()

    d2 = daemon_process(*args, data_dir=data).start()
    base_url = d2.proc.stdout.readline().decode().strip()
    # ready only once the checkpoint is loaded: the first 200 from /ready already serves v2
    root = base_url.removesuffix("/v1")
    first_ready = []

    def ready() -> bool:
        r = httpx.get(root + "/ready", timeout=10)
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            first_ready.append(r.json()["policy_version"])
        return bool(first_ready)

    assert wait_until(ready, timeout=60)
    assert first_ready[0] == 2
    assert wait_until(lambda: _models(base_url)["policy_version"] == 2, timeout=60)
    log = d2.log.read_text()
    assert '"trainer.resumed"' in log and '"step":2' in log
    anyio.run(_run_client, d2.address, base_url, 3)
    assert wait_until(lambda: _models(base_url)["policy_version"] == 3, timeout=60)
    assert d2.stop() == 0
