"""Capture of calls made with the real ``openai`` client against a fake server."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pydantic
import pytest
from fake_openai import (
    TOOL_ARGS,
    VERSION,
    FakeOpenAI,
    logprobs,
    mock_handler,
    prompt_ids,
    sdk_httpx,
    token_ids,
)
from openai import AsyncOpenAI, OpenAI
from structlog.testing import capture_logs

import lightning
from lightning._protocol import Sampling, unpack_ids, unpack_logprobs

HX = sdk_httpx()
MSGS = [{"role": "user", "content": "hi"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
RESP_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


def ids(b):
    return list(unpack_ids(b))


def lps(b):
    return list(unpack_logprobs(b))


def run(fn, *args, **kwargs):
    """Call ``fn`` inside a rollout (sync)."""
    return lightning.rollout(fn)(*args, **kwargs)


async def arun(fn, *args, **kwargs):
    async def agent():
        return await fn(*args, **kwargs)

    return await lightning.rollout(agent)()


@pytest.fixture
def client(server, capture):
    with OpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(server, capture):
    async with AsyncOpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as c:
        yield c


def assert_trainable(t, *, choice=0, n=3, prompt="hi", version=VERSION):
    assert t.trainable, t.metadata.get("untrainable_reason")
    assert ids(t.prompt_ids) == prompt_ids(prompt)
    assert ids(t.response_ids) == token_ids(choice, n)
    assert lps(t.logprobs) == logprobs(n)
    assert t.policy_version == version
    assert "untrainable_reason" not in t.metadata


# ------------------------------------------------------------------ chat.completions


def test_chat_non_stream_sync(client, server, rec):
    out = run(client.chat.completions.create, model="m", messages=MSGS, temperature=0.5)
    assert out.choices[0].message.content == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.model == "m" and t.finish_reason == "stop" and t.latency_s > 0
    m = t.metadata
    assert m["endpoint"] == "chat.completions" and m["stream"] is False
    assert m["text"] == "Hello world!" and "tool_calls" not in m and "choice_index" not in m
    assert m["request"] == {"model": "m", "messages": MSGS, "temperature": 0.5}  # as the app asked
    assert m["usage"]["prompt_tokens"] == 2
    # a server that does not report its sampling: what the request set; the rest unknown
    assert t.sampling == Sampling(temperature=0.5)
    [body] = server.bodies()
    assert body["return_token_ids"] is True and body["logprobs"] is True


async def test_chat_non_stream_async(aclient, rec):
    out = await arun(aclient.chat.completions.create, model="m", messages=MSGS, top_logprobs=2)
    assert out.choices[0].message.content == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["request"]["top_logprobs"] == 2


def test_app_logprobs_request_is_kept(client, server, rec):
    run(client.chat.completions.create, model="m", messages=MSGS, logprobs=True, top_logprobs=3)
    [body] = server.bodies()
    assert body["logprobs"] is True and body["top_logprobs"] == 3


def test_chat_n2_one_transition_per_choice(client, rec):
    run(client.chat.completions.create, model="m", messages=MSGS, n=2)
    t0, t1 = rec.transitions()
    assert_trainable(t0, choice=0)
    assert_trainable(t1, choice=1)
    assert (t0.metadata["choice_index"], t1.metadata["choice_index"]) == (0, 1)
    assert t1.metadata["text"] == "Hello world 1"
    assert (t0.index, t1.index) == (0, 1)


def test_chat_tool_calls(client, rec):
    out = run(client.chat.completions.create, model="m", messages=MSGS, tools=TOOLS)
    assert out.choices[0].message.tool_calls[0].function.arguments == TOOL_ARGS
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.finish_reason == "tool_calls"
    assert t.metadata["tool_calls"] == [
        {"id": "call_0", "name": "get_weather", "arguments": TOOL_ARGS}
    ]
    assert t.metadata["request"]["tools"] == TOOLS and t.metadata["text"] == ""


def test_chat_stream_consumed_fully(client, rec):
    def agent():
        stream = client.chat.completions.create(
            model="m", messages=MSGS, stream=True, stream_options={"include_usage": True}
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert lightning.rollout(agent)() == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)
    m = t.metadata
    assert t.finish_reason == "stop" and m["stream"] is True and m["text"] == "Hello world!"
    assert m["usage"]["completion_tokens"] == 3 and m["ttft_s"] >= 0
    assert t.sampling is None  # nothing set, nothing reported: unknown


async def test_chat_stream_async_with_tools(aclient, rec):
    async def agent():
        stream = await aclient.chat.completions.create(
            model="m", messages=MSGS, tools=TOOLS, stream=True
        )
        return [c async for c in stream]

    chunks = await lightning.rollout(agent)()
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.finish_reason == "tool_calls"
    assert t.metadata["tool_calls"] == [
        {"id": "call_0", "name": "get_weather", "arguments": TOOL_ARGS}
    ]


def test_chat_stream_closed_early_records_abort(client, rec):
    def agent():
        stream = client.chat.completions.create(model="m", messages=MSGS, stream=True)
        it = iter(stream)
        next(it), next(it)  # the role chunk and the first token
        stream.close()

    lightning.rollout(agent)()
    [t] = rec.transitions()
    assert t.trainable and t.finish_reason == "abort"
    assert ids(t.response_ids) == token_ids(0, 3)[:1]
    assert lps(t.logprobs) == logprobs(3)[:1]
    assert t.metadata["text"] == "Hello"


async def test_chat_stream_async_break_in_context_manager(aclient, rec):
    async def agent():
        async with await aclient.chat.completions.create(
            model="m", messages=MSGS, stream=True
        ) as stream:
            async for chunk in stream:
                if chunk.choices[0].delta.content:
                    break

    await lightning.rollout(agent)()
    [t] = rec.transitions()
    assert t.finish_reason == "abort" and ids(t.response_ids) == token_ids(0, 3)[:1]


def test_chat_stream_never_read_records_nothing(client, rec):
    def agent():
        with client.chat.completions.create(model="m", messages=MSGS, stream=True):
            pass

    lightning.rollout(agent)()
    assert rec.transitions() == []


def test_chat_stream_helper(client, rec):
    def agent():
        with client.chat.completions.stream(model="m", messages=MSGS) as s:
            return s.get_final_completion()

    final = lightning.rollout(agent)()
    assert final.choices[0].message.content == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)


def test_parse_with_pydantic_response_format(client, rec):
    class Answer(pydantic.BaseModel):
        answer: int

    out = run(client.chat.completions.parse, model="m", messages=MSGS, response_format=Answer)
    assert out.choices[0].message.parsed == Answer(answer=42)
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["text"] == '{"answer": 42}'
    assert t.metadata["request"]["response_format"]["type"] == "json_schema"


def test_with_raw_response(client, rec):
    raw = run(client.chat.completions.with_raw_response.create, model="m", messages=MSGS)
    assert raw.parse().choices[0].message.content == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)


def test_with_raw_response_stream(client, rec):
    def agent():
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=MSGS, stream=True
        )
        return [c for c in raw.parse()]

    lightning.rollout(agent)()
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["stream"] is True


def test_with_streaming_response(client, rec):
    def agent():
        with client.chat.completions.with_streaming_response.create(model="m", messages=MSGS) as r:
            return r.parse()

    assert lightning.rollout(agent)().choices[0].message.content == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)


# ------------------------------------------------------------------ completions


def test_completions_n2(client, server, rec):
    out = run(client.completions.create, model="m", prompt="hi", n=2, max_tokens=3)
    assert out.choices[1].text == "Hello world 1"
    t0, t1 = rec.transitions()
    assert_trainable(t0, choice=0)
    assert_trainable(t1, choice=1)
    assert t0.metadata["endpoint"] == "completions" and t1.metadata["choice_index"] == 1
    assert t0.finish_reason == "length"
    [body] = server.bodies()
    assert body["logprobs"] == 1 and body["return_token_ids"] is True


def test_completions_batch_maps_choices_to_prompts(client, rec):
    run(client.completions.create, model="m", prompt=["ab", "xyz"], n=2, logprobs=0)
    ts = rec.transitions()
    assert [ids(t.prompt_ids) for t in ts] == [prompt_ids("ab")] * 2 + [prompt_ids("xyz")] * 2
    assert [ids(t.response_ids) for t in ts] == [token_ids(i, 3) for i in range(4)]
    assert all(t.trainable for t in ts)


def test_completions_app_logprobs_kept(client, server, rec):
    run(client.completions.create, model="m", prompt="hi", logprobs=0)
    assert server.bodies()[0]["logprobs"] == 0


async def test_completions_stream_async(aclient, rec):
    async def agent():
        stream = await aclient.completions.create(model="m", prompt="hi", stream=True)
        return "".join([c.choices[0].text async for c in stream])

    assert await lightning.rollout(agent)() == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["stream"] is True


# ------------------------------------------------------------------ responses


def test_responses_non_stream(client, server, rec):
    out = run(client.responses.create, model="m", input="hi")
    assert out.output_text == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["endpoint"] == "responses" and t.finish_reason == "stop"
    assert t.metadata["request"] == {"model": "m", "input": "hi"}
    [body] = server.bodies()
    assert body["include"] == ["message.output_text.logprobs"] and body["return_token_ids"] is True


def test_responses_function_call(client, server, rec):
    run(
        client.responses.create,
        model="m",
        input="hi",
        tools=RESP_TOOLS,
        include=["reasoning.encrypted_content"],
    )
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.finish_reason == "tool_calls"
    assert t.metadata["tool_calls"] == [
        {"id": "call_0", "name": "get_weather", "arguments": TOOL_ARGS}
    ]
    assert server.bodies()[0]["include"] == [
        "reasoning.encrypted_content",
        "message.output_text.logprobs",
    ]


def test_responses_stream_sync(client, rec):
    def agent():
        with client.responses.create(model="m", input="hi", stream=True) as stream:
            return [e.type for e in stream]

    kinds = lightning.rollout(agent)()
    assert kinds[-1] == "response.completed"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["text"] == "Hello world!" and t.metadata["stream"] is True


async def test_responses_stream_async_helper(aclient, rec):
    async def agent():
        async with aclient.responses.stream(model="m", input="hi", tools=RESP_TOOLS) as stream:
            return await stream.get_final_response()

    final = await lightning.rollout(agent)()
    assert final.output[0].type == "function_call"
    [t] = rec.transitions()
    assert_trainable(t)
    assert t.metadata["tool_calls"][0]["name"] == "get_weather"


def test_responses_stream_aborted_is_text_only(client, rec):
    def agent():
        stream = client.responses.create(model="m", input="hi", stream=True)
        for e in stream:
            if e.type == "response.output_text.delta":
                break
        stream.close()

    lightning.rollout(agent)()
    [t] = rec.transitions()
    assert not t.trainable and t.finish_reason == "abort"
    assert t.metadata["untrainable_reason"].startswith("stream_aborted")
    assert t.metadata["text"] == "Hello"


# ------------------------------------------------------------------ servers without token ids


def test_external_server_text_only_warned_once(server, capture, rec):
    with (
        OpenAI(base_url=server.url("external"), api_key="x", max_retries=0) as c,
        capture_logs() as logs,
    ):
        run(c.chat.completions.create, model="gpt", messages=MSGS)
        run(c.responses.create, model="gpt", input="hi")
    body = server.bodies()[0]
    assert "return_token_ids" not in body and "logprobs" not in body  # untouched
    t0, t1 = rec.transitions()
    for t in (t0, t1):
        assert (
            not t.trainable and t.prompt_ids == b"" and t.response_ids == b"" and t.logprobs == b""
        )
        assert t.metadata["untrainable_reason"].startswith("no_token_ids")
        assert t.metadata["text"] == "Hello world!"
    warned = [e for e in logs if e["event"] == "capture.no_token_ids"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["base_url"] == server.url("external") + "/"
    assert "vLLM" in warned[0]["fix"]


def test_injection_only_for_configured_base_urls(server, capture, rec):
    # same host and port, other path; and a prefix of the port number
    for base in (server.url("vllm"), server.root[:-1] + "/lightning/v1"):
        with OpenAI(base_url=base, api_key="x", max_retries=0) as c:
            try:
                run(c.chat.completions.create, model="m", messages=MSGS)
            except openai.APIConnectionError:
                pass  # the truncated port does not listen
    for body in server.bodies():
        assert body == {"model": "m", "messages": MSGS}


def test_vllm_compatible_server(server, capture, rec):
    """vLLM: token ids when asked (extra_body), no policy_version, completions per choice."""
    with OpenAI(base_url=server.url("vllm"), api_key="x", max_retries=0) as c:
        run(
            c.chat.completions.create,
            model="m",
            messages=MSGS,
            logprobs=True,
            extra_body={"return_token_ids": True},
        )
        run(
            c.completions.create,
            model="m",
            prompt=["ab", "c"],
            logprobs=1,
            extra_body={"return_token_ids": True},
        )
    chat, *comp = rec.transitions()
    assert_trainable(chat, version=-1)
    assert chat.metadata["request"]["return_token_ids"] is True
    assert [ids(t.prompt_ids) for t in comp] == [prompt_ids("ab"), prompt_ids("c")]
    assert all(t.trainable and t.policy_version == -1 for t in comp)


def test_vllm_base_url_configured_gets_injection(server, rec):
    from lightning import _capture

    _capture.install(token_id_base_urls=[server.url("vllm") + "/"])
    try:
        with OpenAI(base_url=server.url("vllm"), api_key="x", max_retries=0) as c:
            run(c.chat.completions.create, model="m", messages=MSGS)
    finally:
        _capture.uninstall()
    assert server.bodies()[0]["return_token_ids"] is True
    assert_trainable(rec.transitions()[0], version=-1)


# ------------------------------------------------------------------ robustness


def test_outside_rollout_not_recorded_not_injected(client, server, rec):
    out = client.chat.completions.create(model="m", messages=MSGS)
    assert out.choices[0].message.content == "Hello world!"
    assert rec.events == []
    assert server.bodies() == [{"model": "m", "messages": MSGS}]


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_token_ids_never_break_the_call(server, capture, rec, stream):
    with OpenAI(base_url=server.url("malformed"), api_key="x", max_retries=0) as c:

        def agent():
            out = c.chat.completions.create(model="m", messages=MSGS, stream=stream)
            if stream:
                return "".join(ch.choices[0].delta.content or "" for ch in out)
            return out.choices[0].message.content

        assert lightning.rollout(agent)() == "Hello world!"
    [t] = rec.transitions()
    assert not t.trainable and t.response_ids == b""
    assert t.metadata["untrainable_reason"].startswith("malformed_token_ids")
    assert t.metadata["text"] == "Hello world!"


def test_misaligned_logprobs_untrainable(server, capture, rec):
    with OpenAI(base_url=server.url("misaligned"), api_key="x", max_retries=0) as c:
        run(c.chat.completions.create, model="m", messages=MSGS)
    [t] = rec.transitions()
    assert not t.trainable and t.logprobs == b""
    assert ids(t.response_ids) == token_ids(0, 3)  # the server's ids, kept; nothing guessed
    assert t.metadata["untrainable_reason"] == "logprobs_misaligned: 2 log-probs for 3 token ids"


@pytest.mark.parametrize("stream", [False, True])
def test_capture_failure_logged_once_and_call_goes_on(client, capture, rec, monkeypatch, stream):
    from lightning._capture import _records

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(_records, "chat_records", boom)
    monkeypatch.setattr(_records.ChatStream, "feed", boom)

    def agent():
        out = client.chat.completions.create(model="m", messages=MSGS, stream=stream)
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in out)
        return out.choices[0].message.content

    with capture_logs() as logs:
        assert lightning.rollout(agent)() == "Hello world!"
        assert lightning.rollout(agent)() == "Hello world!"
    failed = [e for e in logs if e["event"] == "capture.failed"]
    assert [e["log_level"] for e in failed] == ["warning", "debug"]
    assert rec.transitions() == []


def test_api_errors_reach_the_app_unchanged(server, capture, rec):
    base = server.root + "/lightning/v1/nope"
    with (
        OpenAI(base_url=base, api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError),
    ):
        run(c.chat.completions.create, model="m", messages=MSGS)
    assert rec.transitions() == []


def test_client_created_before_install_and_uninstall(server, rec):
    from lightning import _capture

    with OpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as c:
        _capture.install(token_id_base_urls=[server.url("lightning")])
        _capture.install(token_id_base_urls=[server.url("lightning")])  # idempotent
        try:
            run(c.chat.completions.create, model="m", messages=MSGS)
        finally:
            _capture.uninstall()
            _capture.uninstall()
        assert len(rec.transitions()) == 1
        assert not getattr(
            openai._base_client.SyncAPIClient.request, "__lightning_capture__", False
        )
        run(c.chat.completions.create, model="m", messages=MSGS)
    assert len(rec.transitions()) == 1


def test_stream_read_after_rollout_returned_is_not_recorded(client, rec):
    stream = run(client.chat.completions.create, model="m", messages=MSGS, stream=True)
    with capture_logs() as logs:
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello world!"
    assert rec.transitions() == []
    assert [e["event"] for e in logs] == ["capture.after_rollout"]


def test_legacy_httpx_client_and_mock_transport(server, capture, rec):
    """A user-supplied ``httpx`` (not the SDK's httpx2) client with a mock transport, streaming."""
    fake = FakeOpenAI()
    http = httpx.Client(transport=httpx.MockTransport(mock_handler(fake, httpx)))
    with OpenAI(base_url=server.url("lightning"), api_key="x", http_client=http) as c:

        def agent():
            return [ch for ch in c.chat.completions.create(model="m", messages=MSGS, stream=True)]

        lightning.rollout(agent)()
        run(c.chat.completions.create, model="m", messages=MSGS)
    t0, t1 = rec.transitions()
    assert_trainable(t0)
    assert_trainable(t1)
    assert fake.requests[0][1]["return_token_ids"] is True


async def test_async_sdk_http_client_with_mock_transport(server, capture, rec):
    fake = FakeOpenAI()
    http = HX.AsyncClient(transport=HX.MockTransport(mock_handler(fake, HX)))
    async with AsyncOpenAI(base_url=server.url("lightning"), api_key="x", http_client=http) as c:

        async def agent():
            stream = await c.responses.create(model="m", input="hi", stream=True)
            return [e async for e in stream]

        await lightning.rollout(agent)()
    [t] = rec.transitions()
    assert_trainable(t)


async def test_concurrent_rollouts_keep_their_calls(aclient, rec):
    import anyio

    @lightning.rollout
    async def agent(i):
        await aclient.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"q{i}"}]
        )
        return lightning.current_rollout().rollout_id

    rids = {}

    async def one(i):
        rids[i] = await agent(i)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    by_rollout = {t.rollout_id: t for t in rec.transitions()}
    for i, rid in rids.items():
        assert ids(by_rollout[rid].prompt_ids) == prompt_ids(f"q{i}")


def test_import_lightning_does_not_import_openai_and_install_without_openai():
    code = (
        "import sys, importlib.util\n"
        "import lightning, lightning._capture as cap\n"
        "assert 'openai' not in sys.modules and 'torch' not in sys.modules\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'openai' else real(name, *a)\n"
        "cap.install(token_id_base_urls=['http://x'])\n"
        "cap.uninstall()\n"
        "assert 'openai' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_stream(server, capture, rec, encoding):
    import json
    import zlib

    from fake_openai import sse_bytes

    fake = FakeOpenAI()

    def handler(request):
        _, events = fake.handle(request.url.path, json.loads(request.content))
        body = b"".join(sse_bytes(events, done=True))
        z = zlib.compressobj(wbits=16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        data = z.compress(body) + z.flush()
        headers = {"content-type": "text/event-stream", "content-encoding": encoding}
        return HX.Response(200, headers=headers, stream=HX.ByteStream(data))

    http = HX.Client(transport=HX.MockTransport(handler))
    with OpenAI(base_url=server.url("lightning"), api_key="x", http_client=http) as c:

        def agent():
            stream = c.chat.completions.create(model="m", messages=MSGS, stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in stream)

        assert lightning.rollout(agent)() == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)


def test_with_streaming_response_stream(client, rec):
    def agent():
        with client.chat.completions.with_streaming_response.create(
            model="m", messages=MSGS, stream=True
        ) as r:
            return "".join(c.choices[0].delta.content or "" for c in r.parse())

    assert lightning.rollout(agent)() == "Hello world!"
    [t] = rec.transitions()
    assert_trainable(t)


async def test_end_to_end_through_runtime_and_daemon(server, capture, tmp_path):
    """Captured calls reach a real in-memory daemon as trajectories."""
    import anyio

    from lightning import DaemonConfig
    from lightning.testing import Daemon, MemoryHub

    hub = MemoryHub()
    async with anyio.create_task_group() as tg:
        cfg = DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0)
        daemon = Daemon(cfg, transport=hub)
        await tg.start(daemon.serve)
        async with (
            lightning.session(transport=hub.connect(), spill_dir=str(tmp_path / "spill"),
                              token_id_urls=(server.url("lightning"),)) as rt,
            AsyncOpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as c,
        ):

            @lightning.rollout
            async def agent():
                await c.chat.completions.create(model="m", messages=MSGS)
                stream = await c.responses.create(model="m", input="hi", stream=True)
                async for _ in stream:
                    pass
                return 1.0

            await agent()
            with anyio.fail_after(10):
                while rt.pending_events() or not daemon.buffer._items:
                    await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    [traj] = daemon.buffer._items
    assert traj.final_reward == 1.0
    chat, resp = traj.transitions
    assert_trainable(chat)
    assert_trainable(resp)
    assert resp.metadata["endpoint"] == "responses" and resp.metadata["stream"] is True
