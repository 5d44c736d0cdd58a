"""Capture gaps found by held-out clients (#16 item 7): one rollout, several capture paths.

An app's runtime and the daemon's server-side capture record into the same rollout when
a client that does not use ``openai`` names the runtime's rollout (per-rollout URL or the
``X-Lightning-Rollout-Id`` header). These tests drive the real runtime, daemon and
policy server (tiny model) in one event loop and check what the daemon stores: every call
exactly once, in the order the calls were made, with no false warnings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

import lightning
from lightning import DaemonConfig
from lightning._ingest import IngestState
from lightning._protocol import (
    Batch,
    Reward,
    RolloutEnd,
    RolloutStart,
    Transition,
    pack_ids,
    unpack_ids,
)
from lightning.testing import Daemon, MemoryHub

openai = pytest.importorskip("openai")

BASE = "http://test/v1"


class Stack:
    def __init__(self, daemon: Daemon, server: Any, hub: MemoryHub) -> None:
        self.daemon = daemon
        self.server = server
        self.hub = hub

    def http(self) -> httpx.AsyncClient:
        """A raw HTTP client (no ``openai``) on the policy server."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.server.app),
                                 base_url="http://test")

    def openai(self, base_url: str = BASE, **kw: Any) -> Any:
        return openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0,
                                  http_client=self.http(), **kw)

    async def trajectory(self, timeout: float = 10.0) -> Any:
        with anyio.fail_after(timeout):
            return await self.daemon.buffer.get()


@contextlib.asynccontextmanager
async def _stack(tiny_dir, tmp_path, **server_kw: Any) -> AsyncIterator[Stack]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning.engine.torch_engine import TorchEngine
    from lightning.serving import PolicyServer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32,
                                                 local_files_only=True).eval()
    hub = MemoryHub()
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=hub)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=512, seed=0) as engine:
            server = PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture,
                                  **server_kw)
            server.ready = True
            yield Stack(daemon, server, hub)
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _session(stack: Stack, tmp_path, **kw: Any) -> AsyncIterator[Any]:
    settings = dict(spill_dir=str(tmp_path / "spill"), policy_url=BASE, policy_model="tiny",
                    heartbeat_s=0.05, peer_timeout_s=2.0)
    settings.update(kw)
    async with lightning.session(transport=stack.hub.connect(), **settings) as rt:
        yield rt


def _chat(content: str) -> dict[str, Any]:
    return {"model": "tiny", "max_tokens": 3, "seed": 1,
            "messages": [{"role": "user", "content": content}]}


def _prompt_text(stack: Stack, t: Transition) -> str:
    return stack.server.engine.decode(list(unpack_ids(t.prompt_ids)))


# ------------------------------------------------------------ (a) a start on its way


@pytest.mark.parametrize("name_it", ["rollout_id", "headers"])
async def test_a_raw_client_naming_the_runtimes_rollout_is_captured_without_a_404(
        tiny_dir, tmp_path, name_it):
    """The runtime holds a rollout's start back (open_linger_s); a raw client naming the
    rollout right away is captured once it lands (the server waits for it), or at once
    when the app took the id from ``.headers`` (the start is then sent within linger_s).
    The end's count is the runtime's own: no false 'recorded 0, 2 were stored'."""
    linger = 1.0 if name_it == "rollout_id" else 30.0  # .headers must not need the wait
    async with _stack(tiny_dir, tmp_path) as stack, _session(
            stack, tmp_path, open_linger_s=linger):
        statuses = []

        @lightning.rollout
        async def agent() -> float:
            ctx = lightning.current_rollout()
            headers = ({"X-Lightning-Rollout-Id": ctx.rollout_id} if name_it == "rollout_id"
                       else ctx.headers)
            async with stack.http() as http:
                t0 = time.monotonic()
                r = await http.post("/v1/chat/completions", headers=headers, json=_chat("a"))
                statuses.append((r.status_code, time.monotonic() - t0))
                r = await http.post(f"/rollouts/{ctx.rollout_id}/v1/completions",
                                    json={"model": "tiny", "prompt": "b", "max_tokens": 2})
                statuses.append((r.status_code, 0.0))
            return 1.0

        await agent()
        t = await stack.trajectory()
    assert [s for s, _ in statuses] == [200, 200], statuses
    if name_it == "headers":
        assert statuses[0][1] < 10.0  # far less than open_linger_s: the start was sent
    assert len(t.transitions) == 2 and t.warnings == []
    assert [tr.index for tr in t.transitions] == [0, 1]
    assert all(tr.metadata["source"] == "server" for tr in t.transitions)
    assert stack.daemon.stats().get("trajectories_incomplete", 0) == 0


async def test_an_unknown_or_finished_rollout_is_a_404_after_a_bounded_wait(tiny_dir, tmp_path):
    async with _stack(tiny_dir, tmp_path, rollout_start_wait_s=0.3) as stack:
        async with stack.http() as http:
            t0 = time.monotonic()
            r = await http.post("/rollouts/nobody/v1/chat/completions", json=_chat("x"))
            waited = time.monotonic() - t0
            assert r.status_code == 404 and r.json()["error"]["code"] == "rollout_not_found"
            assert "rollout_start_wait_s" in r.json()["error"]["message"]
            assert waited >= 0.3
            r = await http.post("/v1/rollouts/nobody/rewards", json={"value": 1.0})
            assert r.status_code == 404
            # a start that lands during the wait is served
            async with anyio.create_task_group() as tg:
                got: list[int] = []

                async def call() -> None:
                    got.append((await http.post("/rollouts/late/v1/chat/completions",
                                                json=_chat("x"))).status_code)

                tg.start_soon(call)
                await anyio.sleep(0.05)
                assert (await http.post("/v1/rollouts", json={"rollout_id": "late"})
                        ).status_code == 201
            assert got == [200]
            assert (await http.post("/v1/rollouts/late/end", json={})).json()[
                "n_transitions"] == 1
            # a finished rollout is refused at once: it never opens again
            t0 = time.monotonic()
            r = await http.post("/rollouts/late/v1/chat/completions", json=_chat("x"))
            assert r.status_code == 404 and time.monotonic() - t0 < 0.3
        stats = stack.daemon.stats()
        assert stats["capture_start_wait_timeouts"] == 2 and not stack.daemon._start_waiters


# ------------------------------------------------------------ (b) both paths, one rollout


@pytest.mark.parametrize("open_linger_s", [0.0, 30.0])
async def test_mixed_capture_paths_store_every_call_once_in_call_order(
        tiny_dir, tmp_path, open_linger_s):
    """openai call (client-side), raw header call (server-side), openai call: all three,
    in call order, whether the runtime's events reach the daemon before the server's
    (open_linger_s=0) or after it (30 s: the third call and the rewards are sent by the
    rollout's end; ``.headers`` sent the start and the first call early)."""
    async with _stack(tiny_dir, tmp_path) as stack, _session(
            stack, tmp_path, open_linger_s=open_linger_s) as rt:

        @lightning.rollout
        async def agent() -> float:
            ctx = lightning.current_rollout()
            async with stack.openai() as client, stack.http() as http:
                await client.chat.completions.create(**_chat("first"))
                lightning.emit_reward(0.25)
                headers = (ctx.headers if open_linger_s else
                           {"X-Lightning-Rollout-Id": ctx.rollout_id})
                r = await http.post("/v1/chat/completions", headers=headers,
                                    json=_chat("second"))
                assert r.status_code == 200, r.text
                lightning.emit_reward(0.5)
                await client.chat.completions.create(**_chat("third"))
            lightning.emit_reward(0.75)
            return 1.0

        await agent()
        t = await stack.trajectory()
        assert rt.counters["events_rejected"] == 0
    texts = [_prompt_text(stack, tr) for tr in t.transitions]
    assert len(texts) == 3, texts
    assert ["first" in texts[0], "second" in texts[1], "third" in texts[2]] == [True] * 3
    assert [tr.index for tr in t.transitions] == [0, 1, 2]
    assert [tr.metadata.get("source", "client") for tr in t.transitions] == [
        "client", "server", "client"]
    assert [(r.value, r.after) for r in t.rewards] == [(0.25, 1), (0.5, 2), (0.75, 3)]
    assert t.warnings == [] and stack.daemon.stats().get("rejected.transition_order", 0) == 0


def _tr(rid: str, index: int, at: float) -> Transition:
    return Transition(rollout_id=rid, index=index, prompt_ids=pack_ids([index]),
                      response_ids=pack_ids([1]), created_at=at)


def test_ingest_interleaves_sources_by_time_keeping_each_sources_order():
    """The state machine alone: two sources, arrival order unlike call order; each
    source's own order wins over its clock (a clock step back), rewards move with it;
    a replay of the same batches (recovery) gives the same trajectory."""
    batches = [
        Batch(client_id="rt", first_seq=1, events=[RolloutStart(rollout_id="r", name="n")]),
        Batch(client_id="srv", first_seq=1, events=[_tr("r", 0, 2.0), _tr("r", 1, 4.0)]),
        Batch(client_id="rt", first_seq=2, events=[
            _tr("r", 0, 1.0), Reward(rollout_id="r", value=1.0, after=1, created_at=1.5),
            _tr("r", 1, 3.0), _tr("r", 2, 2.5),  # the clock stepped back: order is kept
            Reward(rollout_id="r", value=2.0, after=3, created_at=9.0),
            RolloutEnd(rollout_id="r", n_transitions=3)]),
    ]
    outs = []
    for _ in range(2):
        state = IngestState()
        done = [t for b in batches for t in state.apply(b).completed]
        assert len(done) == 1 and state.counters.get("rejected.transition_order", 0) == 0
        outs.append(done[0])
    t = outs[0]
    assert t.warnings == []
    # rt0 (1.0), srv0 (2.0), rt1 (3.0), rt2 (2.5, after rt1), srv1 (4.0)
    assert [(tr.prompt_ids, tr.created_at) for tr in t.transitions] == [
        (pack_ids([0]), 1.0), (pack_ids([0]), 2.0), (pack_ids([1]), 3.0),
        (pack_ids([2]), 2.5), (pack_ids([1]), 4.0)]
    assert [tr.index for tr in t.transitions] == [0, 1, 2, 3, 4]
    assert [r.after for r in t.rewards] == [1, 5]
    assert outs[1] == t


def test_an_end_is_checked_against_its_own_senders_transitions():
    state = IngestState()
    state.apply(Batch(client_id="rt", first_seq=1, events=[
        RolloutStart(rollout_id="r", name="n"), _tr("r", 0, 1.0), _tr("r", 5, 1.0)]))
    state.apply(Batch(client_id="srv", first_seq=1, events=[_tr("r", 0, 2.0)]))
    (t,) = state.apply(Batch(client_id="rt", first_seq=4, events=[
        RolloutEnd(rollout_id="r", n_transitions=2)])).completed
    assert state.counters["rejected.transition_order"] == 1
    assert t.warnings == ["client recorded 2 transitions, 1 of them were stored (the others "
                          "were rejected); 1 more were stored from other sources"]


# ------------------------------------------------------------ (c) once, not twice


@pytest.mark.parametrize("how", ["base_url", "default_headers", "extra_headers"])
async def test_an_openai_client_naming_its_rollout_is_stored_once(tiny_dir, tmp_path, how):
    async with _stack(tiny_dir, tmp_path) as stack, _session(stack, tmp_path,
                                                             open_linger_s=0) as rt:

        @lightning.rollout
        async def agent() -> float:
            ctx = lightning.current_rollout()
            if how == "base_url":
                assert ctx.base_url == f"http://test/rollouts/{ctx.rollout_id}/v1"
                client = stack.openai(ctx.base_url)
            elif how == "default_headers":
                client = stack.openai(default_headers={"X-Lightning-Rollout-Id": ctx.rollout_id})
            else:
                client = stack.openai()
            extra = ({"extra_headers": {"x-lightning-rollout-id": ctx.rollout_id}}
                     if how == "extra_headers" else {})
            async with client:
                await client.chat.completions.create(**_chat("once"), **extra)
                stream = await client.chat.completions.create(**_chat("twice"), stream=True,
                                                              **extra)
                async for _ in stream:
                    pass
            assert ctx.n_transitions == 0  # not recorded in the app: the server did
            return 1.0

        await agent()
        t = await stack.trajectory()
        assert rt.counters["events_rejected"] == 0
    assert len(t.transitions) == 2 and t.warnings == []
    assert all(tr.metadata["source"] == "server" for tr in t.transitions)
    assert ["once" in _prompt_text(stack, tr) for tr in t.transitions] == [True, False]


def test_a_snapshot_keeps_each_events_source():
    """Compaction mid-rollout: the snapshot of an open rollout fed by two sources
    recovers the same numbering and the same interleaved trajectory."""
    import msgspec

    from lightning._ingest import Snapshot

    head = [Batch(client_id="rt", first_seq=1, events=[
                RolloutStart(rollout_id="r", name="n"), _tr("r", 0, 1.0)]),
            Batch(client_id="srv", first_seq=1, events=[_tr("r", 0, 2.0)])]
    tail = [Batch(client_id="rt", first_seq=3, events=[
                _tr("r", 1, 3.0), RolloutEnd(rollout_id="r", n_transitions=2)])]
    live = IngestState()
    for b in head:
        live.apply(b)
    data = msgspec.msgpack.encode(live.snapshot(wal_from="", committed=-1, pending=[]))
    recovered = IngestState.from_snapshot(msgspec.msgpack.decode(data, type=Snapshot))
    (a,) = [t for b in tail for t in live.apply(b).completed]
    (b,) = [t for b_ in tail for t in recovered.apply(b_).completed]
    assert a == b and a.warnings == [] and [t.created_at for t in a.transitions] == [1.0, 2.0, 3.0]
    single = IngestState()
    single.apply(Batch(client_id="rt", first_seq=1, events=[
        RolloutStart(rollout_id="s", name="n"), _tr("s", 0, 1.0)]))
    (o,) = single.snapshot(wal_from="", committed=-1, pending=[]).open
    assert o.transition_sources == []  # one source: nothing extra in the snapshot
