"""Throughput of TorchEngine on SmolLM2-135M-Instruct (CPU, fp32).

    OMP_NUM_THREADS=2 python bench/bench_engine.py            # ~3 minutes on 2 cores

Providers (same 16 chat prompts, greedy, exactly ``--tokens`` new tokens each):
- ``engine_concurrent``: ``--batch`` concurrent ``generate`` calls on one TorchEngine
  (continuous batching: one forward per step for all of them).
- ``hf_generate``: transformers ``model.generate`` on the same prompts as one left-padded
  batch (static batching, the usual offline baseline).
- ``engine_sequential``: the same requests awaited one after another (no batching), on
  ``--sequential`` of the prompts.
- ``engine_concurrent_sampled``: as ``engine_concurrent`` with temperature 1, top-p 0.9
  (per-request generators and masks: the sampling overhead).

Metrics: generated tokens per second of wall time and per second of process CPU time,
plus the engine's speed-up over each baseline in the same run. Every measurement is a
warm-up run and one timed run in a fresh subprocess (``--repeat`` rounds, interleaved,
medians reported). Fresh processes matter on CPU: once two threads have run torch ops
(the engine's worker thread and, say, ``generate`` on the main thread), libgomp has more
OpenMP threads than cores and throttles its spin-waiting, which slows the next runs by
~25% on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import torch

from bench.harness import BenchResult, record, time_cpu
from lightning.engine import SamplingParams
from lightning.engine.torch_engine import TorchEngine
from lightning.models import default_model_path

QUESTIONS = [
    "What is 2+3?", "Name three colors.", "Write a haiku about the sea.",
    "What is the capital of France?", "Explain gravity in one sentence.",
    "List some fruits.", "How do birds fly?", "Translate 'hello' into Spanish.",
    "What is a prime number?", "Give me a tip for sleeping well.",
    "Why is the sky blue?", "Describe a cat.", "What is Python?",
    "Count from one to five.", "What do plants need to grow?", "Tell me a fun fact.",
]  # fmt: skip


def _setup(threads: int) -> tuple[TorchEngine, list[list[int]]]:
    torch.set_num_threads(threads)
    engine = TorchEngine.from_pretrained(default_model_path(), max_model_len=1024)
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    return engine, prompts


def _engine_run(
    template: TorchEngine, prompts: list[list[int]], params: SamplingParams, concurrent: bool
) -> int:
    engine = TorchEngine(template.model, template.tokenizer, max_model_len=template.max_model_len)
    produced = 0

    async def one(p: list[int]) -> None:
        nonlocal produced
        r = await engine.generate(p, params)
        produced += len(r.choices[0].token_ids)

    async def run() -> None:
        async with engine:
            if concurrent:
                async with anyio.create_task_group() as tg:
                    for p in prompts:
                        tg.start_soon(one, p)
            else:
                for p in prompts:
                    await one(p)

    anyio.run(run)
    return produced


def _hf_run(model: Any, tokenizer: Any, prompts: list[list[int]], tokens: int) -> int:
    """transformers ``generate`` on all prompts as one left-padded batch (greedy)."""
    longest = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    return (out.shape[1] - longest) * len(prompts)


def _providers(
    args: argparse.Namespace, engine: TorchEngine, prompts: list[list[int]], tokens: int
) -> dict[str, tuple[Callable[[], int], int]]:
    prompts = (prompts * (args.batch // len(prompts) + 1))[: args.batch]
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=tokens, temperature=1.0, top_p=0.9, seed=0, ignore_eos=True)
    seq = prompts[: args.sequential]
    return {
        "engine_concurrent": (lambda: _engine_run(engine, prompts, greedy, True), len(prompts)),
        "hf_generate": (
            lambda: _hf_run(engine.model, engine.tokenizer, prompts, tokens),
            len(prompts),
        ),
        "engine_sequential": (lambda: _engine_run(engine, seq, greedy, False), len(seq)),
        "engine_concurrent_sampled": (
            lambda: _engine_run(engine, prompts, sampled, True),
            len(prompts),
        ),
    }


def _child(args: argparse.Namespace) -> None:
    """Run one provider in this fresh process: a short warm-up run, then one timed run."""
    engine, prompts = _setup(args.threads)
    warm, _ = _providers(args, engine, prompts, 8)[args.provider]
    fn, requests = _providers(args, engine, prompts, args.tokens)[args.provider]
    warm()
    cpu0 = time.process_time()
    produced = 0

    def timed() -> None:
        nonlocal produced
        produced = fn()

    wall = time_cpu(timed, repeat=1, warmup=0)["min"]
    cpu = time.process_time() - cpu0
    assert produced == requests * args.tokens, (args.provider, produced)
    print(json.dumps({"wall": wall, "cpu": cpu, "tokens": produced}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=4, help="requests in the sequential run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    ap.add_argument("--provider", help=argparse.SUPPRESS)  # internal: run one in this process
    args = ap.parse_args()
    if args.provider:
        _child(args)
        return

    default_model_path()  # convert once, before the children race to do it
    names = ["engine_concurrent", "hf_generate", "engine_sequential", "engine_concurrent_sampled"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    # Each measurement runs in a fresh process (no OpenMP thread pools or allocator state
    # left over from another provider), and rounds interleave the providers so background
    # load on a shared machine hits all of them alike. Medians over rounds are reported.
    for _ in range(args.repeat):
        for name in names:
            out = subprocess.run(
                [sys.executable, __file__, "--provider", name, "--batch", str(args.batch),
                 "--tokens", str(args.tokens), "--sequential", str(args.sequential),
                 "--threads", str(args.threads)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    size = f"smollm2-135m/b{args.batch}/{args.tokens}tok"
    note = f"fp32 cpu, {args.threads} threads, median of {args.repeat} fresh processes"
    results = []
    rate: dict[str, float] = {}
    for name in names:
        tokens = runs[name][0]["tokens"]
        rate[name] = tokens / statistics.median(r["wall"] for r in runs[name])
        per_cpu = tokens / statistics.median(r["cpu"] for r in runs[name])
        results += [
            BenchResult("engine", name, size, "tokens_per_s", rate[name], "tok/s", note),
            BenchResult("engine", name, size, "tokens_per_cpu_s", per_cpu, "tok/cpu-s", note),
        ]
    for base in ("hf_generate", "engine_sequential"):
        speedup = rate["engine_concurrent"] / rate[base]
        results.append(
            BenchResult(
                "engine", "engine_concurrent", size, f"speedup_vs_{base}", speedup, "x", note
            )
        )
    record(results)


if __name__ == "__main__":
    main()
