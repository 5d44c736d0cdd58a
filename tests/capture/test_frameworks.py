"""Frameworks built on the ``openai`` package are captured through it.

Each test is skipped when its framework is not installed (they are optional test
dependencies: langchain-openai, openai-agents, autogen-ext[openai]).
"""

from __future__ import annotations

import pydantic
import pytest
from fake_openai import TOOL_ARGS, VERSION, prompt_ids, sdk_httpx, token_ids

import lightning
from lightning._protocol import unpack_ids


class Answer(pydantic.BaseModel):
    answer: int


def get_weather(city: str) -> str:
    """Get the weather of a city."""
    return f"sunny in {city}"


def trainable(t, *, choice=0):
    return (
        t.trainable
        and t.policy_version == VERSION
        and list(unpack_ids(t.response_ids)) == token_ids(choice, 3)
        and len(t.logprobs) == 12
    )


# ------------------------------------------------------------------ LangChain


@pytest.fixture
def chat_openai(server, capture):
    """A ChatOpenAI factory; pass it our own HTTP clients, closed by the tests (LangChain's
    cached default clients would outlive the test's event loop)."""
    lc = pytest.importorskip("langchain_openai")

    def make(**kw):
        return lc.ChatOpenAI(
            model="m", base_url=server.url("lightning"), api_key="x", max_retries=0, **kw
        )

    return make


def test_langchain_invoke_stream_and_tools(chat_openai, rec):

    with sdk_httpx().Client() as http:
        _langchain_sync(chat_openai(http_client=http), rec)


def _langchain_sync(chat_openai, rec):
    @lightning.rollout
    def agent():
        a = chat_openai.invoke("hi")
        b = "".join(c.content for c in chat_openai.stream("hi"))
        c = chat_openai.bind_tools([get_weather]).invoke("weather?")
        return a, b, c

    a, b, c = agent()
    assert a.content == "Hello world!" and b == "Hello world!"
    assert c.tool_calls[0]["name"] == "get_weather"
    t_invoke, t_stream, t_tool = rec.transitions()
    assert all(trainable(t) for t in (t_invoke, t_stream, t_tool))
    assert t_invoke.metadata["stream"] is False and t_stream.metadata["stream"] is True
    assert list(unpack_ids(t_invoke.prompt_ids)) == prompt_ids("hi")
    assert t_tool.metadata["tool_calls"] == [
        {"id": "call_0", "name": "get_weather", "arguments": TOOL_ARGS}
    ]


async def test_langchain_structured_output_async(chat_openai, rec):

    async with sdk_httpx().AsyncClient() as http:
        structured = chat_openai(http_async_client=http).with_structured_output(
            Answer, method="json_schema"
        )

        @lightning.rollout
        async def agent():
            return await structured.ainvoke("what is the answer?")

        assert await agent() == Answer(answer=42)
    [t] = rec.transitions()
    assert trainable(t)
    assert t.metadata["request"]["response_format"]["type"] == "json_schema"


# ------------------------------------------------------------------ OpenAI Agents SDK


@pytest.fixture
def agents_sdk(server, capture):
    return pytest.importorskip("agents")


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_openai_agents_sdk_tool_loop(agents_sdk, server, rec, api):
    from openai import AsyncOpenAI

    sdk = agents_sdk
    async with AsyncOpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as client:
        if api == "responses":
            model = sdk.OpenAIResponsesModel(model="m", openai_client=client)
        else:
            model = sdk.OpenAIChatCompletionsModel(model="m", openai_client=client)
        agent = sdk.Agent(
            name="weather",
            instructions="be brief",
            model=model,
            tools=[sdk.function_tool(get_weather)],
        )

        @lightning.rollout
        async def run():
            result = await sdk.Runner.run(
                agent, "weather in Paris?", run_config=sdk.RunConfig(tracing_disabled=True)
            )
            return result.final_output

        assert await run() == "Hello world!"
    first, second = rec.transitions()
    endpoint = "responses" if api == "responses" else "chat.completions"
    assert first.metadata["endpoint"] == second.metadata["endpoint"] == endpoint
    assert trainable(first) and trainable(second)
    assert (
        first.finish_reason == "tool_calls"
        and first.metadata["tool_calls"][0]["name"] == "get_weather"
    )
    assert second.finish_reason == "stop" and second.metadata["text"] == "Hello world!"


async def test_openai_agents_sdk_streamed(agents_sdk, server, rec):
    from openai import AsyncOpenAI

    sdk = agents_sdk
    async with AsyncOpenAI(base_url=server.url("lightning"), api_key="x", max_retries=0) as client:
        agent = sdk.Agent(
            name="a",
            instructions="be brief",
            model=sdk.OpenAIResponsesModel(model="m", openai_client=client),
        )

        @lightning.rollout
        async def run():
            result = sdk.Runner.run_streamed(
                agent, "hi", run_config=sdk.RunConfig(tracing_disabled=True)
            )
            async for _ in result.stream_events():
                pass
            return result.final_output

        assert await run() == "Hello world!"
    [t] = rec.transitions()
    assert trainable(t) and t.metadata["stream"] is True


# ------------------------------------------------------------------ AutoGen


async def test_autogen_openai_chat_completion_client(server, capture, rec):
    ext = pytest.importorskip("autogen_ext.models.openai")
    from autogen_core.models import ModelInfo, UserMessage

    info = ModelInfo(
        vision=False,
        function_calling=True,
        json_output=True,
        family="unknown",
        structured_output=True,
    )
    client = ext.OpenAIChatCompletionClient(
        model="m", base_url=server.url("lightning"), api_key="x", model_info=info, max_retries=0
    )

    @lightning.rollout
    async def agent():
        msgs = [UserMessage(content="hi", source="user")]
        a = await client.create(msgs)
        b = [c async for c in client.create_stream(msgs)]
        return a, b

    try:
        a, b = await agent()
    finally:
        await client.close()
    assert a.content == "Hello world!" and b[-1].content == "Hello world!"
    t_create, t_stream = rec.transitions()
    assert trainable(t_create) and trainable(t_stream)
    assert t_stream.metadata["stream"] is True
