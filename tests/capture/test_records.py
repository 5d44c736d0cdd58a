"""Reading token ids and log-probs into records: packed once, checked while packing."""

from __future__ import annotations

import math
from array import array

import httpx
import pytest

from lightning._capture import _records
from lightning._capture import openai as cap
from lightning._capture._records import Record, _floats, _ids, _packed_ids, _packed_logprobs
from lightning._protocol import pack_ids, pack_logprobs, unpack_logprobs


def record(prompt, response, logprobs):
    return Record(prompt_ids=prompt, response_ids=response, logprobs=logprobs,
                  finish_reason="stop", text="", tool_calls=[], choice_index=0)


@pytest.mark.parametrize("ids", [[], [0], [1, 2, 3], (7, 8), [2**31 - 1, 0, 128, 255, 256],
                                 [True, False], list(range(5000))])
def test_packed_ids_are_the_wire_format(ids):
    assert _packed_ids(ids, "token_ids") == pack_ids(list(ids))
    assert list(_ids(ids, "token_ids")) == [int(i) for i in ids]


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ([1, -3, 2], ValueError, "token_ids holds a negative id -3"),
        ([5, -(2**31)], ValueError, f"negative id {-(2**31)}"),
        ([1, 2**31], ValueError, "not a token id"),
        ([2**40], ValueError, "not a token id"),
        ([1.0], ValueError, "not a token id"),
        (["1"], ValueError, "not a token id"),
        ([None], ValueError, "not a token id"),
        (5, TypeError, "token_ids is int, not a list of integers"),
        ("12", TypeError, "token_ids is str"),
    ],
)
def test_packed_ids_reject_what_is_not_a_token_id(ids, error, message):
    with pytest.raises(error, match=message):
        _packed_ids(ids, "token_ids")


def test_packed_ids_check_the_sign_of_every_id():
    # every position of a long list, and ids whose low bytes have the high bit set
    for pos in (0, 1, 2, 3, 4, 999):
        ids = [0x80, 0x8000, 0x800000, 0x7FFFFFFF, 5] * 200
        ids[pos] = -1
        with pytest.raises(ValueError, match="negative id -1"):
            _packed_ids(ids, "token_ids")


@pytest.mark.parametrize("lps", [[], [-0.125], [-0.5, -1, True, 0.0], (-1.5, -2.25),
                                 [float("-inf"), -1.0], [-1e-45]])
def test_packed_logprobs_are_the_wire_format(lps):
    assert _packed_logprobs(lps) == pack_logprobs(list(lps))
    assert list(_floats(lps)) == list(unpack_logprobs(pack_logprobs(list(lps))))


def test_logprobs_beyond_float32_become_infinity_as_before():
    assert list(_floats([-1e300, -0.5])) == [-math.inf, -0.5]


@pytest.mark.parametrize(
    ("lps", "error", "message"),
    [
        ([-0.5, float("nan")], ValueError, "a log-prob is NaN"),
        ([float("inf"), float("-inf")], ValueError, "a log-prob is NaN"),
        ([-0.5, "x"], ValueError, "a log-prob is not a number"),
        ([None], ValueError, "a log-prob is not a number"),
        (-0.5, TypeError, "log-probs are float, not a list"),
    ],
)
def test_packed_logprobs_reject_what_is_not_a_log_prob(lps, error, message):
    with pytest.raises(error, match=message):
        _packed_logprobs(lps)


def test_record_keeps_packed_ids_and_logprobs():
    r = record([1, 2], [3, 4, 5], [-0.5, -0.25, -0.125])
    assert r.trainable
    assert (r.prompt_ids, r.response_ids) == (pack_ids([1, 2]), pack_ids([3, 4, 5]))
    assert r.logprobs == pack_logprobs([-0.5, -0.25, -0.125])
    r = record([1, 2], [3, 4, 5], None)
    assert r.trainable and r.logprobs is None


@pytest.mark.parametrize(
    ("prompt", "response", "logprobs", "reason"),
    [
        (None, [3], None, "no_token_ids: the response has no prompt_token_ids"),
        ([1], None, None, "no_token_ids: the response has no token_ids"),
        ([1], [-3], None, "malformed_token_ids: token_ids holds a negative id -3"),
        ([1], [3, 4, 5], [-1.0, -2.0], "logprobs_misaligned: 2 log-probs for 3 token ids"),
        ([1], [3], [float("nan")], "malformed_logprobs: a log-prob is NaN"),
    ],
)
def test_record_reasons(prompt, response, logprobs, reason):
    r = record(prompt, response, logprobs)
    assert not r.trainable and r.reason == reason
    if reason.startswith(("no_", "malformed_token")):
        assert r.prompt_ids == r.response_ids == b""
    assert r.logprobs is None


def test_chat_records_from_a_plain_dict():
    resp = {"prompt_token_ids": [1, 2], "policy_version": 3, "choices": [
        {"index": 0, "token_ids": [7, 8], "finish_reason": "stop",
         "message": {"content": "hi"}, "logprobs": {"content": [{"logprob": -0.5},
                                                                {"logprob": -0.25}]}}]}
    (r,) = _records.chat_records(resp)
    assert r.trainable and r.text == "hi" and r.finish_reason == "stop"
    assert r.response_ids == pack_ids([7, 8]) and r.logprobs == pack_logprobs([-0.5, -0.25])


def test_target_strips_credentials_and_follows_the_token_id_urls(monkeypatch):
    monkeypatch.setattr(cap, "_targets", {})
    monkeypatch.setattr(cap, "_prefixes", ("http://policy:8000/v1/",))
    url = httpx.URL("http://user:secret@policy:8000/v1/")
    other = httpx.URL("http://api.example.com/v1/")
    assert cap._target(url) == ("http://policy:8000/v1/", True)
    assert cap._target(url) == ("http://policy:8000/v1/", True)  # cached
    assert cap._target(other) == ("http://api.example.com/v1/", False)
    # install() with other token-id URLs replaces _prefixes: cached answers follow
    monkeypatch.setattr(cap, "_prefixes", ("http://api.example.com/",))
    assert cap._target(url) == ("http://policy:8000/v1/", False)
    assert cap._target(other) == ("http://api.example.com/v1/", True)
    monkeypatch.setattr(cap, "_prefixes", ())
    assert cap._target(other) == ("http://api.example.com/v1/", False)


def test_target_cache_stays_small(monkeypatch):
    monkeypatch.setattr(cap, "_targets", {})
    urls = [httpx.URL(f"http://h{i}/v1/") for i in range(200)]
    for u in urls:
        assert cap._target(u) == (str(u), False)
    assert len(cap._targets) <= 64


def test_otel_mapping_still_gets_arrays():
    assert _ids([1, 2], "x") == array("i", [1, 2])
    assert _floats([-0.5]) == array("f", [-0.5])
