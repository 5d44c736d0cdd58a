"""Multi-turn merging: a trajectory's transitions -> token sequences for training.

An agent that talks to the model several times usually re-sends the conversation: call
k's prompt is call k-1's prompt, its response, and then new tokens (a tool result, the
next user turn). When call k's prompt token ids *start with* call k-1's prompt + response
token ids exactly, the calls merge into one sequence; the tokens in between (tool output,
user turns, template glue) are masked out of the loss, and only sampled tokens are
actions. When the prefix does not match (the chat template rewrote history, the agent
truncated or summarised it), a new sequence starts, and the reason is counted and logged.
Training data is never built by re-tokenizing text: every token id here is one the engine
saw or sampled.

Sampler log-probs that cannot serve as the PPO ``old`` log-probs are NaN, never 0:
missing ones (``logprobs`` empty: counted ``logprobs.missing``), and ones whose convention
is not the processed distribution while the sampling was not the identity (``raw`` or
unknown convention with a temperature other than 1 or a truncation: counted
``logprobs.untrusted``). The trainer recomputes NaN log-probs, or the batcher drops their
sequences (``BatcherConfig.missing_logprobs``).
"""

from __future__ import annotations

from array import array
from collections import Counter

import msgspec
import structlog

from ._protocol import Sampling, Transition, unpack_ids, unpack_logprobs

logger = structlog.get_logger()

__all__ = ["TokenSequence", "merge_transitions"]


class TokenSequence(msgspec.Struct, kw_only=True):
    """One training sequence built from one or more consecutive transitions."""

    token_ids: array
    """``array('i')``: the full context, prompt first."""
    action_mask: bytearray
    """1 for tokens the policy sampled (they get a loss), 0 for prompt/tool/user tokens."""
    logprobs: array
    """``array('f')``: sampler log-prob per token: 0.0 where not an action, NaN on an
    action whose sampler log-prob is missing or untrusted (see the module docstring)."""
    policy_versions: array
    """``array('i')``: version that sampled each action token (-1 elsewhere)."""
    transitions: list[int]
    """Indices (within the trajectory) of the transitions merged into this sequence."""
    prompt_len: int
    """Length of the first prompt: the first action token is at or after it."""
    response_spans: list[tuple[int, int]] = []
    """``(start, end)`` token offsets of each merged transition's response, in the order of
    :attr:`transitions` (per-transition advantages are spread over these)."""
    sampling: list[Sampling | None] = []
    """Each merged transition's sampling parameters (None: unknown), in the order of
    :attr:`transitions`: the trainer scores each response under its own processing."""


def logprobs_usable(s: Sampling | None) -> bool:
    """Whether sampler log-probs recorded under ``s`` are the processed distribution's.

    Yes for ``logprobs="processed"`` and for unknown sampling (``None``: nothing says
    otherwise; the trainer counts such data). Otherwise (``raw`` or unknown convention)
    only when the processing is the identity: temperature 1 (or greedy, scored at 1) and
    no top-k/top-p, an unset parameter counting as off.
    """
    if s is None or s.logprobs == "processed":
        return True
    return (s.temperature in (None, 0.0, 1.0) and s.top_p in (None, 1.0)
            and s.top_k in (None, 0, -1))


_NAN = array("f", [float("nan")])


def _split_reason(prompt: bytes, context: bytes) -> str:
    if len(prompt) < len(context):
        return "prompt_shorter_than_context" if context.startswith(prompt) else "prefix_mismatch"
    return "prefix_mismatch"


def merge_transitions(
    transitions: list[Transition], counters: Counter[str] | None = None, *, rollout_id: str = ""
) -> list[TokenSequence]:
    """Merge consecutive transitions whose prompts extend the previous context exactly.

    Transitions that are not trainable (no token ids) end the current sequence and are
    skipped. ``counters`` (if given) gets ``sequences``, ``merged_turns`` and
    ``split.<reason>`` increments.
    """
    counters = counters if counters is not None else Counter()
    out: list[TokenSequence] = []
    cur: TokenSequence | None = None
    context = b""  # packed ids of the current sequence (prompt + responses + glue)
    for k, t in enumerate(transitions):
        if not t.trainable or not t.response_ids:
            counters["skipped.untrainable"] += 1
            cur, context = None, b""
            continue
        prompt, response = bytes(t.prompt_ids), bytes(t.response_ids)
        n_resp = len(response) // 4
        if not t.logprobs:
            counters["logprobs.missing"] += 1
            lps = _NAN * n_resp
        elif not logprobs_usable(t.sampling):
            counters["logprobs.untrusted"] += 1
            lps = _NAN * n_resp
        else:
            lps = unpack_logprobs(t.logprobs)
        if cur is not None and prompt.startswith(context):
            glue = unpack_ids(prompt[len(context):])
            counters["merged_turns"] += 1
        else:
            if cur is not None:
                reason = _split_reason(prompt, context)
                counters["split." + reason] += 1
                logger.info("sequences.split", rollout_id=rollout_id, transition=k, reason=reason)
            cur = TokenSequence(
                token_ids=array("i"), action_mask=bytearray(), logprobs=array("f"),
                policy_versions=array("i"), transitions=[], prompt_len=len(prompt) // 4,
                response_spans=[], sampling=[],
            )
            out.append(cur)
            counters["sequences"] += 1
            glue = unpack_ids(prompt)
            context = b""
        n_glue = len(glue)
        cur.token_ids.extend(glue)
        cur.action_mask.extend(bytes(n_glue))
        cur.logprobs.extend(array("f", bytes(4 * n_glue)))
        cur.policy_versions.extend(array("i", [-1]) * n_glue)
        start = len(cur.token_ids)
        cur.token_ids.extend(unpack_ids(response))
        cur.response_spans.append((start, start + n_resp))
        cur.action_mask.extend(b"\x01" * n_resp)
        cur.logprobs.extend(lps)
        cur.policy_versions.extend(array("i", [t.policy_version]) * n_resp)
        cur.transitions.append(k)
        cur.sampling.append(t.sampling)
        context = prompt + response
    return out
