from __future__ import annotations

import pytest
import torch
from kernels_testutil import assert_close, impl_params

from lightning.kernels import KernelUnavailableError, logprobs_from_hidden, logprobs_from_logits
from lightning.kernels.logprobs import reference

LP_IMPLS = [p for p in impl_params() if p.values[0] != "cuda"]

# (dtype, atol, rtol) for logprobs/entropy and gradients against the fp32 reference on
# the same (rounded) inputs. From logits the math is fp32 in both, only dlogits is rounded
# to the input dtype; from hidden states the GEMM output is rounded to fp16 too (|z| ~ 4:
# ulp 4e-3).
LOGITS_DTYPES = [
    pytest.param(torch.float32, 2e-5, 2e-5, id="fp32"),
    pytest.param(torch.float16, 2e-5, 1e-3, id="fp16"),
]
HIDDEN_DTYPES = [
    pytest.param(torch.float32, 5e-5, 5e-5, id="fp32"),
    pytest.param(torch.float16, 3e-2, 3e-2, id="fp16"),
]
SHAPES = [
    pytest.param(1, 17, 8, id="batch1"),
    pytest.param(13, 1000, 32, id="odd"),
    pytest.param(0, 50, 8, id="empty"),
    pytest.param(40, 2500, 16, id="multi-tile"),
]
GRADS = ["logprobs", "entropy", "both", "none"]


def make(N: int, V: int, H: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)  # [N, H]
    weight = torch.randn(V, H, generator=g) / H**0.5 * 3  # [V, H]: logits ~ N(0, 9)
    ids = torch.randint(0, V, (N,), generator=g)  # [N]
    g_lp = torch.randn(N, generator=g)  # [N]
    g_ent = torch.randn(N, generator=g)  # [N]
    return hidden, weight, ids, g_lp, g_ent


def forward_backward(fn, inputs: list[torch.Tensor], grads: str, g_lp, g_ent, want_entropy: bool):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    loss = torch.zeros(())
    if grads in ("logprobs", "both"):
        loss = loss + (out.logprobs * g_lp).sum()
    if grads in ("entropy", "both") and want_entropy:
        loss = loss + (out.entropy * g_ent).sum()
    if loss.requires_grad:
        loss.backward()
    return out, [x.grad for x in leaves]


def compare(out, grads_got, exp, grads_exp, atol, rtol, grad_atol, grad_rtol):
    assert out.logprobs.dtype == torch.float32
    assert_close(out.logprobs, exp.logprobs, atol, rtol, "logprobs")
    if exp.entropy is None:
        assert out.entropy is None
    else:
        assert_close(out.entropy, exp.entropy, atol, rtol, "entropy")
    for i, (a, e) in enumerate(zip(grads_got, grads_exp)):
        if e is None:
            assert a is None or not a.any(), f"grad {i} should be absent"
        else:
            assert a is not None, f"grad {i} missing"
            assert_close(a, e, grad_atol, grad_rtol, f"grad {i}")


@pytest.mark.parametrize("impl, device", LP_IMPLS)
@pytest.mark.parametrize("dtype, atol, rtol", LOGITS_DTYPES)
@pytest.mark.parametrize("N, V, H", SHAPES)
@pytest.mark.parametrize("grads", GRADS)
def test_from_logits(impl, device, dtype, atol, rtol, N, V, H, grads):
    hidden, weight, ids, g_lp, g_ent = make(N, V, H)
    logits = (hidden @ weight.T).to(dtype)  # [N, V]
    if N > 1:
        logits[1, : V // 2] = float("-inf")  # masked vocabulary entries
    temperature, want_entropy = 0.7, grads != "logprobs"
    if N > 1:
        ids[1] = V - 1  # must be a finite entry
    exp, exp_grads = forward_backward(
        lambda x: reference.logprobs_from_logits(x, ids, temperature=temperature, return_entropy=want_entropy),
        [logits.float()], grads, g_lp, g_ent, want_entropy,
    )
    got, got_grads = forward_backward(
        lambda x: logprobs_from_logits(x, ids.to(device), temperature=temperature, return_entropy=want_entropy, impl=impl),
        [logits.to(device)], grads, g_lp.to(device), g_ent.to(device), want_entropy,
    )
    if got_grads[0] is not None:
        assert got_grads[0].dtype == dtype
    compare(got, got_grads, exp, exp_grads, atol, rtol, 2e-5 if dtype == torch.float32 else 1e-3, 1e-3)


@pytest.mark.parametrize("impl, device", LP_IMPLS)
@pytest.mark.parametrize("dtype, atol, rtol", HIDDEN_DTYPES)
@pytest.mark.parametrize("N, V, H", SHAPES)
@pytest.mark.parametrize("grads", GRADS)
@pytest.mark.parametrize("chunks", [(5, 300), (None, None)], ids=["small-chunks", "default-chunks"])
def test_from_hidden(impl, device, dtype, atol, rtol, N, V, H, grads, chunks):
    hidden, weight, ids, g_lp, g_ent = make(N, V, H)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    temperature, want_entropy = 1.3, grads != "logprobs"
    exp, exp_grads = forward_backward(
        lambda h, w: reference.logprobs_from_hidden(h, w, ids, temperature=temperature, return_entropy=want_entropy),
        [hidden.float(), weight.float()], grads, g_lp, g_ent, want_entropy,
    )
    got, got_grads = forward_backward(
        lambda h, w: logprobs_from_hidden(
            h, w, ids.to(device), temperature=temperature, return_entropy=want_entropy,
            chunk_tokens=chunks[0], chunk_vocab=chunks[1], impl=impl,
        ),
        [hidden.to(device), weight.to(device)], grads, g_lp.to(device), g_ent.to(device), want_entropy,
    )
    for g, x in zip(got_grads, (hidden, weight)):
        if g is not None:
            assert g.dtype == dtype and g.shape == x.shape
    compare(got, got_grads, exp, exp_grads, atol, rtol, atol, rtol)


def test_cpp_bf16():
    hidden, weight, ids, g_lp, g_ent = make(9, 700, 16)
    logits = (hidden @ weight.T).bfloat16()
    exp, eg = forward_backward(lambda x: reference.logprobs_from_logits(x, ids, return_entropy=True), [logits.float()], "both", g_lp, g_ent, True)
    got, gg = forward_backward(lambda x: logprobs_from_logits(x, ids, return_entropy=True, impl="cpp"), [logits], "both", g_lp, g_ent, True)
    compare(got, gg, exp, eg, 2e-5, 2e-5, 1e-2, 1e-2)  # dlogits rounded to bf16 (8 bits)
    h, w = hidden.bfloat16(), weight.bfloat16()
    exp, eg = forward_backward(lambda a, b: reference.logprobs_from_hidden(a, b, ids, return_entropy=True), [h.float(), w.float()], "both", g_lp, g_ent, True)
    got, gg = forward_backward(lambda a, b: logprobs_from_hidden(a, b, ids, return_entropy=True, chunk_tokens=4, chunk_vocab=256, impl="cpp"), [h, w], "both", g_lp, g_ent, True)
    compare(got, gg, exp, eg, 0.15, 0.05, 0.1, 0.05)  # bf16 GEMM output: ulp 3e-2 at |z| ~ 8


@pytest.mark.parametrize("impl, device", LP_IMPLS)
def test_strided_logits_and_int32_ids(impl, device):
    hidden, weight, ids, _g_lp, _ = make(6, 300, 8)
    wide = hidden @ torch.cat([weight, weight]).T  # [N, 2V]
    logits = wide[:, ::2]  # [N, V], stride 2 along V: copied once
    exp = reference.logprobs_from_logits(logits, ids)
    got = logprobs_from_logits(logits.to(device), ids.int().to(device), impl=impl)
    assert_close(got.logprobs, exp.logprobs, 2e-5, 2e-5, "logprobs")


def test_cpp_large_vocab_matches_reference():
    # Qwen-sized vocabulary: chunked online softmax over 151,936 entries (19 tiles).
    hidden, weight, ids, g_lp, g_ent = make(8, 151_936, 16, seed=7)
    exp, eg = forward_backward(lambda h, w: reference.logprobs_from_hidden(h, w, ids, return_entropy=True), [hidden, weight], "both", g_lp, g_ent, True)
    got, gg = forward_backward(lambda h, w: logprobs_from_hidden(h, w, ids, return_entropy=True, impl="cpp"), [hidden, weight], "both", g_lp, g_ent, True)
    compare(got, gg, exp, eg, 1e-4, 1e-4, 5e-5, 1e-3)  # dhidden sums 151,936 fp32 terms


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: logprobs_from_logits(torch.zeros(3), torch.zeros(3, dtype=torch.int64)), "logits must be 2-D"),
        (lambda: logprobs_from_logits(torch.zeros(3, 5), torch.tensor([0, 1, 5])), r"token_ids must lie in \[0, V=5\)"),
        (lambda: logprobs_from_logits(torch.zeros(3, 5), torch.zeros(3)), "token_ids must be int32 or int64"),
        (lambda: logprobs_from_logits(torch.zeros(3, 5), torch.zeros(2, dtype=torch.int64)), "token_ids must have shape"),
        (lambda: logprobs_from_logits(torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64), temperature=0.0), "temperature must be > 0"),
        (lambda: logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.int64)), r"weight must be \[V, H=4\]"),
        (lambda: logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4).half(), torch.zeros(3, dtype=torch.int64)), "weight must have the dtype"),
        (lambda: logprobs_from_hidden(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.int64), chunk_vocab=0), "chunk_vocab must be > 0"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_explicit_unavailable_impl_fails_loudly():
    with pytest.raises(KernelUnavailableError, match="no 'cuda' implementation"):
        logprobs_from_logits(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), impl="cuda")
