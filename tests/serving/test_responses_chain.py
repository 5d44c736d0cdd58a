"""The Responses API's ``previous_response_id`` and ``store`` through the official client.

The OpenAI Agents SDK and coding agents chain turns this way: each request names the
response it continues instead of resending the conversation. The server keeps each
stored turn (bounded in count, bytes and time, and by its rollout's life) and builds the
chained prompt from it; these tests drive it with ``openai.AsyncOpenAI`` on the tiny model.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from lightning._protocol import unpack_ids
from lightning.serving import PolicyServer
from lightning.serving._server import ResponseStore

openai = pytest.importorskip("openai")


def _client(server: Any) -> Any:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                             base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="x", max_retries=0,
                              http_client=http)


def _text(resp: Any) -> str:
    return "".join(part.text for item in resp.output if item.type == "message"
                   for part in item.content if part.type == "output_text")


async def test_a_chained_multi_turn_run_plain_and_streamed(stack):
    server, _, _ = stack
    engine = server.engine
    async with _client(server) as client:
        r1 = await client.responses.create(model="tiny", input="My name is Ada.",
                                           instructions="Be brief.", max_output_tokens=5)
        assert r1.model_extra["store"] is True and r1.previous_response_id is None
        r2 = await client.responses.create(model="tiny", input="What is my name?",
                                           previous_response_id=r1.id, max_output_tokens=5)
        assert r2.previous_response_id == r1.id
        # the chain's input and output, then the new input; r1's instructions stay behind
        history = [{"role": "user", "content": "My name is Ada."},
                   {"role": "assistant", "content": _text(r1)},
                   {"role": "user", "content": "What is my name?"}]
        assert r2.model_extra["prompt_token_ids"] == engine.apply_chat_template(history)

        async with await client.responses.create(
                model="tiny", input=[{"role": "user", "content": "Again?"}], stream=True,
                previous_response_id=r2.id, instructions="Answer.",
                max_output_tokens=5) as stream:
            events = [e async for e in stream]
        final = events[-1].response
        assert events[-1].type in ("response.completed", "response.incomplete")
        assert final.previous_response_id == r2.id and final.model_extra["store"] is True
        history += [{"role": "assistant", "content": _text(r2)},
                    {"role": "user", "content": "Again?"}]
        expected = engine.apply_chat_template([{"role": "system", "content": "Answer."},
                                               *history])
        assert final.model_extra["prompt_token_ids"] == expected

        # a streamed response is kept too: the chain goes on from it
        r4 = await client.responses.create(model="tiny", input="Bye.",
                                           previous_response_id=final.id, max_output_tokens=3)
        history += [{"role": "assistant", "content": _text(final)},
                    {"role": "user", "content": "Bye."}]
        assert r4.model_extra["prompt_token_ids"] == engine.apply_chat_template(history)
    assert server.responses.counters["stored"] == 4


async def test_unknown_ids_and_store_false_are_clear_400s(stack):
    server, _, _ = stack
    async with _client(server) as client:
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model="tiny", input="hi", max_output_tokens=2,
                                          previous_response_id="resp_nope")
        err = e.value.body
        assert err["code"] == "previous_response_not_found"
        assert err["param"] == "previous_response_id" and "resp_nope" in err["message"]
        r = await client.responses.create(model="tiny", input="hi", max_output_tokens=2,
                                          store=False)
        assert r.model_extra["store"] is False  # said, not silently accepted
        with pytest.raises(openai.BadRequestError, match=r.id):
            await client.responses.create(model="tiny", input="hi", max_output_tokens=2,
                                          previous_response_id=r.id)
        with pytest.raises(openai.BadRequestError):  # streamed: refused before the 200
            await client.responses.create(model="tiny", input="hi", stream=True,
                                          previous_response_id="resp_gone")
    assert server.responses.counters["not_kept_store_false"] == 1


async def test_the_store_is_bounded_in_count_and_bytes(stack):
    server, daemon, _ = stack
    small = PolicyServer(server.engine, model_name="tiny", port=0, capture=daemon.capture,
                         max_stored_responses=2, max_stored_response_bytes=1500)
    small.ready = True
    async with _client(small) as client:
        ids = [(await client.responses.create(model="tiny", input=f"turn {i}",
                                              max_output_tokens=2)).id for i in range(3)]
        assert len(small.responses) == 2 and small.responses.counters["evicted"] == 1
        with pytest.raises(openai.BadRequestError, match=ids[0]):
            await client.responses.create(model="tiny", input="x", max_output_tokens=2,
                                          previous_response_id=ids[0])
        await client.responses.create(model="tiny", input="x", max_output_tokens=2,
                                      previous_response_id=ids[2])
        big = await client.responses.create(model="tiny", input="y " * 700,
                                            max_output_tokens=2)
        assert big.model_extra["store"] is False  # one turn over the byte bound
        assert small.responses.counters["not_kept_too_large"] == 1
        assert small.responses.nbytes <= 1500


def test_entries_expire_a_ttl_after_their_last_use_and_a_broken_chain_is_named():
    from lightning.serving._chat import RequestError

    store = ResponseStore(max_count=10, max_bytes=1 << 20, ttl_s=60.0)
    item = [{"type": "message", "role": "user", "content": "a"}]
    assert store.put("r1", None, item, None) and store.put("r2", "r1", item, None)
    assert store.history("r2") == item + item
    store._entries["r1"].used_at -= 3600  # r1 unused for an hour: expired; r2 is fresh
    store._entries.move_to_end("r2")
    with pytest.raises(RequestError, match="it continues r1, which is gone") as e:
        store.history("r2")
    assert e.value.code == "previous_response_not_found" and e.value.status == 400
    assert store.counters["expired"] == 1


async def test_a_chain_inside_a_rollout_lives_as_long_as_the_rollout(stack):
    server, daemon, client = stack
    rid = (await client.post("/v1/rollouts", json={"name": "agent"})).json()["rollout_id"]
    base = f"/rollouts/{rid}/v1/responses"
    r1 = (await client.post(base, json={"model": "tiny", "input": "one",
                                        "max_output_tokens": 3})).json()
    r2 = await client.post(base, json={"model": "tiny", "input": "two",
                                       "previous_response_id": r1["id"],
                                       "max_output_tokens": 3})
    assert r2.status_code == 200, r2.text
    assert (await client.post(f"/v1/rollouts/{rid}/end", json={})).json()["n_transitions"] == 2
    t = daemon.buffer.get_nowait()
    # the captured second call's prompt is the whole chained conversation
    assert list(unpack_ids(t.transitions[1].prompt_ids)) == r2.json()["prompt_token_ids"]
    assert len(t.transitions[1].prompt_ids) > len(t.transitions[0].prompt_ids)
    gone = await client.post("/v1/responses", json={"model": "tiny", "input": "three",
                                                    "previous_response_id": r2.json()["id"]})
    assert gone.status_code == 400
    assert gone.json()["error"]["code"] == "previous_response_not_found"
    assert server.responses.counters["rollout_ended"] == 1
