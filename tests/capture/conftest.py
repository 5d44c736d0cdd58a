from __future__ import annotations

import threading
import time

import pytest
from fake_openai import FakeOpenAI, make_app

from lightning import RuntimeConfig, _lifecycle
from lightning._protocol import Transition, encode_event

pytest.importorskip("openai")


class Recorder:
    """Stands in for the runtime: keeps submitted events (checked to be encodable)."""

    def __init__(self, **cfg):
        self.config = RuntimeConfig(**cfg)
        self.events = []
        self._lock = threading.Lock()

    def submit(self, event):
        encode_event(event)  # what the real runtime sends must encode
        with self._lock:
            self.events.append(event)

    def transitions(self):
        return [e for e in self.events if isinstance(e, Transition)]


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(_lifecycle, "_current", r)
    return r


class Server:
    def __init__(self, fake: FakeOpenAI, root: str) -> None:
        self.fake = fake
        self.root = root

    def url(self, mode: str) -> str:
        return f"{self.root}/{mode}/v1"

    def bodies(self, endpoint: str | None = None) -> list[dict]:
        return [b for p, b in self.fake.requests if endpoint is None or p.endswith(endpoint)]


@pytest.fixture(scope="session")
def _server():
    import uvicorn

    fake = FakeOpenAI()
    config = uvicorn.Config(
        make_app(fake),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-openai", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake OpenAI server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Server(fake, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def server(_server):
    _server.fake.requests.clear()
    return _server


@pytest.fixture
def capture(server):
    """Capture installed; the lightning, malformed and misaligned servers give token ids."""
    from lightning import _capture
    from lightning._capture import openai as cap

    cap._logged.clear()
    _capture.install(
        token_id_base_urls=[
            server.url("lightning"),
            server.url("malformed"),
            server.url("misaligned"),
        ]
    )
    yield cap
    _capture.uninstall()
    cap._logged.clear()
