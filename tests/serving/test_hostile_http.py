"""Issue 14, HTTP half: the exact hostile requests of the issue, each a 4xx naming the
field, nothing invalid made durable, the daemon serving (and recoverable) afterwards."""

from __future__ import annotations

import json
import time

import anyio
import msgspec
import pytest
from http_live import KEY, live_stack

from lightning._daemon import recover

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "tiny", "messages": MSGS, "max_tokens": 2}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def live(tiny_dir, tmp_path_factory):
    with live_stack(tiny_dir, tmp_path_factory.mktemp("hostile") / "data") as s:
        yield s


def _err(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def _start(live, **body):
    r = live.post("/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    return r.json()["rollout_id"]


def _wal_replays(live):
    """Recovery of the live data directory now: no error, nothing quarantined."""
    state, _, _ = live.call(lambda: recover(live.daemon.config.data_dir))
    assert state.counters["wal_records_quarantined"] == 0
    return state


@pytest.mark.parametrize("path_body", [
    ("/v1/rollouts", {"group_key": 123}, "group_key"),
    ("/v1/rollouts", {"attempt": True}, "attempt"),
    ("/v1/rollouts", {"attempt": 2**70}, "attempt"),
    ("/v1/rollouts", {"rollout_id": "a/b"}, "rollout_id"),
    ("/v1/rollouts", {"metadata": []}, "metadata"),
    ("END", {"error": 123}, "error"),
    ("END", {"status": "done"}, "status"),
    ("REWARD", {"value": 1, "primary": [1]}, "primary"),
    ("REWARD", {"value": True}, "value"),
    ("REWARD", {"value": {"a": "x"}}, "value[...]"),
])
def test_rollout_routes_refuse_mistyped_fields(live, path_body):
    path, body, param = path_body
    rid = _start(live)
    path = {"END": f"/v1/rollouts/{rid}/end", "REWARD": f"/v1/rollouts/{rid}/rewards"}.get(
        path, path)
    seq = live.daemon._local_seq
    _err(live.post(path, json=body), 400, param)
    assert live.daemon._local_seq == seq  # nothing reached the write-ahead log
    assert live.post(f"/v1/rollouts/{rid}/end", json={}).status_code == 200
    _wal_replays(live)


def test_metadata_int_overflow_is_a_400_and_later_captures_work(live):
    seq = live.daemon._local_seq
    err = _err(live.post("/v1/rollouts", json={"metadata": {"x": 2**70}}), 400)
    assert err["code"] == "invalid" and "int" in err["message"]
    assert live.daemon._local_seq == seq
    rid = _start(live, metadata={"x": 2**63 - 1, "deep": {"a": [1, 2]}})
    assert live.post(f"/rollouts/{rid}/v1/chat/completions", json=CHAT).status_code == 200
    assert live.post(f"/v1/rollouts/{rid}/end", json={"final_reward": 1}).json() == {
        "rollout_id": rid, "n_transitions": 1}
    state = _wal_replays(live)
    assert rid in state.finished


def test_rollout_ids_are_url_escaped(live):
    r = live.post("/v1/rollouts", json={"rollout_id": "run 1?x#y"})
    assert r.status_code == 201
    assert r.json()["base_url"].endswith("/rollouts/run%201%3Fx%23y/v1")
    url = r.json()["base_url"].removeprefix("http://test") + "/chat/completions"
    assert live.post(url, json=CHAT).status_code == 200
    assert live.daemon.state.open["run 1?x#y"].transitions
    assert live.post("/v1/rollouts", json={"rollout_id": "run 1?x#y"}).status_code == 409


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_huge_n_is_a_fast_400(live, route):
    body = {**CHAT, "prompt": "a", "n": 100000000000000000000}
    t0 = time.perf_counter()
    _err(live.post(route, json=body), 400, "n")
    _err(live.post(route, json={**body, "n": 10**7}), 400, "n")
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("extra,param", [
    ({"n": "abc"}, "n"), ({"n": [2]}, "n"), ({"top_logprobs": "x", "logprobs": True},
                                              "top_logprobs"),
    ({"logprobs": "x"}, "logprobs"), ({"stream_options": "x", "stream": True}, "stream_options"),
    ({"seed": 1.5}, "seed"), ({"seed": -1}, "seed"), ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 2**70}, "max_tokens"), ({"stop": [1]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": 5}]},
     "messages[0].tool_calls"),
    ({"tool_choice": {"type": "function", "function": "f"}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice.function"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
])
def test_chat_field_errors_name_the_field(live, extra, param):
    _err(live.post("/v1/chat/completions", json={**CHAT, **extra}), 400, param)


def test_other_routes_field_errors(live):
    _err(live.post("/v1/responses", json={"model": "tiny", "input": "hi", "text": "x"}), 400,
         "text")
    _err(live.post("/v1/completions", json={"model": "tiny", "prompt": "a", "logprobs": "x"}),
         400, "logprobs")
    _err(live.post("/v1/completions", json={"model": "tiny", "prompt": [[1, True]]}), 400,
         "prompt")


def test_prompt_over_the_context_is_a_400_on_every_route(live):
    long = "hello " * 400  # > max_model_len=256 tokens
    err = _err(live.post("/v1/completions", json={"model": "tiny", "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _err(live.post("/v1/completions", json={"model": "tiny", "prompt": [long, "a"]}), 400)
    assert err["code"] == "context_length_exceeded"
    r = live.post("/v1/completions", json={"model": "tiny", "prompt": long, "stream": True})
    assert _err(r, 400)["code"] == "context_length_exceeded"  # before the stream's 200
    r = live.post("/v1/chat/completions", json={**CHAT, "stream": True,
                                                "messages": [{"role": "user", "content": long}]})
    assert _err(r, 400)["code"] == "context_length_exceeded"


def test_nesting_limits(live):
    deep = "[" * 10_000 + "]" * 10_000
    r = live.post("/v1/chat/completions", content=deep.encode(), headers=JSON)
    assert _err(r, 400)["code"] == "too_deep"
    params = '{"type": "object", "properties": {"x": ' * 900 + '{}' + "}}" * 900
    tools = '[{"type": "function", "function": {"name": "f", "parameters": %s}}]' % params
    body = json.dumps(CHAT)[:-1] + ', "tools": ' + tools + "}"
    r = live.post("/v1/chat/completions", content=body.encode(), headers=JSON)
    assert _err(r, 400)["code"] == "too_deep"
    r = live.post("/v1/rollouts", content=b'{"metadata": {"x": ' + b"[" * 900 + b"]" * 900 + b"}}",
                  headers=JSON)
    assert _err(r, 400)["code"] == "too_deep"
    r = live.post("/v1/traces", content=b'{"resourceSpans": ' + deep.encode() + b"}",
                  headers=JSON)
    assert r.status_code == 400, r.text


def test_seed_1_5_fails_alone_never_its_batch_mates(live):
    async def burst():
        client = live.clients["open"]
        results = [None] * 9

        async def one(i):
            body = {**CHAT, "max_tokens": 4, "seed": 1.5 if i == 4 else i}
            results[i] = await client.post("/v1/chat/completions", json=body)

        async with anyio.create_task_group() as tg:
            for i in range(9):
                tg.start_soon(one, i)
        return results

    results = live.portal.call(burst)
    assert [r.status_code for r in results] == [200] * 4 + [400] + [200] * 4


def test_engine_checks_param_types_per_request(live):
    from lightning.engine.base import InvalidRequestError, SamplingParams

    engine = live.server.engine

    async def go():
        with pytest.raises(InvalidRequestError, match="seed"):
            await engine.generate([1, 2], SamplingParams(seed=1.5, max_tokens=2))
        return await engine.generate([1, 2], SamplingParams(seed=1, max_tokens=2))

    assert live.portal.call(go).choices


def test_body_limit_is_a_413(tiny_dir, tmp_path):
    with live_stack(tiny_dir, tmp_path / "data", max_body_bytes=4096) as s:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
        assert _err(s.post("/v1/chat/completions", json=big), 413)["code"] == "body_too_large"
        r = s.post("/v1/rollouts", json={"metadata": {"x": "y" * 5000}})
        assert r.status_code == 413
        assert s.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("route", ["/v1/rollouts", "/v1/chat/completions", "/v1/completions",
                                   "/v1/responses", "/rollouts/x/v1/chat/completions"])
def test_json_routes_need_a_json_content_type(live, route):
    body = json.dumps({**CHAT, "prompt": "a", "input": "a"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = live.post(route, content=body, headers=headers)
        assert _err(r, 415)["code"] == "unsupported_media_type"


def test_cross_origin_browser_requests_are_refused(live):
    for headers in ({"origin": "https://evil.example"}, {"origin": "null"},
                    {"origin": "http://localhost:3000"}, {"sec-fetch-site": "cross-site"}):
        for route in ("/v1/rollouts", "/v1/chat/completions", "/v1/traces"):
            r = live.post(route, json=CHAT, headers=headers)
            assert r.status_code == 403, (route, headers, r.text)
    r = live.post("/v1/rollouts", json={}, headers={"origin": "http://test"})  # same origin
    assert r.status_code == 201


def test_keyed_server_compares_keys_on_every_route(live):
    for route in ("/v1/rollouts", "/v1/chat/completions", "/v1/traces", "/v1/rollouts/x/end"):
        for auth in (None, "Bearer wrong", f"Bearer {KEY}x", KEY):
            headers = {"authorization": auth} if auth else {}
            r = live.post(route, json=CHAT, headers=headers, server="keyed")
            assert r.status_code == 401, (route, auth)
    assert live.request("GET", "/v1/models", server="keyed").status_code == 401
    r = live.post("/v1/rollouts", json={}, server="keyed",
                  headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 201


def _otlp(trace: str, **attrs):
    span = {"traceId": trace * 32, "spanId": "2" * 16, "name": "agent",
            "startTimeUnixNano": "1", "endTimeUnixNano": "2",
            "attributes": [{"key": k, "value": v} for k, v in attrs.items()]}
    return {"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}


def test_otlp_int_overflow_is_refused_per_event(live):
    receiver = live.server.traces
    receiver.assembler.idle_s = 0.001
    before = dict(receiver.counters)
    seq = live.daemon._local_seq
    r = live.post("/v1/traces", json=_otlp("1", **{
        "lightning.rollout.id": {"stringValue": "otlp-big"},
        "lightning.rollout.attempt": {"intValue": "99999999999999999999999"}}))
    assert r.status_code == 200, r.text
    assert "invalid" in r.json()["partialSuccess"]["errorMessage"]
    assert receiver.counters["rollouts_rejected"] == before.get("rollouts_rejected", 0) + 1
    assert live.daemon._local_seq == seq  # nothing of it reached the log
    r = live.post("/v1/traces", json=_otlp("3", **{
        "lightning.rollout.id": {"stringValue": "otlp-ok"},
        "lightning.rollout.attempt": {"intValue": "2"}}))
    assert r.status_code == 200 and "partialSuccess" not in r.json(), r.text
    assert live.daemon._local_seq == seq + 2  # start + end, no gap
    state = _wal_replays(live)
    assert "otlp-ok" in state.finished and "otlp-big" not in state.finished
    huge_time = _otlp("4")
    huge_time["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["startTimeUnixNano"] = "9" * 400
    assert live.post("/v1/traces", json=huge_time).status_code == 400


def test_non_loopback_listeners_need_a_key(tiny_dir):
    from lightning import ConfigError
    from lightning.otel import TraceReceiver
    from lightning.serving import PolicyServer

    async def main():
        receiver = TraceReceiver(object())
        with pytest.raises(ConfigError, match="without an API key"):
            await receiver.serve(host="0.0.0.0", port=0)
        server = PolicyServer(object(), model_name="m", host="0.0.0.0", port=0, otlp=False)
        with pytest.raises(ConfigError, match="without an API key"):
            await server.serve()

    anyio.run(main, backend="asyncio")


def test_a_huge_prompt_does_not_stall_the_event_loop(live):
    """Tokenising runs in a worker thread: the loop (ZeroMQ acks, /health) keeps going."""
    big = {**CHAT, "messages": [{"role": "user", "content": "hello world " * 40_000}]}

    async def go():
        lags: list[float] = []
        done = anyio.Event()

        async def probe():
            while not done.is_set():
                t = time.perf_counter()
                await anyio.sleep(0.005)
                lags.append(time.perf_counter() - t - 0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(probe)
            t0 = time.perf_counter()
            r = await live.clients["open"].post("/v1/chat/completions", json=big)
            elapsed = time.perf_counter() - t0
            done.set()
        return r, elapsed, lags

    r, elapsed, lags = live.portal.call(go)
    assert _err(r, 400)["code"] == "context_length_exceeded"
    assert max(lags) < max(0.5, elapsed / 4), (max(lags), elapsed)


def test_otlp_rollout_that_cannot_be_mapped_is_refused_alone(live):
    """A rollout whose spans break the mapping (a 100k-deep JSON string attribute) is
    counted and reported; the receiver, its flush loop and other rollouts carry on."""
    receiver = live.server.traces
    receiver.assembler.idle_s = 0.001
    deep = "[" * 100_000 + "]" * 100_000
    bad = _otlp("5", **{"lightning.rollout.id": {"stringValue": "otlp-deep"},
                        "gen_ai.operation.name": {"stringValue": "chat"},
                        "gen_ai.input.messages": {"stringValue": deep}})
    good = _otlp("6", **{"lightning.rollout.id": {"stringValue": "otlp-fine"}})
    bad["resourceSpans"] += good["resourceSpans"]
    r = live.post("/v1/traces", json=bad)
    assert r.status_code == 200, r.text
    assert "otlp-deep" in r.json()["partialSuccess"]["errorMessage"]
    assert receiver.counters["rollouts_unmappable"] >= 1
    assert "otlp-fine" in live.daemon.state.finished
    assert "otlp-deep" not in live.daemon.state.finished


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/v1/responses"])
def test_a_10mb_prompt_is_refused_without_tokenising_it_all(live, route):
    text = "hello world " * 833_334
    body = {"model": "tiny", "max_tokens": 2, "prompt": text, "input": text,
            "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    err = _err(live.post(route, content=msgspec.json.encode(body), headers=JSON), 400)
    assert err["code"] == "context_length_exceeded" and "first 4096" in err["message"]
    assert time.perf_counter() - t0 < 5.0  # tokenising all of it took 6.7-10.8 s here
