from __future__ import annotations

import pytest
import torch
from kernels_testutil import HAS_CUDA, HAS_TRITON, assert_close, impl_params

from lightning.kernels import KernelUnavailableError, discounted_returns, gae
from lightning.kernels.gae import reference

# (dtype, atol, rtol): kernels upcast to fp32, so they match the fp32 reference run on the
# same (rounded) inputs to fp32 accuracy; the scan's reassociation costs a few ulps.
DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.float16, 2e-5, 2e-5, id="fp16"),
]


def packed(lengths: list[int], p_mask: float, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)  # [B + 1]
    rewards = torch.randn(T, generator=g).to(dtype)  # [T]
    values = torch.randn(T, generator=g).to(dtype)  # [T]
    mask = torch.rand(T, generator=g) >= p_mask  # [T] bool
    return rewards, values, mask, cu


def run(impl: str, device: str, rewards, values, mask, cu, gamma, lam):
    def dev(x):
        return None if x is None else x.to(device)

    adv, ret = gae(dev(rewards), dev(values), dev(mask), dev(cu), gamma=gamma, lam=lam, impl=impl)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    assert adv.device.type == device
    return adv, ret


def test_reference_matches_hand_computed_example():
    # t0 action, t1 masked (tool output: reward and value ignored, state passes through),
    # t2 action; gamma discounts once between t2 and t0, not twice.
    rewards = torch.tensor([0.0, 5.0, 1.0])
    values = torch.tensor([0.5, 9.0, 0.2])
    mask = torch.tensor([True, False, True])
    cu = torch.tensor([0, 3])
    adv, ret = reference.gae(rewards, values, mask, cu, gamma=0.9, lam=0.8)
    # t2: delta = 1 - 0.2 = 0.8; t0: delta = 0.9 * 0.2 - 0.5 = -0.32, A = -0.32 + 0.72 * 0.8
    torch.testing.assert_close(adv, torch.tensor([0.256, 0.0, 0.8]))
    torch.testing.assert_close(ret, torch.tensor([0.756, 0.0, 1.0]))
    dr = reference.discounted_returns(torch.tensor([1.0, 7.0, 2.0]), mask, cu, gamma=0.5)
    torch.testing.assert_close(dr, torch.tensor([2.0, 0.0, 2.0]))


def test_reference_sequences_are_independent():
    r, v, m, _ = packed([5, 9], 0.3, torch.float32)
    both = reference.gae(r, v, m, torch.tensor([0, 5, 14]), gamma=0.99, lam=0.95)
    first = reference.gae(r[:5], v[:5], m[:5], torch.tensor([0, 5]), gamma=0.99, lam=0.95)
    second = reference.gae(r[5:], v[5:], m[5:], torch.tensor([0, 9]), gamma=0.99, lam=0.95)
    torch.testing.assert_close(both[0], torch.cat([first[0], second[0]]))
    torch.testing.assert_close(both[1], torch.cat([first[1], second[1]]))


@pytest.mark.parametrize("impl, device", impl_params())
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "lengths",
    [
        pytest.param([1], id="batch1-len1"),
        pytest.param([300], id="batch1"),
        pytest.param([5, 0, 17, 1, 333, 2, 0], id="odd-with-empty"),
        pytest.param([1024, 1, 1023, 257], id="chunk-edges"),
    ],
)
@pytest.mark.parametrize("with_values", [True, False], ids=["gae", "returns"])
def test_matches_reference(impl, device, dtype, atol, rtol, lengths, with_values):
    r, v, m, cu = packed(lengths, 0.3, dtype)
    v = v if with_values else None
    exp_adv, exp_ret = reference.gae(r.float(), None if v is None else v.float(), m, cu, gamma=0.99, lam=0.95)
    adv, ret = run(impl, device, r, v, m, cu, 0.99, 0.95)
    assert_close(adv, exp_adv, atol, rtol, "advantages")
    assert_close(ret, exp_ret, atol, rtol, "returns")


@pytest.mark.parametrize("impl, device", impl_params())
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.0, 0.5), (0.9, 0.0), (0.97, 0.9)])
def test_gamma_lambda_edges(impl, device, gamma, lam):
    r, v, m, cu = packed([7, 64, 3], 0.4, torch.float32, seed=1)
    exp = reference.gae(r, v, m, cu, gamma=gamma, lam=lam)
    got = run(impl, device, r, v, m, cu, gamma, lam)
    assert_close(got[0], exp[0], 2e-5, 2e-5, "advantages")
    assert_close(got[1], exp[1], 2e-5, 2e-5, "returns")


@pytest.mark.parametrize("impl, device", impl_params())
def test_empty_and_all_masked(impl, device):
    # No tokens at all, with zero and with two (empty) sequences.
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0])):
        adv, ret = run(impl, device, torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool), cu, 0.9, 0.9)
        assert adv.shape == (0,) and ret.shape == (0,)
    # Every token masked: all outputs are exactly 0; one sequence all masked among others.
    r, v, m, cu = packed([4, 9, 5], 0.0, torch.float32)
    zeros = torch.zeros_like(m)
    adv, ret = run(impl, device, r, v, zeros, cu, 0.9, 0.9)
    assert not adv.any() and not ret.any()
    m[4:13] = False
    exp = reference.gae(r, v, m, cu, gamma=0.9, lam=0.9)
    got = run(impl, device, r, v, m, cu, 0.9, 0.9)
    assert_close(got[0], exp[0], 2e-5, 2e-5, "advantages")
    assert not got[0][4:13].any()


@pytest.mark.parametrize("impl, device", impl_params())
def test_mask_none_and_integer_mask(impl, device):
    r, v, m, cu = packed([6, 11], 0.5, torch.float32)
    exp = reference.gae(r, v, None, cu, gamma=0.95, lam=0.9)
    assert_close(run(impl, device, r, v, None, cu, 0.95, 0.9)[0], exp[0], 2e-5, 2e-5, "mask=None")
    exp = reference.gae(r, v, m, cu, gamma=0.95, lam=0.9)
    got = run(impl, device, r, v, m.to(torch.int64), cu.long(), 0.95, 0.9)
    assert_close(got[0], exp[0], 2e-5, 2e-5, "int64 mask")


@pytest.mark.slow
@pytest.mark.parametrize("impl, device", impl_params())
def test_long_sequence_32k(impl, device):
    # One 40k-token agent trajectory (turns separated by long masked tool outputs) plus a
    # short one. gamma = lam = 1 keeps every term alive, the hardest case for accumulation.
    g = torch.Generator().manual_seed(3)
    T = 40_000
    r = torch.zeros(T)
    r[torch.randint(0, T, (50,), generator=g)] = torch.randn(50, generator=g)
    v = torch.randn(T, generator=g) * 0.1
    m = (torch.arange(T) // 1000) % 3 != 1  # 1000-token masked blocks
    cu = torch.tensor([0, T - 100, T])
    exp = reference.gae(r, v, m, cu, gamma=1.0, lam=1.0)
    got = run(impl, device, r, v, m, cu, 1.0, 1.0)
    assert_close(got[0], exp[0], 1e-4, 1e-4, "advantages")
    assert_close(got[1], exp[1], 1e-4, 1e-4, "returns")
    if impl != "triton" or device != "cpu":  # the interpreter takes ~5 s per run at this size
        exp = reference.gae(r, v, m, cu, gamma=0.999, lam=0.95)
        got = run(impl, device, r, v, m, cu, 0.999, 0.95)
        assert_close(got[0], exp[0], 1e-4, 1e-4, "advantages")


@pytest.mark.parametrize("impl, device", impl_params())
def test_discounted_returns(impl, device):
    r, _, m, cu = packed([9, 1, 40], 0.3, torch.float32)
    exp = reference.discounted_returns(r, m, cu, gamma=0.9)
    got = discounted_returns(r.to(device), m.to(device), cu.to(device), gamma=0.9, impl=impl)
    assert_close(got, exp, 2e-5, 2e-5, "returns")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_many_chunks_and_carry_steps():
    # 16-token programs and 4 chunk totals per carry step: sequences span many chunks and
    # the carry pass loops; sequence ends fall inside chunks and on their edges.
    from lightning.kernels.gae import triton as gae_triton

    device = "cuda" if HAS_CUDA else "cpu"
    r, v, m, cu = packed([16, 1, 47, 0, 32, 130, 15, 17], 0.3, torch.float32, seed=5)
    exp = reference.gae(r, v, m, cu, gamma=0.99, lam=0.95)
    got = gae_triton.gae(r.to(device), v.to(device), m.to(device), cu.to(device), 0.99, 0.95, block=16, block_c=4)
    assert_close(got[0], exp[0], 2e-5, 2e-5, "advantages")
    assert_close(got[1], exp[1], 2e-5, 2e-5, "returns")


def test_cpp_bf16_and_mixed_dtypes():
    r, v, m, cu = packed([33, 70], 0.3, torch.bfloat16)
    exp = reference.gae(r.float(), v.float(), m, cu, gamma=0.99, lam=0.95)
    got = gae(r, v, m, cu, gamma=0.99, lam=0.95, impl="cpp")
    assert_close(got[0], exp[0], 2e-5, 2e-5, "bf16 advantages")
    got = gae(r, v.float(), m, cu, gamma=0.99, lam=0.95, impl="cpp")  # mixed: both upcast
    assert_close(got[0], exp[0], 2e-5, 2e-5, "mixed advantages")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rewards": torch.zeros(3, 1)}, "rewards must be 1-D"),
        ({"rewards": torch.zeros(3, dtype=torch.int64)}, "rewards must be float"),
        ({"values": torch.zeros(4)}, "values must have shape"),
        ({"mask": torch.zeros(3)}, "mask must be bool or integer"),
        ({"cu_seqlens": torch.tensor([0, 2])}, "cu_seqlens must start at 0 and end at T=3"),
        ({"cu_seqlens": torch.tensor([0, 3, 1, 3])}, "non-decreasing"),
        ({"cu_seqlens": torch.tensor([0.0, 3.0])}, "cu_seqlens must be int32 or int64"),
        ({"gamma": 1.5}, "gamma must be in"),
        ({"lam": -0.1}, "lam must be in"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"rewards": torch.zeros(3), "values": torch.zeros(3), "mask": None, "cu_seqlens": torch.tensor([0, 3]), "gamma": 0.9, "lam": 0.9}
    args.update(kwargs)
    for impl in ("reference", "cpp"):
        with pytest.raises(ValueError, match=match):
            gae(args["rewards"], args["values"], args["mask"], args["cu_seqlens"], gamma=args["gamma"], lam=args["lam"], impl=impl)


def test_cpp_op_checks_cu_seqlens_itself():
    # Called directly (no Python validation in front), the C++ op still refuses bad offsets.
    from lightning import _ext

    _ext.load()
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.lightning_rl.gae(torch.zeros(3), None, None, torch.tensor([0, 2, 1, 3]), 0.9, 0.9)


def test_cuda_impl_on_cpu_fails_loudly():
    with pytest.raises(KernelUnavailableError, match="impl='cuda' cannot run on cpu"):
        gae(torch.zeros(3), None, None, torch.tensor([0, 3]), impl="cuda")
