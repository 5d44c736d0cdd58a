"""AdamW's update kernel (``optimizer_impl``): the choice, its validation, its log line, the
numerical equality of the kernels, and checkpoints that cross kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning_backends._common import OPTIMIZER_IMPLS, TrainSettings, make_adamw
from lightning_backends._torch import TorchBackend, TorchBackendConfig
from structlog.testing import capture_logs
from test_torch_backend import make_backend, max_weight_diff, weights

from lightning._errors import ConfigError
from lightning.training import TrainBatch

#: fused vs for-loop AdamW, fp32: the same formula in another operation order; after a few
#: steps of lr 1e-2 the parameters differ by a few ulps of their magnitude (~1e-7).
ADAM_RTOL, ADAM_ATOL = 1e-5, 1e-6


def _adam_run(impl: str, cfg: TrainSettings, shapes: list[tuple[int, ...]], steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    opt, chosen = make_adamw(params, cfg, impl, backend="test")
    for step_grads in grads:
        for p, gr in zip(params, step_grads, strict=True):
            p.grad = gr.clone()
        opt.step()
    return [p.detach() for p in params], opt, chosen


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    impl=st.sampled_from(["fused", "foreach"]),
    lr=st.floats(1e-6, 1e-1),
    beta1=st.floats(0.0, 0.99),
    beta2=st.floats(0.5, 0.9999),
    weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
    eps=st.sampled_from([1e-8, 1e-6]),
    shapes=st.lists(
        st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_the_for_loop_update(
    impl: str,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    shapes: list[tuple[int, ...]],
    steps: int,
    seed: int,
) -> None:
    cfg = TrainSettings(lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, eps=eps)
    ref, ref_opt, ref_chosen = _adam_run("for-loop", cfg, shapes, steps, seed)
    got, opt, chosen = _adam_run(impl, cfg, shapes, steps, seed)
    assert (ref_chosen, chosen) == ("for-loop", impl)
    assert opt.param_groups[0]["fused"] is (impl == "fused")
    assert opt.param_groups[0]["foreach"] is (impl == "foreach")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=ADAM_RTOL, atol=ADAM_ATOL)
    for pa, pb in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                opt.state[pa][name], ref_opt.state[pb][name], rtol=ADAM_RTOL, atol=1e-9
            )
        assert float(opt.state[pa]["step"]) == float(ref_opt.state[pb]["step"]) == steps


def test_auto_is_fused_on_cpu_and_logged_once() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    with capture_logs() as logs:
        opt, chosen = make_adamw(params, TrainSettings(), "auto", backend="test")
    assert chosen == "fused" and opt.param_groups[0]["fused"] is True
    lines = [e for e in logs if e["event"] == "backend.optimizer"]
    assert len(lines) == 1
    assert lines[0]["impl"] == "fused" and lines[0]["requested"] == "auto"
    assert lines[0]["devices"] == ["cpu"] and lines[0]["dtypes"] == ["float32"]


def test_auto_falls_back_and_says_why_where_fused_cannot_run() -> None:
    params = [torch.zeros(3, device="meta", requires_grad=True)]  # no fused kernel on meta
    with capture_logs() as logs:
        opt, chosen = make_adamw(params, TrainSettings(), "auto", backend="test")
    assert chosen == "for-loop"
    assert opt.param_groups[0]["fused"] is False and opt.param_groups[0]["foreach"] is False
    (line,) = [e for e in logs if e["event"] == "backend.optimizer"]
    assert line["impl"] == "for-loop" and "fused" in line["fused_unavailable"]
    with pytest.raises(ValueError, match="optimizer_impl='fused' cannot run.*meta"):
        make_adamw(params, TrainSettings(), "fused", backend="test")


@given(value=st.text(max_size=12))
def test_optimizer_impl_is_validated(value: str) -> None:
    if value in OPTIMIZER_IMPLS:
        assert TorchBackendConfig(optimizer_impl=value).optimizer_impl == value  # type: ignore[arg-type]
        return
    with pytest.raises(ValueError, match="optimizer_impl must be one of"):
        TorchBackendConfig(optimizer_impl=value)  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError, match="optimizer_impl"):
        msgspec.convert({"optimizer_impl": value}, type=TorchBackendConfig)


def test_a_bad_optimizer_impl_fails_setup_with_the_field(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="optimizer_impl"):
        TorchBackend().setup(str(tiny_model_dir), {"optimizer_impl": "fastest"})


def _batch(backend: TorchBackend) -> TrainBatch:
    from array import array

    from lightning._sequences import TokenSequence
    from lightning.training import pack_sequences

    g = torch.Generator().manual_seed(0)
    seqs = []
    for b in range(4):
        n = 10 + 3 * b
        seqs.append(
            TokenSequence(
                token_ids=array("i", torch.randint(0, 1000, (n,), generator=g).tolist()),
                action_mask=bytearray([0] * 5 + [1] * (n - 5)),
                logprobs=array("f", [0.0] * n),
                policy_versions=array("i", [0] * n),
                transitions=[0],
                prompt_len=5,
            )
        )
    batch = pack_sequences(seqs, [1.0, -1.0, 0.5, -0.5])
    batch.old_logprobs = backend.compute_logprobs(batch)
    return batch


def _optim_state(backend: TorchBackend) -> dict[int, dict[str, Any]]:
    return backend.optimizer.state_dict()["state"]


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_backend_steps_match_the_for_loop_kernel(tiny_model_dir: Path, impl: str) -> None:
    ref = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=32, optimizer_impl="for-loop")
    got = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=32, optimizer_impl=impl)
    assert (ref.optimizer_impl, got.optimizer_impl) == ("for-loop", impl)
    batch = _batch(ref)
    for _ in range(4):
        m_ref, m_got = ref.train_step(batch), got.train_step(batch)
        assert m_got["actor/grad_norm"] == pytest.approx(m_ref["actor/grad_norm"], rel=1e-4)
    assert 0 < max_weight_diff(weights(ref), weights(make_backend(tiny_model_dir)))
    assert max_weight_diff(weights(got), weights(ref)) < 1e-5


def test_default_backend_uses_fused_on_cpu(tiny_model_dir: Path) -> None:
    backend = make_backend(tiny_model_dir)
    assert backend.optimizer_impl == "fused"
    assert backend.optimizer.param_groups[0]["fused"] is True


def test_a_checkpoint_resumes_with_the_configured_kernel(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Saved by the for-loop kernel, loaded into a fused backend (and back): the state is
    restored bit-exactly, the loading backend keeps its own kernel, and it continues as a
    backend of its kernel that never stopped."""
    a = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=32, optimizer_impl="for-loop")
    batch = _batch(a)
    a.train_step(batch)
    a.train_step(batch)
    a.save(str(tmp_path / "loop"))
    b = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=32, optimizer_impl="fused")
    b.load(str(tmp_path / "loop"))
    assert b.optimizer.param_groups[0]["fused"] is True
    assert b.optimizer.param_groups[0]["foreach"] is False
    sa, sb = _optim_state(a), _optim_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    assert max_weight_diff(weights(a), weights(b)) == 0.0
    a.train_step(batch)
    b.train_step(batch)
    assert max_weight_diff(weights(a), weights(b)) < 1e-5  # fused: another rounding order
    # and back: a fused checkpoint into a for-loop backend
    b.save(str(tmp_path / "fused"))
    c = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=32, optimizer_impl="for-loop")
    c.load(str(tmp_path / "fused"))
    assert c.optimizer.param_groups[0]["fused"] is False
    assert c.optimizer.param_groups[0]["foreach"] is False
    for k, v in _optim_state(b).items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[name], _optim_state(c)[k][name]), (k, name)
