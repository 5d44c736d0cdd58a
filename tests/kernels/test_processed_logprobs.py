"""Per-row temperature and top-k/top-p truncation in the log-prob kernels: the trainer's
side of "score what the sampler sampled"."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_testutil import assert_close, impl_params
from lightning.kernels.logprobs import (
    logprobs_from_hidden,
    logprobs_from_logits,
    processed_logprobs_from_hidden,
    reference,
)

IMPLS = [pytest.param("reference", "cpu", id="reference"), *impl_params()]


def _data(n=9, v=301, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / 2
    ids = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("impl, device", IMPLS)
def test_per_row_temperature_equals_one_call_per_row(impl, device):
    hidden, weight, ids = _data()
    temps = torch.tensor([0.3, 0.7, 1.0, 1.3, 0.7, 0.3, 2.0, 1.0, 0.7])
    h = hidden.to(device).detach().requires_grad_()
    w = weight.to(device).detach().requires_grad_()
    got = logprobs_from_hidden(h, w, ids.to(device), temperature=temps.to(device),
                               return_entropy=True, impl=impl)
    (got.logprobs.sum() + got.entropy.sum()).backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rows = [reference.logprobs_from_hidden(hr[i : i + 1], wr, ids[i : i + 1], temperature=float(t),
                                           return_entropy=True) for i, t in enumerate(temps)]
    exp_lp = torch.cat([r.logprobs for r in rows])
    exp_ent = torch.cat([r.entropy for r in rows])
    (exp_lp.sum() + exp_ent.sum()).backward()
    assert_close(got.logprobs, exp_lp, 2e-5, 1e-5, "logprobs")
    assert_close(got.entropy, exp_ent, 2e-5, 1e-5, "entropy")
    assert_close(h.grad, hr.grad, 2e-4, 1e-4, "d hidden")
    assert_close(w.grad, wr.grad, 2e-4, 1e-4, "d weight")
    # from logits too
    lg = logprobs_from_logits((hidden @ weight.T).to(device), ids.to(device),
                              temperature=temps.to(device), impl=impl)
    assert_close(lg.logprobs, exp_lp, 2e-5, 1e-5, "logprobs from logits")


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, 0.0, 1.0]), "> 0"),
    (torch.tensor([1.0, math.nan, 1.0]), "> 0"),
    (torch.tensor([1.0, 1.0]), "shape"),
    (torch.tensor([1, 1, 1]), "floating"),
])
def test_per_row_temperature_is_checked(bad, match):
    hidden, weight, ids = _data(n=3)
    with pytest.raises(ValueError, match=match):
        logprobs_from_hidden(hidden, weight, ids, temperature=bad)


def _naive_processed(z_row: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Top-k then top-p by hand on one row of scaled logits (sorted list walk)."""
    v = z_row.numel()
    order = sorted(range(v), key=lambda j: -float(z_row[j]))
    kept = order[: k] if 0 < k < v else order
    probs = torch.softmax(z_row[kept].double(), 0).tolist()
    keep, mass = [], 0.0
    for j, q in zip(kept, probs):
        if keep and mass >= p:
            break
        keep.append(j)
        mass += q
    out = torch.full_like(z_row, -math.inf)
    out[keep] = z_row[keep]
    return torch.log_softmax(out, 0)


@pytest.mark.parametrize("impl, device", IMPLS)
def test_truncated_rows_match_a_hand_computation(impl, device):
    hidden, weight, ids = _data(n=8, v=97)
    temps = torch.tensor([0.3, 0.7, 1.0, 1.3, 0.7, 1.0, 1.0, 0.5])
    top_k = torch.tensor([0, 20, 0, 5, 0, 0, 1, 97])
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.9, 1.0, 1.0, 0.3])
    z = (hidden @ weight.T) / temps[:, None]
    # the sampled token must be in the kept set (a sampler never draws outside it)
    for i in range(8):
        ids[i] = int(z[i].argmax())
    got = processed_logprobs_from_hidden(hidden.to(device), weight.to(device), ids.to(device),
                                         temperature=temps.to(device), top_k=top_k, top_p=top_p,
                                         return_entropy=True, impl=impl)
    exp = torch.stack([_naive_processed(z[i], int(top_k[i]), float(top_p[i]))[ids[i]]
                       for i in range(8)])
    assert_close(got.logprobs, exp, 2e-5, 1e-5, "processed logprobs")
    assert float(got.logprobs[6]) == pytest.approx(0.0, abs=1e-6)  # top_k=1: certain


def test_the_engine_samples_from_the_same_distribution():
    """The torch engine's sampler and the kernels share truncation_threshold: the engine's
    reported log-prob of a token equals processed_logprobs_from_hidden's."""
    from lightning.engine import torch_engine
    from lightning.engine.base import SamplingParams

    hidden, weight, ids = _data(n=6, v=97)
    logits = hidden @ weight.T
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=i)
              for i, (t, p, k) in enumerate([(0.7, 0.9, 0), (1.0, 1.0, 20), (0.3, 1.0, 0),
                                             (1.3, 0.9, 20), (0.0, 1.0, 0), (0.0, 0.8, 5)])]

    class Req:
        def __init__(self, p):
            self.params = p

    class Seq:
        def __init__(self, p):
            self.req = Req(p)
            self.generator = torch.Generator().manual_seed(p.seed)

    chosen, lps, _ = torch_engine._sample(logits, [Seq(p) for p in params])
    # greedy: scored at temperature 1 over the full vocabulary (resolve_sampling's rule)
    t = torch.tensor([p.temperature or 1.0 for p in params])
    got = processed_logprobs_from_hidden(
        hidden, weight, torch.tensor(chosen), temperature=t,
        top_k=torch.tensor([p.top_k if p.temperature else 0 for p in params]),
        top_p=torch.tensor([p.top_p if p.temperature else 1.0 for p in params]))
    assert_close(got.logprobs, torch.tensor(lps), 1e-5, 1e-5, "engine vs trainer")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.floats(0.05, 3.0), k=st.integers(-1, 40),
       p=st.floats(0.01, 1.0), v=st.integers(2, 60))
def test_processed_distribution_is_a_distribution(seed, t, k, p, v):
    hidden, weight, ids = _data(n=1, v=v, h=4, seed=seed)
    z = (hidden @ weight.T).float() / t
    masked = reference.processed_logits(z, torch.tensor([k]), torch.tensor([p]), keep=ids)
    kept = torch.isfinite(masked[0])
    assert bool(kept[ids[0]]) and int(kept.sum()) >= 1
    if 0 < k < v:
        assert int(kept.sum()) <= max(k, 1) + int((z[0] == z[0][kept].min()).sum())
    lp = processed_logprobs_from_hidden(hidden, weight, ids, temperature=t,
                                        top_k=torch.tensor([k]), top_p=torch.tensor([p]),
                                        impl="reference").logprobs
    assert float(lp[0]) <= 1e-6 and math.isfinite(float(lp[0]))
    assert float(torch.logsumexp(torch.log_softmax(masked[0], 0)[kept], 0)) == pytest.approx(0, abs=1e-5)
