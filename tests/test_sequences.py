import math
from collections import Counter

import msgspec
import pytest

from lightning._protocol import Sampling, Transition, pack_ids, pack_logprobs
from lightning._sequences import logprobs_usable, merge_transitions


def T(i, prompt, response, lps=None, version=0, trainable=True):
    return Transition(rollout_id="r", index=i, prompt_ids=pack_ids(prompt),
                      response_ids=pack_ids(response),
                      logprobs=pack_logprobs(lps if lps is not None else [-0.5] * len(response)),
                      policy_version=version, trainable=trainable)


def test_extending_prompts_merge_with_glue_masked():
    ts = [
        T(0, [1, 2, 3], [10, 11], version=4),
        T(1, [1, 2, 3, 10, 11, 50, 51], [12], [-0.25], version=5),  # 50, 51: tool output
        T(2, [1, 2, 3, 10, 11, 50, 51, 12, 60], [13, 14], version=5),
    ]
    c = Counter()
    (seq,) = merge_transitions(ts, c)
    assert list(seq.token_ids) == [1, 2, 3, 10, 11, 50, 51, 12, 60, 13, 14]
    assert list(seq.action_mask) == [0, 0, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    assert list(seq.logprobs) == [0, 0, 0, -0.5, -0.5, 0, 0, -0.25, 0, -0.5, -0.5]
    assert list(seq.policy_versions) == [-1, -1, -1, 4, 4, -1, -1, 5, -1, 5, 5]
    assert seq.transitions == [0, 1, 2] and seq.prompt_len == 3
    assert c == Counter(sequences=1, merged_turns=2)


def test_rewritten_history_splits_and_says_why():
    ts = [
        T(0, [1, 2, 3], [10, 11]),
        T(1, [1, 2, 3, 10, 99, 50], [12]),     # template rewrote the assistant turn
        T(2, [1, 2], [7]),                      # truncated history
        T(3, [5], [8], trainable=False),        # external API: no ids
        T(4, [5, 8], [9]),
    ]
    c = Counter()
    seqs = merge_transitions(ts, c)
    assert [s.transitions for s in seqs] == [[0], [1], [2], [4]]
    assert c["split.prefix_mismatch"] == 1 and c["split.prompt_shorter_than_context"] == 1
    assert c["skipped.untrainable"] == 1
    assert c["sequences"] == 4 and c["merged_turns"] == 0
    assert list(seqs[1].token_ids) == [1, 2, 3, 10, 99, 50, 12]


def test_missing_logprobs_are_nan_never_zero_and_exact_prefix_without_glue():
    t0 = Transition(rollout_id="r", index=0, prompt_ids=pack_ids([1]), response_ids=pack_ids([2, 3]))
    t1 = T(1, [1, 2, 3], [4])
    c = Counter()
    (seq,) = merge_transitions([t0, t1], c)
    assert seq.logprobs[0] == 0 and math.isnan(seq.logprobs[1]) and math.isnan(seq.logprobs[2])
    assert seq.logprobs[3] == -0.5
    assert list(seq.action_mask) == [0, 1, 1, 1]
    assert c["logprobs.missing"] == 1 and c["logprobs.untrusted"] == 0


@pytest.mark.parametrize("sampling, usable", [
    (None, True),
    (Sampling(temperature=0.7, top_p=0.9, logprobs="processed"), True),
    (Sampling(temperature=0.7, logprobs="raw"), False),
    (Sampling(temperature=0.7), False),  # unknown convention, not the identity
    (Sampling(temperature=1.0, top_k=20), False),
    (Sampling(temperature=1.0, top_p=1.0, top_k=0, logprobs="raw"), True),  # raw == processed
    (Sampling(temperature=0.0), True),  # greedy: both conventions score at temperature 1
])
def test_untrusted_logprobs_are_nan_and_counted(sampling, usable):
    t = msgspec.structs.replace(T(0, [1], [2, 3]), sampling=sampling)
    c = Counter()
    (seq,) = merge_transitions([t], c)
    assert logprobs_usable(sampling) is usable
    assert seq.sampling == [sampling]
    assert math.isnan(seq.logprobs[1]) is (not usable)
    assert c["logprobs.untrusted"] == (0 if usable else 1)
