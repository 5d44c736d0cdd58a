"""DeepSpeedBackend on the tiny random Llama (CPU, gloo): parity with the torch backend at
ZeRO-0 and ZeRO-3, bf16 with DeepSpeed's own optimizer and scheduler, checkpoints, weight
export to the engine, a 2-process ZeRO-3 run, config errors, and the missing-extra error.

DeepSpeed's first process-group init JIT-builds its shared-memory comm op (~45-100 s on a
small CPU box); torch caches it in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/py<XY>_cpu``), which CI should keep between runs. The rank
subprocesses inherit the variable, so they find the op the in-process tests built.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning_backends
import msgspec
import pytest
import torch
from lightning_backends._torch import TorchBackend, TorchBackendConfig

from lightning import BackendError, ConfigError
from lightning._sequences import TokenSequence
from lightning.engine.base import SamplingParams
from lightning.engine.torch_engine import TorchEngine
from lightning.training import TrainBatch, pack_sequences

pytestmark = [
    # torch.distributed's own deprecation notices, raised from inside DeepSpeed's ZeRO-3
    # comm (all_gather_into_tensor, reduce_scatter_tensor); nothing this code calls
    pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning"),
    # ZeRO's optimizer check imports its Muon optimizer, whose torch.compile decorator
    # imports torch._inductor -> torch.utils.mkldnn (once per process)
    pytest.mark.filterwarnings(
        r"ignore:`torch\.jit\.script_method` is deprecated:DeprecationWarning"
    ),
]

#: The whole parity run is fp32 on CPU. ZeRO-0 runs the torch backend's exact operations
#: (observed: bitwise-equal losses with one OpenMP thread; with two threads a few fp32 ulps,
#: 1.7e-8 relative, as the kernels may split reductions differently between the runs);
#: ZeRO-1..3 flatten, partition and re-reduce gradients (observed relative differences
#: <= 1e-6 in losses, ~4e-5 in grad norms, absolute weight differences ~2e-5 after three
#: lr=1e-3 Adam steps).
LOSS_RTOL_ZERO0 = 1e-6
LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
#: fp32 sampler (KV-cached decode) vs trainer (padded full forward), as in the torch tests
LOGPROB_ATOL = 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ds_env() -> Iterator[None]:
    """A world of one for in-process backends: env vars set for the module, the process
    group torn down at the end."""
    pytest.importorskip("deepspeed")
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def make_batch(model_dir: Path, *, n: int = 6, seed: int = 0) -> TrainBatch:
    """``n`` random sequences of different lengths, half with positive advantages, with
    on-policy ``old_logprobs`` (the untrained model's) and ``ref_logprobs`` 0.1 below."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        n_p, n_r = 4 + i, 3 + 2 * i
        ids = torch.randint(0, 1000, (n_p + n_r,), generator=g).tolist()
        seqs.append(
            TokenSequence(
                token_ids=array("i", ids),
                action_mask=bytearray(b"\x00" * n_p + b"\x01" * n_r),
                logprobs=array("f", [0.0] * (n_p + n_r)),
                policy_versions=array("i", [-1] * n_p + [0] * n_r),
                transitions=[0],
                prompt_len=n_p,
            )
        )
    batch = pack_sequences(seqs, [1.0 if i % 2 else -0.5 for i in range(n)])
    lp = torch_backend(model_dir).compute_logprobs(batch)  # [T]
    ref = torch.where(batch.action_mask, lp - 0.1, 0.0)  # [T]
    return dataclasses.replace(batch, old_logprobs=lp, ref_logprobs=ref)


def torch_backend(model_dir: Path, **cfg: Any) -> TorchBackend:
    backend = TorchBackend()
    backend.setup(str(model_dir), TorchBackendConfig(device="cpu", dtype="float32", **cfg))
    return backend


def ds_backend(model_dir: Path, **cfg: Any) -> Any:
    from lightning_backends._deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend()
    cfg.setdefault("dtype", "float32")
    backend.setup(str(model_dir), cfg)
    return backend


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)


#: the short run compared across backends: three micro-batches a step, KL on, clipping on
RUN = {"lr": 1e-3, "micro_batch_tokens": 40, "kl_coef": 0.1, "max_grad_norm": 0.5, "seed": 0}
# DeepSpeed keeps no reference policy: the test batches bring their ref_logprobs
DS_RUN = {**RUN, "kl_reference": "batch"}
KEYS = ("loss/policy", "loss/kl", "loss/total", "actor/clip_frac", "actor/logprob_gap")


def test_missing_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "lightning_backends._deepspeed", raising=False)
    monkeypatch.setattr(lightning_backends, "_cache", {})
    with pytest.raises(LookupError, match=r"pip install 'lightning-rl\[deepspeed\]'"):
        lightning_backends.get_backend("deepspeed")


def test_get_backend_and_protocol() -> None:
    pytest.importorskip("deepspeed")
    from lightning_backends._deepspeed import DeepSpeedBackend

    assert lightning_backends.get_backend("deepspeed") is DeepSpeedBackend
    assert isinstance(DeepSpeedBackend(), lightning_backends.Backend)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"zero_stage": 4}, "invalid deepspeed backend config"),
        ({"micro_batch_size": 2}, "invalid deepspeed backend config"),
        ({"deepspeed_config": "/nowhere/ds.json"}, "cannot read the DeepSpeed config"),
        ({"deepspeed_config": {"train_batch_size": 8}}, "train_batch_size"),
        ({"deepspeed_config": {"fp16": {"enabled": True}}}, "fp16"),
        ({"deepspeed_config": {"zero_optimization": {"stage": 7}}}, "stage must be 0, 1, 2 or 3"),
        # DeepSpeed's own parser: an unknown ZeRO key
        (
            {"deepspeed_config": {"zero_optimization": {"stage": 2, "overlap_comms": True}}},
            "DeepSpeed rejects the config",
        ),
    ],
)
def test_bad_config_fails_before_training(
    ds_env: None, tiny_model_dir: Path, cfg: dict[str, Any], match: str
) -> None:
    from lightning_backends._deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend()
    with pytest.raises(ConfigError, match=match):
        backend.setup(str(tiny_model_dir), cfg)
    with pytest.raises(BackendError, match="not set up"):
        backend.train_step(TrainBatch.__new__(TrainBatch))


def test_config_from_a_json_file(ds_env: None, tmp_path: Path) -> None:
    from lightning_backends._deepspeed import DeepSpeedBackendConfig, resolve_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto"}))
    ds = resolve_deepspeed_config(
        DeepSpeedBackendConfig(deepspeed_config=str(path), zero_stage=1, max_grad_norm=None)
    )
    assert ds["zero_optimization"]["stage"] == 2  # the file wins where it sets a key
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"] == {"enabled": False}
    assert ds["train_micro_batch_size_per_gpu"] == 1 and "train_batch_size" not in ds
    # the daemon's TOML form: the DeepSpeed JSON as a nested table
    toml = b"""
zero_stage = 1
lr = 2e-6
[deepspeed_config.zero_optimization]
stage = 3
offload_optimizer = { device = "cpu" }
"""
    cfg = msgspec.toml.decode(toml, type=DeepSpeedBackendConfig)
    ds = resolve_deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}}


@pytest.mark.parametrize("stage", [0, 3])
def test_matches_the_torch_backend(ds_env: None, tiny_model_dir: Path, stage: int) -> None:
    batch = make_batch(tiny_model_dir)
    ref = torch_backend(tiny_model_dir, **RUN)
    ds = ds_backend(tiny_model_dir, zero_stage=stage, export_group_elements=10_000, **DS_RUN)
    if stage == 3:  # built partitioned (zero.Init), and only for the duration of the load
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        embed = ds.model.get_input_embeddings().weight
        assert embed.numel() == 0 and embed.ds_numel == 49152 * 64  # [V, H], partitioned
        assert not is_deepspeed_zero3_enabled()
    rtol = LOSS_RTOL_ZERO0 if stage == 0 else LOSS_RTOL
    for _ in range(3):
        m_ref, m_ds = ref.train_step(batch), ds.train_step(batch)
        assert m_ds["perf/micro_batches"] == m_ref["perf/micro_batches"] == 3
        for key in KEYS:
            assert m_ds[key] == pytest.approx(m_ref[key], rel=rtol, abs=1e-9), key
        assert m_ds["actor/grad_norm"] == pytest.approx(
            m_ref["actor/grad_norm"], rel=GRAD_NORM_RTOL
        )
    assert m_ref["actor/grad_norm"] > RUN["max_grad_norm"]  # clipping was exercised
    assert ds.step == 3 and m_ds["train/step"] == 3.0
    assert max_diff(ds.export_weights(), ref.export_weights()) < WEIGHT_ATOL
    torch.testing.assert_close(
        ds.compute_logprobs(batch), ref.compute_logprobs(batch), atol=WEIGHT_ATOL, rtol=0
    )


async def test_zero3_export_to_engine(
    ds_env: None, engine: TorchEngine, tiny_model_dir: Path
) -> None:
    batch = make_batch(tiny_model_dir)
    ds = ds_backend(
        tiny_model_dir,
        zero_stage=3,
        lr=3e-3,
        export_group_elements=10_000,
        gradient_checkpointing=True,
    )
    ds.train_step(batch)
    exported = ds.export_weights()
    assert exported.keys() == engine.model.state_dict().keys()
    assert exported["lm_head.weight"] is exported["model.embed_tokens.weight"]  # tied: one copy
    assert await engine.update_weights(exported) == 1
    prompt = engine.apply_chat_template([{"role": "user", "content": "Say hi"}])
    out = await engine.generate(
        prompt, SamplingParams(temperature=1.0, max_tokens=10, n=2, seed=3, ignore_eos=True)
    )
    seqs = [
        TokenSequence(
            token_ids=array("i", prompt + c.token_ids),
            action_mask=bytearray(b"\x00" * len(prompt) + b"\x01" * len(c.token_ids)),
            logprobs=array("f", [0.0] * len(prompt) + c.logprobs),
            policy_versions=array("i", [-1] * len(prompt) + [1] * len(c.token_ids)),
            transitions=[0],
            prompt_len=len(prompt),
        )
        for c in out.choices
    ]
    fresh = pack_sequences(seqs, [0.0, 0.0])
    m = fresh.action_mask
    torch.testing.assert_close(
        ds.compute_logprobs(fresh)[m], fresh.old_logprobs[m], atol=LOGPROB_ATOL, rtol=0
    )


def test_bf16_with_deepspeed_optimizer_scheduler_and_checkpoint(
    ds_env: None, tiny_model_dir: Path, tmp_path: Path
) -> None:
    batch = make_batch(tiny_model_dir)
    ds_json = {
        "zero_optimization": {"stage": 1},
        "bf16": {"enabled": True},
        # torch_adam: torch.optim.AdamW, no JIT-built fused Adam
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 1e-3,
                "warmup_max_lr": 1e-2,
                "warmup_num_steps": 4,
                "warmup_type": "linear",
            },
        },
    }
    cfg = {"deepspeed_config": ds_json, "dtype": "bfloat16", "micro_batch_tokens": 64}
    a = ds_backend(tiny_model_dir, **cfg)
    assert a.deepspeed_config["bf16"] == {"enabled": True}
    before = a.compute_logprobs(batch)
    lrs = [a.train_step(batch)["actor/lr"] for _ in range(3)]
    assert 1e-3 <= lrs[0] < lrs[1] < lrs[2] < 1e-2  # the warm-up steps with the optimizer
    assert float((a.compute_logprobs(batch) - before).abs().max()) > 1e-3
    a.save(str(tmp_path / "ckpt"))
    b = ds_backend(tiny_model_dir, **cfg)
    assert max_diff(a.export_weights(), b.export_weights()) > 0
    b.load(str(tmp_path / "ckpt"))
    assert b.step == 3
    assert max_diff(a.export_weights(), b.export_weights()) == 0.0
    # optimizer and scheduler state came back too: the next steps are identical
    m_a, m_b = a.train_step(batch), b.train_step(batch)
    assert m_a["actor/lr"] == m_b["actor/lr"] and m_a["loss/policy"] == m_b["loss/policy"]
    assert max_diff(a.export_weights(), b.export_weights()) == 0.0
    with pytest.raises(BackendError, match="not a deepspeed-backend checkpoint"):
        b.load(str(tmp_path / "nowhere"))


def test_workers_are_refused_rank0_calls(ds_env: None, tiny_model_dir: Path) -> None:
    ds = ds_backend(tiny_model_dir)
    assert ds.is_primary and ds.world_size == 1
    with pytest.raises(BackendError, match="ranks > 0"):
        ds.serve_worker()
    ds.close()
    with pytest.raises(BackendError, match="closed"):
        ds.export_weights()


@pytest.mark.slow
def test_two_process_zero3_matches_the_torch_backend(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    batch = make_batch(tiny_model_dir)
    torch.save(batch, tmp_path / "batch.pt")
    cfg = {
        "zero_stage": 3,
        "dtype": "float32",
        "export_group_elements": 10_000,
        "worker_poll_s": 0.2,
        **DS_RUN,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    script = Path(__file__).with_name("deepspeed_rank.py")
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        args = [
            str(tiny_model_dir),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "cfg.json"),
            str(tmp_path),
            "3",
        ]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    assert result["world_size"] == 2
    ref = torch_backend(tiny_model_dir, **RUN)
    for step, m_ds in enumerate(result["metrics"]):
        m_ref = ref.train_step(batch)
        assert m_ds["perf/micro_batches"] == 3  # two on rank 0, one (+ a zero pass) on rank 1
        for key in KEYS:
            assert m_ds[key] == pytest.approx(m_ref[key], rel=LOSS_RTOL, abs=1e-9), (step, key)
        assert m_ds["actor/grad_norm"] == pytest.approx(
            m_ref["actor/grad_norm"], rel=GRAD_NORM_RTOL
        )
    assert max_diff(result["weights"], ref.export_weights()) < WEIGHT_ATOL
    torch.testing.assert_close(
        result["logprobs"], ref.compute_logprobs(batch), atol=WEIGHT_ATOL, rtol=0
    )
    assert result["reload_same"] and result["step_after_load"] == 3
