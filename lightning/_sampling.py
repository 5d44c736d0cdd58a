"""A transition's sampling parameters (:class:`~lightning._protocol.Sampling`): built from
an OpenAI-style request body or from explicit arguments, and checked.

Where they come from
    - the policy server knows what it sampled with: it records them server-side and
      reports them on every response (``"sampling"``, next to ``policy_version``); the
      capture prefers that report over the request, since a parameter the request left
      out is whatever the server's default is;
    - the app-side capture of another server reads the request the app sent: what it set
      is known, what it left out is ``None`` (unknown, the server's default);
    - OTLP spans carry ``gen_ai.request.temperature`` / ``top_p`` / ``top_k``;
    - :func:`lightning.record_transition` takes them as keyword arguments.

A parameter that is set to its neutral value (``frequency_penalty=0``, ``logit_bias={}``)
does not change the distribution and is not recorded under ``other``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from ._protocol import Sampling, check_sampling

__all__ = ["OTHER_PARAMS", "check_sampling", "make_sampling", "sampling_from_request"]

OTHER_PARAMS: tuple[str, ...] = (
    "min_p",
    "typical_p",
    "top_a",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "bad_words",
    "allowed_token_ids",
)
"""Request parameters that change the sampling distribution in a way the trainer does not
reproduce (recorded in ``Sampling.other`` when set to a non-neutral value)."""

_NEUTRAL: dict[str, Any] = {"min_p": 0, "typical_p": 1, "top_a": 0, "frequency_penalty": 0,
                            "presence_penalty": 0, "repetition_penalty": 1}


def make_sampling(
    *,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    logprobs: str,
    other: Mapping[str, Any] | None = None,
) -> Sampling | None:
    """A checked :class:`Sampling`; None when nothing at all is known.

    Raises:
        ValueError: a parameter out of range or ``logprobs`` not one of
            ``"processed"``, ``"raw"``, ``""`` (named in the message).
    """
    if logprobs not in ("processed", "raw", ""):
        raise ValueError(
            f"logprob_convention must be 'processed', 'raw' or None (unknown), got {logprobs!r}"
        )
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise ValueError(f"{name} must be a number or None (unknown), got {v!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)):
        raise ValueError(f"top_k must be an integer or None (unknown), got {top_k!r}")
    s = Sampling(temperature=None if temperature is None else float(temperature),
                 top_p=None if top_p is None else float(top_p),
                 top_k=None if top_k is None else int(top_k),
                 logprobs=logprobs, other=dict(other or {}))
    problem = check_sampling(s)
    if problem is not None:
        raise ValueError(problem)
    if s == Sampling():
        return None
    return s


def _other(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in OTHER_PARAMS:
        v = body.get(key)
        if v is None or v == _NEUTRAL.get(key) or (isinstance(v, (dict, list)) and not v):
            continue
        out[key] = v
    return out


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def sampling_from_request(
    body: Mapping[str, Any], *, reported: Any = None, logprobs: str = ""
) -> Sampling | None:
    """The sampling of a request ``body`` (OpenAI chat/completions/responses fields, plus
    ``top_k`` and the :data:`OTHER_PARAMS` that vLLM-style servers take).

    ``reported`` is the server's ``"sampling"`` report, when the response has one: its
    values (and its log-prob convention) win over the request's. Values that are not
    numbers of the right range become None (unknown) rather than failing the capture.
    """
    t, p, k = _number(body.get("temperature")), _number(body.get("top_p")), body.get("top_k")
    k = k if type(k) is int else None
    if isinstance(reported, Mapping):
        rt, rp, rk = (_number(reported.get(f)) for f in ("temperature", "top_p", "top_k"))
        t = rt if rt is not None else t
        p = rp if rp is not None else p
        k = int(rk) if rk is not None and float(rk).is_integer() else k
        lp = reported.get("logprobs")
        logprobs = lp if lp in ("processed", "raw") else logprobs
    fields = {"temperature": t, "top_p": p, "top_k": k}
    for name in fields:  # an odd value (the server rejects it anyway) is unknown
        if check_sampling(Sampling(**{name: fields[name]})) is not None:
            fields[name] = None
    s = Sampling(**fields, logprobs=logprobs, other=_other(body))
    return None if s == Sampling() else s
