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
"""

from __future__ import annotations

from array import array
from collections import Counter

import msgspec
import structlog

from ._protocol import Transition, unpack_ids, unpack_logprobs

logger = structlog.get_logger()

__all__ = ["TokenSequence", "merge_transitions"]


class TokenSequence(msgspec.Struct, kw_only=True):
    """One training sequence built from one or more consecutive transitions."""

    token_ids: array
    """``array('i')``: the full context, prompt first."""
    action_mask: bytearray
    """1 for tokens the policy sampled (they get a loss), 0 for prompt/tool/user tokens."""
    logprobs: array
    """``array('f')``: sampler log-prob per token (0.0 where not an action or unknown)."""
    policy_versions: array
    """``array('i')``: version that sampled each action token (-1 elsewhere)."""
    transitions: list[int]
    """Indices (within the trajectory) of the transitions merged into this sequence."""
    prompt_len: int
    """Length of the first prompt: the first action token is at or after it."""
    response_spans: list[tuple[int, int]] = []
    """``(start, end)`` token offsets of each merged transition's response, in the order of
    :attr:`transitions` (per-transition advantages are spread over these)."""


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
        lps = unpack_logprobs(t.logprobs) if t.logprobs else array("f", bytes(4 * n_resp))
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
        context = prompt + response
    return out
