"""Each framework's real tool loop, driven through the real policy server and capture.

A :class:`~lightning.engine.scripted.ScriptedEngine` plays the model: it calls tools in
the chat template's own format, reads the tool results the framework sends back and
answers, so LangGraph's prebuilt ReAct agent, the OpenAI Agents SDK (tools, a handoff,
streaming, both model APIs) and AutoGen's AssistantAgent run several real rounds.
Checked on what the daemon stored: one transition per LLM call, the tool results inside
the later prompts, the turns merged into training sequences with the tool output masked
out of the loss, and the reason of every split.
"""

from __future__ import annotations

import json
from collections import Counter

import anyio
import httpx
import pytest

import lightning
from lightning._protocol import unpack_ids
from lightning._sequences import merge_transitions
from lightning.engine.scripted import Reply, ToolCall

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")


class Dispatch:
    """One stack for the module; each test sets the script it needs."""

    def __init__(self):
        self.script = None
        self.requests = []

    def __call__(self, req):
        self.requests.append(req)
        return self.script(req)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from lightning.testing import ScriptedStack

    tmp = tmp_path_factory.mktemp("loops")
    dispatch = Dispatch()
    with ScriptedStack(dispatch, tmp / "data") as stack:
        yield stack, dispatch


@pytest.fixture
def stack(live, tmp_path):
    stack, dispatch = live
    dispatch.requests.clear()
    lightning.init(daemon=stack.address, policy_url=stack.base_url,
                   policy_model=stack.model_name, spill_dir=str(tmp_path / "spill"))
    yield stack, dispatch
    lightning.shutdown()


def _run(agent, *args):
    """Run an async rollout in a fresh event loop; returns (result, rollout id)."""
    ids = []

    async def main():
        return await agent(ids, *args)

    return anyio.run(main), ids


def _checked(stack, rollout_id, calls):
    """The stored trajectory: ``calls`` transitions, each exactly the tokens sampled."""
    traj = stack.trajectory(rollout_id)
    assert traj.status == "completed", traj.error
    assert len(traj.transitions) == calls, [t.metadata for t in traj.transitions]
    for t in traj.transitions:
        assert t.trainable and len(t.logprobs) == len(t.response_ids)
    return traj


def _tool_output_masked(traj, tool_texts, tok):
    """Every tool result, as the template renders it, lies in the masked (non-action) part
    of a training sequence, and no action token is a tool response."""
    counters = Counter()
    seqs = merge_transitions(traj.transitions, counters)
    masked_all = []
    for s in seqs:
        ids = list(s.token_ids)
        masked_all.append("".join(tok.decode([t]) for t, a in zip(ids, s.action_mask) if not a))
        acted = "".join(tok.decode([t]) for t, a in zip(ids, s.action_mask) if a)
        assert "<tool_response>" not in acted
    for text in tool_texts:
        assert any(f"<tool_response>\n{text}\n</tool_response>" in m for m in masked_all), text
    return seqs, counters


def _add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


# ------------------------------------------------------------------ LangGraph ReAct
# (LangChain 1.x's create_agent: the prebuilt ReAct loop on a LangGraph graph; LangGraph's
# own create_react_agent is deprecated in its favour)


def test_langgraph_react_agent_runs_two_tool_rounds(stack):
    pytest.importorskip("langgraph")
    agents_mod = pytest.importorskip("langchain.agents")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    stack, dispatch = stack

    def script(req):
        if req.turn == 0:
            return Reply(text="First the sum.", tool_calls=[ToolCall("add", {"a": 19, "b": 23})])
        if req.turn == 1:
            (s,) = req.tool_results
            return Reply(tool_calls=[ToolCall("mul", {"a": int(s), "b": 3})])
        return f"The result is {req.tool_results[-1]}."

    dispatch.script = script

    @lightning.rollout
    async def agent(ids):
        ids.append(lightning.current_rollout().rollout_id)
        ep = lightning.llm()
        async with httpx.AsyncClient() as http:
            llm = ChatOpenAI(base_url=ep.base_url, api_key=ep.api_key, model=ep.model,
                             max_retries=0, temperature=0.7, http_async_client=http)
            graph = agents_mod.create_agent(llm, [tool("add")(_add), tool("mul")(_mul)])
            out = await graph.ainvoke({"messages": [("user", "What is (19 + 23) * 3?")]})
        answer = out["messages"][-1].content
        return 1.0 if answer == "The result is 126." else 0.0

    reward, ids = _run(agent)
    assert reward == 1.0
    traj = _checked(stack, ids[0], 3)
    assert [t.finish_reason for t in traj.transitions] == ["tool_calls", "tool_calls", "stop"]
    assert [c["name"] for t in traj.transitions[:2] for c in t.metadata["tool_calls"]] == \
        ["add", "mul"]
    assert [r.tool_results for r in dispatch.requests] == [[], ["42"], ["126"]]
    assert traj.transitions[0].sampling.temperature == 0.7
    seqs, counters = _tool_output_masked(traj, ["42", "126"], stack.engine.tokenizer)
    assert len(seqs) == 1 and counters["merged_turns"] == 2  # one sequence, three actions
    assert len(seqs[0].response_spans) == 3


# ------------------------------------------------------------------ OpenAI Agents SDK


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_agents_sdk_tool_and_handoff(stack, api):
    sdk = pytest.importorskip("agents")
    stack, dispatch = stack

    def script(req):
        system = req.messages[0]["content"] if req.messages[0]["role"] == "system" else ""
        if "triage" in system:
            return Reply(tool_calls=[ToolCall("transfer_to_math", {})])
        if not any(m["role"] == "tool" and m["content"].isdigit() for m in req.messages):
            return Reply(tool_calls=[ToolCall("add", {"a": 2, "b": 40})])
        return "It is 42."

    dispatch.script = script

    @lightning.rollout
    async def agent(ids):
        ids.append(lightning.current_rollout().rollout_id)
        ep = lightning.llm()
        async with openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key,
                                      max_retries=0) as client:
            cls = (sdk.OpenAIResponsesModel if api == "responses"
                   else sdk.OpenAIChatCompletionsModel)
            model = cls(model=ep.model, openai_client=client)
            math = sdk.Agent(name="math", instructions="You do math with tools.", model=model,
                             tools=[sdk.function_tool(_add, name_override="add")])
            triage = sdk.Agent(name="triage", instructions="You are the triage agent.",
                               model=model, handoffs=[math])
            result = await sdk.Runner.run(triage, "2 + 40?",
                                          run_config=sdk.RunConfig(tracing_disabled=True))
            return 1.0 if result.final_output == "It is 42." else 0.0

    reward, ids = _run(agent)
    assert reward == 1.0
    traj = _checked(stack, ids[0], 3)
    names = [c["name"] for t in traj.transitions[:2] for c in t.metadata["tool_calls"]]
    assert names == ["transfer_to_math", "add"]
    seqs, counters = _tool_output_masked(traj, ["42"], stack.engine.tokenizer)
    # the handoff changes the system prompt: a new sequence starts, and says why
    assert counters["split.prefix_mismatch"] == 1 and len(seqs) == 2


def test_agents_sdk_streamed_tool_loop(stack):
    sdk = pytest.importorskip("agents")
    stack, dispatch = stack

    def script(req):
        if not req.tool_results:
            return Reply(text="Calling.", tool_calls=[ToolCall("mul", {"a": 6, "b": 7})])
        return f"Done: {req.tool_results[0]}"

    dispatch.script = script

    @lightning.rollout
    async def agent(ids):
        ids.append(lightning.current_rollout().rollout_id)
        ep = lightning.llm()
        async with openai.AsyncOpenAI(base_url=ep.base_url, api_key=ep.api_key,
                                      max_retries=0) as client:
            a = sdk.Agent(name="m", instructions="Use tools.",
                          model=sdk.OpenAIChatCompletionsModel(model=ep.model, openai_client=client),
                          tools=[sdk.function_tool(_mul, name_override="mul")])
            result = sdk.Runner.run_streamed(a, "6*7?", run_config=sdk.RunConfig(
                tracing_disabled=True))
            kinds = Counter()
            async for ev in result.stream_events():
                kinds[ev.type] += 1
            return (1.0 if result.final_output == "Done: 42" else 0.0), kinds

    (reward, kinds), ids = _run(agent)
    assert reward == 1.0 and kinds["raw_response_event"] > 2
    traj = _checked(stack, ids[0], 2)
    assert all(t.metadata["stream"] is True for t in traj.transitions)
    # streamed content equals non-streamed content, so the turns merge (no split)
    seqs, counters = _tool_output_masked(traj, ["42"], stack.engine.tokenizer)
    assert len(seqs) == 1 and counters["merged_turns"] == 1


# ------------------------------------------------------------------ AutoGen


@pytest.mark.parametrize("stream", [False, True])
def test_autogen_assistant_tool_loop(stack, stream):
    pytest.importorskip("autogen_agentchat")
    from autogen_agentchat.agents import AssistantAgent
    from autogen_core.models import ModelInfo
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    stack, dispatch = stack

    def script(req):
        if req.turn == 0:
            return Reply(tool_calls=[ToolCall("add", {"a": 5, "b": 6})])
        if req.turn == 1:
            return Reply(tool_calls=[ToolCall("mul", {"a": int(req.tool_results[0]), "b": 2})])
        return f"Answer: {req.tool_results[0]}"

    dispatch.script = script
    info = ModelInfo(vision=False, function_calling=True, json_output=False, family="unknown",
                     structured_output=False)

    @lightning.rollout
    async def agent(ids):
        ids.append(lightning.current_rollout().rollout_id)
        ep = lightning.llm()
        client = OpenAIChatCompletionClient(model=ep.model, base_url=ep.base_url,
                                            api_key=ep.api_key, model_info=info, max_retries=0)
        try:
            a = AssistantAgent("calc", model_client=client, model_client_stream=stream,
                               tools=[FunctionTool(_add, description="add", name="add"),
                                      FunctionTool(_mul, description="mul", name="mul")],
                               max_tool_iterations=3, system_message="Use the tools.")
            result = await a.run(task="(5 + 6) * 2?")
        finally:
            await client.close()
        return 1.0 if result.messages[-1].content == "Answer: 22" else 0.0

    reward, ids = _run(agent)
    assert reward == 1.0
    traj = _checked(stack, ids[0], 3)
    assert all(t.metadata["stream"] is stream for t in traj.transitions)
    seqs, counters = _tool_output_masked(traj, ["11", "22"], stack.engine.tokenizer)
    assert len(seqs) == 1 and counters["merged_turns"] == 2
    # what the model saw: the tool results, as the template renders tool messages
    last = unpack_ids(traj.transitions[-1].prompt_ids)
    assert "<tool_response>\n22\n</tool_response>" in stack.engine.tokenizer.decode(last)
    assert json.loads(traj.transitions[0].metadata["tool_calls"][0]["arguments"]) == {"a": 5, "b": 6}
