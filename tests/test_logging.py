"""The repeat filter: a storm of one warning becomes a line per interval, and every
occurrence is still counted (lines without ``summary`` + the sum of ``repeated``)."""

import io
import json

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning._logging import RepeatFilter, configure_logging, level_number, repeat_filter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _run(f: RepeatFilter, method: str, **event) -> dict | None:
    try:
        return f(None, method, dict(event))
    except structlog.DropEvent:
        return None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["e1", "e2"]),
                          st.sampled_from(["warning", "error", "info"]),
                          st.floats(0, 5)), max_size=80),
       st.floats(0.5, 10))
def test_every_occurrence_is_counted_once(events, interval):
    clock = Clock()
    f = RepeatFilter(interval, clock=clock)
    written: list[dict] = []
    for name, err, method, dt in events:
        clock.t += dt
        out = _run(f, method, event=name, error=err, rollout=clock.t)
        if out is not None:
            written.append(out)
    captured = []
    structlog.configure(processors=[lambda _l, _m, e: captured.append(e) or e,
                                    structlog.processors.KeyValueRenderer()],
                        logger_factory=structlog.ReturnLoggerFactory())
    try:
        f.flush()
    finally:
        structlog.reset_defaults()
    for key in {(n, e) for n, e, _m, _d in events}:
        total = sum(1 for n, e, _m, _d in events if (n, e) == key)
        lines = [w for w in written + captured if (w["event"], w["error"]) == key]
        assert sum(1 for w in lines if not w.get("summary")) + \
            sum(w.get("repeated", 0) for w in lines) == total
    assert f.held() == 0


def test_one_line_per_interval_with_the_count():
    clock = Clock()
    f = RepeatFilter(10.0, clock=clock)
    assert _run(f, "warning", event="x", error="boom") is not None
    for _ in range(1000):
        clock.t += 0.001
        assert _run(f, "warning", event="x", error="boom", id=clock.t) is None
    assert _run(f, "warning", event="x", error="other") is not None  # another error: its own line
    assert _run(f, "info", event="x", error="boom") is not None  # info always passes
    clock.t = 10.5
    line = _run(f, "warning", event="x", error="boom")
    assert line["repeated"] == 1000 and line["repeated_over_s"] == 10.5
    assert f.held() == 0


def test_a_code_groups_lines_whose_reasons_name_ids():
    f = RepeatFilter(10.0, clock=Clock())
    assert _run(f, "warning", event="daemon.event_rejected", code="unknown_rollout",
                reason="unknown rollout 'a'") is not None
    assert _run(f, "warning", event="daemon.event_rejected", code="unknown_rollout",
                reason="unknown rollout 'b'") is None
    assert _run(f, "warning", event="daemon.event_rejected", code="invalid",
                reason="unknown rollout 'b'") is not None


def test_bounded_keys():
    clock = Clock()
    f = RepeatFilter(10.0, clock=clock, max_keys=16)
    for i in range(1000):
        _run(f, "warning", event="x", error=str(i))
    assert len(f._seen) <= 16


def test_configure_logging_aggregates_and_flushes():
    stream = io.BytesIO()
    configure_logging("warning", stream=stream)
    log = structlog.get_logger()
    for i in range(50):
        log.warning("storm", error="same", n=i)
    log.info("hidden")  # below the level
    repeat_filter().flush()
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["event"], x.get("repeated"), x.get("summary")) for x in lines] == [
        ("storm", None, None), ("storm", 49, True)]
    structlog.reset_defaults()


def test_levels():
    assert level_number("WARNING") == 30
    with pytest.raises(ValueError, match="use one of debug, info"):
        level_number("loud")
