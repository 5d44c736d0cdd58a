from __future__ import annotations

import pytest
import torch
from kernels_testutil import assert_close, impl_params

from lightning.kernels import (
    KernelUnavailableError,
    group_stats,
    grpo_advantage,
    masked_whiten,
    rloo_advantage,
)
from lightning.kernels.group_stats import reference

GS_IMPLS = [p for p in impl_params() if p.values[0] != "cuda"]  # no CUDA sources for these ops

DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 1e-5, id="fp16"),
]


def scores_and_groups(n: int, n_labels: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(n, generator=g) * 2 + 5).to(dtype)  # [N]
    labels = torch.randint(0, n_labels, (n,), generator=g) * 7919 - 1000  # [N] arbitrary, negative too
    return scores, labels


def test_reference_hand_computed():
    s = torch.tensor([1.0, 3.0, 10.0, 4.0])
    ids = torch.tensor([5, 5, -2, 5])  # group 5 = {1, 3, 4}, group -2 = {10}
    st = reference.group_stats(s, ids)
    torch.testing.assert_close(st.mean, torch.tensor([8 / 3, 8 / 3, 10.0, 8 / 3]))
    std = torch.tensor([1.0, 3.0, 4.0]).std()  # unbiased
    torch.testing.assert_close(st.std, torch.stack([std, std, torch.tensor(0.0), std]))
    assert st.count.tolist() == [3, 3, 1, 3]
    adv = reference.grpo_advantage(s, ids)
    torch.testing.assert_close(adv, torch.tensor([(1 - 8 / 3) / (std + 1e-6), (3 - 8 / 3) / (std + 1e-6), 0.0, (4 - 8 / 3) / (std + 1e-6)]))
    with pytest.raises(ValueError, match="eps must be > 0"):
        reference.grpo_advantage(s, ids, eps=0.0)
    # RLOO: s - mean of the others
    torch.testing.assert_close(reference.rloo_advantage(s, ids), torch.tensor([1 - 3.5, 3 - 2.5, 0.0, 4 - 2.0]))


@pytest.mark.parametrize("impl, device", GS_IMPLS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("n, n_labels", [(1, 1), (37, 10), (1000, 3), (257, 300)], ids=["batch1", "odd", "big-groups", "many-singletons"])
def test_matches_reference(impl, device, dtype, atol, rtol, n, n_labels):
    s, ids = scores_and_groups(n, n_labels, dtype)
    exp = reference.group_stats(s.float(), ids)
    got = group_stats(s.to(device), ids.to(device), impl=impl)
    assert_close(got.mean, exp.mean, atol, rtol, "mean")
    assert_close(got.std, exp.std, atol, rtol, "std")
    assert got.count.dtype == torch.int64 and torch.equal(got.count.cpu(), exp.count)
    for norm in (True, False):
        assert_close(
            grpo_advantage(s.to(device), ids.to(device), norm_by_std=norm, impl=impl),
            reference.grpo_advantage(s.float(), ids, norm_by_std=norm),
            1e-4, 1e-4, f"grpo norm_by_std={norm}",
        )
    assert_close(rloo_advantage(s.to(device), ids.to(device), impl=impl), reference.rloo_advantage(s.float(), ids), atol, rtol, "rloo")


@pytest.mark.parametrize("impl, device", GS_IMPLS)
def test_dense_ids_with_empty_groups_and_singletons(impl, device):
    s = torch.tensor([2.0, 4.0, 7.0, 1.0, 1.0])
    ids = torch.tensor([3, 3, 0, 5, 5], dtype=torch.int32)  # groups 1, 2, 4 empty
    exp = reference.group_stats(s, ids, num_groups=6)
    got = group_stats(s.to(device), ids.to(device), num_groups=6, impl=impl)
    assert_close(got.mean, exp.mean, 1e-6, 1e-6, "mean")
    assert_close(got.std, exp.std, 1e-6, 1e-6, "std")
    adv = grpo_advantage(s.to(device), ids.to(device), num_groups=6, impl=impl).cpu()
    assert adv[2] == 0.0  # singleton
    assert adv[3] == 0.0 and adv[4] == 0.0  # constant group: std 0, s - mean 0
    assert rloo_advantage(s.to(device), ids.to(device), impl=impl).cpu()[2] == 0.0


@pytest.mark.parametrize("impl, device", GS_IMPLS)
def test_empty(impl, device):
    got = group_stats(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device), impl=impl)
    assert got.mean.shape == got.std.shape == got.count.shape == (0,)
    assert grpo_advantage(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.int64, device=device), impl=impl).shape == (0,)


def test_group_stats_bad_arguments():
    with pytest.raises(ValueError, match="group_ids must lie in"):
        group_stats(torch.zeros(3), torch.tensor([0, 1, 3]), num_groups=3, impl="cpp")
    with pytest.raises(ValueError, match="group_ids must be int32 or int64"):
        group_stats(torch.zeros(3), torch.zeros(3), impl="cpp")
    with pytest.raises(ValueError, match="scores must be 1-D"):
        group_stats(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(KernelUnavailableError, match="no 'cuda' implementation"):
        group_stats(torch.zeros(3), torch.zeros(3, dtype=torch.int64), impl="cuda")


# ------------------------------------------------------------------------ whitening


@pytest.mark.parametrize("impl, device", GS_IMPLS)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T", [1, 2, 999, 70_001])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_reference(impl, device, dtype, atol, rtol, T, shift_mean):
    g = torch.Generator().manual_seed(T)
    x = (torch.randn(T, generator=g) * 3 + 10).to(dtype)  # [T], offset: stresses the two-pass variance
    mask = torch.rand(T, generator=g) > 0.4  # [T]
    for m in (mask, None):
        exp = reference.masked_whiten(x.float(), m, shift_mean=shift_mean)
        got = masked_whiten(x.to(device), None if m is None else m.to(device), shift_mean=shift_mean, impl=impl)
        assert_close(got, exp, 1e-4, 1e-4, f"whiten mask={'yes' if m is not None else 'none'}")


@pytest.mark.parametrize("impl, device", GS_IMPLS)
def test_whiten_degenerate_masks(impl, device):
    x = torch.randn(50)
    assert not masked_whiten(x.to(device), torch.zeros(50, dtype=torch.bool, device=device), impl=impl).any()
    one = torch.zeros(50, dtype=torch.bool)
    one[7] = True
    out = masked_whiten(x.to(device), one.to(device), impl=impl).cpu()  # n = 1: var 0, x - mean = 0
    assert not out.any()
    assert_close(out, reference.masked_whiten(x, one), 0, 0, "one kept element")
    assert masked_whiten(torch.zeros(0, device=device), impl=impl).shape == (0,)
