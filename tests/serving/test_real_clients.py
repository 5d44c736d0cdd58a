"""Real agent frameworks inside @lightning.rollout against a real daemon serving the tiny model.

Each test checks that the daemon stored, for every LLM call, exactly the token ids the
policy server sampled (read back from the server's own `server.sampled` log lines), with
log-probs aligned to them and the rewards attached.
"""

from __future__ import annotations

import json

import anyio
import pytest

import lightning
from lightning._protocol import unpack_ids, unpack_logprobs
from lightning.testing import recover

from lightning_test_helpers import DaemonProcess, free_tcp_address, wait_until

openai = pytest.importorskip("openai")


def _serve(tiny_dir, tmp, max_model_len):
    d = DaemonProcess(tmp / "data", free_tcp_address())
    d.extra = ("--model", str(tiny_dir), "--http-port", "0", "--served-model-name", "tiny",
               "--max-model-len", str(max_model_len), "--log-level", "debug",
               "--buffer-size", "100000")
    d.start()
    base = d.proc.stdout.readline().decode().strip()
    return d, base, tmp


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    d, base, tmp = _serve(tiny_dir, tmp_path_factory.mktemp("served"), 1024)
    yield d, base, tmp
    if d.proc.poll() is None:
        d.stop()


@pytest.fixture
def served_short(tiny_dir, tmp_path):
    """A daemon whose context holds the README snippets' prompts (<= 250 tokens) and a short
    answer: the snippets set no ``max_tokens``, so the random model writes to the end of the
    context (at 1024, ~900 tokens a call: minutes on a loaded box)."""
    d, base, tmp = _serve(tiny_dir, tmp_path, 384)
    yield d, base, tmp
    if d.proc.poll() is None:
        d.stop()


@pytest.fixture
def runtime(served, tmp_path):
    d, base, _ = served
    rt = lightning.init(daemon=d.address, spill_dir=str(tmp_path / "spill"), policy_url=base,
                        policy_model="tiny")
    yield rt
    lightning.shutdown()


def _sampled(d: DaemonProcess) -> list[dict]:
    out = []
    for line in d.log.read_text().splitlines():
        if line.startswith("{") and '"server.sampled"' in line:
            out.append(json.loads(line))
    return out


def _stored(served, rt, rollout_ids):
    d, _, tmp = served
    assert wait_until(lambda: rt.pending_events() == 0, 30)
    # read the daemon's log of stored events without stopping it
    _, trajs, _ = recover(tmp / "data")
    return {t.rollout_id: t for t in trajs if t.rollout_id in rollout_ids}


def _check(served, rt, rollout_ids, *, min_calls=1, reward=1.0):
    d = served[0]
    trajs = _stored(served, rt, rollout_ids)
    assert set(trajs) == set(rollout_ids)
    sampled = {(tuple(s["prompt_token_ids"]), tuple(s["token_ids"])) for s in _sampled(d)}
    for t in trajs.values():
        assert len(t.transitions) >= min_calls, t
        for tr in t.transitions:
            assert tr.trainable, tr.metadata.get("untrainable_reason")
            key = (tuple(unpack_ids(tr.prompt_ids)), tuple(unpack_ids(tr.response_ids)))
            assert key in sampled  # exactly what the server sampled, no re-tokenization
            assert len(unpack_logprobs(tr.logprobs)) == len(key[1])
            assert tr.policy_version == 0
        assert [r.value for r in t.rewards] == [reward]
        assert t.final_reward == 0.5
    return trajs


def test_openai_sync_async_streaming(served, runtime):
    base = served[1]
    ids = []

    @lightning.rollout
    def sync_agent():
        ids.append(lightning.current_rollout().rollout_id)
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        client.chat.completions.create(model="tiny", max_tokens=6,
                                       messages=[{"role": "user", "content": "2+3?"}])
        with client.chat.completions.create(model="tiny", max_tokens=6, stream=True,
                                            messages=[{"role": "user", "content": "hi"}]) as s:
            for _ in s:
                pass
        lightning.emit_reward(1.0)
        return 0.5

    @lightning.rollout
    async def async_agent():
        ids.append(lightning.current_rollout().rollout_id)
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as client:
            await client.completions.create(model="tiny", prompt="Once", max_tokens=5)
            stream = await client.responses.create(model="tiny", input="hi", stream=True,
                                                   max_output_tokens=5)
            async for _ in stream:
                pass
        lightning.emit_reward(1.0)
        return 0.5

    sync_agent()
    anyio.run(async_agent)
    trajs = _check(served, runtime, ids, min_calls=2)
    assert [t.metadata["endpoint"] for t in trajs[ids[1]].transitions] == ["completions",
                                                                           "responses"]


def test_langchain_plain_tools_structured(served, runtime):
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from pydantic import BaseModel

    base = served[1]

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    class Answer(BaseModel):
        value: int

    llm = lc.ChatOpenAI(model="tiny", base_url=base, api_key="x", max_tokens=12,
                        max_retries=0)
    ids = []

    @lightning.rollout
    def agent(kind: str):
        ids.append(lightning.current_rollout().rollout_id)
        if kind == "plain":
            llm.invoke("What is 2+3?")
        elif kind == "tools":  # a tool-calling agent loop: call, run tools, answer
            bound = llm.bind_tools([add])
            messages = [HumanMessage("What is 2+3? Use the add tool.")]
            for _ in range(3):
                ai = bound.invoke(messages)
                messages.append(ai)
                if not ai.tool_calls:
                    break
                for call in ai.tool_calls:
                    try:
                        result = add.invoke(call["args"])
                    except Exception as exc:  # the tiny random model writes bad arguments
                        result = f"error: {exc}"
                    messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
        else:
            # default method (json_schema, through the SDK's parse): a random model rarely
            # writes JSON and runs into max_tokens, which the SDK reports as an error
            try:
                llm.with_structured_output(Answer).invoke("2+3?")
            except (openai.LengthFinishReasonError, ValueError):
                pass
            out = llm.with_structured_output(Answer, method="function_calling",
                                             include_raw=True).invoke("2+3?")
            assert "raw" in out
        lightning.emit_reward(1.0)
        return 0.5

    for kind in ("plain", "tools", "structured"):
        agent(kind)
    _check(served, runtime, ids)


def test_openai_agents_sdk_runner_with_function_tool(served, runtime):
    agents = pytest.importorskip("agents")
    base = served[1]

    @agents.function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    ids = []

    @lightning.rollout
    async def agent():
        ids.append(lightning.current_rollout().rollout_id)
        client = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)
        agents.set_default_openai_client(client, use_for_tracing=False)
        agents.set_tracing_disabled(True)
        a = agents.Agent(name="calc", instructions="Answer briefly.", tools=[add],
                         model="tiny",
                         model_settings=agents.ModelSettings(max_tokens=16))
        try:
            await agents.Runner.run(a, "What is 2+3?", max_turns=3)
        except agents.exceptions.AgentsException:
            pass  # a random model may produce a tool call the SDK rejects; captured anyway
        await client.close()
        lightning.emit_reward(1.0)
        return 0.5

    anyio.run(agent)
    trajs = _check(served, runtime, ids)
    assert trajs[ids[0]].transitions[0].metadata["endpoint"] == "responses"


def test_autogen_assistant_agent_with_tool(served, runtime):
    pytest.importorskip("autogen_agentchat")
    from autogen_agentchat.agents import AssistantAgent
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    base = served[1]

    async def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    ids = []

    @lightning.rollout
    async def agent():
        ids.append(lightning.current_rollout().rollout_id)
        client = OpenAIChatCompletionClient(
            model="tiny", base_url=base, api_key="x", max_tokens=16,
            model_info={"vision": False, "function_calling": True, "json_output": False,
                        "family": "unknown", "structured_output": False},
        )
        a = AssistantAgent("assistant", model_client=client, tools=[add])
        await a.run(task="What is 2+3?")
        await client.close()
        lightning.emit_reward(1.0)
        return 0.5

    anyio.run(agent)
    _check(served, runtime, ids)


def test_readme_integration_snippets_run_unchanged(served_short, tmp_path, monkeypatch):
    """The four snippets of README.md's "Agents that need no changes", executed verbatim
    in order (configured through LIGHTNING_* variables, as a user would), each capture
    what the server sampled."""
    import inspect
    import re

    agents = pytest.importorskip("agents")
    pytest.importorskip("langchain_openai")
    pytest.importorskip("autogen_agentchat")
    from lightning_test_helpers import ROOT

    d, base, tmp = served_short
    section = (ROOT / "README.md").read_text().split("## Agents that need no changes\n")[1]
    blocks = re.findall(r"```python\n(.*?)```", section.split("\n## ")[0], re.DOTALL)
    assert len(blocks) == 4
    for key, value in (("DAEMON", d.address), ("SPILL_DIR", str(tmp_path / "spill")),
                       ("POLICY_URL", base), ("POLICY_MODEL", "tiny")):
        monkeypatch.setenv(f"LIGHTNING_{key}", value)
    agents.set_tracing_disabled(True)  # the SDK would export traces to api.openai.com
    from agents.models import _openai_shared

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    namespace = {"check": lambda text: True, "add": add, "add_tool": agents.function_tool(add)}
    _, before, _ = recover(tmp / "data")
    seen = {t.rollout_id for t in before}
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the test
            agent = namespace.pop("agent")
            try:
                if inspect.iscoroutinefunction(agent):
                    anyio.run(_run_then_close, agent, namespace)
                else:
                    agent("What is 2+3?")
            except agents.exceptions.AgentsException:
                pass  # the random model may write a tool call the SDK rejects
        rt = lightning.get_runtime()
        assert wait_until(lambda: rt.pending_events() == 0, 30)
        _, after, _ = recover(tmp / "data")
    finally:
        lightning.shutdown()
        _openai_shared.set_default_openai_client(None)  # type: ignore[arg-type]
    new = [t for t in after if t.rollout_id not in seen]
    assert len(new) == 4
    sampled = {(tuple(s["prompt_token_ids"]), tuple(s["token_ids"])) for s in _sampled(d)}
    for t in new:
        assert t.transitions
        for tr in t.transitions:
            assert tr.trainable
            assert (tuple(unpack_ids(tr.prompt_ids)), tuple(unpack_ids(tr.response_ids))) in sampled
    assert [t.transitions[0].metadata["endpoint"] for t in new] == [
        "chat.completions", "chat.completions", "responses", "chat.completions"]


async def _run_then_close(agent, namespace):
    """Run an async README agent, then close the clients its snippet opened, in the loop
    they belong to."""
    from agents.models import _openai_shared

    try:
        await agent("What is 2+3?")
    finally:
        for client in (*namespace.values(), _openai_shared.get_default_openai_client()):
            if type(client).__name__ in ("AsyncOpenAI", "OpenAIChatCompletionClient"):
                await client.close()
