"""Grouping spans into rollouts (pure: no I/O)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lightning._protocol import (
    RolloutEnd,
    RolloutStart,
    Sampling,
    Span,
    Transition,
    check_sampling,
    decode_event,
    encode_event,
    validate_event,
)
from lightning.otel._mapping import Assembler, to_events
from lightning.otel._model import OtelSpan

T = "a" * 32


def span(sid, parent="", start=0.0, end=1.0, **attrs):
    return OtelSpan(trace_id=T, span_id=sid.rjust(16, "0"),
                    parent_span_id=parent.rjust(16, "0") if parent else "",
                    name=f"s{sid}", start=start, end=end, attributes=attrs)


LLM = {"gen_ai.operation.name": "chat", "lightning.prompt_token_ids": [1],
       "lightning.response_token_ids": [2]}


def test_nested_rollouts_are_cut_innermost_first():
    a = Assembler()
    outer = span("1", "9", 0, 10, **{"lightning.rollout.id": "outer",
                                     "lightning.rollout.status": "completed"})
    inner = span("2", "1", 1, 5, **{"lightning.rollout.id": "inner",
                                    "lightning.rollout.status": "completed",
                                    "lightning.rollout.parent_id": "outer"})
    llm_inner = span("3", "2", 2, 3, **LLM)
    llm_outer = span("4", "1", 6, 7, **LLM)
    tool = span("5", "1", 7, 8, **{"gen_ai.operation.name": "execute_tool",
                                   "gen_ai.tool.name": "calc"})
    groups = a.add([llm_inner, inner, llm_outer, tool, outer])
    assert [g.root.attributes["lightning.rollout.id"] for g in groups] == ["inner", "outer"]
    inner_ev, outer_ev = (to_events(g).events for g in groups)
    assert [type(e) for e in inner_ev] == [RolloutStart, Transition, RolloutEnd]
    assert inner_ev[0].parent_id == "outer"
    assert [type(e) for e in outer_ev] == [RolloutStart, Transition, Span, RolloutEnd]
    assert outer_ev[2].name == "calc" and outer_ev[2].after == 1
    assert len(a) == 0  # the app's span "9" never came: nothing else buffered
    # the outer rollout is done: a straggler of it is late, not a new rollout
    assert a.add([span("6", "1", 8, 9, **{"lightning.rollout.id": "outer", **LLM})]) == []
    assert a.late == 1


def test_a_trace_without_genai_spans_is_not_a_rollout():
    a = Assembler()
    assert a.add([span("2", "1"), span("1")]) == []
    assert len(a) == 0


def test_idle_traces_are_cut_and_then_late():
    a = Assembler(idle_s=5)
    assert a.add([span("2", "1", **LLM)], now=100.0) == []
    assert a.expire(now=104.0) == []
    (g,) = a.expire(now=105.0)
    ev = to_events(g).events
    assert ev[0].rollout_id == f"otel-{T}" and ev[-1].n_transitions == 1
    assert a.add([span("1")], now=106.0) == [] and a.late == 1


def test_bad_rewards_are_skipped_and_counted():
    root = span("1", **{"lightning.reward.final": "high"})
    r = span("2", "1", **{"lightning.reward.value": float("nan")})
    (g,) = Assembler().add([r, span("3", "1", **LLM), root])
    mapped = to_events(g)
    assert mapped.skipped_rewards == 2
    assert mapped.events[-1].final_reward is None


def test_misaligned_logprobs_keep_the_ids_untrainable():
    bad = {**LLM, "lightning.response_logprobs": [-0.1, -0.2]}
    (g,) = Assembler().add([span("1", **bad)])
    (x,) = [e for e in to_events(g).events if isinstance(e, Transition)]
    assert not x.trainable and x.metadata["untrainable_reason"].startswith("logprobs_misaligned")


def test_two_views_of_one_call_count_once_and_keep_the_text():
    ours = span("2", "1", 1.0, 3.0, **{**LLM, "gen_ai.response.model": "m"})
    theirs = span("3", "1", 1.1, 3.2, **{"openinference.span.kind": "LLM", "llm.model_name": "m",
                                         "llm.output_messages.0.message.content": "hi"})
    other = span("4", "1", 1.5, 2.0, **{"gen_ai.operation.name": "chat",  # another model:
                                        "gen_ai.request.model": "gpt-4o"})  # a real call
    (g,) = Assembler().add([ours, theirs, other, span("1", "", 0, 4)])
    xs = [e for e in to_events(g).events if isinstance(e, Transition)]
    assert [(x.trainable, x.model, x.metadata["text"]) for x in xs] == [
        (True, "m", "hi"), (False, "gpt-4o", "")]


def test_the_innermost_llm_span_keeps_its_wrappers_text():
    wrapper = span("2", "1", 1.0, 3.0, **{"openinference.span.kind": "LLM",
                                          "output.value": "the answer"})
    inner = span("3", "2", 1.1, 2.9, **LLM)
    (g,) = Assembler().add([inner, wrapper, span("1", "", 0, 4)])
    (x,) = [e for e in to_events(g).events if isinstance(e, Transition)]
    assert x.trainable and x.metadata["text"] == "the answer"


def test_sampling_parameters_come_from_genai_request_attributes():
    attrs = {**LLM, "lightning.response_logprobs": [-0.5], "gen_ai.request.temperature": 0.7,
             "gen_ai.request.top_p": 0.9, "gen_ai.request.top_k": 20,
             "lightning.logprobs.convention": "processed"}
    (g,) = Assembler().add([span("1", **attrs)])
    (x,) = [e for e in to_events(g).events if isinstance(e, Transition)]
    assert x.sampling == Sampling(temperature=0.7, top_p=0.9, top_k=20, logprobs="processed")
    # absent: unknown; nonsense: unknown (never a guess)
    for extra, expected in (({}, None),
                            ({"gen_ai.request.temperature": -3.0, "gen_ai.request.top_p": 0.5},
                             Sampling(top_p=0.5))):
        (g,) = Assembler().add([span("2", **{**LLM, **extra})])
        (x,) = [e for e in to_events(g).events if isinstance(e, Transition)]
        assert x.sampling == expected


_attr = st.one_of(st.none(), st.floats(), st.integers(-2**40, 2**40), st.text(max_size=4),
                  st.booleans(), st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=100, deadline=None)
@given(t=_attr, p=_attr, k=_attr, conv=_attr)
def test_any_sampling_attributes_map_to_a_valid_or_unknown_sampling(t, p, k, conv):
    attrs = dict(LLM)
    for key, v in (("gen_ai.request.temperature", t), ("gen_ai.request.top_p", p),
                   ("gen_ai.request.top_k", k), ("lightning.logprobs.convention", conv)):
        if v is not None:
            attrs[key] = v
    (g,) = Assembler().add([span("1", **attrs)])
    (x,) = [e for e in to_events(g).events if isinstance(e, Transition)]
    assert x.sampling is None or check_sampling(x.sampling) is None
    validate_event(x)  # what ingest stores, recovery can apply
    decode_event(encode_event(x))
