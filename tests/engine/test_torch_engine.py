"""TorchEngine on the tiny random model (CPU, fp32).

Tolerances: fp32 on CPU. Batched and unbatched forwards use different matmul shapes, so
logits differ in the last bits; sampled token ids must be identical and log-probs agree
within 1e-4 (absolute). Against a no-cache full forward the same tolerance applies.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import pytest
import torch

from lightning.engine import (
    ContextLengthError,
    EngineClosedError,
    GenerationResult,
    InferenceEngine,
    InvalidRequestError,
    SamplingParams,
    WeightUpdateError,
)
from lightning.engine.torch_engine import TorchEngine

pytestmark = pytest.mark.anyio

ATOL = 1e-4


async def gather(
    *aws: Awaitable[Any], delays: Sequence[float] | None = None, return_exceptions: bool = False
) -> list[Any]:
    """Run awaitables concurrently (optionally starting each after a delay), in order."""
    out: list[Any] = [None] * len(aws)

    async def run(i: int, aw: Awaitable[Any]) -> None:
        if delays is not None:
            await anyio.sleep(delays[i])
        try:
            out[i] = await aw
        except Exception as exc:
            if not return_exceptions:
                raise
            out[i] = exc

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(aws):
            tg.start_soon(run, i, aw)
    return out


def prompts(engine: TorchEngine, count: int) -> list[list[int]]:
    """Chat prompts of different lengths."""
    return [
        engine.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": "Tell me about number " + " ".join([str(i)] * (1 + 3 * i)),
                }
            ]
        )
        for i in range(count)
    ]


def reference_logprobs(
    model: Any, prompt: list[int], tokens: list[int], temperature: float, top_k: int = 0
) -> torch.Tensor:
    """Processed log-probs of ``tokens`` from one full forward without a KV cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()  # [L, V]
    logits = logits[len(prompt) - 1 : -1] / (temperature or 1.0)  # predicts each token
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def test_satisfies_protocol(make_engine: Callable[..., TorchEngine]) -> None:
    assert isinstance(make_engine(), InferenceEngine)


async def test_concurrent_requests_are_batched(engine: TorchEngine) -> None:
    ps = prompts(engine, 8)
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=1, ignore_eos=True)
    before = engine.stats
    results = await gather(*(engine.generate(p, params) for p in ps))
    concurrent = engine.stats
    forwards = concurrent.forward_calls - before.forward_calls
    assert all(len(r.choices[0].token_ids) == 16 for r in results)
    # One prefill (all 8 arrive together) + 15 decode steps over all 8 rows.
    assert forwards <= 16 + 2, concurrent
    assert concurrent.max_decode_batch == 8

    for p in ps:
        await engine.generate(p, params)
    sequential = engine.stats.forward_calls - concurrent.forward_calls
    assert sequential == 8 * 16
    assert forwards * 6 < sequential


async def test_seeded_and_greedy_results_do_not_depend_on_the_batch(
    engine: TorchEngine,
) -> None:
    ps = prompts(engine, 6)
    target = ps[2]
    sampled = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone_s = await engine.generate(target, sampled)
    alone_g = await engine.generate(target, greedy)

    # Others join before, with and after the target; some finish early (rows move).
    others = [
        engine.generate(p, SamplingParams(max_tokens=5 + 7 * i, seed=i, ignore_eos=True))
        for i, p in enumerate(ps)
    ]
    results = await gather(
        *others,
        engine.generate(target, sampled),
        engine.generate(target, greedy),
        delays=[0, 0, 0.01, 0.02, 0, 0.05, 0.01, 0.03],
    )
    batched_s, batched_g = results[-2], results[-1]
    assert engine.stats.max_decode_batch >= 4
    for alone, batched in ((alone_s, batched_s), (alone_g, batched_g)):
        a, b = alone.choices[0], batched.choices[0]
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(
            torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=ATOL, rtol=0
        )
        assert a.text == b.text


async def test_logprobs_match_a_full_forward_without_cache(engine: TorchEngine) -> None:
    """The key correctness check: KV-cached, batched decoding (with rows joining, leaving
    and moving) returns log-softmax(model(prompt + response).logits / T) at each token."""
    ps = prompts(engine, 7)
    cases = [
        SamplingParams(max_tokens=30, temperature=0.7, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=1.3, seed=8, ignore_eos=True),
        SamplingParams(max_tokens=25, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1.0, seed=9, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=1.0, top_k=20, seed=10, ignore_eos=True),
        SamplingParams(max_tokens=18, temperature=0.5, seed=11, n=3, ignore_eos=True),
        SamplingParams(max_tokens=33, temperature=0.9, seed=12, ignore_eos=True),
        # Grows the slab past its initial 256 columns while others run.
        SamplingParams(max_tokens=300, temperature=1.0, seed=13, ignore_eos=True),
    ]
    ps.append(ps[0])
    results: list[GenerationResult] = await gather(
        *(engine.generate(p, c) for p, c in zip(ps, cases)),
        delays=[0, 0.01, 0, 0.03, 0.02, 0.05, 0.08, 0.01],
    )
    assert engine.stats.prefill_forwards >= 2  # some joined a running batch
    for prompt, params, result in zip(ps, cases, results):
        assert result.prompt_token_ids == prompt
        assert len(result.choices) == params.n
        for choice in result.choices:
            assert len(choice.token_ids) == params.max_tokens
            expected = reference_logprobs(
                engine.model, prompt, choice.token_ids, params.temperature, params.top_k
            )
            torch.testing.assert_close(torch.tensor(choice.logprobs), expected, atol=ATOL, rtol=0)
            if params.temperature == 0:
                # Greedy: every token is the argmax of the full-forward logits.
                with torch.no_grad():
                    full = engine.model(torch.tensor([prompt + choice.token_ids])).logits[0]
                argmax = full[len(prompt) - 1 : -1].argmax(-1).tolist()
                assert argmax == choice.token_ids


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"),
    [
        (0.5, 0.9, 0),  # peaked: the nucleus is among the 1024 most likely tokens
        (3.0, 0.2, 0),  # flatter: among the 8192 most likely (second tier)
        (10.0, 0.9, 0),  # nearly uniform: wider than any tier, full sort
        (1.0, 0.7, 300),  # top-k first, then top-p over the renormalised top-k
    ],
)
async def test_top_p_logprobs_are_renormalised_over_the_nucleus(
    engine: TorchEngine, temperature: float, top_p: float, top_k: int
) -> None:
    prompt = prompts(engine, 1)[0]
    params = SamplingParams(
        max_tokens=20, temperature=temperature, top_p=top_p, top_k=top_k, seed=3, ignore_eos=True
    )
    choice = (await engine.generate(prompt, params)).choices[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt + choice.token_ids])).logits[0].float()
    scaled = logits[len(prompt) - 1 : -1] / temperature
    widths = []
    for pos, token in enumerate(choice.token_ids):
        row = scaled[pos]
        if top_k:
            row = row.masked_fill(row < row.topk(top_k).values[-1], -math.inf)
        logp = torch.log_softmax(row, dim=-1)
        probs, order = logp.exp().sort(descending=True)
        before = probs.cumsum(0) - probs
        kept = order[before < top_p]
        widths.append(kept.numel())
        assert token in kept.tolist()
        mass = probs[: kept.numel()].sum().log()
        assert choice.logprobs[pos] == pytest.approx(float(logp[token] - mass), abs=ATOL)
    tier = {0.5: (1, 1024), 3.0: (1024, 8192), 10.0: (8192, 49152)}.get(temperature)
    if tier is not None:
        assert tier[0] < max(widths) <= tier[1] and min(widths) > tier[0] // 2, widths


async def test_sampling_follows_the_processed_distribution(engine: TorchEngine) -> None:
    """Chi-square check of the sampler: 320 draws from a top-3 distribution."""
    prompt = prompts(engine, 1)[0]
    params = [SamplingParams(max_tokens=1, top_k=3, n=32, seed=s) for s in range(10)]
    results = await gather(*(engine.generate(prompt, p) for p in params))
    draws = [c.token_ids[0] for r in results for c in r.choices]
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt])).logits[0, -1].float()
    top = logits.topk(3)
    probs = torch.softmax(top.values, 0)
    assert set(draws) <= set(top.indices.tolist())
    counts = torch.tensor([draws.count(t) for t in top.indices.tolist()], dtype=torch.float)
    expected = probs * len(draws)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, expected)  # p = 0.001 with 2 degrees of freedom
    for r in results:
        for c in r.choices:
            (token,) = c.token_ids
            rank = top.indices.tolist().index(token)
            assert c.logprobs[0] == pytest.approx(float(probs[rank].log()), abs=ATOL)


async def test_queueing_beyond_max_num_seqs_and_prefill_budget(
    make_engine: Callable[..., TorchEngine],
) -> None:
    async with make_engine(max_num_seqs=3, max_prefill_tokens=71, policy_version=7) as engine:
        ps = prompts(engine, 7)
        assert [len(p) for p in ps] == [36, 42, 48, 54, 60, 66, 72]
        params = [SamplingParams(max_tokens=4 + 3 * i, seed=i, ignore_eos=True) for i in range(7)]
        results = await gather(*(engine.generate(p, c) for p, c in zip(ps, params)))
        stats = engine.stats
        alone = [await engine.generate(p, c) for p, c in zip(ps, params)]
    assert stats.max_decode_batch == 3
    # 71 tokens fit no two prompts (2 x 36), and the 72-token one is admitted alone anyway.
    assert stats.prefill_forwards == 7
    assert stats.running == 0 and stats.waiting == 0 and stats.requests_finished == 7
    for r, a, c in zip(results, alone, params):
        assert r.policy_version == 7
        assert r.choices[0].token_ids == a.choices[0].token_ids
        assert len(r.choices[0].token_ids) == c.max_tokens


async def test_n_choices_share_one_prefill(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    before = engine.stats
    result = await engine.generate(prompt, SamplingParams(max_tokens=8, n=4, seed=5))
    after = engine.stats
    assert after.prefill_forwards - before.prefill_forwards == 1
    assert after.prompt_tokens - before.prompt_tokens == len(prompt)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in result.choices}) == 4
    single = await engine.generate(prompt, SamplingParams(max_tokens=8, seed=5))
    assert single.choices[0].token_ids == result.choices[0].token_ids


async def test_unseeded_requests_differ(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    a, b = await gather(*(engine.generate(prompt, SamplingParams(max_tokens=8)) for _ in range(2)))
    assert a.choices[0].token_ids != b.choices[0].token_ids


async def test_stop_strings_cut_the_text_and_keep_the_tokens(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    base = SamplingParams(max_tokens=40, temperature=0.0)
    full = (await engine.generate(prompt, base)).choices[0]
    assert full.finish_reason == "length"
    assert full.text == engine.decode(full.token_ids)
    assert len(full.text) > 30
    stop = full.text[20:24]
    cut = full.text.find(stop)

    stopped = (
        await engine.generate(prompt, SamplingParams(**{**_fields(base), "stop": ("zzzq", stop)}))
    ).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.stop_reason == stop
    assert stopped.text == full.text[:cut]
    # Token ids run up to the token that completed the stop string, and no further.
    n = len(stopped.token_ids)
    assert stopped.token_ids == full.token_ids[:n]
    assert stop in engine.decode(full.token_ids[:n])
    assert stop not in engine.decode(full.token_ids[: n - 1])
    assert len(stopped.logprobs) == n

    # Streaming never leaks text past the stop string.
    pieces = []
    async with aclosing(
        engine.generate_stream(prompt, SamplingParams(**{**_fields(base), "stop": (stop,)}))
    ) as s:
        async for delta in s:
            pieces.append(delta.text)
    assert "".join(pieces) == full.text[:cut]


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {f: getattr(params, f) for f in params.__struct_fields__}


async def test_stop_token_ids_and_eos(
    make_engine: Callable[..., TorchEngine], load_tiny_model: Any
) -> None:
    async with make_engine() as engine:
        prompt = prompts(engine, 1)[0]
        full = (
            await engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0))
        ).choices[0]
    stop_id = full.token_ids[6]
    first = full.token_ids.index(stop_id)

    # The tiny model never samples EOS by itself: declare a frequent token to be EOS.
    model = load_tiny_model()
    model.generation_config.eos_token_id = stop_id
    async with make_engine(model) as engine:
        assert stop_id in engine.eos_token_ids
        greedy = SamplingParams(max_tokens=30, temperature=0)
        by_id = (
            await engine.generate(
                prompt,
                SamplingParams(
                    max_tokens=30, temperature=0, stop_token_ids=(stop_id,), ignore_eos=True
                ),
            )
        ).choices[0]
        by_eos = (await engine.generate(prompt, greedy)).choices[0]
        ignored = (
            await engine.generate(
                prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
            )
        ).choices[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    assert by_id.token_ids == full.token_ids[: first + 1]
    assert by_eos.finish_reason == "stop" and by_eos.stop_reason is None
    assert by_eos.token_ids == full.token_ids[: first + 1]
    assert by_eos.text == engine.decode(full.token_ids[:first])
    assert ignored.token_ids == full.token_ids and ignored.finish_reason == "length"


async def test_max_tokens_and_context_limits(make_engine: Callable[..., TorchEngine]) -> None:
    async with make_engine(max_model_len=64) as engine:
        prompt = prompts(engine, 1)[0]
        assert 20 < len(prompt) < 60
        r = await engine.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True))
        assert len(r.choices[0].token_ids) == 5 and r.choices[0].finish_reason == "length"
        # max_tokens=None fills the context exactly.
        r = await engine.generate(prompt, SamplingParams(max_tokens=None, ignore_eos=True))
        assert len(prompt) + len(r.choices[0].token_ids) == 64
        assert r.choices[0].finish_reason == "length"

        with pytest.raises(ContextLengthError, match="max_model_len 64") as info:
            await engine.generate(prompt, SamplingParams(max_tokens=64 - len(prompt) + 1))
        assert isinstance(info.value, ValueError)
        assert info.value.limit == 64
        assert info.value.requested == 65
        with pytest.raises(ContextLengthError, match="max_model_len is 64"):
            await engine.generate(list(range(100, 164)), SamplingParams(max_tokens=None))
        with pytest.raises(InvalidRequestError, match="empty"):
            await engine.generate([], SamplingParams())
        with pytest.raises(InvalidRequestError, match="out of range"):
            await engine.generate([1, 10**6], SamplingParams())
        with pytest.raises(InvalidRequestError, match="max_num_seqs"):
            await engine.generate(prompt, SamplingParams(n=33, max_tokens=1))
        # The engine keeps serving after rejected requests.
        r = await engine.generate(prompt, SamplingParams(max_tokens=2))
        assert len(r.choices[0].token_ids) == 2


def test_sampling_params_are_validated() -> None:
    for bad in (
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -2},
        {"n": 0},
        {"max_tokens": 0},
        {"stop": ("",)},
        {"top_logprobs": -1},
        {"seed": -1},
    ):
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)


async def test_streaming_yields_the_same_tokens_as_generate(engine: TorchEngine) -> None:
    prompt = prompts(engine, 2)[1]
    params = SamplingParams(max_tokens=20, seed=21, n=2, top_logprobs=3, ignore_eos=True)
    result = await engine.generate(prompt, params)
    deltas: dict[int, list[Any]] = {0: [], 1: []}
    async with aclosing(engine.generate_stream(prompt, params)) as stream:
        async for delta in stream:
            deltas[delta.index].append(delta)
    for choice in result.choices:
        ds = deltas[choice.index]
        assert len(ds) == 20  # one delta per sampled token
        assert [t for d in ds for t in d.token_ids] == choice.token_ids
        assert [x for d in ds for x in d.logprobs] == choice.logprobs
        assert "".join(d.text for d in ds) == choice.text
        assert [d.finish_reason for d in ds] == [None] * 19 + ["length"]
        assert all(d.policy_version == 0 for d in ds)


async def test_incremental_text_equals_full_decode(
    engine: TorchEngine, tiny_tokenizer: Any
) -> None:
    """Random tokens include partial UTF-8 byte tokens: held back, then completed."""
    prompt = prompts(engine, 1)[0]
    params = SamplingParams(max_tokens=80, temperature=2.0, n=8, seed=17, ignore_eos=True)
    result = await engine.generate(prompt, params)
    broken = 0
    for c in result.choices:
        assert c.text == tiny_tokenizer.decode(c.token_ids, skip_special_tokens=True)
        broken += sum("\ufffd" in tiny_tokenizer.decode([t]) for t in c.token_ids)
    assert broken > 0  # the check above did cover incomplete UTF-8 pieces


async def test_top_logprobs(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    r = await engine.generate(prompt, SamplingParams(max_tokens=6, top_logprobs=5, temperature=0))
    c = r.choices[0]
    assert c.top_logprobs is not None and len(c.top_logprobs) == 6
    for token, lp, top in zip(c.token_ids, c.logprobs, c.top_logprobs):
        assert len(top) == 5
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert top[0] == (token, pytest.approx(lp))  # greedy picks the most likely
    r = await engine.generate(prompt, SamplingParams(max_tokens=2))
    assert r.choices[0].top_logprobs is None


async def test_weight_update_bumps_version_and_changes_outputs(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    before = await engine.generate(prompt, greedy)
    assert before.policy_version == 0 == engine.policy_version

    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    new = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen)
        for k, v in state.items()
        if "layers.1." in k
    }
    assert await engine.update_weights(new) == 1
    after = await engine.generate(prompt, greedy)
    assert after.policy_version == 1 and after.choices[0].policy_version == 1
    assert after.choices[0].token_ids != before.choices[0].token_ids
    # The served log-probs are those of the new weights.
    expected = reference_logprobs(engine.model, prompt, after.choices[0].token_ids, 0)
    torch.testing.assert_close(torch.tensor(after.choices[0].logprobs), expected, atol=ATOL, rtol=0)

    # A function can change the model in place; explicit versions must increase.
    assert await engine.update_weights(lambda m: m.load_state_dict(state), version=5) == 5
    again = await engine.generate(prompt, greedy)
    assert again.choices[0].token_ids == before.choices[0].token_ids
    assert again.policy_version == 5
    with pytest.raises(WeightUpdateError, match="not newer"):
        await engine.update_weights(state, version=5)


async def test_bad_weights_change_nothing(engine: TorchEngine) -> None:
    prompt = prompts(engine, 1)[0]
    greedy = SamplingParams(max_tokens=8, temperature=0)
    before = await engine.generate(prompt, greedy)
    good = engine.model.state_dict()["model.norm.weight"] * 2
    with pytest.raises(WeightUpdateError, match="not in the model"):
        await engine.update_weights({"model.norm.weight": good, "module.model.norm.weight": good})
    with pytest.raises(WeightUpdateError, match="shapes"):
        await engine.update_weights(
            {"model.norm.weight": good, "lm_head.weight": torch.zeros(3, 3)}
        )

    def broken(model: Any) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(WeightUpdateError, match="disk full"):
        await engine.update_weights(broken)
    assert engine.policy_version == 0
    after = await engine.generate(prompt, greedy)
    assert after.choices[0].token_ids == before.choices[0].token_ids


async def test_in_flight_requests_finish_on_the_old_weights(
    make_engine: Callable[..., TorchEngine], load_tiny_model: Any
) -> None:
    """An update during generation waits for running requests, which keep the old
    weights for every token; requests arriving meanwhile start on the new weights."""
    new_model = load_tiny_model()
    with torch.no_grad():
        for p in new_model.model.layers[0].parameters():
            p.mul_(-1.0)
    new_weights = {k: v.clone() for k, v in new_model.state_dict().items()}
    ps = prompts(make_engine(), 2)
    long = SamplingParams(max_tokens=60, temperature=0.9, seed=99, ignore_eos=True)
    late = SamplingParams(max_tokens=10, temperature=0.9, seed=98, ignore_eos=True)

    # Reference runs, each on one set of weights only.
    async with make_engine() as ref_old:
        expect_old = await ref_old.generate(ps[0], long)
    async with make_engine(new_model) as ref_new:
        expect_new = await ref_new.generate(ps[1], late)

    events: list[str] = []
    async with make_engine() as engine:
        streamed: list[Any] = []
        started = anyio.Event()

        async def in_flight() -> None:
            async with aclosing(engine.generate_stream(ps[0], long)) as stream:
                async for delta in stream:
                    streamed.append(delta)
                    if len(streamed) == 3:
                        started.set()
            events.append("in_flight_done")

        async def update() -> None:
            await started.wait()
            version = await engine.update_weights(new_weights)
            # The in-flight request was complete before the swap.
            assert engine.stats.requests_finished == 1
            events.append(f"updated:{version}")

        late_result: list[GenerationResult] = []

        async def late_request() -> None:
            await started.wait()
            await anyio.sleep(0.01)  # the update is pending by now
            late_result.append(await engine.generate(ps[1], late))
            events.append("late_done")

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            tg.start_soon(update)
            tg.start_soon(late_request)

    assert sorted(events) == ["in_flight_done", "late_done", "updated:1"]
    assert events.index("updated:1") < events.index("late_done")
    tokens = [t for d in streamed for t in d.token_ids]
    assert tokens == expect_old.choices[0].token_ids
    assert {d.policy_version for d in streamed} == {0}
    torch.testing.assert_close(
        torch.tensor([x for d in streamed for x in d.logprobs]),
        torch.tensor(expect_old.choices[0].logprobs),
        atol=ATOL,
        rtol=0,
    )
    (late_r,) = late_result
    assert late_r.policy_version == 1
    assert late_r.choices[0].token_ids == expect_new.choices[0].token_ids


async def test_cancelled_requests_leave_the_batch(engine: TorchEngine) -> None:
    ps = prompts(engine, 3)
    keep = SamplingParams(max_tokens=30, seed=1, ignore_eos=True)
    alone = await engine.generate(ps[0], keep)

    async def cancelled() -> None:
        with anyio.move_on_after(0.05):
            await engine.generate(ps[1], SamplingParams(max_tokens=400, ignore_eos=True))

    async def abandoned_stream() -> None:
        async with aclosing(
            engine.generate_stream(ps[2], SamplingParams(max_tokens=400, ignore_eos=True))
        ) as s:
            async for _ in s:
                break

    results = await gather(engine.generate(ps[0], keep), cancelled(), abandoned_stream())
    assert results[0].choices[0].token_ids == alone.choices[0].token_ids
    # Far fewer than 400 decode steps ran: the cancelled rows were dropped.
    assert engine.stats.decode_forwards < 200
    r = await engine.generate(ps[1], SamplingParams(max_tokens=3))
    assert len(r.choices[0].token_ids) == 3


async def test_event_loop_stays_responsive(make_engine: Callable[..., TorchEngine]) -> None:
    """Forwards run in a worker thread: a slow forward (0.3 s here) does not stall the loop."""
    import time

    async with make_engine() as engine:
        ps = prompts(engine, 2)
        model = engine.model
        real_forward = model.forward

        def slow(*args: Any, **kwargs: Any) -> Any:
            time.sleep(0.3)
            return real_forward(*args, **kwargs)

        model.forward = slow
        lags: list[float] = []
        done = anyio.Event()

        async def ticker() -> None:
            while not done.is_set():
                t0 = anyio.current_time()
                await anyio.sleep(0.01)
                lags.append(anyio.current_time() - t0 - 0.01)

        async def work() -> None:
            await gather(*(engine.generate(p, SamplingParams(max_tokens=4)) for p in ps))
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            tg.start_soon(work)
    assert engine.stats.forward_calls == 4  # one prefill, three decode steps
    assert len(lags) > 50
    assert max(lags) < 0.15


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    make_engine: Callable[..., TorchEngine],
) -> None:
    from lightning.engine import EngineError

    async with make_engine() as engine:
        ps = prompts(engine, 2)
        model = engine.model
        real_forward = model.forward
        calls = 0

        def flaky(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 5:
                raise RuntimeError("out of memory")
            return real_forward(*args, **kwargs)

        model.forward = flaky
        results = await gather(
            *(engine.generate(p, SamplingParams(max_tokens=10, ignore_eos=True)) for p in ps),
            return_exceptions=True,
        )
        assert all(isinstance(r, EngineError) for r in results), results
        assert "out of memory" in str(results[0]) and isinstance(results[0].__cause__, RuntimeError)
        r = await engine.generate(ps[0], SamplingParams(max_tokens=10, ignore_eos=True))
        assert len(r.choices[0].token_ids) == 10


async def test_lifecycle(make_engine: Callable[..., TorchEngine]) -> None:
    engine = make_engine()
    with pytest.raises(EngineClosedError, match="not running"):
        await engine.generate([1, 2, 3])
    async with anyio.create_task_group() as tg:
        await tg.start(engine.serve)
        prompt = prompts(engine, 1)[0]
        r = await engine.generate(prompt, SamplingParams(max_tokens=2))
        assert len(r.choices[0].token_ids) == 2
        pending: list[BaseException] = []

        async def doomed() -> None:
            try:
                await engine.generate(prompt, SamplingParams(max_tokens=400, ignore_eos=True))
            except EngineClosedError as exc:
                pending.append(exc)

        tg.start_soon(doomed)
        await anyio.sleep(0.05)
        await engine.aclose()
    assert len(pending) == 1
    with pytest.raises(EngineClosedError, match="closed"):
        await engine.generate(prompt)
    with pytest.raises(EngineClosedError):
        await engine.update_weights({})


async def test_chat_template_renders_tools(engine: TorchEngine, tiny_tokenizer: Any) -> None:
    from lightning.models import SMOLLM2_CHAT_TEMPLATE

    tools = [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate an arithmetic expression.",
                "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "What is 2+3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expr": "2+3"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    ids = engine.apply_chat_template(messages, tools=tools)
    text = engine.tokenizer.decode(ids)
    assert "<tools>\n" + '{"type": "function", "function": {"name": "calculator"' in text
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expr": "2+3"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert ids[-4:] == engine.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)

    # Without tools the template renders exactly what SmolLM2's own template renders.
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ours = engine.apply_chat_template(plain)
    theirs = tiny_tokenizer.apply_chat_template(
        plain, chat_template=SMOLLM2_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert engine.tokenizer.decode(ours) == theirs

    # A template that cannot render tools refuses them instead of dropping them.
    original = engine.tokenizer.chat_template
    try:
        engine.tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        with pytest.raises(InvalidRequestError, match="does not render tools"):
            engine.apply_chat_template(messages[:1], tools=tools)
    finally:
        engine.tokenizer.chat_template = original


@pytest.mark.slow
async def test_smollm2_answers_coherently() -> None:
    from lightning.models import default_model_path

    path = await anyio.to_thread.run_sync(default_model_path)
    engine = await anyio.to_thread.run_sync(
        lambda: TorchEngine.from_pretrained(path, max_model_len=256)
    )
    async with engine:
        ids = engine.apply_chat_template([{"role": "user", "content": "What is 2+3?"}])
        r = await engine.generate(ids, SamplingParams(temperature=0, max_tokens=24))
        c = r.choices[0]
        assert "5" in c.text, c.text
        assert c.finish_reason == "stop"  # SmolLM2 ends its turn with <|im_end|>
        assert c.token_ids[-1] in engine.eos_token_ids
        expected = reference_logprobs(engine.model, ids, c.token_ids, 0)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=ATOL, rtol=0)
