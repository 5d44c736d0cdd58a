"""Measure the untrained policy on held-out questions: F1, EM, how often it searches.

    PYTHONPATH=examples python -m rag.base_rate --tasks 40 --model default

The real stack, as ``lightning train`` wires it (daemon, torch engine, policy server,
runtime session), without training: each held-out task is run once; the stored
trajectories are then read back for the ``final_answer`` span (F1, EM) and the ``search``
tool spans (the model's own searches and their retrieval hits).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "measure"]


def _mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    n = len(xs)
    if n == 0:
        return None, None
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else 0.0
    return round(m, 4), round(se, 4)


async def measure(tasks: list[dict[str, Any]], model_dir: Path, *, concurrency: int = 16,
                  samples: int = 1, seed: int = 0, time_limit_s: float = 1e9
                  ) -> dict[str, Any]:
    """Run ``tasks`` on the untrained policy; rollouts still running after
    ``time_limit_s`` are cancelled and left out (``stopped_early`` says so)."""
    import anyio
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lightning
    from lightning import DaemonConfig
    from lightning._daemon import Daemon
    from lightning.engine.torch_engine import TorchEngine
    from lightning.serving import PolicyServer
    from lightning.testing import recover
    from lightning.training.runner import evaluate

    from .agent import agent

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 local_files_only=True).eval()
    tmp = Path(tempfile.mkdtemp(prefix="rag-base-"))
    daemon = Daemon(DaemonConfig(bind="tcp://127.0.0.1:0", data_dir=str(tmp / "data"),
                                 stats_interval_s=0))
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        address = await tg.start(daemon.serve)
        engine = TorchEngine(model, tok, max_num_seqs=concurrency, seed=seed)
        await tg.start(engine.serve)
        server = PolicyServer(engine, model_name=model_dir.name, port=0,
                              capture=daemon.capture, accept_any_model=True)
        base_url = await tg.start(server.serve)
        async with lightning.session(daemon=address, policy_url=base_url,
                                     policy_model=model_dir.name, spill_dir=str(tmp / "spill")):
            scores: list[float] = []

            async def scored(task: dict[str, Any]) -> float:
                value = await agent(task)
                scores.append(value)
                print(f"[{time.perf_counter() - t0:6.1f}s] {len(scores)} rollouts, mean F1 "
                      f"{sum(scores) / len(scores):.3f}", file=sys.stderr, flush=True)
                return value

            with anyio.move_on_after(time_limit_s) as scope:
                await evaluate(scored, tasks, samples_per_task=samples,
                               concurrency=concurrency)
            rt = lightning.get_runtime()
            with anyio.move_on_after(30):
                while rt.pending_events():
                    await anyio.sleep(0.05)
            wall = time.perf_counter() - t0
            await anyio.sleep(0.5)  # let the daemon commit the last batch before reading
            out = _summarise(recover(tmp / "data")[1], tasks, samples, wall)
            out["stopped_early"] = scope.cancelled_caught
            # printed before shutting down (a cancelled engine may take a while to stop)
            print(json.dumps(out), flush=True)
        tg.cancel_scope.cancel()
    return out


def _summarise(trajs: list[Any], tasks: list[dict[str, Any]], samples: int,
               wall: float) -> dict[str, Any]:
    f1s, ems, searched, hit_any, answered, turns = [], [], [], [], [], []
    samples_out = []
    by_hops: dict[str, list[float]] = {}
    by_template: dict[str, list[float]] = {}
    for t in trajs:
        fa = [s for s in t.spans if s.name == "final_answer"]
        own = [s for s in t.spans if s.kind == "tool" and s.name == "search"]
        if not fa:
            continue
        f1s.append(float(fa[-1].attributes["f1"]))
        ems.append(float(fa[-1].attributes["em"]))
        answered.append(float(bool(fa[-1].attributes["answer"])))
        searched.append(float(bool(own)))
        hit_any.append(float(any(s.status == "ok" for s in own)))
        turns.append(len(t.transitions))
        by_hops.setdefault(str(fa[-1].attributes.get("hops")), []).append(f1s[-1])
        by_template.setdefault(str(fa[-1].attributes.get("template")), []).append(f1s[-1])
        if len(samples_out) < 8:
            samples_out.append((fa[-1].attributes["text"][:120], fa[-1].attributes["f1"]))
    return {
        "tasks": len(tasks), "samples": samples, "rollouts": len(f1s),
        "f1": _mean_se(f1s), "em": _mean_se(ems),
        "share_answered": _mean_se(answered)[0],
        "share_with_own_search": _mean_se(searched)[0],
        "share_own_search_hit": _mean_se(hit_any)[0],
        "mean_llm_calls": round(sum(turns) / max(len(turns), 1), 2),
        "wall_s": round(wall, 1),
        "rewards_nonzero": sum(1 for x in f1s if x > 0),
        "f1_by_hops": {h: (len(v), *_mean_se(v)) for h, v in sorted(by_hops.items())},
        "f1_by_template": {h: (len(v), *_mean_se(v)) for h, v in sorted(by_template.items())},
        "examples": samples_out,
    }


def main(argv: list[str] | None = None) -> int:
    import anyio

    from .agent import dataset

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=40)
    p.add_argument("--offset", type=int, default=0, help="skip the first N held-out tasks")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M) or a path")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-initial-search", action="store_true")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--first-k", type=int, default=None,
                   help="passages in the given first search (default: the agent's FIRST_K)")
    p.add_argument("--time-limit", type=float, default=270.0,
                   help="seconds; rollouts not done by then are left out")
    args = p.parse_args(argv)
    from lightning._logging import configure_logging

    configure_logging("warning")
    if args.model == "default":
        from lightning.models import default_model_path

        model_dir = default_model_path()
    else:
        model_dir = Path(args.model)
    _, test = dataset()
    extra = {} if args.first_k is None else {"first_k": args.first_k}
    tasks = [{**t, "initial_search": not args.no_initial_search,
              "temperature": args.temperature, **extra}
             for t in test[args.offset : args.offset + args.tasks]]
    anyio.run(functools.partial(measure, tasks, model_dir, concurrency=args.concurrency,
                                      samples=args.samples, time_limit_s=args.time_limit),
                    backend="asyncio")
    print(json.dumps({"initial_search": not args.no_initial_search,
                      "temperature": args.temperature, "offset": args.offset,
                      "first_k": args.first_k}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
