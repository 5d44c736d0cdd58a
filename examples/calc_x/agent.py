"""Calc-X with AutoGen and an MCP calculator: multi-step word problems, tool rounds, reward.

    lightning train --agent examples/calc_x/agent.py:agent --steps 4 --group-size 4 \\
        --batch-size 8 --concurrency 16 --air --eval-tasks 30 --out runs/calc_x

The agent is an AutoGen AgentChat ``AssistantAgent`` whose model client is AutoGen's own
``OpenAIChatCompletionClient`` pointed at ``lightning.llm()`` (the policy being trained;
every call it makes is captured by the ``openai`` SDK underneath). Its one tool, the
calculator, is not a Python function here: it lives in an MCP server (``calc_server.py``)
that runs as a child process and is spoken to over stdio with the ``mcp`` package's client.
AutoGen runs its real tool loop: the model writes a ``<tool_call>`` (the chat template's
format, parsed by the policy server into OpenAI ``tool_calls``), AutoGen calls the tool,
feeds the result back as a tool message, and asks the model again, for at most
:data:`MAX_TOOL_ITERATIONS` rounds.

**The MCP adapter.** autogen-ext 0.7.5's MCP adapter (``autogen_ext.tools.mcp``:
``StdioServerParams``, ``McpWorkbench``) cannot be imported with the installed ``mcp``
2.x: it imports ``mcp.shared.context.RequestContext``, which mcp 2 removed. So
:class:`McpCalculatorWorkbench` implements AutoGen's ``Workbench`` interface (the one
``McpWorkbench`` implements and ``AssistantAgent(workbench=...)`` takes) over mcp's own
``ClientSession`` on ``stdio_client``. When autogen-ext supports mcp 2, ``McpWorkbench``
can replace it; the AIR recording below would then wrap its ``call_tool``.

**One server per event loop, not per rollout.** Measured on this 2-core box: starting the
server and its session takes about 0.7 s (a Python process importing ``mcp``) and closing
it 0.15 s, while a tool call takes about 5 ms. Rollouts run 8-32 at a time, so a server per
rollout would spend more CPU starting servers than the 135M policy spends sampling. The
rollouts of an event loop therefore share one server (:class:`CalculatorServer`): the first
rollout starts it, the last one to finish stops it, so it never outlives the rollouts that
use it and no process is left behind (it also stops when the loop is torn down). The
server is stateless, so sharing changes no answer.

**AIR.** Each MCP call is recorded as a ``kind="tool"`` span around the call (in the
rollout's context, between the transition that asked for it and the next one), ``ok``
when the server answered, ``error`` when it returned a tool error (a refused expression)
or failed; ``lightning train --air`` turns these into step rewards.

**Reward** (:func:`final_answer`, :func:`score`): 1.0 when the agent's final answer equals
the gold answer, else 0.0. The final answer is the last number in the agent's final text
message ("The answer is 29."); when the agent ran out of tool rounds (its last message is
AutoGen's tool-call summary) it is the last successful calculator result, because then the
last calculation is what the agent answered with. A number the model computed in its head
counts too: the reward is for the answer, the calculator is how to get it right.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
import weakref
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning

from .data import bundled, load_calc_x, parse_result
from .make_data import generate

__all__ = [
    "FEW_SHOT",
    "FEW_SHOT_CHAIN",
    "FEW_SHOT_MIXED",
    "MAX_TOKENS",
    "MAX_TOOL_ITERATIONS",
    "SERVER_SCRIPT",
    "SYSTEM_MESSAGE",
    "CalculatorServer",
    "McpCalculatorWorkbench",
    "Outcome",
    "agent",
    "calculator_workbench",
    "dataset",
    "few_shot_messages",
    "final_answer",
    "gold_answer",
    "last_number",
    "load_calc_x",
    "score",
    "solve",
]

SERVER_SCRIPT = Path(__file__).resolve().with_name("calc_server.py")
"""The MCP server the agent starts (``python calc_server.py``, stdio)."""

MAX_TOOL_ITERATIONS = 4
"""Tool rounds per rollout: a three-step problem takes three, one more allows a retry."""

MAX_TOKENS = 64
"""Tokens per model reply: a tool call is about 25, an answer sentence about 10."""

SYSTEM_MESSAGE = (
    "You solve math word problems with the calculator tool. Call the calculator for each "
    "step of the calculation. When you have the result, reply: The answer is <number>."
)

#: The solved examples shown before each problem, as (question, [(expression, result)...],
#: final reply). A 135M model copies formats far better than it follows instructions, so it
#: sees the whole loop: a calculator call with the whole calculation, its result, the answer.
#: One call is the shortest loop to copy; the model may still call once per step (the agent
#: allows :data:`MAX_TOOL_ITERATIONS` rounds). Measured against :data:`FEW_SHOT_CHAIN` (see
#: the README): SmolLM2-135M made no well-formed call after the chained example.
FEW_SHOT: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("A box holds 8 rows of 5 eggs and 6 eggs break. How many eggs are not broken?",
     (("8 * 5 - 6", "34"),), "The answer is 34."),
    ("Tom has 20 dollars and buys 3 books at 4 dollars each. How many dollars are left?",
     (("20 - 3 * 4", "8"),), "The answer is 8."),
)

#: The curriculum design: one two-step example and one one-step example (the shape of the
#: one-operation problems, which are 40 % of the data), the shortest last.
FEW_SHOT_MIXED: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    FEW_SHOT[0],
    ("Mia has 7 cards and gets 5 more. How many cards does Mia have now?",
     (("7 + 5", "12"),), "The answer is 12."),
)

#: The other design measured: one step per call, two calls over two rounds, then the answer.
FEW_SHOT_CHAIN: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("A box holds 8 rows of 5 eggs and 6 eggs break. How many eggs are not broken?",
     (("8 * 5", "40"), ("40 - 6", "34")), "The answer is 34."),
)

_MODEL_INFO: dict[str, Any] = {
    # the policy's name is unknown to AutoGen, so say what it can do
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
    "multiple_system_messages": False,
}


def few_shot_messages(shots: Sequence[tuple[str, Sequence[tuple[str, str]], str]] | None = None
                      ) -> list[Any]:
    """:data:`FEW_SHOT` as AutoGen messages (user, assistant tool call, tool result, ...).

    They go into the agent's model context before the question, so AutoGen sends them as
    real ``tool_calls`` and ``tool`` messages and the chat template renders them exactly as
    the model's own calls will look.
    """
    from autogen_core import FunctionCall
    from autogen_core.models import (
        AssistantMessage,
        FunctionExecutionResult,
        FunctionExecutionResultMessage,
        UserMessage,
    )

    out: list[Any] = []
    for n, (question, steps, reply) in enumerate(FEW_SHOT if shots is None else shots):
        out.append(UserMessage(content=question, source="user"))
        for k, (expression, result) in enumerate(steps):
            call_id = f"call_example_{n}_{k}"
            out.append(AssistantMessage(content=[FunctionCall(
                id=call_id, name="calculator", arguments=json.dumps({"expression": expression}))],
                source="assistant"))
            out.append(FunctionExecutionResultMessage(content=[FunctionExecutionResult(
                content=result, name="calculator", call_id=call_id, is_error=False)]))
        out.append(AssistantMessage(content=reply, source="assistant"))
    return out


# ---------------------------------------------------------------------------- MCP side


def _workbench_base() -> type:
    from autogen_core.tools import Workbench

    return Workbench


class McpCalculatorWorkbench(_workbench_base()):  # type: ignore[misc]
    """AutoGen ``Workbench`` over an open MCP ``ClientSession``; each call is an AIR step.

    The session's lifetime belongs to :class:`CalculatorServer`, so ``start``/``stop``/
    ``reset`` do nothing here (an ``AssistantAgent`` never calls them on its own).
    """

    def __init__(self, session: Any, tools: Sequence[Any]) -> None:
        super().__init__()
        self._session = session
        self._tools = [_schema(t) for t in tools]
        self.calls = 0
        """Tool calls made through this workbench (all rollouts sharing it)."""

    async def list_tools(self) -> list[Any]:
        return list(self._tools)

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None,
                        cancellation_token: Any = None, call_id: str | None = None) -> Any:
        from autogen_core.tools import TextResultContent, ToolResult

        args = dict(arguments or {})
        self.calls += 1
        # a span only inside a rollout (outside one, e.g. in a test, the call just runs)
        span = (lightning.span(name, kind="tool", **{"tool.name": name, "input": args,
                                                     "tool.call_id": call_id or ""})
                if lightning.current_rollout() is not None else None)
        with span or contextlib.nullcontext():
            try:
                result = await self._session.call_tool(name, args)
            except Exception as exc:  # noqa: BLE001 - the model sees the failure, AIR records it
                text, is_error = f"error: {type(exc).__name__}: {exc}", True
            else:
                text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
                is_error = bool(result.is_error)
            if span is not None:
                span.set_output(text)
                if is_error:
                    span.set_error(text)
        return ToolResult(name=name, result=[TextResultContent(content=text)], is_error=is_error)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def reset(self) -> None:
        pass

    async def save_state(self) -> Mapping[str, Any]:
        return {}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        pass


def _schema(tool: Any) -> dict[str, Any]:
    """An MCP ``Tool`` as AutoGen's ``ToolSchema`` (name, description, JSON parameters)."""
    params = dict(tool.input_schema or {"type": "object", "properties": {}})
    params.pop("title", None)
    return {"name": tool.name, "description": tool.description or "", "parameters": params}


class CalculatorServer:
    """The calculator MCP server of one event loop, shared by the rollouts running on it.

    :meth:`acquire` starts it for the first user, :meth:`release` stops it when the last
    user leaves. The server's ``stdio_client``/``ClientSession`` contexts are entered and
    exited by one owner task (anyio cancel scopes must be left by the task that entered
    them, and the rollout that started the server may not be the one that ends last).
    """

    def __init__(self, command: str = sys.executable,
                 args: Sequence[str] = (str(SERVER_SCRIPT),)) -> None:
        self.command = command
        self.args = list(args)
        self.starts = 0
        """Times a server process was started (for tests and measurements)."""
        self._users = 0
        self._lock = asyncio.Lock()
        self._workbench: McpCalculatorWorkbench | None = None
        self._stop: asyncio.Event | None = None
        self._owner: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._owner is not None and not self._owner.done()

    async def acquire(self) -> McpCalculatorWorkbench:
        """The shared workbench; starts the server if no rollout is using it.

        Raises:
            RuntimeError: the server did not start (its error is chained).
        """
        async with self._lock:
            if self._workbench is None or not self.running:
                await self._start()
            self._users += 1
            assert self._workbench is not None
            return self._workbench

    async def release(self) -> None:
        """One user fewer; the last one stops the server and waits for it to exit."""
        async with self._lock:
            self._users -= 1
            if self._users > 0 or self._owner is None:
                return
            owner, self._owner, self._workbench = self._owner, None, None
            assert self._stop is not None
            self._stop.set()
            await owner

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[McpCalculatorWorkbench] = loop.create_future()
        self._stop = asyncio.Event()
        self._owner = loop.create_task(self._own(ready, self._stop), name="calc_x.mcp_server")
        self.starts += 1
        try:
            self._workbench = await ready
        except Exception as exc:
            self._owner = None
            raise RuntimeError(
                f"the calculator MCP server did not start ({self.command} {' '.join(self.args)}): "
                f"{exc}") from exc

    async def _own(self, ready: asyncio.Future[McpCalculatorWorkbench], stop: asyncio.Event
                   ) -> None:
        from mcp import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client

        params = StdioServerParameters(command=self.command, args=self.args)
        try:
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                tools = (await session.list_tools()).tools
                ready.set_result(McpCalculatorWorkbench(session, tools))
                await stop.wait()
        except Exception as exc:  # noqa: BLE001 - handed to the rollout that started it
            if not ready.done():
                ready.set_exception(exc)


_servers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CalculatorServer] = (
    weakref.WeakKeyDictionary())


def _server() -> CalculatorServer:
    loop = asyncio.get_running_loop()
    if loop not in _servers:
        _servers[loop] = CalculatorServer()
    return _servers[loop]


@contextlib.asynccontextmanager
async def calculator_workbench(server: CalculatorServer | None = None
                               ) -> AsyncIterator[McpCalculatorWorkbench]:
    """The calculator's workbench for the duration of the block (the loop's shared server)."""
    import anyio

    server = server or _server()
    workbench = await server.acquire()
    try:
        yield workbench
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await server.release()


# --------------------------------------------------------------------------- the agent

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str | None) -> float | None:
    """The last number written in ``text`` (``"1,200"`` is 1200), or None."""
    found = _NUMBER.findall(text or "")
    return float(found[-1].replace(",", "")) if found else None


def final_answer(messages: Sequence[Any]) -> float | None:
    """The answer an AutoGen run ended with (see the module docstring), or None."""
    from autogen_agentchat.messages import TextMessage, ToolCallSummaryMessage

    if not messages:
        return None
    last = messages[-1]
    if isinstance(last, TextMessage):
        return last_number(last.content)
    if isinstance(last, ToolCallSummaryMessage):
        ok = [r.content for r in last.results if not r.is_error]
        return last_number(ok[-1]) if ok else None
    return None


def score(answer: float | None, gold: float) -> float:
    """1.0 when ``answer`` equals ``gold`` (to 1e-4 relative, for Calc-X's fractions)."""
    if answer is None:
        return 0.0
    return 1.0 if math.isclose(answer, float(gold), rel_tol=1e-4, abs_tol=1e-6) else 0.0


def gold_answer(task: Mapping[str, Any]) -> float:
    """The task's gold answer: ``answer``, else a raw Calc-X row's ``result_float``/``result``.

    Raises:
        ValueError: the task has no numeric answer (e.g. a multiple-choice Calc-X row; filter
            those out with :func:`load_calc_x`).
    """
    for key in ("answer", "result_float", "result"):
        if task.get(key) is not None:
            value = parse_result(task[key])
            if value is None:
                raise ValueError(f"task {task.get('id', '?')!r}: {key}={task[key]!r} is not a "
                                 "number; load Calc-X files with load_calc_x(), which skips such rows")
            return value
    raise ValueError(f"task {task.get('id', '?')!r} has no 'answer' (fields: {sorted(task)})")


class Outcome(dict):
    """What one solve did: ``reward``, ``answer``, ``tool_calls``, ``tool_errors``,
    ``model_calls``, ``final`` (the final message's text)."""


async def solve(task: Mapping[str, Any]) -> Outcome:
    """Run the AutoGen agent on one task against ``lightning.llm()``; score it."""
    from autogen_agentchat.agents import AssistantAgent
    from autogen_agentchat.messages import (
        TextMessage,
        ToolCallExecutionEvent,
        ToolCallRequestEvent,
    )
    from autogen_core.model_context import UnboundedChatCompletionContext
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    gold = gold_answer(task)
    ep = lightning.llm()
    client = OpenAIChatCompletionClient(
        model=ep.model, base_url=ep.base_url, api_key=ep.api_key or "none",
        model_info=_MODEL_INFO, max_retries=2, timeout=600.0,
        temperature=float(task.get("temperature", 1.0)),
        max_tokens=int(task.get("max_tokens", MAX_TOKENS)),
    )
    try:
        async with calculator_workbench() as workbench:
            assistant = AssistantAgent(
                "calculator_agent", model_client=client, workbench=workbench,
                system_message=SYSTEM_MESSAGE,
                model_context=UnboundedChatCompletionContext(initial_messages=few_shot_messages()),
                max_tool_iterations=MAX_TOOL_ITERATIONS, reflect_on_tool_use=False,
            )
            result = await assistant.run(task=str(task["question"]))
    finally:
        await client.close()
    answer = final_answer(result.messages)
    executions = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]
    last = result.messages[-1] if result.messages else None
    final = last.content if isinstance(last, TextMessage) else ""
    return Outcome(
        reward=score(answer, gold),
        answer=answer,
        tool_calls=sum(len(m.content) for m in executions),
        tool_errors=sum(1 for m in executions for r in m.content if r.is_error),
        model_calls=sum(isinstance(m, ToolCallRequestEvent) for m in result.messages)
        + isinstance(last, TextMessage),
        final=final,
    )


@lightning.rollout(name="calc_x_autogen")
async def agent(task: dict[str, Any]) -> float:
    """Solve one word problem with the AutoGen agent; the reward is 1.0 if it is right."""
    return float((await solve(task))["reward"])


def dataset(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)``: the bundled problems for seed 0, freshly generated ones otherwise.

    For the public Calc-X data, pass its JSONL files as ``--dataset``/``--eval-dataset`` (the
    agent reads a raw row's ``result``), or build tasks with :func:`load_calc_x`.
    """
    if seed == 0:
        return bundled("train"), bundled("test")
    return generate(seed=seed)
