"""Sampling parameters of a transition: record_transition's arguments, request bodies."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lightning
from lightning import _lifecycle
from lightning._protocol import Sampling, Transition, check_sampling, decode_event, encode_event
from lightning._sampling import OTHER_PARAMS, make_sampling, sampling_from_request

from test_rollout import Recorder


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(_lifecycle, "_current", r)
    return r


def _one_transition(rec, **kw):
    @lightning.rollout
    def agent():
        lightning.record_transition([1, 2], [3, 4], [-0.5, -0.25], **kw)

    agent()
    (t,) = [e for e in rec.events if isinstance(e, Transition)]
    return t


def test_record_transition_carries_sampling(rec):
    t = _one_transition(rec, temperature=0.7, top_p=0.9, top_k=20, logprob_convention="processed")
    assert t.sampling == Sampling(temperature=0.7, top_p=0.9, top_k=20, logprobs="processed")
    assert decode_event(encode_event(t)) == t


def test_record_transition_without_sampling_is_unknown(rec):
    assert _one_transition(rec).sampling is None


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"logprob_convention": "unnormalised"}, "logprob_convention"),
])
def test_record_transition_rejects_bad_sampling(rec, kw, field):
    with pytest.raises(ValueError, match=field):
        _one_transition(rec, **kw)
    assert not [e for e in rec.events if isinstance(e, Transition)]


_maybe_num = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-5, 5), st.text(max_size=3), st.booleans())
_maybe_k = st.one_of(st.none(), st.integers(-5, 500), st.floats(), st.text(max_size=2))


@given(t=_maybe_num, p=_maybe_num, k=_maybe_k,
       extra=st.dictionaries(st.sampled_from(OTHER_PARAMS + ("seed", "n")),
                             st.one_of(st.none(), st.floats(-2, 2), st.just({}), st.just({"1": 5}))),
       reported=st.one_of(st.none(), st.fixed_dictionaries(
           {"temperature": _maybe_num, "top_p": _maybe_num, "top_k": _maybe_k,
            "logprobs": st.sampled_from(["processed", "raw", "", "odd", None])})))
def test_sampling_from_request_is_always_valid_and_prefers_the_report(t, p, k, extra, reported):
    body = {"temperature": t, "top_p": p, "top_k": k, **extra}
    s = sampling_from_request(body, reported=reported)
    if s is None:
        return
    assert check_sampling(s) is None  # never a value the validator would refuse
    assert s.logprobs in ("processed", "raw", "")
    assert set(s.other) <= set(OTHER_PARAMS)
    assert all(v not in (None, {}) for v in s.other.values())
    assert decode_event(encode_event(Transition(rollout_id="r", index=0, prompt_ids=b"",
                                                response_ids=b"", sampling=s))).sampling == s


def test_sampling_from_request_values():
    body = {"temperature": 0.7, "top_p": 0.9, "frequency_penalty": 0, "logit_bias": {},
            "min_p": 0.1}
    assert sampling_from_request(body) == Sampling(temperature=0.7, top_p=0.9,
                                                   other={"min_p": 0.1})
    # what the request left out is unknown, unless the server reported it
    assert sampling_from_request({"top_p": 0.9}).temperature is None
    rep = {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "logprobs": "processed"}
    assert sampling_from_request({"top_p": 0.9}, reported=rep) == Sampling(
        temperature=1.0, top_p=0.9, top_k=0, logprobs="processed")
    assert sampling_from_request({}) is None
    assert make_sampling(temperature=None, top_p=None, top_k=None, logprobs="") is None
