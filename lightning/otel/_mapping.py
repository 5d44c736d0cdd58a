"""Spans -> rollouts: group the spans of a trace into rollouts, map them to events.

Grouping (:class:`Assembler`)
    Spans are buffered per trace. A rollout is cut out of its trace when its *rollout
    span* arrives: a span carrying ``lightning.rollout.status`` (the exporter writes it on
    the span of each ``@lightning.rollout`` call, which ends after everything inside).
    Its members are the buffered spans of the trace that carry its
    ``lightning.rollout.id`` or descend from it. What is left of a trace becomes one
    rollout when the trace's root span (no parent) arrives, or when the trace has been
    idle for ``idle_s``; a leftover with no LLM, reward or ``lightning.*`` span is
    dropped (a plain HTTP trace is not a rollout). Spans arriving for a rollout or a
    trace already cut are late: dropped and counted.

Mapping (:func:`to_events`) -- see :mod:`lightning.otel._attributes` for names
    * rollout: ``lightning.rollout.id`` (else ``otel-<trace id>``), name from
      ``lightning.rollout.name``, ``gen_ai.agent.name`` or the root span's name; group key
      and attempt from ``lightning.rollout.group_key``/``.attempt``; status from
      ``lightning.rollout.status`` or the root span's status (error -> failed); final
      reward ``lightning.reward.final``.
    * transitions: LLM spans (``gen_ai.operation.name`` chat / text_completion /
      generate_content, OpenInference ``openinference.span.kind=LLM``, OpenLLMetry
      ``llm.request.type`` chat / completion, or any span with ``lightning.*_token_ids``)
      that have no LLM span below them (a framework span wrapping the SDK's span would
      count the call twice: the innermost is closest to the wire), and no twin with
      token ids (a span without token ids overlapping in time a related span of the
      same model that has them, matched one to one by closest start: two
      instrumentations' views of one call; its text is kept). Ordered by
      ``lightning.transition.index``, then start time. Token ids from
      ``lightning.prompt_token_ids``/``lightning.response_token_ids`` and log-probs from
      ``lightning.response_logprobs``; without them the call is stored with its text,
      ``trainable=False`` and ``untrainable_reason``.
    * tool spans (``gen_ai.operation.name=execute_tool``, OpenInference ``TOOL``,
      OpenLLMetry ``traceloop.span.kind=tool``) and spans with ``lightning.span.kind``
      become :class:`~lightning._protocol.Span` events (what AIR reads).
    * rewards: spans with ``lightning.reward.value``; span events with
      ``lightning.reward.value`` or GenAI ``gen_ai.evaluation.result`` events
      (``gen_ai.evaluation.score.value``, ``gen_ai.evaluation.name``).
    * ``after`` of spans and rewards: ``lightning.span.after``/``lightning.reward.after``
      when given, else the number of transitions that ended before.

A rollout whose spans say ``lightning.delivered=true`` was already sent to the daemon
over ZeroMQ by the runtime: :func:`to_events` returns None for it (no double count).
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from typing import Any

from .._capture._records import _floats, _ids
from .._protocol import (
    Event,
    Reward,
    RolloutEnd,
    RolloutStart,
    Span,
    Transition,
    pack_ids,
    pack_logprobs,
)
from .._sampling import sampling_from_request
from . import _attributes as A
from ._model import OtelSpan

__all__ = ["Assembler", "Group", "Mapped", "is_llm", "is_tool", "to_events"]

_LLM_OPS = frozenset({"chat", "text_completion", "generate_content", "completion", "responses"})
_TOOL_MARKS = (("openinference.span.kind", "TOOL"), ("traceloop.span.kind", "tool"))


def is_llm(s: OtelSpan) -> bool:
    a = s.attributes
    op = a.get(A.GEN_AI_OPERATION)
    if op is not None:
        return op in _LLM_OPS
    if a.get("openinference.span.kind") == "LLM":
        return True
    if a.get("llm.request.type") in ("chat", "completion"):
        return True
    return A.PROMPT_IDS in a or A.RESPONSE_IDS in a


def is_tool(s: OtelSpan) -> bool:
    a = s.attributes
    if a.get(A.GEN_AI_OPERATION) == "execute_tool" or a.get(A.SPAN_KIND) == "tool":
        return True
    return any(a.get(k) == v for k, v in _TOOL_MARKS)


def _ours(s: OtelSpan) -> bool:
    return any(k.startswith("lightning.") for k in s.attributes) or any(
        A.REWARD_VALUE in e.attributes or e.name == A.GEN_AI_EVALUATION_EVENT for e in s.events
    )


class Group:
    """The spans of one rollout, cut out of a trace."""

    __slots__ = ("root", "spans", "trace_id")

    def __init__(self, trace_id: str, root: OtelSpan | None, spans: list[OtelSpan]) -> None:
        self.trace_id = trace_id
        self.root = root
        self.spans = spans


class _Trace:
    __slots__ = ("last_seen", "spans")

    def __init__(self) -> None:
        self.spans: dict[str, OtelSpan] = {}
        self.last_seen = 0.0


class Assembler:
    """Buffers spans per trace and cuts rollouts out of them (not thread-safe)."""

    def __init__(self, *, idle_s: float = 30.0, max_spans: int = 1_000_000,
                 remember: int = 100_000) -> None:
        self.idle_s = idle_s
        self.max_spans = max_spans
        self._remember = remember
        self._traces: dict[str, _Trace] = {}
        self._n = 0
        self._cut_rollouts: OrderedDict[str, None] = OrderedDict()
        self._cut_traces: OrderedDict[str, None] = OrderedDict()
        self.late = 0
        self.dropped_overflow = 0
        self.ignored = 0

    def __len__(self) -> int:
        return self._n

    def _mark(self, seen: OrderedDict[str, None], key: str) -> None:
        seen[key] = None
        if len(seen) > self._remember:
            seen.popitem(last=False)

    def add(self, spans: list[OtelSpan], now: float | None = None) -> list[Group]:
        """Buffer ``spans``; return the rollouts they complete."""
        now = time.monotonic() if now is None else now
        touched: dict[str, _Trace] = {}
        for s in spans:
            if A.AIR_RULE in s.attributes:  # the daemon's own output (export_step_rewards)
                self.ignored += 1
                continue
            rid = s.attributes.get(A.ROLLOUT_ID)
            if (rid is not None and rid in self._cut_rollouts) or (
                s.trace_id in self._cut_traces and s.trace_id not in self._traces
            ):
                self.late += 1
                continue
            if self._n >= self.max_spans:
                self.dropped_overflow += 1
                continue
            t = self._traces.get(s.trace_id)
            if t is None:
                t = self._traces[s.trace_id] = _Trace()
            if s.span_id not in t.spans:
                self._n += 1
            t.spans[s.span_id] = s
            t.last_seen = now
            touched[s.trace_id] = t
        out: list[Group] = []
        for trace_id, t in touched.items():
            out.extend(self._collect(trace_id, t, final=False))
        return out

    def expire(self, now: float | None = None, *, everything: bool = False) -> list[Group]:
        """Cut the traces idle for ``idle_s`` (or all of them) into rollouts."""
        now = time.monotonic() if now is None else now
        out: list[Group] = []
        for trace_id, t in list(self._traces.items()):
            if everything or now - t.last_seen >= self.idle_s:
                out.extend(self._collect(trace_id, t, final=True))
        return out

    def _remove(self, trace_id: str, t: _Trace, ids: list[str]) -> list[OtelSpan]:
        taken = [t.spans.pop(i) for i in ids]
        self._n -= len(taken)
        return taken

    def _collect(self, trace_id: str, t: _Trace, *, final: bool) -> list[Group]:
        out: list[Group] = []
        rollout_spans = sorted(
            (s for s in t.spans.values() if A.ROLLOUT_STATUS in s.attributes),
            key=lambda s: s.end,
        )
        for rs in rollout_spans:  # innermost (earliest ending) first: nested rollouts
            rid = rs.attributes.get(A.ROLLOUT_ID)
            members = [sid for sid, s in t.spans.items()
                       if (rid is not None and s.attributes.get(A.ROLLOUT_ID) == rid)
                       or _descends(s, rs.span_id, t.spans)]
            if rs.span_id not in members:
                members.append(rs.span_id)
            out.append(Group(trace_id, rs, self._remove(trace_id, t, members)))
            if rid is not None:
                self._mark(self._cut_rollouts, str(rid))
        has_root = any(not s.parent_span_id for s in t.spans.values())
        if final or has_root:
            rest = self._remove(trace_id, t, list(t.spans))
            if any(is_llm(s) or _ours(s) for s in rest):
                root = next((s for s in rest if not s.parent_span_id), None)
                out.append(Group(trace_id, root, rest))
        if not t.spans:
            del self._traces[trace_id]
            if final or has_root:
                self._mark(self._cut_traces, trace_id)
        return out


def _descends(s: OtelSpan, ancestor: str, spans: dict[str, OtelSpan]) -> bool:
    seen = 0
    while s.parent_span_id and seen < 1000:
        if s.parent_span_id == ancestor:
            return True
        parent = spans.get(s.parent_span_id)
        if parent is None:
            return False
        s = parent
        seen += 1
    return False


# ------------------------------------------------------------------ mapping


class Mapped:
    """The events of one rollout, and how many of its LLM calls are not trainable."""

    __slots__ = ("events", "rollout_id", "skipped_rewards", "untrainable")

    def __init__(self, rollout_id: str, events: list[Event], untrainable: int,
                 skipped_rewards: int) -> None:
        self.rollout_id = rollout_id
        self.events = events
        self.untrainable = untrainable
        self.skipped_rewards = skipped_rewards


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _int(v: Any, default: int) -> int:
    return v if type(v) is int else default


def _num(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _maybe_json(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in ("{", "["):
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _first(a: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        v = a.get(k)
        if v is not None:
            return v
    return None


def _output_text_and_calls(a: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Response text and tool calls from GenAI, OpenInference or OpenLLMetry attributes."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    msgs = _maybe_json(a.get(A.GEN_AI_OUTPUT_MESSAGES))
    if isinstance(msgs, list):  # GenAI: [{"role", "parts": [{"type": "text", "content"}]}]
        for m in msgs:
            for p in (m.get("parts") or ()) if isinstance(m, dict) else ():
                if not isinstance(p, dict):
                    continue
                if p.get("type") == "text" and isinstance(p.get("content"), str):
                    text.append(p["content"])
                elif p.get("type") == "tool_call":
                    args = p.get("arguments")
                    calls.append({"id": p.get("id"), "name": p.get("name"),
                                  "arguments": args if isinstance(args, str) else json.dumps(args)})
        return "".join(text), calls
    for prefix, content, tc in (
        ("llm.output_messages.0.message.", "content", "tool_calls."),  # OpenInference
        ("gen_ai.completion.0.", "content", "tool_calls."),  # OpenLLMetry
    ):
        if prefix + content in a or any(k.startswith(prefix + tc) for k in a):
            if isinstance(a.get(prefix + content), str):
                text.append(a[prefix + content])
            i = 0
            while True:
                base = f"{prefix}{tc}{i}."
                name = _first(a, base + "tool_call.function.name", base + "name")
                if name is None:
                    break
                calls.append({"id": _first(a, base + "tool_call.id", base + "id"), "name": name,
                              "arguments": _first(a, base + "tool_call.function.arguments",
                                                  base + "arguments")})
                i += 1
            return "".join(text), calls
    out = a.get("output.value")
    return (out if isinstance(out, str) else ""), calls


def _tokens(a: dict[str, Any]) -> tuple[Any, Any, Any, str | None]:
    """(prompt ids, response ids, log-probs, untrainable reason)."""
    prompt, response = a.get(A.PROMPT_IDS), a.get(A.RESPONSE_IDS)
    if prompt is None or response is None:
        missing = A.PROMPT_IDS if prompt is None else A.RESPONSE_IDS
        return (), (), None, f"no_token_ids: the span has no {missing} attribute"
    try:
        p, r = _ids(prompt, A.PROMPT_IDS), _ids(response, A.RESPONSE_IDS)
    except (TypeError, ValueError) as exc:
        return (), (), None, f"malformed_token_ids: {exc}"
    lps = a.get(A.LOGPROBS)
    if lps is None:
        return p, r, None, None
    try:
        lp = _floats(lps)
    except (TypeError, ValueError) as exc:
        return p, r, None, f"malformed_logprobs: {exc}"
    if len(lp) != len(r):
        return p, r, None, f"logprobs_misaligned: {len(lp)} log-probs for {len(r)} token ids"
    return p, r, lp, None


def _transition(rid: str, index: int, s: OtelSpan, source: str,
                twin: OtelSpan | None = None) -> Transition:
    a = s.attributes
    prompt, response, lp, reason = _tokens(a)
    if reason is None and a.get(A.TRAINABLE) is False:
        reason = str(a.get(A.UNTRAINABLE_REASON) or "marked lightning.trainable=false")
    text, calls = _output_text_and_calls(a)
    if twin is not None and not text and not calls:
        text, calls = _output_text_and_calls(twin.attributes)
    meta: dict[str, Any] = {
        "source": source,
        "otel": {"trace_id": s.trace_id, "span_id": s.span_id, "name": s.name, "scope": s.scope},
        "text": text,
    }
    if calls:
        meta["tool_calls"] = calls
    usage_in = _first(a, A.GEN_AI_USAGE_INPUT, "gen_ai.usage.prompt_tokens",
                      "llm.token_count.prompt")
    usage_out = _first(a, A.GEN_AI_USAGE_OUTPUT, "gen_ai.usage.completion_tokens",
                       "llm.token_count.completion")
    if usage_in is not None or usage_out is not None:
        meta["usage"] = {"input_tokens": usage_in, "output_tokens": usage_out}
    req_model = _first(a, A.GEN_AI_REQUEST_MODEL, "llm.model_name")
    messages = _maybe_json(a.get(A.GEN_AI_INPUT_MESSAGES))
    if req_model is not None or messages is not None:
        meta["request"] = {k: v for k, v in (("model", req_model), ("messages", messages))
                           if v is not None}
    if reason is not None:
        meta["untrainable_reason"] = reason
    finish = a.get(A.GEN_AI_RESPONSE_FINISH_REASONS)
    if isinstance(finish, list):
        finish = finish[0] if finish else ""
    finish = finish or a.get("gen_ai.completion.0.finish_reason") or ""
    model = _first(a, A.GEN_AI_RESPONSE_MODEL, A.GEN_AI_REQUEST_MODEL, "llm.model_name") or ""
    convention = a.get(A.LOGPROB_CONVENTION)
    sampling = sampling_from_request(
        {"temperature": _num(a.get(A.GEN_AI_REQUEST_TEMPERATURE)),
         "top_p": _num(a.get(A.GEN_AI_REQUEST_TOP_P)), "top_k": a.get(A.GEN_AI_REQUEST_TOP_K)},
        logprobs=convention if convention in ("processed", "raw") else "",
    )
    return Transition(
        rollout_id=rid,
        index=index,
        prompt_ids=pack_ids(prompt),
        response_ids=pack_ids(response),
        logprobs=b"" if lp is None else pack_logprobs(lp),
        policy_version=_int(a.get(A.POLICY_VERSION), -1),
        model=str(model),
        finish_reason=str(finish),
        trainable=reason is None,
        latency_s=max(0.0, s.end - s.start),
        created_at=s.end,
        metadata=meta,
        sampling=sampling,
    )


def _span_event(rid: str, s: OtelSpan, after: int) -> Span:
    a = s.attributes
    kind = "tool" if is_tool(s) else str(a.get(A.SPAN_KIND) or "custom")
    attrs = _maybe_json(a.get(A.SPAN_ATTRIBUTES))
    name = s.name
    if kind == "tool":
        name = str(_first(a, A.GEN_AI_TOOL_NAME, "tool.name", "traceloop.entity.name") or name)
    if not isinstance(attrs, dict):
        attrs = {}
        if kind == "tool":
            attrs["tool.name"] = name
            inp = _first(a, A.GEN_AI_TOOL_ARGUMENTS, "input.value", "traceloop.entity.input")
            out = _first(a, A.GEN_AI_TOOL_RESULT, "output.value", "traceloop.entity.output")
            if inp is not None:
                attrs["input"] = _maybe_json(inp)
            if out is not None:
                attrs["output"] = _maybe_json(out)
    error = s.status_code == 2
    return Span(
        rollout_id=rid,
        span_id=s.span_id,
        parent_span_id=s.parent_span_id or None,
        name=name,
        kind=kind,
        start_time=s.start,
        end_time=s.end,
        status="error" if error else "ok",
        error=(s.status_message or "error") if error else None,
        attributes=attrs,
        after=_int(a.get(A.SPAN_AFTER), after),
    )


def _after(ends: list[float], t: float) -> int:
    return sum(1 for e in ends if e <= t + 1e-6)


def _has_llm_below(s: OtelSpan, llm_ids: set[str], spans: dict[str, OtelSpan]) -> bool:
    return any(o.span_id != s.span_id and _descends(o, s.span_id, spans)
               for o in spans.values() if o.span_id in llm_ids)


def _llm_ancestor(s: OtelSpan, llm_ids: set[str], spans: dict[str, OtelSpan]) -> OtelSpan | None:
    """The nearest enclosing LLM span (an instrumentation's view of the same call)."""
    for _ in range(1000):
        parent = spans.get(s.parent_span_id)
        if parent is None:
            return None
        if parent.span_id in llm_ids:
            return parent
        s = parent
    return None


def _model_of(s: OtelSpan) -> Any:
    return _first(s.attributes, A.GEN_AI_RESPONSE_MODEL, A.GEN_AI_REQUEST_MODEL, "llm.model_name")


def _related(a: OtelSpan, b: OtelSpan, spans: dict[str, OtelSpan]) -> bool:
    return (a.parent_span_id == b.parent_span_id or _descends(a, b.span_id, spans)
            or _descends(b, a.span_id, spans))


def _drop_text_twins(
    llm: list[OtelSpan], spans: dict[str, OtelSpan]
) -> tuple[list[OtelSpan], dict[str, OtelSpan]]:
    """Drop text-only LLM spans that are another instrumentation's view of a call we have
    with token ids: a related span (sibling, ancestor or descendant) of the same model
    whose time overlaps it. Pairs are matched one to one, closest start times first (both
    views start when the request does). (When the capture's hook runs outside an
    instrumentation's wrapper, the capture's span is the instrumentation span's sibling,
    not its child.) Returns the spans kept and, per kept span, the twin dropped for it
    (its text fills in missing text)."""
    with_ids = [s for s in llm if A.RESPONSE_IDS in s.attributes]
    twins: dict[str, OtelSpan] = {}
    if not with_ids or len(with_ids) == len(llm):
        return llm, twins
    pairs = []
    for w in llm:
        if A.RESPONSE_IDS in w.attributes:
            continue
        for t in with_ids:
            mw, mt = _model_of(w), _model_of(t)
            if mw is not None and mt is not None and mw != mt:
                continue
            if min(w.end, t.end) > max(w.start, t.start) and _related(w, t, spans):
                pairs.append((abs(w.start - t.start), w.span_id, t.span_id, w))
    drop: set[str] = set()
    for _, wid, tid, w in sorted(pairs, key=lambda p: p[0]):
        if wid not in drop and tid not in twins:
            twins[tid] = w
            drop.add(wid)
    return [s for s in llm if s.span_id not in drop], twins


def to_events(group: Group, *, source: str = "otlp") -> Mapped | None:
    """The events of one rollout, in the order the daemon stores them.

    Returns None when the rollout was already delivered over ZeroMQ
    (``lightning.delivered``).
    """
    spans = sorted(group.spans, key=lambda s: (s.start, s.end))
    if any(s.attributes.get(A.DELIVERED) is True for s in spans):
        return None
    by_id = {s.span_id: s for s in spans}
    root = group.root
    if root is None:
        root = next((s for s in spans if s.parent_span_id not in by_id), spans[0])
    ra = root.attributes
    rid = str(ra.get(A.ROLLOUT_ID) or f"otel-{group.trace_id}")
    llm_ids = {s.span_id for s in spans if is_llm(s)}
    llm = [s for s in spans if s.span_id in llm_ids and not _has_llm_below(s, llm_ids, by_id)]
    llm, twins = _drop_text_twins(llm, by_id)
    llm.sort(key=lambda s: (_int(s.attributes.get(A.TRANSITION_INDEX), 1 << 62), s.start))
    transitions = [_transition(rid, i, s, source,
                               twins.get(s.span_id) or _llm_ancestor(s, llm_ids, by_id))
                   for i, s in enumerate(llm)]
    ends = sorted(s.end for s in llm)
    events: list[Event] = []
    rewards: list[Event] = []
    skipped = 0
    for s in spans:
        a = s.attributes
        if s.span_id in llm_ids or s is root:
            pass
        elif A.REWARD_VALUE in a:
            r = _reward(rid, a, s.end, ends)
            if r is None:
                skipped += 1
            else:
                rewards.append(r)
        elif is_tool(s) or A.SPAN_KIND in a:
            events.append(_span_event(rid, s, _after(ends, s.end)))
        for e in s.events:
            if A.REWARD_VALUE in e.attributes:
                r = _reward(rid, e.attributes, e.time, ends)
            elif (e.name == A.GEN_AI_EVALUATION_EVENT
                  and "gen_ai.evaluation.score.value" in e.attributes):
                ea = e.attributes
                v = _num(ea.get("gen_ai.evaluation.score.value"))
                r = None if v is None else Reward(
                    rollout_id=rid, value=v,
                    name=str(ea.get("gen_ai.evaluation.name") or "evaluation"),
                    after=_after(ends, e.time), created_at=e.time)
            else:
                continue
            if r is None:
                skipped += 1
            else:
                rewards.append(r)
    status = ra.get(A.ROLLOUT_STATUS)
    if status not in ("completed", "failed", "cancelled"):
        status = "failed" if root.status_code == 2 else "completed"
    error = (root.status_message or "error") if status != "completed" else None
    final = _num(ra.get(A.REWARD_FINAL))
    if final is None and ra.get(A.REWARD_FINAL) is not None:
        skipped += 1
    # the same keys the exporter writes, so export_step_rewards links AIR spans here too
    metadata: dict[str, Any] = {
        "source": source,
        "otel.trace_id": group.trace_id,
        "otel.span_id": root.span_id,
    }
    service = root.resource.get("service.name")
    if service:
        metadata["otel.service.name"] = service
    start = RolloutStart(
        rollout_id=rid,
        name=str(_first(ra, A.ROLLOUT_NAME, A.GEN_AI_AGENT_NAME) or root.name or "otel"),
        group_key=_str(ra.get(A.ROLLOUT_GROUP)),
        attempt=_int(ra.get(A.ROLLOUT_ATTEMPT), 0),
        parent_id=_str(ra.get(A.ROLLOUT_PARENT)),
        metadata=metadata,
        started_at=min(s.start for s in spans),
    )
    end = RolloutEnd(
        rollout_id=rid,
        status=status,
        final_reward=final,
        error=error,
        n_transitions=len(transitions),
        ended_at=max(s.end for s in spans),
    )
    untrainable = sum(1 for t in transitions if not t.trainable)
    return Mapped(rid, [start, *transitions, *events, *rewards, end], untrainable, skipped)


def _reward(rid: str, a: dict[str, Any], t: float, ends: list[float]) -> Reward | None:
    value = _num(a.get(A.REWARD_VALUE))
    if value is None:
        return None
    components = {}
    for k, v in a.items():
        if k.startswith(A.REWARD_COMPONENT):
            c = _num(v)
            if c is None:
                return None
            components[k[len(A.REWARD_COMPONENT):]] = c
    return Reward(rollout_id=rid, value=value, name=str(a.get(A.REWARD_NAME) or "reward"),
                  components=components, after=_int(a.get(A.REWARD_AFTER), _after(ends, t)),
                  created_at=t)
