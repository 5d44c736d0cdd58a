"""pack_sequences / split_by_token_budget: layout, conventions, errors."""

from __future__ import annotations

from array import array

import pytest
import torch

from lightning._sequences import TokenSequence
from lightning.training import TrainBatch, pack_sequences, split_by_token_budget


def make_seq(
    prompt: list[int], response: list[int], lps: list[float], version: int = 0
) -> TokenSequence:
    n_p, n_r = len(prompt), len(response)
    return TokenSequence(
        token_ids=array("i", prompt + response),
        action_mask=bytearray(b"\x00" * n_p + b"\x01" * n_r),
        logprobs=array("f", [0.0] * n_p + lps),
        policy_versions=array("i", [-1] * n_p + [version] * n_r),
        transitions=[0],
        prompt_len=n_p,
    )


def test_pack_layout() -> None:
    seqs = [make_seq([1, 2], [3, 4], [-0.5, -0.25], 3), make_seq([5], [6], [-1.0], 7)]
    b = pack_sequences(seqs, [2.0, -1.0])
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.input_ids.dtype == torch.int64
    assert b.cu_seqlens.tolist() == [0, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1]
    assert b.action_mask.tolist() == [False, False, True, True, False, True]
    assert b.old_logprobs.tolist() == [0.0, 0.0, -0.5, -0.25, 0.0, -1.0]
    assert b.advantages.tolist() == [0.0, 0.0, 2.0, 2.0, 0.0, -1.0]
    assert b.policy_versions.tolist() == [3, 7]
    assert b.is_weights is None and b.ref_logprobs is None
    assert (b.num_tokens, b.num_sequences, b.num_action_tokens) == (6, 2, 3)


def test_pack_per_token_values() -> None:
    seqs = [make_seq([1, 2], [3, 4], [-0.5, -0.25])]
    b = pack_sequences(seqs, [[9.0, 9.0, 1.0, 2.0]], ref_logprobs=[[0.0, 0.0, -1.0, -2.0]])
    assert b.advantages.tolist() == [0.0, 0.0, 1.0, 2.0]  # kept on actions only
    assert b.ref_logprobs is not None and b.ref_logprobs.tolist() == [0.0, 0.0, -1.0, -2.0]
    with pytest.raises(ValueError, match="4 per-token values"):
        pack_sequences(seqs, [[1.0, 2.0]])


def test_pack_rejects_action_first_token_and_empty() -> None:
    bad = make_seq([], [3, 4], [-0.5, -0.25])
    with pytest.raises(ValueError, match="first token"):
        pack_sequences([bad], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        pack_sequences([], [])


def test_split_by_token_budget() -> None:
    seqs = [
        make_seq([1] * p, [2] * r, [-1.0] * r, v)
        for v, (p, r) in enumerate([(2, 2), (1, 1), (3, 4), (1, 2)])
    ]
    b = pack_sequences(seqs, [1.0, 2.0, 3.0, 4.0])  # lengths 4, 2, 7, 3
    parts = split_by_token_budget(b, 6)
    assert [p.num_tokens for p in parts] == [6, 7, 3]  # the 7-token sequence goes alone
    assert [p.cu_seqlens.tolist() for p in parts] == [[0, 4, 6], [0, 7], [0, 3]]
    assert [p.policy_versions.tolist() for p in parts] == [[0, 1], [2], [3]]
    assert torch.equal(torch.cat([p.advantages for p in parts]), b.advantages)
    assert torch.equal(torch.cat([p.input_ids for p in parts]), b.input_ids)
    assert len(split_by_token_budget(b, 10_000)) == 1
    assert isinstance(parts[0], TrainBatch)
    with pytest.raises(ValueError, match="max_tokens"):
        split_by_token_budget(b, 0)
