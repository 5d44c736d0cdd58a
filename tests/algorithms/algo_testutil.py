"""Builders shared by the algorithm tests: trajectories and packed batches."""

from __future__ import annotations

from typing import Any

import torch

from lightning._ingest import Trajectory
from lightning._protocol import Reward, Span, Transition, pack_ids


def transition(
    index: int,
    *,
    text: str = "",
    tool_calls: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Transition:
    meta: dict[str, Any] = {"text": text, "request": {"model": "m", "tools": tools or []}}
    if tool_calls:
        meta["tool_calls"] = tool_calls
    return Transition(
        rollout_id="r",
        index=index,
        prompt_ids=pack_ids([1, 2]),
        response_ids=pack_ids([3]),
        metadata=meta,
    )


def span(
    after: int,
    name: str = "search",
    *,
    kind: str = "tool",
    status: str = "ok",
    output: Any = "fine",
    **attrs: Any,
) -> Span:
    return Span(
        rollout_id="r",
        span_id=f"s{after}{name}",
        name=name,
        kind=kind,
        status=status,  # type: ignore[arg-type]
        error=None if status == "ok" else "ValueError: boom",
        attributes={"output": output, **attrs},
        after=after,
    )


def reward(after: int, value: float) -> Reward:
    return Reward(rollout_id="r", value=value, after=after)


def trajectory(
    n: int = 3,
    *,
    transitions: list[Transition] | None = None,
    rewards: list[Reward] = (),  # type: ignore[assignment]
    spans: list[Span] = (),
    final_reward: float | None = 1.0,  # type: ignore[assignment]
    status: str = "completed",
) -> Trajectory:
    return Trajectory(
        index=0,
        rollout_id="r",
        name="agent",
        client_id="c",
        group_key=None,
        attempt=0,
        parent_id=None,
        metadata={},
        status=status,
        final_reward=final_reward,
        error=None if status == "completed" else "boom",
        started_at=0.0,
        ended_at=1.0,
        transitions=transitions if transitions is not None else [transition(i) for i in range(n)],
        rewards=list(rewards),
        spans=list(spans),
    )


def packed_batch(lengths: list[int], seed: int = 0, p_action: float = 0.7):
    """Random packed batch: cu_seqlens, action mask (first token of each seq an action
    unless the sequence is empty), logprobs, old logprobs, advantages."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)  # [B + 1]
    T = int(cu[-1])
    mask = torch.rand(T, generator=g) < p_action  # [T]
    for b in range(len(lengths)):
        if lengths[b]:
            mask[cu[b]] = True
    logp = -torch.rand(T, generator=g) * 3  # [T]
    old = logp + torch.randn(T, generator=g) * 0.3  # [T]
    adv = torch.randn(T, generator=g)  # [T]
    return cu, mask, logp, old, adv
