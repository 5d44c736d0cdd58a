"""GRPO on two-number addition: the verl backend trains, vLLM samples, one GPU.

    bash examples/verl_gpu/run.sh                      # the real thing (installs, downloads)
    python examples/verl_gpu/train.py --smoke          # CPU smoke test: tiny model, torch engine

Each step: ``--tasks`` additions, each sampled ``--group-size`` times (temperature 1) by the
serving engine, with the token ids and log-probs it sampled; reward 1 when the last number
in the answer is the sum; GRPO advantages per group (:mod:`lightning.algorithms.grpo`);
:func:`lightning.training.pack_sequences`; ``VerlBackend.train_step`` (verl's FSDP2
``TrainingWorker``); the new weights go into the engine in place (its prefix cache reset)
and the policy version increments. One CSV row per step goes to ``--csv``: reward,
losses, grad norm, ``logprob_gap`` (mean |trainer - sampler| log-prob, before the update:
vLLM bf16 vs FSDP), step and rollout seconds.

On the GPU the engine is vLLM's offline ``LLM`` in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so weights pass as tensors) sharing the GPU with the
trainer (``--gpu-memory-utilization``). ``--smoke`` swaps in lightning's ``TorchEngine`` and
the tiny random model so the loop itself is tested on CPU (``tests/backends/test_verl.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import random
import re
import sys
import time
from array import array
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch

from lightning._sequences import TokenSequence
from lightning.algorithms.grpo import grpo_advantages
from lightning.training import pack_sequences


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="HF id or local path")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--tasks", type=int, default=32, help="additions per step")
    p.add_argument("--group-size", type=int, default=8, help="samples per addition (GRPO group)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    p.add_argument("--csv", default="verl_gpu_results.csv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model, torch engine, CPU")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- task


def make_tasks(rng: random.Random, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        out.append((f"What is {a} + {b}? Answer with the number at the end.", a + b))
    return out


def reward(text: str, answer: int) -> float:
    nums = re.findall(r"-?\d+", text.replace(",", ""))
    return 1.0 if nums and int(nums[-1]) == answer else 0.0


def to_sequence(
    prompt: list[int], ids: list[int], logprobs: list[float], version: int
) -> TokenSequence:
    n_p, n_r = len(prompt), len(ids)
    return TokenSequence(
        token_ids=array("i", prompt + ids),
        action_mask=bytearray(b"\x00" * n_p + b"\x01" * n_r),
        logprobs=array("f", [0.0] * n_p + logprobs),
        policy_versions=array("i", [-1] * n_p + [version] * n_r),
        transitions=[0],
        prompt_len=n_p,
    )


# ---------------------------------------------------------------------------- engines


class VLLMEngine:
    """vLLM's offline engine in this process; weights are loaded in place."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model,
            dtype="bfloat16",
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            seed=args.seed,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0

    def sample(self, prompts: list[str], n: int, max_tokens: int) -> list[list[tuple]]:
        from vllm import SamplingParams

        ids = [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
            )
            for p in prompts
        ]
        params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        result = []
        for prompt_ids, o in zip(ids, outs):
            group = []
            for c in o.outputs:
                lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs)]
                group.append((list(prompt_ids), list(c.token_ids), lps, c.text))
            result.append(group)
        return result

    def update_weights(self, weights: dict[str, torch.Tensor]) -> int:
        items = list(weights.items())

        def _load(worker: Any) -> None:
            worker.model_runner.model.load_weights(weights=items)

        self.llm.collective_rpc(_load)
        self.llm.reset_prefix_cache()
        self.version += 1
        return self.version


class TorchEngineSync:
    """lightning's TorchEngine behind the same three calls (``--smoke``), driven from this
    thread through an anyio blocking portal."""

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        from anyio.from_thread import start_blocking_portal

        from lightning.engine.torch_engine import TorchEngine

        self._stack = contextlib.ExitStack()
        self.portal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self.engine = self._stack.enter_context(
            self.portal.wrap_async_context_manager(
                TorchEngine.from_pretrained(model, device="cpu", max_model_len=512, seed=args.seed)
            )
        )
        self.version = 0

    def sample(self, prompts: list[str], n: int, max_tokens: int) -> list[list[tuple]]:
        from lightning.engine.base import SamplingParams

        result = []
        for i, text in enumerate(prompts):
            prompt = self.engine.apply_chat_template([{"role": "user", "content": text}])
            params = SamplingParams(temperature=1.0, max_tokens=max_tokens, n=n, seed=i)
            out = self.portal.call(self.engine.generate, prompt, params)
            result.append([(prompt, c.token_ids, c.logprobs, c.text) for c in out.choices])
        return result

    def update_weights(self, weights: dict[str, torch.Tensor]) -> int:
        self.version = self.portal.call(self.engine.update_weights, weights)
        return self.version

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    args = parse_args(argv)
    from lightning_backends._verl import VerlBackend, VerlBackendConfig

    if args.smoke:
        from lightning.models import tiny_model_path

        model = str(tiny_model_path(seed=0))
        args.steps, args.tasks, args.group_size, args.max_tokens = 2, 2, 2, 6
        device = "cpu"
    else:
        from huggingface_hub import snapshot_download

        model = args.model if Path(args.model).is_dir() else snapshot_download(args.model)
        device = "cuda"
    # the trainer first: it creates this process's torch.distributed world (gloo + NCCL),
    # which vLLM then reuses instead of creating its own
    backend = VerlBackend()
    backend.setup(
        model,
        VerlBackendConfig(
            device=device, lr=args.lr, micro_batch_tokens=args.micro_batch_tokens, seed=args.seed
        ),
    )
    engine: Any = TorchEngineSync(model, args) if args.smoke else VLLMEngine(model, args)
    try:
        rng = random.Random(args.seed)
        rows: list[dict[str, float]] = []
        with open(args.csv, "w", newline="") as f:
            writer: csv.DictWriter | None = None
            for step in range(1, args.steps + 1):
                t0 = time.perf_counter()
                tasks = make_tasks(rng, args.tasks)
                groups = engine.sample([q for q, _ in tasks], args.group_size, args.max_tokens)
                t_roll = time.perf_counter() - t0
                seqs, rewards, gids = [], [], []
                for g, ((_, answer), group) in enumerate(zip(tasks, groups)):
                    for prompt, ids, lps, text in group:
                        seqs.append(to_sequence(prompt, list(ids), list(lps), engine.version))
                        # the tiny random model never adds: reward token-id parity instead, so
                        # the smoke test has advantages and gradients
                        rewards.append(float(sum(ids) % 2) if args.smoke else reward(text, answer))
                        gids.append(g)
                adv = grpo_advantages(torch.tensor(rewards), torch.tensor(gids))  # [N]
                metrics = backend.train_step(pack_sequences(seqs, adv.tolist()))
                version = engine.update_weights(backend.export_weights())
                row = {
                    "step": float(step),
                    "policy_version": float(version),
                    "reward": sum(rewards) / len(rewards),
                    "rollout_s": t_roll,
                    **{k: v for k, v in metrics.items() if not k.startswith("verl/")},
                    "total_s": time.perf_counter() - t0,
                }
                rows.append(row)
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
                f.flush()
                print(
                    f"step {step} v{version} reward {row['reward']:.3f} "
                    f"loss {row['loss/policy']:.4f} gap {row['actor/logprob_gap']:.4f} "
                    f"grad {row['actor/grad_norm']:.3f} train {row['perf/step_s']:.1f}s "
                    f"rollout {t_roll:.1f}s",
                    flush=True,
                )
    finally:
        if hasattr(engine, "close"):
            engine.close()
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
