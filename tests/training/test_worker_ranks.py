"""lightning-daemon under torchrun/deepspeed: ranks other than 0 only train."""

import os
import signal
import socket
import subprocess
import sys

import anyio
import pytest
from test_train_cli import _run_client

from lightning._cli import daemon_main
from lightning.models import tiny_model_path
from lightning_test_helpers import ROOT, wait_until


def test_single_process_backend_refuses_a_worker_rank(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = daemon_main(["--backend", "torch", "--model", "default", "--local_rank=1"])
    assert rc == 2
    assert "runs in one process" in capsys.readouterr().err


def test_worker_rank_needs_a_model(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert daemon_main(["--backend", "deepspeed", "--model", "none"]) == 2
    assert "worker ranks need a --model" in capsys.readouterr().err


@pytest.mark.slow
def test_deepspeed_daemon_on_two_ranks_trains_and_stops(tmp_path):
    """torchrun, 2 ranks, ZeRO-2: rank 0 serves and ingests, rank 1 trains with it."""
    pytest.importorskip("deepspeed")
    cfg = tmp_path / "ds.toml"
    cfg.write_text("zero_stage = 2\nlr = 0.01\nmicro_batch_tokens = 512\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logf = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "lightning._cli", "--backend", "deepspeed",
         "--backend-config", str(cfg), "--model", str(tiny_model_path()), "--http-port", "0",
         "--bind", "tcp://127.0.0.1:0", "--data-dir", str(tmp_path / "data"),
         "--print-address", "--group-size", "2", "--batch-size", "4", "--save-every", "1"],
        stdout=subprocess.PIPE, stderr=logf, env=env,
    )
    try:
        lines = []  # DeepSpeed prints to stdout too: take our two lines
        while len(lines) < 2:
            line = proc.stdout.readline().decode()
            assert line, (tmp_path / "log").read_text()[-3000:]
            if line.startswith(("tcp://", "http://")):
                lines.append(line.strip())
        address, base_url = lines
        anyio.run(_run_client, address, base_url, 2)
        assert wait_until(
            lambda: (tmp_path / "data" / "checkpoints" / "step-000002").exists(), timeout=60)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
        proc.wait(timeout=60)  # torchrun itself reports the signal with a non-zero status
        log = (tmp_path / "log").read_text()
        assert '"daemon.stopped"' in log, log[-3000:]
        assert not [ln for ln in log.splitlines() if ln.startswith(("[rank0]", "[rank1]"))
                    and "Error" in ln], log[-3000:]  # neither rank died with a traceback
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        logf.close()
