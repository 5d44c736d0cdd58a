"""Issue 15's acceptance: the trainer scores what the sampler sampled.

Through the real policy server (torch engine, tiny random model) and both capture paths
(server-side capture into the daemon, and the app-side openai capture), for each sampling
configuration the first on-policy step's mean |trainer - sampler| log-prob gap is < 1e-3
and its ratio is 1. The same data scored the old way (one temperature, no truncation:
``sampling`` stripped) is far off, so the test can fail.
"""

from __future__ import annotations

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning_test_helpers import SAMPLING_CONFIGS

import lightning
from lightning import _capture, _lifecycle
from lightning._protocol import Sampling, Transition, check_sampling
from lightning._sequences import merge_transitions
from lightning.training import pack_sequences

CONFIGS = SAMPLING_CONFIGS
PROMPTS = ["What is 2+3?", "Name a colour.", "Say hi", "Count to three."]


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from lightning_backends._torch import TorchBackend, TorchBackendConfig

    b = TorchBackend()
    # lr 0: the step reports its metrics and leaves the weights as the engine has them
    b.setup(str(tiny_dir), TorchBackendConfig(device="cpu", lr=0.0, micro_batch_tokens=4096))
    return b


async def _server_side(client, daemon, params):
    out = []
    for text in PROMPTS:
        rid = (await client.post("/v1/rollouts", json={"name": "agent"})).json()["rollout_id"]
        r = await client.post(f"/rollouts/{rid}/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": text}],
            "max_tokens": 8, "seed": len(out), **params})
        assert r.status_code == 200, r.text
        await client.post(f"/v1/rollouts/{rid}/end", json={"final_reward": 0.0})
        out += daemon.buffer.get_nowait().transitions
    return out


class _Recorder:
    def __init__(self):
        self.config = lightning.RuntimeConfig()
        self.events = []

    def submit(self, event):
        self.events.append(event)


async def _app_side(server, params, monkeypatch):
    import openai

    rec = _Recorder()
    monkeypatch.setattr(_lifecycle, "_current", rec)
    _capture.install(token_id_base_urls=["http://test/v1"])
    top_k = params.get("top_k")
    body = {k: v for k, v in params.items() if k != "top_k"}
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app))
    try:
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x",
                                      http_client=http, max_retries=0) as client:
            @lightning.rollout
            async def agent(text):
                await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": text}], max_tokens=8,
                    **body, **({"extra_body": {"top_k": top_k}} if top_k else {}))

            for text in PROMPTS:
                await agent(text)
    finally:
        _capture.uninstall()
    return [e for e in rec.events if isinstance(e, Transition)]


def _step(backend, transitions):
    seqs = [s for t in transitions for s in merge_transitions([t])]
    batch = pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))])
    return backend.train_step(batch)


@pytest.mark.parametrize("path", ["server", "app"])
@pytest.mark.parametrize("name", list(CONFIGS))
async def test_first_on_policy_step_has_no_gap(stack, backend, monkeypatch, name, path):
    server, daemon, client = stack
    params = CONFIGS[name]
    if path == "server":
        transitions = await _server_side(client, daemon, params)
    else:
        transitions = await _app_side(server, params, monkeypatch)
    assert len(transitions) == len(PROMPTS)
    for t in transitions:
        s = t.sampling
        assert s is not None and s.logprobs == "processed"
        assert s.temperature == params["temperature"]
        assert s.top_p == params.get("top_p", 1.0) and s.top_k == params.get("top_k", 0)
        assert t.policy_version == 0
    m = _step(backend, transitions)
    assert m["actor/logprob_gap"] < 1e-3, m
    assert m["actor/logprob_gap_p99"] < 5e-3, m
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=2e-3)
    assert m["actor/clip_frac"] == 0.0 and m["actor/clip_frac_low"] == 0.0
    assert m["data/unknown_temperature_tokens"] == 0
    greedy = params["temperature"] == 0
    assert m["data/greedy_tokens"] == (m["perf/action_tokens"] if greedy else 0)
    if not greedy and params != {"temperature": 1.0}:
        # the old scoring (one temperature 1, full vocabulary; greedy was already scored
        # at 1) on the same data
        blind = [msgspec.structs.replace(t, sampling=None) for t in transitions]
        assert _step(backend, blind)["actor/logprob_gap"] > 0.02


async def test_a_stream_that_leaves_parameters_out_gets_the_servers_report(stack, monkeypatch):
    """The app set only top_p and streamed: the capture takes the server's report (its
    default temperature, top_k and the log-prob convention), not a guess."""
    import openai

    server, _, _ = stack
    rec = _Recorder()
    monkeypatch.setattr(_lifecycle, "_current", rec)
    _capture.install(token_id_base_urls=["http://test/v1"])
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app))
    try:
        async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x",
                                      http_client=http, max_retries=0) as client:
            @lightning.rollout
            async def agent():
                stream = await client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                    top_p=0.8, stream=True)
                async for _ in stream:
                    pass

            await agent()
    finally:
        _capture.uninstall()
    (t,) = [e for e in rec.events if isinstance(e, Transition)]
    assert t.sampling == Sampling(temperature=1.0, top_p=0.8, top_k=0, logprobs="processed")


_num = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32),
                 st.integers(-3, 3), st.just("0.7"))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(t=_num, p=_num, k=st.one_of(st.none(), st.integers(-3, 60)))
async def test_any_sampling_request_is_a_4xx_or_reports_what_was_recorded(stack, t, p, k):
    """Fuzzed sampling parameters against the live server with server-side capture: a
    4xx (never a 5xx), or a 200 whose ``sampling`` report is what the transition carries."""
    server, daemon, client = stack
    rid = (await client.post("/v1/rollouts", json={"name": "fuzz"})).json()["rollout_id"]
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update({key: v for key, v in (("temperature", t), ("top_p", p), ("top_k", k))
                 if v is not None})
    r = await client.post(f"/rollouts/{rid}/v1/chat/completions", json=body)
    await client.post(f"/v1/rollouts/{rid}/end", json={})
    traj = daemon.buffer.get_nowait()
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert traj.transitions == []
        return
    rep = r.json()["sampling"]
    (tr,) = traj.transitions
    assert tr.sampling == Sampling(temperature=rep["temperature"], top_p=rep["top_p"],
                                   top_k=rep["top_k"], logprobs="processed")
    assert check_sampling(tr.sampling) is None
    if t is not None and not isinstance(t, str):
        assert rep["temperature"] == pytest.approx(float(t))
