"""Measure the base rate: the untrained policy on held-out Calc-X problems, no training.

    PYTHONPATH=examples python -m calc_x.measure --tasks 40 --samples 1

Runs the real stack in one process (daemon, ``TorchEngine`` behind the ``PolicyServer``,
the agent's AutoGen loop and MCP server), each task as an evaluation rollout, and prints
the accuracy with its standard error plus what the agent did: how many rollouts called the
calculator at all, how many calls errored, how many model calls a rollout took. With
``--json PATH`` it also writes every rollout's outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning

from . import agent as calc_agent
from .agent import dataset, solve

__all__ = ["main", "measure"]

_outcomes: list[dict[str, Any]] = []
_temperature = 1.0
_stream: Any = None  # --json: one line per rollout as it ends (a run cut short keeps them)


@lightning.rollout(name="calc_x_autogen_measure")
async def _measured(task: dict[str, Any]) -> float:
    outcome = await solve({**task, "temperature": _temperature})
    row = {"id": task.get("id"), "gold": task["answer"], **outcome}
    _outcomes.append(row)
    if _stream is not None:
        _stream.write(json.dumps(row, default=str) + "\n")
        _stream.flush()
    return float(outcome["reward"])


async def measure(model_dir: str, tasks: list[dict[str, Any]], *, samples: int,
                  concurrency: int, seed: int) -> dict[str, Any]:
    import anyio
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning._config import DaemonConfig
    from lightning._daemon import Daemon
    from lightning.engine.torch_engine import TorchEngine
    from lightning.serving import PolicyServer
    from lightning.training.runner import evaluate

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 local_files_only=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(DaemonConfig(bind="tcp://127.0.0.1:0", data_dir=str(Path(tmp) / "data"),
                                     stats_interval_s=0))
        engine = TorchEngine(model, tok, max_num_seqs=max(concurrency, 1), seed=seed)
        async with anyio.create_task_group() as tg:
            address = await tg.start(daemon.serve)
            await tg.start(engine.serve)
            server = PolicyServer(engine, model_name=Path(model_dir).name, port=0,
                                  capture=daemon.capture, accept_any_model=True)
            base_url = await tg.start(server.serve)
            async with lightning.session(daemon=address, policy_url=base_url,
                                         policy_model=Path(model_dir).name,
                                         spill_dir=str(Path(tmp) / "spill")):
                t0 = time.perf_counter()
                result = await evaluate(_measured, tasks, samples_per_task=samples,
                                        concurrency=concurrency)
                wall = time.perf_counter() - t0
            tg.cancel_scope.cancel()
    n = len(_outcomes)
    return {
        "tasks": len(tasks), "samples_per_task": samples, "rollouts": n,
        "accuracy": round(result.mean, 4), "stderr": round(result.stderr, 4),
        "rollouts_with_a_tool_call": sum(o["tool_calls"] > 0 for o in _outcomes),
        "tool_calls": sum(o["tool_calls"] for o in _outcomes),
        "tool_errors": sum(o["tool_errors"] for o in _outcomes),
        "model_calls_mean": round(sum(o["model_calls"] for o in _outcomes) / max(n, 1), 2),
        "tasks_solved_at_least_once": len({o["id"] for o in _outcomes if o["reward"] > 0}),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Calc-X base rate of an untrained policy")
    p.add_argument("--model", default="default",
                   help="checkpoint directory ('default': SmolLM2-135M-Instruct, 'tiny')")
    p.add_argument("--tasks", type=int, default=40, help="held-out tasks (from the bundled test)")
    p.add_argument("--samples", type=int, default=1, help="samples per task")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (training samples at the task's, default 1.0)")
    p.add_argument("--ops", type=int, default=None,
                   help="only the held-out problems taking this many operations")
    p.add_argument("--shots", choices=("one-call", "chain", "mixed"), default="one-call",
                   help="few-shot design: FEW_SHOT (one call with the whole calculation, then "
                   "the answer) or FEW_SHOT_CHAIN (one call per step, two rounds)")
    p.add_argument("--json", type=Path, default=None,
                   help="write every rollout's outcome here (JSON lines, as they end), then "
                   "the summary as the last line")
    args = p.parse_args(argv)
    import anyio

    import lightning.models
    from lightning._logging import configure_logging

    configure_logging("warning")  # the run's own JSON logs; the summary goes to stdout

    if args.model == "default":
        model_dir = str(lightning.models.default_model_path())
    elif args.model == "tiny":
        model_dir = str(lightning.models.tiny_model_path())
    else:
        model_dir = args.model
    tasks = [t for t in dataset()[1] if args.ops is None or t["ops"] == args.ops][: args.tasks]
    global _stream, _temperature
    _temperature = args.temperature
    if args.shots == "chain":
        calc_agent.FEW_SHOT = calc_agent.FEW_SHOT_CHAIN
    elif args.shots == "mixed":
        calc_agent.FEW_SHOT = calc_agent.FEW_SHOT_MIXED
    if args.json is not None:
        _stream = args.json.open("w")
    summary = anyio.run(lambda: measure(model_dir, tasks, samples=args.samples,
                                        concurrency=args.concurrency, seed=args.seed),
                        backend="asyncio")
    summary.update(model=Path(model_dir).name, temperature=args.temperature, shots=args.shots)
    print(json.dumps(summary, indent=1))
    if _stream is not None:
        _stream.write(json.dumps({"summary": summary}) + "\n")
        _stream.close()
    se = summary["stderr"]
    print(f"base rate {summary['accuracy']:.3f} ± {se:.3f} s.e. "
          f"(95% CI ± {1.96 * se:.3f}; {math.floor(summary['accuracy'] * summary['rollouts'] + .5)}"
          f"/{summary['rollouts']} rollouts right)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
