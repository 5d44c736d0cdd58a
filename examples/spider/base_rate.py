"""Measure the agent's held-out accuracy on the untrained policy (no training).

    cd examples && python -m spider.base_rate --tasks 40 --temperature 1.0
    cd examples && python -m spider.base_rate --tasks 40 --temperature 0

The real serving path of ``lightning train`` (TorchEngine behind the PolicyServer, an
in-process daemon that stores the rollouts), without the trainer. Prints the accuracy with
its standard error, per template, and the mean number of LLM calls.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    import anyio
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lightning
    from lightning import DaemonConfig
    from lightning.engine.torch_engine import TorchEngine
    from lightning.models import default_model_path
    from lightning.serving import PolicyServer
    from lightning.testing import Daemon, MemoryHub

    from .agent import agent, dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model != "default" else default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    _, test = dataset()
    extra = {"max_llm_calls": args.max_llm_calls} if args.max_llm_calls else {}
    tasks = [{**t, "temperature": args.temperature, **extra} for t in test[args.skip: args.skip + args.tasks]]
    tmp = tempfile.mkdtemp(prefix="spider-base-rate-")
    hub = MemoryHub()
    daemon = Daemon(DaemonConfig(data_dir=f"{tmp}/data", stats_interval_s=0,
                                 buffer_size=100_000), transport=hub)
    results: list[float | None] = [None] * len(tasks)
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=2048, max_num_seqs=args.concurrency,
                               seed=args.seed) as engine:
            server = PolicyServer(engine, model_name="policy", port=0, capture=daemon.capture,
                                  accept_any_model=True)
            base_url = await tg.start(server.serve)
            async with lightning.session(transport=hub.connect(), policy_url=base_url,
                                         policy_model="policy", spill_dir=f"{tmp}/spill"):
                slots = anyio.Semaphore(args.concurrency)

                async def one(i: int) -> None:
                    async with slots:
                        results[i] = await agent(tasks[i])
                    done = [r for r in results if r is not None]
                    print(f"[{time.perf_counter() - t0:6.1f}s] {len(done)}/{len(tasks)} done, "
                          f"{sum(done):.0f} correct", file=sys.stderr, flush=True)

                # --time-limit: stop there and report the tasks that finished (a loaded
                # box should not turn a measurement into an hour)
                with anyio.move_on_after(args.time_limit or math.inf):
                    async with anyio.create_task_group() as inner:
                        for i in range(len(tasks)):
                            inner.start_soon(one, i)
            wall = time.perf_counter() - t0
            calls = [len(t.transitions) for t in daemon.buffer._items]
            answers = {s.attributes.get("task_id"): s.attributes.get("answer")
                       for t in daemon.buffer._items for s in t.spans if s.name == "final_answer"}
        tg.cancel_scope.cancel()
    finished = [(t, r) for t, r in zip(tasks, results) if r is not None]
    n = len(finished)
    if n == 0:
        raise SystemExit("no task finished within --time-limit")
    mean = sum(r for _, r in finished) / n
    se = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else 0.0
    per: dict[str, list[float]] = collections.defaultdict(list)
    for t, r in finished:
        per[t.get("template", "?")].append(r)
    return {"model": path.name, "max_llm_calls": args.max_llm_calls or "agent default", "tasks": n, "tasks_asked": len(tasks), "temperature": args.temperature,
            "accuracy": round(mean, 4), "stderr": round(se, 4), "wall_s": round(wall, 1),
            "mean_llm_calls": round(sum(calls) / len(calls), 2) if calls else None,
            "per_template": {k: f"{sum(v):.0f}/{len(v)}" for k, v in sorted(per.items())},
            "answers": [{"question": t["question"], "gold": t["query"],
                         "predicted": answers.get(t["id"]), "reward": r} for t, r in finished]}


def main(argv: list[str] | None = None) -> int:
    import anyio

    from lightning._logging import configure_logging

    p = argparse.ArgumentParser(description="held-out accuracy of the untrained policy")
    p.add_argument("--model", default="default", help="checkpoint dir ('default': SmolLM2-135M)")
    p.add_argument("--tasks", type=int, default=40, help="held-out tasks (N after --skip)")
    p.add_argument("--skip", type=int, default=0, help="start at this held-out task")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-llm-calls", type=int, default=0,
                   help="override the agent's MAX_LLM_CALLS (1: first-call accuracy; 0: keep)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; stop then and report the finished tasks (0: no limit)")
    args = p.parse_args(argv)
    configure_logging("warning", stream=sys.stderr)  # not every sampled token id
    print(json.dumps(anyio.run(_measure, args, backend="asyncio"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
