from __future__ import annotations

from pathlib import Path

import pytest

from lightning_test_helpers import DaemonProcess, free_tcp_address


@pytest.fixture
def anyio_backend():
    # ZeroMQ's async support is asyncio-only, so the whole suite runs on asyncio.
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_leftover_runtime():
    yield
    import lightning

    lightning.shutdown(grace_s=0)


@pytest.fixture
def daemon_process(tmp_path):
    procs: list[DaemonProcess] = []

    def make(*extra: str, address: str | None = None, data_dir: Path | None = None):
        d = DaemonProcess(data_dir or tmp_path / "data", address or free_tcp_address(), *extra)
        procs.append(d)
        return d

    yield make
    for d in procs:
        if d.proc is not None and d.proc.poll() is None:
            d.kill()


