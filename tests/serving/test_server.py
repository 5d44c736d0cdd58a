"""The policy server on the tiny model: OpenAI shapes, token ids, errors, server-side capture."""

from __future__ import annotations

import json

import anyio
import pytest

from lightning._protocol import unpack_ids, unpack_logprobs

MSGS = [{"role": "user", "content": "What is 2+3?"}]


async def _chat(client, **kw):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 8, "seed": 1, **kw}
    return await client.post("/v1/chat/completions", json=body)


async def test_models_health_ready(stack):
    server, _, client = stack
    r = await client.get("/v1/models")
    assert r.status_code == 200
    m = r.json()["data"][0]
    assert m["id"] == "tiny" and m["policy_version"] == 0 and m["max_model_len"] == 1024
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    server.ready = False
    assert (await client.get("/ready")).status_code == 503


async def test_chat_returns_sampled_token_ids_and_logprobs(stack):
    server, _, client = stack
    r = await _chat(client, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["policy_version"] == 0
    assert j["prompt_token_ids"] == server.engine.apply_chat_template(MSGS)
    c = j["choices"][0]
    assert 1 <= len(c["token_ids"]) <= 8
    content = c["logprobs"]["content"]
    assert len(content) == len(c["token_ids"])
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
    assert j["usage"]["completion_tokens"] == len(c["token_ids"])
    assert j["usage"]["prompt_tokens"] == len(j["prompt_token_ids"])
    # the text is what the ids decode to (stop strings aside)
    assert c["message"]["content"] == server.engine.decode(c["token_ids"])


async def test_seed_n_and_max_tokens(stack):
    _, _, client = stack
    a = (await _chat(client, n=2, temperature=1.0)).json()
    b = (await _chat(client, n=2, temperature=1.0)).json()
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert len(a["choices"]) == 2
    r = (await _chat(client, max_tokens=3, temperature=0)).json()
    c = r["choices"][0]
    assert len(c["token_ids"]) <= 3
    if len(c["token_ids"]) == 3:
        assert c["finish_reason"] == "length"


async def test_stop_strings(stack):
    server, _, client = stack
    free = (await _chat(client, max_tokens=12, temperature=0)).json()["choices"][0]
    text = free["message"]["content"]
    if len(text) < 4:
        pytest.skip("the random model stopped too early to pick a stop string")
    stop = text[2:4]
    r = (await _chat(client, max_tokens=12, temperature=0, stop=[stop])).json()["choices"][0]
    assert r["finish_reason"] == "stop" and stop not in r["message"]["content"]
    assert r["message"]["content"] == text[: text.index(stop)]


async def test_stream_matches_non_stream(stack):
    _, _, client = stack
    full = (await _chat(client, max_tokens=10, logprobs=True)).json()
    events = []
    async with client.stream("POST", "/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "max_tokens": 10, "seed": 1, "logprobs": True,
        "stream": True, "stream_options": {"include_usage": True},
    }) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["prompt_token_ids"] == full["prompt_token_ids"]
    ids = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids", [])]
    lps = [e["logprob"] for c in chunks for ch in c["choices"]
           for e in (ch.get("logprobs") or {}).get("content", [])]
    assert ids == full["choices"][0]["token_ids"]
    assert lps == pytest.approx([e["logprob"] for e in full["choices"][0]["logprobs"]["content"]],
                                abs=1e-4)
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    assert all(c.get("policy_version") == 0 for c in chunks[:-1])


async def test_completions_text_and_token_prompts(stack):
    server, _, client = stack
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello",
                                                    "max_tokens": 5, "logprobs": 1, "seed": 3})
    j = r.json()
    assert r.status_code == 200, r.text
    ids = j["prompt_token_ids"]
    assert ids == server.engine.tokenizer.encode("Hello", add_special_tokens=False)
    c = j["choices"][0]
    assert len(c["logprobs"]["token_logprobs"]) == len(c["token_ids"]) == len(c["logprobs"]["tokens"])
    r2 = (await client.post("/v1/completions", json={"model": "tiny", "prompt": ids,
                                                      "max_tokens": 5, "seed": 3})).json()
    assert r2["choices"][0]["token_ids"] == c["token_ids"]
    r3 = (await client.post("/v1/completions", json={"model": "tiny", "prompt": [ids, ids],
                                                      "max_tokens": 2, "n": 2})).json()
    assert [c["index"] for c in r3["choices"]] == [0, 1, 2, 3]


async def test_responses_api_shape(stack):
    from openai.types.responses import Response

    _, _, client = stack
    body = {"model": "tiny", "input": "Say hi", "instructions": "Be brief",
            "max_output_tokens": 6, "tools": [{"type": "function", "name": "calc",
                                                "parameters": {"type": "object"}}]}
    r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    resp = Response.model_validate(r.json())
    assert resp.output and resp.usage.output_tokens == len(r.json()["output_token_ids"])
    assert len(r.json()["output_token_logprobs"]) == len(r.json()["output_token_ids"])
    events = []
    async with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as s:
        async for line in s.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                            "response.incomplete")
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)


@pytest.mark.parametrize("body, status, code, needle", [
    ({"model": "nope", "messages": MSGS}, 404, "model_not_found", "does not exist"),
    ({"model": "tiny", "messages": []}, 400, None, "non-empty"),
    ({"model": "tiny", "messages": MSGS, "tools": [{"type": "web"}]}, 400, None, "function tools"),
    ({"model": "tiny", "messages": MSGS, "frequency_penalty": 0.5}, 400, None, "not supported"),
    ({"model": "tiny", "messages": MSGS, "temperature": -1}, 400, None, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 2000}]}, 400,
     "context_length_exceeded", ""),
    ({"messages": MSGS}, 400, None, "model is required"),
])
async def test_errors_are_openai_shaped(stack, body, status, code, needle):
    _, _, client = stack
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    if code:
        assert err["code"] == code


async def test_bad_json_and_alias(stack):
    _, _, client = stack
    r = await client.post("/v1/chat/completions", content=b"{nope",
                          headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert (await client.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 2})).status_code == 200
    r = await client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


async def test_api_key(stack):
    server, _, client = stack
    server.api_key = "sekret"
    r = await _chat(client)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await client.post("/v1/chat/completions", headers={"authorization": "Bearer sekret"},
                          json={"model": "tiny", "messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200


async def test_server_side_capture(stack):
    server, daemon, client = stack
    r = await client.post("/v1/rollouts", json={"name": "curl-agent", "group_key": "g7"})
    assert r.status_code == 201
    rid, base = r.json()["rollout_id"], r.json()["base_url"]
    assert base.endswith(f"/rollouts/{rid}/v1")
    first = (await client.post(f"/rollouts/{rid}/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "max_tokens": 4})).json()
    second = (await client.post("/v1/completions", headers={"X-Lightning-Rollout-Id": rid},
                                json={"model": "tiny", "prompt": "a", "max_tokens": 3})).json()
    assert (await client.post(f"/v1/rollouts/{rid}/rewards", json={"value": 0.5})).status_code == 200
    bad = await client.post(f"/v1/rollouts/{rid}/rewards", content=b'{"value": 1e999}',
                            headers={"content-type": "application/json"})
    assert bad.status_code == 400
    bad = await client.post(f"/v1/rollouts/{rid}/rewards", json={"value": "high"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"
    r = await client.post(f"/v1/rollouts/{rid}/end", json={"final_reward": 1.0})
    assert r.json()["n_transitions"] == 2
    t = daemon.buffer.get_nowait()
    assert (t.rollout_id, t.name, t.group_key, t.final_reward) == (rid, "curl-agent", "g7", 1.0)
    t0, t1 = t.transitions
    assert list(unpack_ids(t0.prompt_ids)) == first["prompt_token_ids"]
    assert list(unpack_ids(t0.response_ids)) == first["choices"][0]["token_ids"]
    assert len(unpack_logprobs(t0.logprobs)) == len(first["choices"][0]["token_ids"])
    assert list(unpack_ids(t1.response_ids)) == second["choices"][0]["token_ids"]
    assert t0.metadata["endpoint"] == "chat.completions" and t.rewards[0].value == 0.5
    # finished and unknown rollouts are refused
    r = await client.post(f"/rollouts/{rid}/v1/chat/completions",
                          json={"model": "tiny", "messages": MSGS})
    assert r.status_code == 404 and r.json()["error"]["code"] == "rollout_not_found"
    assert (await client.post("/v1/rollouts/zzz/end", json={})).status_code == 404
    dup = await client.post("/v1/rollouts", json={"rollout_id": rid})
    assert dup.status_code == 409


async def test_real_openai_client_over_a_socket(stack):
    import openai

    server, _, _ = stack
    async with anyio.create_task_group() as tg:
        base = await tg.start(server.serve)
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        r = await client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5,
                                                 logprobs=True, seed=2)
        assert r.choices[0].logprobs.content and r.model_extra["policy_version"] == 0
        assert r.choices[0].model_extra["token_ids"]
        stream = await client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5,
                                                      seed=2, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == r.choices[0].message.content
        c = await client.completions.create(model="tiny", prompt="hi", max_tokens=3)
        assert c.choices[0].model_extra["token_ids"]
        resp = await client.responses.create(model="tiny", input="hi", max_output_tokens=4)
        assert resp.model_extra["output_token_ids"]
        async with await client.responses.create(model="tiny", input="hi", max_output_tokens=4,
                                                 stream=True) as rs:
            kinds = [e.type async for e in rs]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-5", messages=MSGS)
        await client.close()
        tg.cancel_scope.cancel()


async def test_unknown_model_names_the_flags_and_accept_any_model_says_each_name_once(stack):
    from structlog.testing import capture_logs

    server, _, client = stack
    r = await client.post("/v1/chat/completions",
                          json={"model": "gpt-4o", "messages": MSGS, "max_tokens": 2})
    assert r.status_code == 404
    msg = r.json()["error"]["message"]
    assert "--model-alias gpt-4o" in msg and "--accept-any-model" in msg and "'tiny'" in msg
    server.accept_any_model = True  # what lightning train serves with
    try:
        with capture_logs() as logs:
            for name in ("gpt-4o", "gpt-4o", "claude", "tiny"):
                r = await client.post("/v1/chat/completions",
                                      json={"model": name, "messages": MSGS, "max_tokens": 2})
                assert r.status_code == 200, r.text
        said = [x["requested"] for x in logs if x["event"] == "server.model_name_accepted"]
        assert said == ["gpt-4o", "claude"]
    finally:
        server.accept_any_model = False


async def test_get_one_rollout_open_then_finished(stack):
    """GET /v1/rollouts/{id}: what the daemon holds of a rollout, open or finished and not
    yet used, in ``lightning-daemon inspect``'s shape; the key is required when set."""
    server, daemon, client = stack
    rid = (await client.post("/v1/rollouts", json={"name": "probe", "group_key": "g"})).json()[
        "rollout_id"]
    first = (await client.post(f"/rollouts/{rid}/v1/chat/completions", json={
        "model": "tiny", "messages": MSGS, "max_tokens": 4, "temperature": 0.7})).json()
    r = await client.get(f"/v1/rollouts/{rid}")
    assert r.status_code == 200, r.text
    o = r.json()
    assert o["status"] == "open" and o["name"] == "probe" and o["group_key"] == "g"
    (t,) = o["transitions"]
    assert t["prompt_tokens"] == len(first["prompt_token_ids"])
    assert t["response_tokens"] == len(first["choices"][0]["token_ids"])
    assert t["logprobs"] == "yes" and t["trainable"] and t["policy_version"] == 0
    await client.post(f"/v1/rollouts/{rid}/rewards", json={"value": 0.5})
    await client.post(f"/v1/rollouts/{rid}/end", json={"final_reward": 1.0})
    f = (await client.get(f"/v1/rollouts/{rid}")).json()
    assert f["status"] == "completed" and f["final_reward"] == 1.0
    assert f["rewards"] == [{"value": 0.5, "name": "reward", "after": 1}]
    assert f["sequences"] == 1 and f["used_by_training"] is False
    missing = await client.get("/v1/rollouts/nope")
    assert missing.status_code == 404 and "lightning-daemon inspect" in missing.json()["error"]["message"]
    server.api_key = "k"
    try:
        assert (await client.get(f"/v1/rollouts/{rid}")).status_code == 401
        ok = await client.get(f"/v1/rollouts/{rid}", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
    finally:
        server.api_key = None
    daemon.buffer.get_nowait()
