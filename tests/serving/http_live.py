"""A live daemon + tiny torch engine + policy servers (one without a key, one with), driven
from synchronous tests (hypothesis) through an anyio blocking portal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
from anyio.from_thread import start_blocking_portal

from lightning import DaemonConfig
from lightning.engine.torch_engine import TorchEngine
from lightning.serving import PolicyServer
from lightning.testing import Daemon, MemoryHub

KEY = "sk-test-key"


class Live:
    """Blocking handles on the running stack: ``post(path, ...)`` -> ``httpx.Response``."""

    def __init__(self, portal: Any, daemon: Daemon, open_: PolicyServer, keyed: PolicyServer,
                 clients: dict[str, httpx.AsyncClient]) -> None:
        self.portal = portal
        self.daemon = daemon
        self.server = open_
        self.keyed = keyed
        self.clients = clients

    def request(self, method: str, path: str, *, server: str = "open",
                **kw: Any) -> httpx.Response:
        return self.portal.call(lambda: self.clients[server].request(method, path, **kw))

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the event loop (daemon state is the loop's)."""

        async def run() -> Any:
            return fn(*args)

        return self.portal.call(run)


@contextlib.asynccontextmanager
async def _stack(model_dir: Path, data_dir: Path, **server_kw: Any) -> AsyncIterator[tuple]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 local_files_only=True).eval()
    daemon = Daemon(DaemonConfig(data_dir=str(data_dir), stats_interval_s=0),
                    transport=MemoryHub())
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=256, max_num_seqs=8, seed=0) as engine:
            servers = [PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture,
                                    api_key=key, **server_kw) for key in (None, KEY)]
            clients = {}
            for name, s in zip(("open", "keyed"), servers):
                s.ready = True
                clients[name] = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=s.app), base_url="http://test")
            try:
                yield daemon, servers[0], servers[1], clients
            finally:
                for c in clients.values():
                    await c.aclose()
        tg.cancel_scope.cancel()


@contextlib.contextmanager
def live_stack(model_dir: Path, data_dir: Path, **server_kw: Any) -> Iterator[Live]:
    with start_blocking_portal(backend="asyncio") as portal:
        with portal.wrap_async_context_manager(_stack(model_dir, data_dir, **server_kw)) as s:
            daemon, open_, keyed, clients = s
            yield Live(portal, daemon, open_, keyed, clients)
