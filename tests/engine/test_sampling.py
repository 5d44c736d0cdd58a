"""The torch engine's sampler: exact draws, zero-mass tokens never drawn, and robust to
last-bit logit differences (what makes seeded requests independent of the batch)."""

from __future__ import annotations

import itertools

import torch

from lightning.engine.torch_engine import _FANOUT, _LEVELS, _pick, _tree_sample


def _draw(probs: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws from one distribution, 1000 rows at a time."""
    rows = probs.expand(1000, -1).contiguous()
    return torch.cat(
        [_tree_sample(rows, torch.rand((1000, _LEVELS), generator=gen)) for _ in range(n // 1000)]
    )


def _chi2(draws: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    expected = probs.double() * draws.numel()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def test_draws_follow_the_distribution_and_skip_zero_mass() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 5000  # not a multiple of the tree's block: padded with zero mass
    support = torch.tensor([0, 63, 64, 4095, 4096, 4097, 4999, 2500])
    probs = torch.zeros(vocab)
    probs[support] = torch.tensor([0.3, 0.05, 0.2, 0.1, 0.01, 0.04, 0.25, 0.05])
    n = 40_000
    draws = _draw(probs, n, gen)
    assert set(draws.unique().tolist()) <= set(support.tolist())
    # 7 degrees of freedom; p = 0.001 at 24.3
    assert _chi2(draws, probs) < 24.3


def test_draws_from_a_wide_distribution() -> None:
    """Every token has mass: the empirical distribution over 40 coarse bins matches."""
    gen = torch.Generator().manual_seed(1)
    vocab = 3 * _FANOUT**2 + 17
    probs = torch.softmax(torch.randn(vocab, generator=gen) * 2, dim=0)
    n = 40_000
    draws = _draw(probs, n, gen)
    bins = 40
    edges = torch.linspace(0, vocab, bins + 1).long()
    coarse = torch.stack([probs[a:b].sum() for a, b in itertools.pairwise(edges.tolist())])
    which = torch.bucketize(draws, edges[1:-1], right=True)
    assert _chi2(which, coarse) < 73.4  # 39 degrees of freedom, p = 0.001


def test_extreme_uniforms_never_pick_zero_mass() -> None:
    w = torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.25, 0.0, 0.0]] * 3)
    u = torch.tensor([0.0, 0.5, 1.0 - 2.0**-24])  # the largest uniform_ value
    assert _pick(w, u).tolist() == [2, 2, 4]
    # the last positive child is chosen when u * total rounds up to the total
    w = torch.tensor([[0.1, 0.7, 0.0, 0.0]])
    assert _pick(w, torch.tensor([1.0])).tolist() == [1]


def test_tiny_logit_differences_rarely_change_the_draw() -> None:
    """Logits computed in another batch shape differ in their last bits (here: noise of
    1e-4, more than that). With the same uniforms the tree sampler's token almost never
    changes, while a flat inverse CDF over the whole vocabulary (the control) changes in
    a measurable share of rows."""
    gen = torch.Generator().manual_seed(2)
    rows, vocab = 1000, 49152
    x = torch.randn((rows, vocab), generator=gen)
    x2 = x + torch.randn((rows, vocab), generator=gen) * 1e-4
    p, p2 = torch.softmax(x, -1), torch.softmax(x2, -1)
    u = torch.rand((rows, _LEVELS), generator=gen)
    changed = int((_tree_sample(p, u) != _tree_sample(p2, u)).sum())
    target = u[:, :1].contiguous()
    flat = torch.searchsorted(p.cumsum(-1), target) != torch.searchsorted(p2.cumsum(-1), target)
    assert int(flat.sum()) >= 10  # the control: the perturbation is big enough to matter
    assert changed <= 1
