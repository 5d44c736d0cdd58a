"""TorchBackend on the tiny random Llama (CPU, fp32): sampler/trainer log-prob consistency,
gradient accumulation, learning, weight export to the engine, checkpoints, registry."""

from __future__ import annotations

import importlib.util
from array import array
from pathlib import Path
from typing import Any

import lightning_backends
import msgspec
import pytest
import torch
from lightning_backends._torch import TorchBackend, TorchBackendConfig

from lightning._sequences import TokenSequence
from lightning.engine.base import SamplingParams
from lightning.engine.torch_engine import TorchEngine
from lightning.training import TrainBatch, pack_sequences

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hi", "Count to three, slowly please."]

#: fp32 on CPU: the engine's KV-cached decode and the trainer's padded full forward differ
#: only in summation order (observed max |diff| ~1e-5).
LOGPROB_ATOL = 1e-4


async def sample_sequences(
    engine: TorchEngine, *, n: int = 2, max_tokens: int = 12, seed: int = 0
) -> list[TokenSequence]:
    """Sample ``n`` continuations of each prompt at temperature 1 (``max_tokens + 3 i``
    tokens for prompt ``i``: sequences of different lengths and action counts) and turn them
    into TokenSequences exactly as the engine produced them."""
    out = []
    for i, text in enumerate(PROMPTS):
        prompt = engine.apply_chat_template([{"role": "user", "content": text}])
        params = SamplingParams(
            temperature=1.0, max_tokens=max_tokens + 3 * i, n=n, seed=seed + i, ignore_eos=True
        )
        result = await engine.generate(prompt, params)
        for c in result.choices:
            n_p, n_r = len(prompt), len(c.token_ids)
            out.append(
                TokenSequence(
                    token_ids=array("i", prompt + c.token_ids),
                    action_mask=bytearray(b"\x00" * n_p + b"\x01" * n_r),
                    logprobs=array("f", [0.0] * n_p + c.logprobs),
                    policy_versions=array("i", [-1] * n_p + [c.policy_version] * n_r),
                    transitions=[0],
                    prompt_len=n_p,
                )
            )
    return out


def make_backend(model_dir: Path, **cfg: Any) -> TorchBackend:
    backend = TorchBackend()
    cfg.setdefault("device", "cpu")
    backend.setup(str(model_dir), TorchBackendConfig(**cfg))
    return backend


def weights(backend: TorchBackend) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backend.model.state_dict().items()}


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


async def test_trainer_logprobs_match_sampler(engine: TorchEngine, tiny_model_dir: Path) -> None:
    seqs = await sample_sequences(engine)
    batch = pack_sequences(seqs, [0.0] * len(seqs))
    # a small micro-batch budget: several padded micro-batches of mixed lengths
    backend = make_backend(tiny_model_dir, micro_batch_tokens=64)
    lp = backend.compute_logprobs(batch)  # [T]
    m = batch.action_mask
    assert m.sum() == sum(len(s.token_ids) - s.prompt_len for s in seqs)
    torch.testing.assert_close(lp[m], batch.old_logprobs[m], atol=LOGPROB_ATOL, rtol=0)
    assert float(lp[~m].abs().max()) == 0.0
    # the logprob_gap metric reports the same agreement before the update
    metrics = backend.train_step(batch)
    assert metrics["actor/logprob_gap"] < LOGPROB_ATOL


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
async def test_gradient_accumulation_matches_one_big_batch(
    engine: TorchEngine, tiny_model_dir: Path, agg: str
) -> None:
    seqs = await sample_sequences(engine, max_tokens=8)
    advs = [1.0 if i % 3 == 0 else -0.5 for i in range(len(seqs))]
    batch = pack_sequences(seqs, advs, ref_logprobs=[[x - 0.1 for x in s.logprobs] for s in seqs])
    # Adam with eps >> |g| is SGD with step lr * g / (|g| + eps) ~ g here: the weight
    # change compares the accumulated gradients themselves, scale included (Adam's usual
    # first step, lr * sign(g), would hide a wrongly scaled micro-batch)
    cfg = {"lr": 1.0, "eps": 1.0, "loss_agg": agg, "kl_coef": 0.1, "max_grad_norm": None}
    init = weights(make_backend(tiny_model_dir))
    big = make_backend(tiny_model_dir, micro_batch_tokens=100_000, **cfg)
    small = make_backend(tiny_model_dir, micro_batch_tokens=90, **cfg)
    m_big, m_small = big.train_step(batch), small.train_step(batch)
    assert m_big["perf/micro_batches"] == 1 and m_small["perf/micro_batches"] > 2
    for key in (
        "loss/policy",
        "loss/kl",
        "actor/grad_norm",
        "actor/clip_frac",
        "actor/logprob_gap",
    ):
        assert m_small[key] == pytest.approx(m_big[key], rel=1e-4, abs=1e-6), key
    w_big, w_small = weights(big), weights(small)
    step = max(float((w_big[k] - init[k]).abs().max()) for k in init)
    assert step > 1e-4  # the step is visible
    # fp32 summation order only: the two updates agree to 1e-4 of the largest change
    assert max_weight_diff(w_big, w_small) < 1e-4 * step


async def test_gradient_checkpointing_gives_the_same_step(
    engine: TorchEngine, tiny_model_dir: Path
) -> None:
    seqs = await sample_sequences(engine, max_tokens=6)
    batch = pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))])
    plain = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=128)
    ckpt = make_backend(
        tiny_model_dir, lr=1e-3, micro_batch_tokens=128, gradient_checkpointing=True
    )
    m_plain, m_ckpt = plain.train_step(batch), ckpt.train_step(batch)
    assert m_ckpt["actor/grad_norm"] == pytest.approx(m_plain["actor/grad_norm"], rel=1e-5)
    assert max_weight_diff(weights(plain), weights(ckpt)) < 1e-5


async def test_ppo_raises_positive_and_lowers_negative_actions(
    engine: TorchEngine, tiny_model_dir: Path
) -> None:
    seqs = await sample_sequences(engine, max_tokens=8)
    advs = [1.0 if i % 2 == 0 else -1.0 for i in range(len(seqs))]
    batch = pack_sequences(seqs, advs)
    backend = make_backend(tiny_model_dir, lr=3e-3, micro_batch_tokens=128)
    pos = (
        torch.tensor([a > 0 for a in advs])[
            torch.repeat_interleave(torch.arange(len(seqs)), batch.cu_seqlens.diff().long())
        ]
        & batch.action_mask
    )  # [T]
    neg = batch.action_mask & ~pos  # [T]
    before = backend.compute_logprobs(batch)
    for _ in range(4):
        metrics = backend.train_step(batch)
        assert all(isinstance(v, float) for v in metrics.values())
    after = backend.compute_logprobs(batch)
    assert backend.step == 4 and metrics["train/step"] == 4.0
    assert float(after[pos].mean()) > float(before[pos].mean()) + 0.05
    assert float(after[neg].mean()) < float(before[neg].mean()) - 0.05


async def test_cispo_learns_too(engine: TorchEngine, tiny_model_dir: Path) -> None:
    seqs = await sample_sequences(engine, max_tokens=6)
    batch = pack_sequences(seqs, [1.0] * len(seqs))
    backend = make_backend(tiny_model_dir, lr=3e-3, loss="cispo")
    before = backend.compute_logprobs(batch)
    backend.train_step(batch)
    backend.train_step(batch)
    m = batch.action_mask
    assert float(backend.compute_logprobs(batch)[m].mean()) > float(before[m].mean())


async def test_export_weights_to_engine(engine: TorchEngine, tiny_model_dir: Path) -> None:
    seqs = await sample_sequences(engine, max_tokens=8)
    backend = make_backend(tiny_model_dir, lr=3e-3)
    advs = [1.0 if i % 2 == 0 else -1.0 for i in range(len(seqs))]
    backend.train_step(pack_sequences(seqs, advs))
    exported = backend.export_weights()
    assert all(not t.requires_grad for t in exported.values())
    assert engine.policy_version == 0
    assert await engine.update_weights(exported) == 1
    assert engine.policy_version == 1
    # new samples carry version 1, and the trainer's log-probs (new weights) match them
    fresh = await sample_sequences(engine, max_tokens=8, seed=100)
    batch = pack_sequences(fresh, [0.0] * len(fresh))
    assert batch.policy_versions.tolist() == [1] * len(fresh)
    lp = backend.compute_logprobs(batch)
    m = batch.action_mask
    torch.testing.assert_close(lp[m], batch.old_logprobs[m], atol=LOGPROB_ATOL, rtol=0)
    # ... and the weights really changed: the untrained model disagrees
    stale = make_backend(tiny_model_dir).compute_logprobs(batch)
    assert float((stale[m] - batch.old_logprobs[m]).abs().max()) > 1e-3
    # exported tensors are copies: training further does not change them
    snapshot = {k: v.clone() for k, v in exported.items()}
    backend.train_step(pack_sequences(seqs, advs))
    assert max_weight_diff(exported, snapshot) == 0.0


async def test_save_load_round_trip(
    engine: TorchEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    seqs = await sample_sequences(engine, max_tokens=6)
    batch = pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))])
    a = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=128)
    a.train_step(batch)
    a.train_step(batch)
    a.save(str(tmp_path / "ckpt"))
    b = make_backend(tiny_model_dir, lr=1e-3, micro_batch_tokens=128)
    assert max_weight_diff(weights(a), weights(b)) > 0
    b.load(str(tmp_path / "ckpt"))
    assert b.step == a.step == 2
    assert max_weight_diff(weights(a), weights(b)) == 0.0
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    # the restored optimizer continues identically
    a.train_step(batch)
    b.train_step(batch)
    assert max_weight_diff(weights(a), weights(b)) == 0.0
    with pytest.raises(lightning_backends_error()):
        b.load(str(tmp_path / "nowhere"))


def lightning_backends_error() -> type[Exception]:
    from lightning import BackendError

    return BackendError


def test_empty_action_batch_skips_the_step(tiny_model_dir: Path) -> None:
    seq = TokenSequence(
        token_ids=array("i", [1, 2, 3]),
        action_mask=bytearray(3),
        logprobs=array("f", [0.0] * 3),
        policy_versions=array("i", [-1] * 3),
        transitions=[0],
        prompt_len=3,
    )
    backend = make_backend(tiny_model_dir, lr=1e-2)
    before = weights(backend)
    metrics = backend.train_step(pack_sequences([seq], [1.0]))
    assert metrics["actor/skipped"] == 1.0 and backend.step == 0
    assert max_weight_diff(before, weights(backend)) == 0.0
    assert backend.compute_logprobs(pack_sequences([seq], [1.0])).tolist() == [0.0] * 3


def test_get_backend_and_protocol() -> None:
    cls = lightning_backends.get_backend("torch")
    assert cls is TorchBackend
    assert isinstance(TorchBackend(), lightning_backends.Backend)


def test_config_validation(tiny_model_dir: Path) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"lr": 1e-5, "nope": 1}, type=TorchBackendConfig)
    with pytest.raises(ValueError, match="invalid torch backend config"):
        TorchBackend().setup(str(tiny_model_dir), {"micro_batch_size": 3})
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        TorchBackendConfig(micro_batch_tokens=0)
    with pytest.raises(lightning_backends_error(), match="setup"):
        TorchBackend().train_step(TrainBatch.__new__(TrainBatch))


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_lora_without_peft_names_the_install(tiny_model_dir: Path) -> None:
    with pytest.raises(LookupError, match="pip install peft"):
        make_backend(tiny_model_dir, lora_rank=4)


async def test_lora_trains_exports_merged_and_round_trips(
    engine: TorchEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("peft")
    seqs = await sample_sequences(engine, max_tokens=6)
    batch = pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))])
    backend = make_backend(tiny_model_dir, lr=1e-2, lora_rank=4, seed=0)
    base = make_backend(tiny_model_dir).export_weights()
    backend.train_step(batch)
    backend.train_step(batch)
    exported = backend.export_weights()
    assert exported.keys() == base.keys()  # plain HF names, no lora_/base_layer keys
    assert (
        float(
            (
                exported["model.layers.0.self_attn.q_proj.weight"]
                - base["model.layers.0.self_attn.q_proj.weight"]
            )
            .abs()
            .max()
        )
        > 0
    )
    assert torch.equal(
        exported["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    # the merged weights reproduce the adapter model's log-probs in a plain model
    await engine.update_weights(exported)
    fresh = pack_sequences(await sample_sequences(engine, max_tokens=6, seed=7), [0.0] * len(seqs))
    m = fresh.action_mask
    torch.testing.assert_close(
        backend.compute_logprobs(fresh)[m], fresh.old_logprobs[m], atol=LOGPROB_ATOL, rtol=0
    )
    backend.save(str(tmp_path / "lora"))
    other = make_backend(tiny_model_dir, lr=1e-2, lora_rank=4, seed=1)
    other.load(str(tmp_path / "lora"))
    assert other.step == 2
    torch.testing.assert_close(
        other.compute_logprobs(batch), backend.compute_logprobs(batch), atol=0, rtol=0
    )
