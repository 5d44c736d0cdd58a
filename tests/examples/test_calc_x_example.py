"""examples/calc_x: the MCP calculator, its safety, the data, the answer parsing, and the
AutoGen agent end to end behind the real policy server and daemon."""

from __future__ import annotations

import json
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))  # examples/ is the package root of calc_x

from calc_x import agent as calc_agent
from calc_x.calc_server import MAX_CHARS, CalcError, evaluate, format_number
from calc_x.data import bundled, load_calc_x, parse_result
from calc_x.make_data import DATA_DIR, generate

pytest.importorskip("autogen_agentchat")
pytest.importorskip("mcp")


def _server_pids() -> list[int]:
    """Live calc_server.py processes whose parent is this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and int(stat[1]) == os.getpid() and any(
                c.endswith(b"calc_server.py") for c in cmd):
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------- the MCP server


async def test_calculator_over_a_real_stdio_session():
    from mcp import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    params = StdioServerParameters(command=sys.executable, args=[str(calc_agent.SERVER_SCRIPT)])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        assert _server_pids()
        (tool,) = (await session.list_tools()).tools
        assert tool.name == "calculator"
        assert tool.input_schema["required"] == ["expression"]
        assert tool.input_schema["properties"]["expression"]["type"] == "string"
        ok = await session.call_tool("calculator", {"expression": "3 * 12 - 7"})
        assert not ok.is_error and ok.content[0].text == "29"
        frac = await session.call_tool("calculator", {"expression": "(2 + 3) / 4"})
        assert frac.content[0].text == "1.25"
        for bad, why in [("__import__('os').system('true')", "function call"),
                         ("x + 1", "name 'x'"), ("(1).real", "attribute 'real'"),
                         ("9 ** 10 ** 9", "exponent"), ("1 / 0", "division by zero")]:
            res = await session.call_tool("calculator", {"expression": bad})
            assert res.is_error, bad
            assert why in res.content[0].text, (bad, res.content[0].text)
        # the server is still answering after the errors
        again = await session.call_tool("calculator", {"expression": "2 ** 10"})
        assert again.content[0].text == "1024"
    with anyio.fail_after(10):
        while _server_pids():
            await anyio.sleep(0.02)


# ------------------------------------------------------------------ safe evaluation


@pytest.mark.parametrize("expr, value", [
    ("3 * 12 - 7", 29), ("(40 - 6) / 2", 17), ("7 // 2", 3), ("7 % 4", 3), ("2 ** 10", 1024),
    ("-3 + +5", 2), ("1,200 / 4", 300), ("3 × 4 ÷ 2", 6), ("2 ^ 3", 8), ("12 / 4 =", 3),
    ("0.5 * 3", 1.5),
])
def test_evaluate_arithmetic(expr, value):
    assert evaluate(expr) == value
    assert type(evaluate(expr)) is type(value)


@pytest.mark.parametrize("expr", [
    "__import__('os')", "open('/etc/passwd')", "x", "a.b", "(1).real", "[1, 2]", "'a' * 3",
    "lambda: 1", "1 if 1 else 2", "1 < 2", "True + 1", "9 ** 9 ** 9", "10 ** 100",
    "2 ** -1000 ** 2", "1e308 * 10", "1 / 0", "5 % 0", "0 ** -1", "(-8) ** 0.5", "", "1 +",
    "1" * 300, "(" * 150 + "1" + ")" * 150, "1\0", "().__class__",
])
def test_evaluate_refuses(expr):
    with pytest.raises(CalcError):
        evaluate(expr)


_ARITH = st.text(alphabet="0123456789+-*/%().,^ =e", max_size=60)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_ARITH, st.text(max_size=80)))
def test_evaluate_never_raises_anything_but_a_clean_error(text):
    try:
        value = evaluate(text)
    except CalcError as exc:
        assert str(exc)
    else:
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert abs(value) <= 1e15
        assert format_number(value)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.integers(0, 99).map(str),
                    lambda sub: st.tuples(sub, st.sampled_from("+-*"), sub).map(
                        lambda t: f"({t[0]} {t[1]} {t[2]})"), max_leaves=8))
def test_evaluate_agrees_with_integer_arithmetic(expr):
    # reference: the same tree folded with Python ints (no eval of the string)
    import ast

    def fold(node):
        if isinstance(node, ast.Constant):
            return node.value
        a, b = fold(node.left), fold(node.right)
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]

    if len(expr) <= MAX_CHARS:
        assert evaluate(expr) == fold(ast.parse(expr, mode="eval").body)


# ----------------------------------------------------------------------------- data


def test_generator_is_deterministic_and_disjoint():
    train, test = generate(seed=3)
    assert (train, test) == generate(seed=3)
    assert generate(seed=4) != (train, test)
    assert len(train) == 320 and len(test) == 80
    assert not {t["question"] for t in train} & {t["question"] for t in test}
    assert len({t["question"] for t in train + test}) == 400
    for t in train + test:
        assert t["ops"] in (1, 2, 3)
        assert evaluate(t["expression"]) == t["answer"] > 0
        assert all(str(n) in t["question"] for n in _numbers(t["expression"]))
    assert {t["ops"] for t in test} == {1, 2, 3}
    # the curriculum mix: one-operation problems for a signal from the start, not a majority
    share = {k: sum(t["ops"] == k for t in train + test) / 400 for k in (1, 2, 3)}
    assert 0.3 < share[1] < 0.5 and 0.3 < share[2] < 0.5 and 0.1 < share[3] < 0.3


def _numbers(expression: str) -> list[int]:
    import re

    return [int(n) for n in re.findall(r"\d+", expression)]


def test_bundled_data_is_the_seed_0_generation():
    train, test = generate(seed=0)
    assert bundled("train") == train and bundled("test") == test
    assert calc_agent.dataset() == (train, test)
    assert calc_agent.dataset(seed=1) == generate(seed=1)
    assert (DATA_DIR / "train.jsonl").is_file()


def test_calc_x_loader_reads_public_rows(tmp_path):
    rows = [
        {"id": "ape210k__1", "question": "How many degrees of 75° make a right angle?",
         "chain": '<gadget id="calculator">90 - 75</gadget>\n<output>15</output>',
         "result": "15", "source": "calc"},
        {"id": "ape210k__2", "question": "x?", "chain": "", "result": "2/3"},
        {"id": "aqua__3", "question": "Pick one: A) 1 B) 2", "chain": "", "result": "C"},
        {"question": "gsm8k style", "chain": "", "result": "1,200", "result_float": 1200.0},
    ]
    path = tmp_path / "calc-x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks, skipped = load_calc_x(path)
    assert skipped == 1
    assert [t["answer"] for t in tasks] == [15.0, pytest.approx(2 / 3), 1200.0]
    assert tasks[0]["id"] == "ape210k__1" and tasks[0]["chain"].startswith("<gadget")
    assert tasks[2]["id"] == "calc-x-3"
    assert load_calc_x(path, limit=1)[0] == tasks[:1]
    # a raw row is a task as it is: the agent reads its result
    assert calc_agent.gold_answer(rows[1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="not a number"):
        calc_agent.gold_answer(rows[2])


def test_calc_x_loader_missing_file_says_where_to_get_it(tmp_path):
    missing = tmp_path / "nope" / "calc-gsm8k-test.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        load_calc_x(missing)
    msg = str(info.value)
    assert str(missing) in msg and "never downloaded" in msg and "MU-NLPC/Calc-gsm8k" in msg


def test_calc_x_loader_rejects_other_files(tmp_path):
    path = tmp_path / "spider.jsonl"
    path.write_text(json.dumps({"query": "SELECT 1"}) + "\n")
    with pytest.raises(ValueError, match="no 'question'/'result'"):
        load_calc_x(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=":1 is not valid JSON"):
        load_calc_x(path)


@pytest.mark.parametrize("text, value", [
    ("24", 24.0), ("-3.5", -3.5), ("1,200", 1200.0), ("2/3", 2 / 3), ("1 1/2", 1.5),
    ("12%", 12.0), (7, 7.0), ("C", None), ("", None), ("1/0", None), (True, None),
    (float("nan"), None),
])
def test_parse_result(text, value):
    got = parse_result(text)
    assert got == (pytest.approx(value) if value is not None else None)


# ------------------------------------------------------------------ answer parsing


@pytest.mark.parametrize("text, value", [
    ("The answer is 29.", 29.0), ("8 * 5 = 40, then 40 - 6 = 34", 34.0), ("1,200 pens", 1200.0),
    ("-4 degrees", -4.0), ("about 2.5", 2.5), ("no idea", None), ("", None), (None, None),
])
def test_last_number(text, value):
    assert calc_agent.last_number(text) == value


def test_final_answer_from_text_or_tool_summary():
    from autogen_agentchat.messages import TextMessage, ToolCallSummaryMessage
    from autogen_core import FunctionCall
    from autogen_core.models import FunctionExecutionResult

    text = TextMessage(content="36 - 7 = 29. The answer is 29.", source="a")
    assert calc_agent.final_answer([text]) == 29.0
    calls = [FunctionCall(id="1", name="calculator", arguments="{}")] * 2
    results = [FunctionExecutionResult(content="17", name="calculator", call_id="1", is_error=False),
               FunctionExecutionResult(content="error: exponent 100 is over 64", name="calculator",
                                       call_id="2", is_error=True)]
    summary = ToolCallSummaryMessage(content="17\nerror: exponent 100 is over 64", source="a",
                                     tool_calls=calls, results=results)
    assert calc_agent.final_answer([text, summary]) == 17.0  # the error's 64 is not an answer
    assert calc_agent.final_answer([summary.model_copy(update={"results": results[1:]})]) is None
    assert calc_agent.final_answer([]) is None
    assert calc_agent.score(29.0, 29) == 1.0 and calc_agent.score(28.0, 29) == 0.0
    assert calc_agent.score(0.666667, 2 / 3) == 1.0 and calc_agent.score(None, 1) == 0.0


# ----------------------------------------------------------------- the shared server


async def test_one_server_per_loop_shared_then_stopped():
    server = calc_agent.CalculatorServer()
    async with calc_agent.calculator_workbench(server) as a:
        async with calc_agent.calculator_workbench(server) as b:
            assert a is b and server.starts == 1 and len(_server_pids()) == 1
            (schema,) = await a.list_tools()
            assert schema["name"] == "calculator"
            assert schema["parameters"]["required"] == ["expression"]
            res = await a.call_tool("calculator", {"expression": "6 * 7"})
            assert not res.is_error and res.to_text() == "42"
        assert server.running
    assert not server.running and _server_pids() == []
    async with calc_agent.calculator_workbench(server):  # a fresh one after the last left
        assert server.starts == 2
    assert _server_pids() == []


async def test_a_cancelled_rollout_still_stops_the_server():
    server = calc_agent.CalculatorServer()
    started = anyio.Event()

    async def user():
        async with calc_agent.calculator_workbench(server):
            started.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(user)
        with anyio.fail_after(30):
            await started.wait()
        tg.cancel_scope.cancel()
    assert not server.running and _server_pids() == []


async def test_a_server_that_does_not_start_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken_server.py"
    broken.write_text("raise SystemExit(3)\n")
    server = calc_agent.CalculatorServer(args=[str(broken)])
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="did not start"):
        await server.acquire()
    assert not server.running


# ------------------------------------------------------------- end to end, live stack


@asynccontextmanager
async def _stack(engine, tmp_path, model_name):
    from lightning._config import DaemonConfig
    from lightning._daemon import Daemon
    from lightning.serving import PolicyServer

    daemon = Daemon(DaemonConfig(bind="tcp://127.0.0.1:0", data_dir=str(tmp_path / "data"),
                                 stats_interval_s=0))
    async with anyio.create_task_group() as tg:
        address = await tg.start(daemon.serve)
        await tg.start(engine.serve)
        server = PolicyServer(engine, model_name=model_name, port=0, capture=daemon.capture,
                              accept_any_model=True)
        base_url = await tg.start(server.serve)
        async with lightning.session(daemon=address, policy_url=base_url, policy_model=model_name,
                                     spill_dir=str(tmp_path / "spill")):
            yield daemon
        tg.cancel_scope.cancel()


def _tokenizer():
    from transformers import AutoTokenizer

    import lightning.models

    return AutoTokenizer.from_pretrained(str(lightning.models.tiny_model_path()),
                                         local_files_only=True)


SHOT_TURNS = sum(len(steps) + 1 for _, steps, _ in calc_agent.FEW_SHOT)
SHOT_RESULTS = [r for _, steps, _ in calc_agent.FEW_SHOT for _, r in steps]
TASK = {"id": "t0", "question": "Ann buys 3 packs of 12 pencils and gives away 7, then buys 4 "
        "more. How many pencils does Ann have?", "answer": 33}


async def test_scripted_two_tool_rounds_then_answer(tmp_path):
    scripted = pytest.importorskip("lightning.engine.scripted")
    seen = []

    def script(req):
        seen.append(req)
        n_calls = req.turn - SHOT_TURNS  # the assistant messages of the few-shot come first
        if n_calls == 0:
            return scripted.Reply(text="", tool_calls=[
                scripted.ToolCall("calculator", {"expression": "3 * 12 - 7"})])
        if n_calls == 1:
            return scripted.Reply(text="", tool_calls=[
                scripted.ToolCall("calculator", {"expression": "29 + 4 +"})])  # a bad one
        if n_calls == 2:
            return scripted.Reply(text="", tool_calls=[
                scripted.ToolCall("calculator", {"expression": "29 + 4"})])
        return "29 + 4 = 33. The answer is 33."

    engine = scripted.ScriptedEngine(_tokenizer(), script)
    async with _stack(engine, tmp_path, "scripted") as daemon:
        with anyio.fail_after(120):
            reward = await calc_agent.agent(TASK)
            traj = await daemon.buffer.get()
    assert reward == 1.0 and traj.final_reward == 1.0 and traj.status == "completed"
    assert _server_pids() == []
    # four model calls: three tool rounds (one refused), then the answer
    assert len(seen) == 4 and len(traj.transitions) == 4
    assert all(r.tools == ["calculator"] for r in seen)
    assert seen[0].tool_results == []
    assert seen[1].tool_results == ["29"]
    assert "error" in seen[2].tool_results[0] and "not an arithmetic expression" in \
        seen[2].tool_results[0]
    assert seen[3].tool_results == ["33"]
    # the later prompts carry the earlier rounds: calls and tool messages, in order
    tool_msgs = [m["content"] for m in seen[3].messages if m["role"] == "tool"]
    assert tool_msgs[-3:] == ["29", seen[2].tool_results[0], "33"]
    assert tool_msgs[:-3] == SHOT_RESULTS  # the few-shot's results come first
    assert seen[3].messages[0]["role"] == "system"
    assert calc_agent.SYSTEM_MESSAGE in seen[3].messages[0]["content"]
    # captured transitions: each prompt extends the previous one
    from lightning._protocol import unpack_ids

    prompts = [list(unpack_ids(t.prompt_ids)) for t in traj.transitions]
    for a, b, t in zip(prompts, prompts[1:], traj.transitions):
        assert b[: len(a) + len(unpack_ids(t.response_ids))] == a + list(unpack_ids(t.response_ids))
    assert all(t.trainable and len(t.logprobs) for t in traj.transitions)
    # AIR: three tool spans, the middle one an error, each after the call that asked for it
    spans = [s for s in traj.spans if s.kind == "tool"]
    assert [s.status for s in spans] == ["ok", "error", "ok"]
    assert [s.after for s in spans] == [1, 2, 3]
    assert spans[0].attributes["input"] == {"expression": "3 * 12 - 7"}
    assert spans[0].attributes["output"] == "29"
    from lightning.algorithms.air import AIR

    steps = AIR().step_rewards(traj)
    tool_steps = [(s.after, s.value) for s in steps if s.rule == "tool_call"]
    w = tool_steps[0][1]  # the rule's weight
    assert w > 0 and tool_steps == [(1, w), (2, -w), (3, w)]
    per_transition = AIR().per_transition(traj)
    # the transition whose call was refused gets less than the ones whose calls worked
    assert per_transition[1] < per_transition[0] and per_transition[1] < per_transition[2]


async def test_scripted_wrong_answer_and_tool_round_limit(tmp_path):
    scripted = pytest.importorskip("lightning.engine.scripted")
    calls = []

    def script(req):
        calls.append(req)
        assert req.turn == SHOT_TURNS + len(calls) - 1
        return scripted.Reply(text="", tool_calls=[
            scripted.ToolCall("calculator", {"expression": f"{len(calls)} + 1"})])

    engine = scripted.ScriptedEngine(_tokenizer(), script)
    async with _stack(engine, tmp_path, "scripted") as daemon:
        with anyio.fail_after(120):
            reward = await calc_agent.agent({**TASK, "answer": calc_agent.MAX_TOOL_ITERATIONS + 1})
            traj = await daemon.buffer.get()
    # it never answers in text: the rounds stop at the limit, the last result is the answer
    assert len(calls) == calc_agent.MAX_TOOL_ITERATIONS
    assert reward == 1.0 and len(traj.transitions) == calc_agent.MAX_TOOL_ITERATIONS
    assert _server_pids() == []


async def test_tiny_model_smoke(tmp_path):
    """The tiny random model writes garbage: the rollout ends, scores 0, leaves no process."""
    import torch
    from transformers import AutoModelForCausalLM

    import lightning.models
    from lightning.engine.torch_engine import TorchEngine

    path = lightning.models.tiny_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    engine = TorchEngine(model, _tokenizer(), max_num_seqs=2, seed=0)
    async with _stack(engine, tmp_path, path.name) as daemon:
        with anyio.fail_after(240):
            rewards = [await calc_agent.agent({**TASK, "max_tokens": 16}) for _ in range(2)]
            trajs = [await daemon.buffer.get() for _ in range(2)]
    assert rewards == [0.0, 0.0]
    assert all(t.status == "completed" and len(t.transitions) >= 1 for t in trajs)
    from lightning._protocol import unpack_ids

    assert all(len(unpack_ids(x.response_ids)) <= 16 for t in trajs for x in t.transitions)
    assert _server_pids() == []


def test_scripted_expressions_match_the_generator():
    from calc_x.scripted import expression_for

    train, test = generate(seed=5)
    assert all(expression_for(t["question"]) == t["expression"] for t in train + test)
    assert expression_for("What is 2 + 2?") is None


def test_lightning_train_runs_the_example_on_the_scripted_engine(tmp_path):
    """The README's command, scripted: ``--agent`` by file path, real AutoGen + MCP loop,
    real trainer on the tiny model; the outputs of the main job are written."""
    import subprocess

    pytest.importorskip("lightning.engine.scripted")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train",
         "--agent", f"{EXAMPLES / 'calc_x' / 'agent.py'}:agent", "--model", "tiny",
         "--engine", "scripted", "--script", "calc_x.scripted:reply", "--steps", "2",
         "--group-size", "4", "--batch-size", "8", "--concurrency", "8", "--eval-tasks", "4",
         "--air", "--out", str(out), "--no-progress"],
        check=False, capture_output=True, text=True, env=env, timeout=280, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["train/step"] for m in train] == [1, 2]
    assert 0.0 < train[0]["reward/mean"] < 1.0  # groups with both outcomes
    evals = {m["when"]: m for m in lines if m["kind"] == "eval"}
    assert set(evals) == {"before", "after"} and evals["before"]["samples"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval" in summary
    assert (out / "reward.png").is_file() or "plot" in summary
