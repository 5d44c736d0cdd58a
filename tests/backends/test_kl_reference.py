"""A real KL penalty: kl_coef > 0 penalises the KL to the frozen initial weights (with
LoRA, the model with its adapter off) in the torch backend; 0 at step 1, > 0 once moved.
Backends without a reference say so instead of skipping the KL."""

from __future__ import annotations

import importlib.util
from array import array
from pathlib import Path

import pytest
import torch
from lightning_backends._common import require_ref_logprobs
from lightning_backends._torch import TorchBackend, TorchBackendConfig

from lightning._protocol import Sampling
from lightning._sequences import TokenSequence
from lightning.algorithms.kl import kl_k3
from lightning.training import pack_sequences


def _batch(backend: TorchBackend, n: int = 4):
    g = torch.Generator().manual_seed(0)
    seqs = []
    for b in range(n):
        ids = torch.randint(0, 1000, (12,), generator=g).tolist()
        seqs.append(TokenSequence(
            token_ids=array("i", ids), action_mask=bytearray([0] * 6 + [1] * 6),
            logprobs=array("f", [0.0] * 12), policy_versions=array("i", [0] * 12),
            transitions=[0], prompt_len=6, response_spans=[(6, 12)],
            sampling=[Sampling(temperature=0.7, top_p=0.9, logprobs="processed")]))
    batch = pack_sequences(seqs, [1.0 if b % 2 else -1.0 for b in range(n)])
    # on-policy old log-probs: the current policy's own, as a sampler would report them
    batch.old_logprobs = torch.where(batch.action_mask, backend.compute_logprobs(batch), 0.0)
    return batch


@pytest.mark.parametrize("lora", [0, 4])
def test_kl_is_zero_at_step_one_and_positive_once_the_policy_moved(tiny_model_dir: Path, lora):
    if lora and importlib.util.find_spec("peft") is None:
        pytest.skip("peft is not installed")
    backend = TorchBackend()
    backend.setup(str(tiny_model_dir), TorchBackendConfig(
        device="cpu", lr=0.05, kl_coef=0.1, kl_estimator="k3", lora_rank=lora,
        lora_target_modules=("q_proj", "v_proj")))
    batch = _batch(backend)
    ref0 = backend.reference_logprobs(batch)
    m1 = backend.train_step(batch)
    assert m1["loss/kl"] == pytest.approx(0.0, abs=1e-7)
    assert m1["loss/total"] == pytest.approx(m1["loss/policy"], abs=1e-7)
    act = batch.action_mask
    lp1 = backend.compute_logprobs(batch)  # the policy after step 1
    expected = float(kl_k3(lp1[act], ref0[act]).mean())  # token-mean k3, by hand
    m2 = backend.train_step(batch)
    assert m2["loss/kl"] > 1e-5
    assert m2["loss/kl"] == pytest.approx(expected, rel=1e-3)
    # the reference did not move with the policy
    torch.testing.assert_close(backend.reference_logprobs(batch), ref0, atol=1e-6, rtol=0)


def test_backends_without_a_reference_say_so():
    batch = pack_sequences([TokenSequence(
        token_ids=array("i", [1, 2]), action_mask=bytearray([0, 1]),
        logprobs=array("f", [0.0, -1.0]), policy_versions=array("i", [0, 0]),
        transitions=[0], prompt_len=1, response_spans=[(1, 2)])], [1.0])
    with pytest.raises(ValueError, match="deepspeed backend keeps no reference"):
        require_ref_logprobs(batch, 0.1, "deepspeed")
    require_ref_logprobs(batch, 0.0, "deepspeed")
    batch.ref_logprobs = torch.zeros(2)
    require_ref_logprobs(batch, 0.1, "deepspeed")


@pytest.mark.parametrize("backend", ["deepspeed", "verl"])
def test_kl_without_a_reference_fails_at_setup(backend):
    """kl_coef > 0 on a backend without a reference is refused when the config is read
    (``lightning train`` exits 2 before sampling), unless the batches bring ref_logprobs."""
    from lightning._errors import ConfigError
    from lightning_backends._common import as_settings

    if backend == "verl":
        cls = pytest.importorskip("lightning_backends._verl", reason="verl not installed"
                                  ).VerlBackendConfig
    else:
        from lightning_backends._deepspeed import DeepSpeedBackendConfig as cls
    with pytest.raises(ConfigError, match=f"the {backend} backend does not keep"):
        as_settings({"kl_coef": 0.1}, cls, backend)
    assert as_settings({"kl_coef": 0.1, "kl_reference": "batch"}, cls, backend).kl_coef == 0.1
    assert as_settings({"kl_coef": 0.0}, cls, backend).kl_reference is None
