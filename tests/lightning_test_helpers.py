"""Helpers shared by the end-to-end tests (a module, not conftest, so it can be imported)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The sampling configurations the "same numbers on both sides" tests sweep (engine
#: sampling vs trainer scoring), shared by the torch-engine and vLLM-engine tests.
SAMPLING_CONFIGS = {
    "t0.3": {"temperature": 0.3},
    "t0.7": {"temperature": 0.7},
    "t1.0": {"temperature": 1.0},
    "t1.3": {"temperature": 1.3},
    "top_p0.9": {"temperature": 1.0, "top_p": 0.9},
    "top_k20": {"temperature": 1.0, "top_k": 20},
    "t0.7-top_p0.9": {"temperature": 0.7, "top_p": 0.9},
    "greedy": {"temperature": 0.0},
    "greedy-top_k20": {"temperature": 0.0, "top_k": 20},
}


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class DaemonProcess:
    """`lightning-daemon` in a subprocess (what users run), for kill/restart tests."""

    def __init__(self, data_dir: Path, address: str, *extra: str) -> None:
        self.data_dir = data_dir
        self.address = address
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self) -> DaemonProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lightning._cli", "--bind", self.address,
             "--data-dir", str(self.data_dir), "--print-address", "--stats-interval-s", "0",
             "--model", "none",
             *self.extra],
            stdout=subprocess.PIPE,
            stderr=logf,
            env=env,
        )
        logf.close()
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"daemon failed to start: {self.log.read_text()[-2000:]}")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = self.proc.wait(timeout=30)
        self.proc.stdout.close()
        return rc


def wait_until(pred, timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
