"""KL penalty to a reference model, from per-token log-probs (Schulman's estimators).

With ``d = logp - ref_logp`` on tokens sampled from the current policy:

- :func:`kl_k1` ``d``: unbiased for KL(pi || ref), high variance, can be negative.
- :func:`kl_k2` ``d ** 2 / 2`` (verl's ``mse``): biased, low variance, its gradient is the
  right one for KL(pi || ref) in expectation.
- :func:`kl_k3` ``exp(-d) - 1 + d`` (``low_var_kl``): unbiased, non-negative, low variance.
  ``-d`` is clamped to [-20, 20] and the result to [-10, 10] for stability, as verl does.

:func:`kl_penalty_loss` aggregates one of them over a packed layout into ``(loss, Stats)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from lightning.algorithms.aggregate import Aggregator, get_aggregator

__all__ = ["KL_ESTIMATORS", "KLStats", "kl_k1", "kl_k2", "kl_k3", "kl_penalty_loss"]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs  # [T]


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()  # [T]


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    log_r = torch.clamp(ref_logprobs - logprobs, -20.0, 20.0)  # [T]
    return torch.clamp(torch.exp(log_r) - log_r - 1.0, -10.0, 10.0)  # [T]


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


class KLStats(NamedTuple):
    kl: torch.Tensor
    """The aggregated estimate (detached loss value)."""
    kl_max: torch.Tensor
    """Largest per-token estimate over action tokens."""


def kl_penalty_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    estimator: str = "k3",
    agg: str | Aggregator = "token-mean",
) -> tuple[torch.Tensor, KLStats]:
    """``(loss, stats)``: the chosen estimator aggregated over action tokens (multiply by
    your KL coefficient and add to the policy loss)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}: choose one of {sorted(KL_ESTIMATORS)}"
        ) from None
    kl = fn(logprobs, ref_logprobs.detach())  # [T]
    loss = get_aggregator(agg)(kl, mask, cu_seqlens)  # []
    keep = mask.bool()  # [T]
    kl_max = kl.detach()[keep].max() if bool(keep.any()) else kl.new_zeros(())  # []
    return loss, KLStats(kl=loss.detach(), kl_max=kl_max.detach())
