"""VerlBackend on the tiny random Llama, for real: verl 0.9's FSDP2 ``TrainingWorker`` on CPU
(fp32, one rank, through the platform shim) against the torch backend on the same batches.

Skipped where verl is not installed (the default environment); ``.ci/stage_verl.sh``
builds a venv with verl and runs this module. Tolerances, all fp32 on CPU, where the two
backends differ only in summation order (padded micro-batches and the chunked log-prob
kernel vs verl's micro-batches and full logits + log-softmax):

- log-probs: ``LOGPROB_ATOL`` = 1e-4 absolute (observed max 2e-6 before any step, 2e-5
  after three AdamW steps at lr 1e-3);
- step metrics (policy loss, KL, grad norm, clip fraction, approx KL): relative 1e-4,
  absolute 1e-6 (observed relative <= 3e-5);
- weights after three AdamW steps at lr 1e-3 (each step moves weights by up to 1e-3):
  ``WEIGHT_ATOL`` = 1e-4 (observed 6e-6 with PPO, 4e-5 with CISPO).
"""

from __future__ import annotations

import os
import warnings
from array import array
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Import-time warnings of verl 0.9.1 (filterwarnings=error would fail the import):
# its engine package warns once per optional engine it cannot import (torchtitan, veomni,
# automodel, mindspeed, megatron), and its engine workers import Ray's state API from the
# deprecated ``ray.experimental`` path.
_VERL_WARNINGS = [
    ("ignore:.* engine is not available:UserWarning", UserWarning),
    ("ignore:Ray state API is no longer experimental:DeprecationWarning", DeprecationWarning),
]
with warnings.catch_warnings():
    for spec, category in _VERL_WARNINGS:
        warnings.filterwarnings("ignore", spec.split(":")[1], category)
    if os.environ.get("LIGHTNING_REQUIRE_VERL") == "1":  # the verl CI stage: never skip
        import verl
    else:
        pytest.importorskip("verl", reason="verl is not installed (run .ci/stage_verl.sh)")
    import torch
    import verl.workers.engine_workers  # noqa: F401  (its import-time warnings, filtered)

import lightning_backends
from lightning_backends import _verl_platform
from lightning_backends._torch import TorchBackend, TorchBackendConfig
from lightning_backends._verl import (
    VERL_REQUIREMENT,
    VerlBackend,
    VerlBackendConfig,
    to_verl_tensordict,
    verl_advantages,
)

from lightning import BackendError
from lightning._sequences import TokenSequence
from lightning.engine.base import SamplingParams
from lightning.engine.torch_engine import TorchEngine
from lightning.training import TrainBatch, pack_sequences

pytestmark = [pytest.mark.filterwarnings(spec) for spec, _ in _VERL_WARNINGS]

LOGPROB_ATOL = 1e-4
METRIC_RTOL = 1e-4
WEIGHT_ATOL = 1e-4
PROMPTS = ["What is 2 + 3?", "Name a colour.", "Say hi", "Count to three, slowly please."]
COMPARED = ("loss/policy", "loss/kl", "actor/grad_norm", "actor/clip_frac", "actor/approx_kl")


async def sample_sequences(
    engine: TorchEngine, *, n: int = 2, max_tokens: int = 8, seed: int = 0
) -> list[TokenSequence]:
    """``n`` temperature-1 samples per prompt, as TokenSequences exactly as sampled."""
    out = []
    for i, text in enumerate(PROMPTS):
        prompt = engine.apply_chat_template([{"role": "user", "content": text}])
        params = SamplingParams(
            temperature=1.0, max_tokens=max_tokens + 2 * i, n=n, seed=seed + i, ignore_eos=True
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


def make_pair(model_dir: Path, **cfg: Any) -> tuple[VerlBackend, TorchBackend]:
    """A verl and a torch backend with the same settings, both fp32 on CPU."""
    verl_only = {k: cfg.pop(k) for k in ("verl_policy_loss", "kl_reference") if k in cfg}
    verl = VerlBackend()
    verl.setup(str(model_dir), VerlBackendConfig(device="cpu", **cfg, **verl_only))
    ref = TorchBackend()
    ref.setup(str(model_dir), TorchBackendConfig(device="cpu", **cfg))
    return verl, ref


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() <= b.keys(), sorted(set(a) - set(b))[:3]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_metrics_close(
    mv: dict[str, float], mt: dict[str, float], keys: tuple[str, ...] = COMPARED
) -> None:
    for key in keys:
        assert mv[key] == pytest.approx(mt[key], rel=METRIC_RTOL, abs=1e-6), key


# ---------------------------------------------------------------------------- the shim


def test_cpu_platform_shim_still_fits_verl() -> None:
    """Fails loudly when a verl upgrade moves an internal the CPU shim relies on."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet
    from verl.plugin.platform import PlatformBase, get_platform
    from verl.utils.device import get_device_id, get_device_name, get_nccl_backend, get_torch_device
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    assert version("verl") in SpecifierSet(_verl_platform.VERIFIED), (
        f"verl {version('verl')} is outside the range the CPU shim was verified for "
        f"({_verl_platform.VERIFIED}); re-verify lightning_backends/_verl_platform.py"
    )
    assert _verl_platform.VERIFIED == VERL_REQUIREMENT
    assert _verl_platform.check_shim() == []
    _verl_platform.install()
    # every abstract method of verl's platform interface is implemented
    assert set(PlatformBase.__abstractmethods__) <= set(vars(_verl_platform.PlatformCPU))
    assert get_platform().device_name == get_device_name() == "cpu"
    assert get_nccl_backend() == "gloo"
    assert get_device_id() == "cpu"  # verl does .to(get_device_id()): an int would be cuda:N
    dev = get_torch_device()
    dev.empty_cache(), dev.synchronize()
    assert dev.max_memory_allocated() == 0
    with pytest.raises(AttributeError, match="CPU platform shim"):
        dev.no_such_call  # noqa: B018
    assert os.environ["VERL_ENGINE_DEVICE"] == "cuda"
    assert _verl_platform.__name__ in os.environ["VERL_USE_EXTERNAL_MODULES"]
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead


def test_platform_reaches_a_fresh_process_through_verls_plugin_hook() -> None:
    """What a Ray worker or subprocess sees: install() exports VERL_PLATFORM and
    VERL_USE_EXTERNAL_MODULES, and verl's own ``__init__`` then imports the shim."""
    import subprocess
    import sys

    _verl_platform.install()
    code = (
        "import sys, verl\n"
        "from verl.utils.device import get_device_name, get_nccl_backend\n"
        "print(get_device_name(), get_nccl_backend(), "
        "'lightning_backends._verl_platform' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["cpu", "gloo", "True"]


def test_verl_version_is_checked_at_setup(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_backends import _verl

    for bad in ("0.8.5", "0.10.0"):
        monkeypatch.setattr(_verl, "version", lambda _name, v=bad: v)
        with pytest.raises(BackendError, match=rf"verl {bad} is installed.*verl>=0\.9,<0\.10"):
            VerlBackend().setup(str(tiny_model_dir), {"device": "cpu"})


# ---------------------------------------------------------------------------- layout


def test_batch_layout_round_trips_through_verls_padding() -> None:
    from verl.workers.utils.padding import no_padding_2_padding

    # a multi-turn sequence (tool tokens inside the response are not actions) and a plain one
    seqs = [
        TokenSequence(
            token_ids=array("i", [5, 6, 7, 8, 9, 10, 11, 12]),
            action_mask=bytearray([0, 0, 1, 1, 0, 0, 1, 1]),
            logprobs=array("f", [0, 0, -1, -2, 0, 0, -3, -4]),
            policy_versions=array("i", [-1, -1, 3, 3, -1, -1, 4, 4]),
            transitions=[0, 1],
            prompt_len=2,
        ),
        TokenSequence(
            token_ids=array("i", [20, 21, 22, 23, 24]),
            action_mask=bytearray([0, 0, 0, 1, 1]),
            logprobs=array("f", [0, 0, 0, -5, -6]),
            policy_versions=array("i", [-1, -1, -1, 2, 2]),
            transitions=[0],
            prompt_len=3,
        ),
    ]
    batch = pack_sequences(seqs, [1.0, -2.0], is_weights=[[0.5] * 8, [2.0] * 5])
    td = to_verl_tensordict(batch, pad_token_id=0, pad_to_multiple=4)
    assert td.batch_size[0] == 4  # two all-masked padding rows for an even dp split
    assert td["input_ids"].values()[:13].tolist() == batch.input_ids.tolist()
    assert td["response_mask"].tolist()[:2] == [[1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert td["response_mask"][2:].sum() == 0
    assert td["old_log_probs"][0].tolist() == [-1, -2, 0, 0, -3, -4]
    assert td["advantages"][1].tolist() == [-2, -2, 0, 0, 0, 0]
    assert td["rollout_is_weights"][1, :2].tolist() == [2.0, 2.0]
    # verl's own un-padding maps "position t scores token t + 1" onto the response tokens
    scores = torch.arange(float(td["input_ids"].values().numel()))  # [n_tokens]
    resp = no_padding_2_padding(scores, td)  # [4, R]
    assert resp[0].tolist() == [1, 2, 3, 4, 5, 6]  # scores of tokens 2..7 of sequence 0
    assert resp[1, :2].tolist() == [10, 11]


# ---------------------------------------------------------------------------- training


async def test_steps_match_the_torch_backend_and_land_in_the_engine(
    engine: TorchEngine, tiny_model_dir: Path
) -> None:
    seqs = await sample_sequences(engine)
    advs = [1.0 if i % 2 == 0 else -1.0 for i in range(len(seqs))]
    batch = pack_sequences(seqs, advs)
    m = batch.action_mask
    # micro_batch_tokens=96: verl splits the batch into several micro-batches
    verl, ref = make_pair(tiny_model_dir, lr=1e-3, micro_batch_tokens=96)
    calls = []
    loss_fn = verl.worker.loss_fn

    def counting_loss_fn(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return loss_fn(*args, **kwargs)

    verl.worker.set_loss_fn(counting_loss_fn)
    init = verl.export_weights()
    lp_v, lp_t = verl.compute_logprobs(batch), ref.compute_logprobs(batch)
    torch.testing.assert_close(lp_v, lp_t, atol=LOGPROB_ATOL, rtol=0)
    # the trainer agrees with the sampler before any step
    torch.testing.assert_close(lp_v[m], batch.old_logprobs[m], atol=LOGPROB_ATOL, rtol=0)
    for step in range(1, 4):
        mv, mt = verl.train_step(batch), ref.train_step(batch)
        assert all(isinstance(v, float) for v in mv.values())
        assert mv["train/step"] == float(step) and mv["actor/skipped"] == 0.0
        assert_metrics_close(mv, mt)
        if step == 1:
            assert mv["actor/logprob_gap"] < LOGPROB_ATOL
            assert len(calls) > 2  # verl split the step into micro-batches (96 tokens each)
            assert mv["perf/micro_batches"] == len(calls)
        exported = verl.export_weights()
        assert all(not t.requires_grad and t.device.type == "cpu" for t in exported.values())
        assert await engine.update_weights(exported) == step
    assert max_diff(exported, init) > 1e-3  # the weights moved
    assert max_diff(exported, ref.export_weights()) < WEIGHT_ATOL
    torch.testing.assert_close(
        verl.compute_logprobs(batch), ref.compute_logprobs(batch), atol=LOGPROB_ATOL, rtol=0
    )
    # samples from the updated engine carry version 3 and match the verl trainer's log-probs
    fresh = pack_sequences(await sample_sequences(engine, seed=100), [0.0] * len(seqs))
    assert fresh.policy_versions.tolist() == [3] * len(seqs)
    fm = fresh.action_mask
    torch.testing.assert_close(
        verl.compute_logprobs(fresh)[fm], fresh.old_logprobs[fm], atol=LOGPROB_ATOL, rtol=0
    )
    # and PPO did what it should: positive-advantage actions became likelier
    after = verl.compute_logprobs(batch)
    sid = torch.repeat_interleave(torch.arange(len(seqs)), batch.cu_seqlens.diff().long())
    pos = torch.tensor([a > 0 for a in advs])[sid] & m
    assert float(after[pos].mean()) > float(lp_v[pos].mean())


@pytest.mark.parametrize(
    ("loss", "agg"), [("cispo", "seq-mean-token-mean"), ("verl:vanilla", "seq-mean-token-sum")]
)
async def test_losses_multi_turn_masks_and_kl_match_the_torch_backend(
    engine: TorchEngine, tiny_model_dir: Path, loss: str, agg: str
) -> None:
    """Our CISPO, and verl's own ``vanilla`` policy loss by name, on a batch with masked
    tool tokens inside responses, a sequence without actions, IS weights and a KL term."""
    seqs = await sample_sequences(engine, n=1, max_tokens=10)
    for s in seqs[:2]:  # tool output in the middle of the response
        mid = s.prompt_len + 3
        s.action_mask[mid : mid + 2] = b"\x00\x00"
    no_action = seqs[3]
    no_action.action_mask[:] = bytes(len(no_action.action_mask))
    batch = pack_sequences(
        seqs,
        [1.0, -0.5, 0.7, 0.0],
        is_weights=[[0.8] * len(s.token_ids) for s in seqs],
        ref_logprobs=[[x - 0.05 for x in s.logprobs] for s in seqs],
    )
    cfg: dict[str, Any] = {"lr": 1e-3, "loss_agg": agg, "kl_coef": 0.1, "kl_reference": "batch",
                           "micro_batch_tokens": 64}
    if loss.startswith("verl:"):
        cfg["verl_policy_loss"] = loss.removeprefix("verl:")
    else:
        cfg["loss"] = loss
    verl, ref = make_pair(tiny_model_dir, **cfg)
    mv, mt = verl.train_step(batch), ref.train_step(batch)
    # verl's own loss reports clip fraction and approx KL as micro-batch means (ours are
    # token-weighted): compare the loss terms and the gradient only
    keys = COMPARED[:3] if "verl_policy_loss" in cfg else COMPARED
    assert_metrics_close(mv, mt, keys)
    if "verl_policy_loss" in cfg:
        assert "verl/actor/pg_clipfrac_lower" in mv  # verl's ppo_loss really ran
    assert mv["loss/kl"] > 0
    torch.testing.assert_close(
        verl.compute_logprobs(batch), ref.compute_logprobs(batch), atol=LOGPROB_ATOL, rtol=0
    )


async def test_ray_worker_group_of_two_cpu_ranks_matches_one_rank(
    engine: TorchEngine, tiny_model_dir: Path
) -> None:
    """The multi-GPU code path on CPU: a Ray worker group of two FSDP2 ranks (gloo), the
    batch split over them (3 sequences: one all-masked padding row), gradients averaged,
    weights gathered on rank 0. Same steps as one in-process rank."""
    import ray

    seqs = (await sample_sequences(engine, n=1))[:3]
    batch = pack_sequences(seqs, [1.0, -1.0, 0.5])
    cfg = {"device": "cpu", "lr": 1e-3, "micro_batch_tokens": 64}
    one = VerlBackend()
    one.setup(str(tiny_model_dir), cfg)
    two = VerlBackend()
    try:
        two.setup(str(tiny_model_dir), {**cfg, "gpus_per_node": 2})
        torch.testing.assert_close(
            two.compute_logprobs(batch), one.compute_logprobs(batch), atol=LOGPROB_ATOL, rtol=0
        )
        for _ in range(2):
            m2, m1 = two.train_step(batch), one.train_step(batch)
            assert_metrics_close(m2, m1)
        assert max_diff(two.export_weights(), one.export_weights()) < WEIGHT_ATOL
        assert two.step == 2
    finally:
        ray.shutdown()


def test_empty_action_batch_skips_the_step(tiny_model_dir: Path) -> None:
    seq = TokenSequence(
        token_ids=array("i", [1, 2, 3]),
        action_mask=bytearray(3),
        logprobs=array("f", [0.0] * 3),
        policy_versions=array("i", [-1] * 3),
        transitions=[0],
        prompt_len=3,
    )
    backend = VerlBackend()
    backend.setup(str(tiny_model_dir), {"device": "cpu", "lr": 1e-2})
    before = backend.export_weights()
    metrics = backend.train_step(pack_sequences([seq], [1.0]))
    assert metrics["actor/skipped"] == 1.0 and backend.step == 0
    assert max_diff(before, backend.export_weights()) == 0.0
    assert backend.compute_logprobs(pack_sequences([seq], [1.0])).tolist() == [0.0] * 3


async def test_save_load_round_trip(
    engine: TorchEngine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    seqs = await sample_sequences(engine, n=1, max_tokens=6)
    batch = pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))])
    a = VerlBackend()
    a.setup(str(tiny_model_dir), {"device": "cpu", "lr": 1e-3})
    a.train_step(batch)
    a.save(str(tmp_path / "ckpt"))
    b = VerlBackend()
    b.setup(str(tiny_model_dir), {"device": "cpu", "lr": 1e-3})
    assert max_diff(a.export_weights(), b.export_weights()) > 0
    b.load(str(tmp_path / "ckpt"))
    assert b.step == a.step == 1
    assert max_diff(a.export_weights(), b.export_weights()) == 0.0
    a.train_step(batch)  # the restored optimizer state continues identically
    b.train_step(batch)
    assert max_diff(a.export_weights(), b.export_weights()) == 0.0
    with pytest.raises(BackendError, match="not a verl-backend checkpoint"):
        b.load(str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- API


def test_get_backend_protocol_and_config(tiny_model_dir: Path) -> None:
    import msgspec

    assert lightning_backends.get_backend("verl") is VerlBackend
    assert isinstance(VerlBackend(), lightning_backends.Backend)
    with pytest.raises(BackendError, match="setup"):
        VerlBackend().train_step(TrainBatch.__new__(TrainBatch))
    with pytest.raises(ValueError, match="invalid verl backend config"):
        VerlBackend().setup(str(tiny_model_dir), {"micro_batch_size": 3})
    with pytest.raises(ValueError, match="Unsupported loss mode: nope"):
        VerlBackend().setup(str(tiny_model_dir), {"device": "cpu", "verl_policy_loss": "nope"})
    with pytest.raises(ValueError, match="float32 only"):
        VerlBackendConfig(device="cpu", dtype="bfloat16")
    cfg = msgspec.toml.decode(
        b'lr = 1e-5\nverl_policy_loss = "gspo"\nnnodes = 2\ngpus_per_node = 8\n',
        type=VerlBackendConfig,
    )
    assert cfg.world_size == 16 and cfg.verl_policy_loss == "gspo"


def test_verl_advantage_estimators_by_name() -> None:
    rewards = torch.zeros(4, 3)  # [b, R]
    rewards[:, -1] = torch.tensor([1.0, 0.0, 2.0, 2.0])
    mask = torch.ones(4, 3)
    adv = verl_advantages("grpo", rewards, mask, ["a", "a", "b", "b"])  # [b, R]
    assert adv.shape == (4, 3)
    assert float(adv[0, 0]) > 0 > float(adv[1, 0])
    assert torch.allclose(adv[2:], torch.zeros(2, 3))  # a group with equal rewards: no signal


def test_gpu_example_loop_smoke(tmp_path: Path) -> None:
    """examples/verl_gpu/train.py's loop at tiny scale: TorchEngine instead of vLLM, CPU."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "examples" / "verl_gpu" / "train.py"
    spec = importlib.util.spec_from_file_location("verl_gpu_train", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        rows = module.main(["--smoke", "--csv", str(tmp_path / "rows.csv")])
    finally:
        sys.modules.pop(spec.name, None)
    assert [r["policy_version"] for r in rows] == [1.0, 2.0]
    assert all(r["actor/logprob_gap"] < LOGPROB_ATOL for r in rows)
    assert rows[0]["actor/grad_norm"] > 0
    assert (tmp_path / "rows.csv").read_text().count("\n") == 3


@pytest.mark.parametrize("ours, theirs", [("grpo", "grpo"), ("rloo", "rloo")])
def test_batcher_uses_verl_estimators_by_name(ours: str, theirs: str) -> None:
    """``estimator="verl:<name>"``: verl's outcome estimator on the batcher's groups gives
    the advantages of our own estimator of the same name."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from test_batcher import action_advantages, traj

    from lightning.training.batcher import Batcher, BatcherConfig

    out = {}
    for name in (ours, f"verl:{theirs}"):
        b = Batcher(BatcherConfig(group_size=4, batch_size=8, credit="final", estimator=name))
        for g, rewards in (("a", (1.0, 0.0, 0.0, 1.0)), ("b", (0.5, 2.0, 0.0, 1.0))):
            for r in rewards:
                b.add(traj(r, group=g))
        out[name] = [a[0] for a in action_advantages(b.next_batch(0).batch)]
    assert out[f"verl:{theirs}"] == pytest.approx(out[ours], abs=1e-4)
