"""`lightning-daemon --model ...`: ingest + policy server in one process, for real."""

from __future__ import annotations

import subprocess
import sys

import httpx


from lightning.testing import recover

from lightning_test_helpers import ROOT, DaemonProcess, free_tcp_address


def test_daemon_serves_the_policy_and_captures_server_side(tiny_dir, tmp_path):
    d = DaemonProcess(tmp_path / "data", free_tcp_address())
    d.extra = ("--model", str(tiny_dir), "--http-port", "0", "--served-model-name", "tiny",
               "--max-model-len", "512")
    # DaemonProcess passes --model none first; the later --model wins in argparse
    d.start()
    try:
        base = d.proc.stdout.readline().decode().strip()
        assert base.startswith("http://127.0.0.1:") and base.endswith("/v1")
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.get("/models").json()["data"][0]["id"] == "tiny"
            rid = http.post("/rollouts", json={"name": "curl"}).json()["rollout_id"]
            r = http.post(f"{base[:-3]}/rollouts/{rid}/v1/chat/completions",
                          json={"model": "tiny", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"]
            assert http.post(f"/rollouts/{rid}/end", json={"final_reward": 1}).status_code == 200
    finally:
        assert d.stop() == 0
    _, trajs, _ = recover(tmp_path / "data")
    assert len(trajs) == 1 and len(trajs[0].transitions) == 1


def test_non_loopback_http_needs_an_api_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning._cli", "--http-host", "0.0.0.0",
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--api-key" in out.stderr


def test_otlp_only_non_loopback_listener_needs_an_api_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning._cli", "--model", "none", "--otlp-port", "0",
         "--http-host", "0.0.0.0", "--bind", "tcp://127.0.0.1:0",
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--api-key" in out.stderr, out.stderr[-2000:]
