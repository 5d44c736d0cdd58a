"""The public recording API: decorator, context, rewards, spans, transitions."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import math
import threading

import anyio
import pytest

import lightning
from lightning import RuntimeConfig
from lightning import _lifecycle
from lightning._protocol import Reward, RolloutEnd, RolloutStart, Span, Transition, unpack_ids


class Recorder:
    """Stands in for the runtime: keeps submitted events in order."""

    def __init__(self, **cfg):
        self.config = RuntimeConfig(**cfg)
        self.events = []
        self._lock = threading.Lock()

    def submit(self, event):
        with self._lock:
            self.events.append(event)

    def of(self, rollout_id):
        return [e for e in self.events if e.rollout_id == rollout_id]


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(_lifecycle, "_current", r)
    return r


def test_sync_rollout_records_start_transitions_rewards_end(rec):
    @lightning.rollout
    def agent(task: str, *, k: int = 2) -> float:
        """doc"""
        ctx = lightning.current_rollout()
        assert ctx is not None and ctx.name.endswith("agent")
        for i in range(k):
            assert lightning.record_transition([1, 2, 3], [4, 5], [-0.1, -0.2], policy_version=3) == i
        lightning.emit_reward(0.25)
        return 1.0

    assert agent("t", k=3) == 1.0
    assert agent.__doc__ == "doc" and agent.__name__ == "agent"
    assert str(inspect.signature(agent)) == "(task: 'str', *, k: 'int' = 2) -> 'float'"
    kinds = [type(e) for e in rec.events]
    assert kinds == [RolloutStart, Transition, Transition, Transition, Reward, RolloutEnd]
    t = rec.events[1]
    assert list(unpack_ids(t.prompt_ids)) == [1, 2, 3] and t.policy_version == 3
    assert rec.events[4].after == 3 and rec.events[4].value == 0.25
    end = rec.events[-1]
    assert end.status == "completed" and end.final_reward == 1.0 and end.n_transitions == 3
    assert lightning.current_rollout() is None


async def test_async_rollout_with_arguments(rec):
    @lightning.rollout(name="solver", group_key=lambda task, **_: f"task-{task}",
                       metadata={"split": "train"})
    async def agent(task: int) -> str:
        await anyio.sleep(0)
        lightning.emit_reward({"correct": 1.0, "format": 0.5}, primary="correct")
        return "not a number"

    assert inspect.iscoroutinefunction(agent)
    assert await agent(7) == "not a number"
    start, reward, end = rec.events
    assert start.name == "solver" and start.group_key == "task-7"
    assert start.metadata == {"split": "train"}
    assert reward.name == "correct" and reward.value == 1.0
    assert reward.components == {"correct": 1.0, "format": 0.5}
    assert end.final_reward is None and end.status == "completed"


async def test_concurrent_rollouts_in_one_loop_stay_separate(rec):
    @lightning.rollout
    async def agent(i: int) -> int:
        for step in range(5):
            lightning.record_transition([i], [i, step])
            await anyio.sleep(0.001 * ((i + step) % 3))
        lightning.emit_reward(float(i))
        return i

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(agent, i)
    starts = [e for e in rec.events if isinstance(e, RolloutStart)]
    assert len({s.rollout_id for s in starts}) == 20
    for s in starts:
        evs = rec.of(s.rollout_id)
        ts = [e for e in evs if isinstance(e, Transition)]
        i = list(unpack_ids(ts[0].prompt_ids))[0]
        assert [t.index for t in ts] == list(range(5))
        assert all(list(unpack_ids(t.prompt_ids)) == [i] for t in ts)
        assert [e.value for e in evs if isinstance(e, Reward)] == [float(i)]
        assert evs[-1].final_reward == float(i)


def test_threads_stay_separate_and_to_thread_carries_context(rec):
    @lightning.rollout
    def agent(i: int) -> int:
        lightning.record_transition([i], [i])
        return i

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ends = [e for e in rec.events if isinstance(e, RolloutEnd)]
    assert sorted(e.final_reward for e in ends) == [float(i) for i in range(8)]

    rec.events.clear()

    @lightning.rollout
    async def outer() -> None:
        await asyncio.to_thread(lightning.emit_reward, 2.0)
        ctx = contextvars.copy_context()
        th = threading.Thread(target=ctx.run, args=(lightning.emit_reward, 3.0))
        th.start()
        th.join()

    asyncio.run(outer())
    assert [e.value for e in rec.events if isinstance(e, Reward)] == [2.0, 3.0]


def test_exception_marks_failed_and_propagates_unchanged(rec):
    class Boom(Exception):
        pass

    err = Boom("tool exploded")

    @lightning.rollout
    def agent():
        lightning.record_transition([1], [2])
        raise err

    with pytest.raises(Boom) as info:
        agent()
    assert info.value is err
    end = rec.events[-1]
    assert end.status == "failed" and "Boom: tool exploded" in end.error
    assert end.final_reward is None and end.n_transitions == 1


async def test_cancellation_marks_cancelled(rec):
    @lightning.rollout
    async def agent():
        await anyio.sleep(10)

    with anyio.move_on_after(0.01):
        await agent()
    assert rec.events[-1].status == "cancelled"


def test_nested_child_and_inline(rec):
    @lightning.rollout
    def child():
        lightning.record_transition([9], [9])
        return 0.5

    @lightning.rollout(nested="inline")
    def helper():
        lightning.record_transition([8], [8])
        return 123.0  # not a reward: inline calls belong to the outer rollout

    @lightning.rollout
    def parent():
        lightning.record_transition([1], [1])
        child()
        helper()
        lightning.record_transition([2], [2])
        return 1.0

    parent()
    starts = [e for e in rec.events if isinstance(e, RolloutStart)]
    assert len(starts) == 2
    p, c = starts
    assert c.parent_id == p.rollout_id and p.parent_id is None
    p_ts = [e for e in rec.of(p.rollout_id) if isinstance(e, Transition)]
    assert [list(unpack_ids(t.prompt_ids)) for t in p_ts] == [[1], [8], [2]]
    assert [t.index for t in p_ts] == [0, 1, 2]
    assert rec.of(c.rollout_id)[-1].final_reward == 0.5
    assert rec.of(p.rollout_id)[-1].final_reward == 1.0


def test_rollout_options_set_group_and_attempt(rec):
    @lightning.rollout(group_key="default")
    def agent():
        return True  # bools count as 1.0 / 0.0

    with lightning.rollout_options(group_key="task-1", attempt=3, metadata={"seed": 5}):
        agent()
    agent()
    s1, e1, s2, _ = rec.events
    assert (s1.group_key, s1.attempt, s1.metadata) == ("task-1", 3, {"seed": 5})
    assert (s2.group_key, s2.attempt) == ("default", 0)
    assert e1.final_reward == 1.0


def test_outside_rollout_policies(monkeypatch):
    for policy in ("warn", "ignore", "raise"):
        r = Recorder(outside_rollout=policy)
        monkeypatch.setattr(_lifecycle, "_current", r)
        if policy == "warn":
            with pytest.warns(lightning.LightningWarning, match="outside a rollout"):
                lightning.emit_reward(1.0)
            with pytest.warns(lightning.LightningWarning, match="outside a rollout"):
                assert lightning.record_transition([1], [2]) is None
        elif policy == "ignore":
            lightning.emit_reward(1.0)
            with lightning.span("x"):
                pass
        else:
            with pytest.raises(lightning.RolloutError, match="outside a rollout"):
                lightning.emit_reward(1.0)
            with pytest.raises(lightning.RolloutError):
                lightning.emit_span("x")
        assert r.events == []


def test_emit_after_rollout_finished(monkeypatch):
    r = Recorder(outside_rollout="raise")
    monkeypatch.setattr(_lifecycle, "_current", r)
    saved = []

    @lightning.rollout
    def agent():
        saved.append(lightning.current_rollout())

    agent()
    with pytest.raises(lightning.RolloutError, match="finished") as info:
        lightning.emit_reward(1.0, rollout=saved[0])
    assert info.value.rollout_id == saved[0].rollout_id


def test_bad_rewards_raise_clear_errors(rec):
    @lightning.rollout
    def agent(value, **kw):
        lightning.emit_reward(value, **kw)

    with pytest.raises(ValueError, match="finite"):
        agent(math.nan)
    with pytest.raises(ValueError, match="finite"):
        agent({"a": math.inf})
    with pytest.raises(TypeError, match="real number"):
        agent("1.0")
    with pytest.raises(ValueError, match="primary=NAME"):
        agent({"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="not one of"):
        agent({"a": 1.0}, primary="z")
    with pytest.raises(ValueError, match="empty"):
        agent({})
    assert not any(isinstance(e, Reward) for e in rec.events)


def test_non_finite_return_is_not_a_reward(rec):
    @lightning.rollout
    def agent():
        return math.nan

    with pytest.warns(lightning.LightningWarning, match="non-finite"):
        assert math.isnan(agent())
    assert rec.events[-1].final_reward is None


def test_record_transition_validates_lengths(rec):
    @lightning.rollout
    def agent():
        lightning.record_transition([1, 2], [3, 4], [-1.0])

    with pytest.raises(ValueError, match="1 entries for 2 response tokens"):
        agent()


async def test_spans_and_tools(rec):
    @lightning.tool
    def calculator(expr: str) -> float:
        if expr == "bad":
            raise ZeroDivisionError("division by zero")
        return 42.0

    @lightning.tool(name="search")
    async def search(q: str, k: int = 3) -> list[str]:
        return [q] * k

    @lightning.rollout
    async def agent():
        with lightning.span("plan", kind="custom", step=1) as s:
            s.set(note="thinking")
            calculator("6*7")
        await search("x", k=2)
        with pytest.raises(ZeroDivisionError):
            calculator("bad")
        async with lightning.span("lookup", kind="retrieval") as s:
            s.set_error("not found")
        lightning.emit_span("validator", kind="check", status="error", error="bad format",
                            attributes={"obj": object()})

    await agent()
    spans = [e for e in rec.events if isinstance(e, Span)]
    by_name = {s.name: s for s in spans}
    calc_ok, calc_bad = [s for s in spans if s.name == "calculator"]
    assert calc_ok.kind == "tool" and calc_ok.status == "ok"
    assert calc_ok.attributes == {"tool.name": "calculator", "input": {"expr": "6*7"}, "output": 42.0}
    assert calc_ok.parent_span_id == by_name["plan"].span_id
    assert by_name["plan"].attributes == {"step": 1, "note": "thinking"}
    assert by_name["search"].attributes["output"] == ["x", "x"]
    assert calc_bad.status == "error" and "ZeroDivisionError" in calc_bad.error
    assert by_name["lookup"].status == "error" and by_name["lookup"].error == "not found"
    v = by_name["validator"]
    assert v.status == "error" and v.attributes["obj"].startswith("<object object")


def test_tool_outside_rollout_just_runs(rec):
    @lightning.tool
    def f(x):
        return x + 1

    assert f(1) == 2
    assert rec.events == []


def test_generators_are_refused():
    with pytest.raises(TypeError, match="generator"):

        @lightning.rollout
        def gen():
            yield 1


def test_without_init_functions_still_run():
    assert _lifecycle.get_runtime() is None

    @lightning.rollout
    def agent():
        lightning.emit_reward(1.0)
        return 2

    assert agent() == 2
