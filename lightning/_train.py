"""``lightning train``: daemon, policy server, trainer and rollout runner in one process.

Defaults train the embedded Calc-X task (:mod:`lightning.tasks.calc_x`) with
SmolLM2-135M-Instruct on CPU. Any ``@lightning.rollout`` agent runs the same way:
``lightning train --agent mypkg.agents:solve --dataset train.jsonl --eval-dataset
test.jsonl``. Everything goes through the real paths: the agent's ``openai`` calls hit
the policy server over HTTP, its rollouts travel to the daemon over ZeroMQ, the trainer
reads the daemon's buffer and publishes weights back to the engine.

Writes to ``--out``: ``metrics.jsonl`` (one line per step, plus the evaluations),
``summary.json``, ``reward.png`` (training reward per step, before/after evaluation),
``log.jsonl`` (structured logs), ``data/`` (write-ahead log) and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import ConfigError

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # anyio's dependency on Python 3.10

__all__ = ["main", "train_main"]

_DEFAULT_AGENT = "lightning.tasks.calc_x:agent"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning train",
        description="Train a @lightning.rollout agent with RL: before/after evaluation, "
        "progress bar, metrics JSONL and a reward-curve PNG. Defaults: the embedded Calc-X "
        "task with SmolLM2-135M-Instruct on CPU.",
    )
    p.add_argument("--agent", default=_DEFAULT_AGENT, metavar="MODULE:FUNCTION",
                   help=f"the agent, a @lightning.rollout function (default {_DEFAULT_AGENT}). "
                   "Without --dataset, its module's dataset() gives the data: dataset() or "
                   "dataset(seed=N) (it gets --seed when it takes a seed) must return a pair "
                   "(train_tasks, eval_tasks) of sequences, train non-empty; each task is "
                   "passed to the agent as is")
    p.add_argument("--dataset", default=None, metavar="JSONL",
                   help="training tasks, one JSON object per line (passed to the agent)")
    p.add_argument("--eval-dataset", default=None, metavar="JSONL", help="held-out tasks")
    p.add_argument("--model", default="default",
                   help="Hugging Face checkpoint directory ('default': SmolLM2-135M-Instruct; "
                   "'tiny': a tiny random model with SmolLM2's tokenizer, for smoke runs)")
    p.add_argument("--out", default="lightning-train", help="output directory")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--group-size", type=int, default=8, help="rollouts per task and step")
    p.add_argument("--batch-size", type=int, default=16,
                   help="trajectories per optimizer step (whole groups)")
    p.add_argument("--concurrency", type=int, default=32, help="rollouts in flight")
    p.add_argument("--estimator", default="grpo",
                   help="grpo, grpo_no_std, rloo, reinforce_pp, or verl:<name> (verl's "
                   "estimator by name, verl installed)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--max-staleness", type=int, default=1)
    p.add_argument("--overlap", action="store_true",
                   help="sample the next batch while training on this one (faster with "
                   "spare cores; samples are then one version old)")
    p.add_argument("--air", action="store_true", help="add AIR step rewards (tool errors...)")
    p.add_argument("--eval-tasks", type=int, default=100,
                   help="held-out tasks to evaluate before and after (0 skips evaluation)")
    p.add_argument("--eval-samples", type=int, default=1, help="samples per held-out task")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    p.add_argument("--backend", default="torch", choices=("torch", "deepspeed", "verl"),
                   help="training backend (one process; default torch)")
    p.add_argument("--engine", default="torch", choices=("torch", "vllm", "scripted"),
                   help="inference engine (vllm: pip install 'lightning-rl[vllm]'; scripted: "
                   "answers come from --script, log-probs from the model: for tests and CI "
                   "smoke runs of an agent's own loop)")
    p.add_argument("--script", default=None, metavar="MODULE:FUNCTION",
                   help="with --engine scripted: the script, a function (ScriptRequest) -> "
                   "Reply | str, or a zero-argument factory of one "
                   "(lightning.engine.scripted)")
    p.add_argument("--backend-config", default=None, metavar="TOML",
                   help="backend settings (e.g. TorchBackendConfig fields); --lr wins")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    f = p.add_argument_group("stopping a failing agent (a rollout fails when the agent raises)")
    f.add_argument("--fail-first", type=int, default=8, metavar="N",
                   help="stop when each of the first N rollouts failed (default 8; 0: never)")
    f.add_argument("--fail-window", type=int, default=64, metavar="N",
                   help="the number of recent rollouts --fail-max-rate is taken over "
                   "(default 64; 0: never)")
    f.add_argument("--fail-max-rate", type=float, default=0.95, metavar="RATE",
                   help="stop when more than this share of the last --fail-window rollouts "
                   "failed (default 0.95)")
    return p


def _import_path(path: Path, spec: str) -> Any:
    """Import a ``.py`` file as a module. In a package (its folder has ``__init__.py``),
    the package root goes first on ``sys.path`` and the module is imported by its dotted
    name, so the file's relative imports work; otherwise its folder goes first."""
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"--agent {spec!r}: {str(path)!r} is not a file")
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").exists():
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    name = ".".join(parts)
    module = importlib.import_module(name)
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        raise ConfigError(
            f"--agent {spec!r}: importing {name!r} found {module.__file__!r}, another module "
            f"of that name; rename the file or its package, or use --agent MODULE:FUNCTION"
        )
    return module


def _load_agent(spec: str) -> tuple[Any, Any]:
    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--agent {spec!r} must look like 'package.module:function' or "
                          "'path/to/file.py:function'")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or "\\" in mod_name:
            module = _import_path(Path(mod_name), spec)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.append(str(Path.cwd()))  # as `python -m` would: modules of the cwd
            module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"--agent {spec!r}: cannot import {mod_name!r}: {exc}") from exc
    try:
        agent = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"--agent {spec!r}: {mod_name!r} has no attribute {attr!r}") from None
    if not hasattr(agent, "__lightning_rollout__"):
        raise ConfigError(
            f"--agent {spec!r} is not a rollout: decorate it with @lightning.rollout so its "
            "LLM calls and reward reach the trainer"
        )
    return module, agent


def _read_jsonl(path: str) -> list[Any]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path!r}: {exc}") from exc
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"{path}:{n} is not valid JSON: {exc}") from exc
    if not out:
        raise ConfigError(f"dataset {path!r} has no tasks")
    return out


def _datasets(args: argparse.Namespace, module: Any) -> tuple[list[Any], list[Any]]:
    if args.dataset is not None:
        train = _read_jsonl(args.dataset)
        test = _read_jsonl(args.eval_dataset) if args.eval_dataset else []
        return train, test
    train, test = _module_dataset(args, module)
    if args.eval_dataset:
        test = _read_jsonl(args.eval_dataset)
    return train, test


def _module_dataset(args: argparse.Namespace, module: Any) -> tuple[list[Any], list[Any]]:
    """Call the agent module's ``dataset()`` and check what it returns (see ``--agent``)."""
    where = f"--agent {args.agent!r}: {module.__name__}.dataset"
    fn = getattr(module, "dataset", None)
    if not callable(fn):
        raise ConfigError(f"--agent {args.agent!r}: pass --dataset JSONL (the module "
                          f"{module.__name__!r} has no dataset() function)")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it bare
        params = {}
    takes_seed = "seed" in params or any(
        q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
    required = [n for n, q in params.items() if n != "seed" and q.default is q.empty
                and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD, q.KEYWORD_ONLY)]
    if required:
        raise ConfigError(f"{where}() must be callable as dataset() or dataset(seed=N); it "
                          f"requires {', '.join(required)}")
    result = fn(seed=args.seed) if takes_seed else fn()
    if (not isinstance(result, (tuple, list)) or len(result) != 2
            or not all(_is_task_sequence(part) for part in result)):
        raise ConfigError(f"{where}() must return a pair (train_tasks, eval_tasks) of "
                          f"sequences (lists); it returned {_describe(result)}")
    train, test = list(result[0]), list(result[1])
    if not train:
        raise ConfigError(f"{where}() returned no training tasks")
    return train, test


def _is_task_sequence(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, bytes))


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}: ({', '.join(type(v).__name__ for v in x[:4])})"
    return f"a {type(x).__name__}"


def train_main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        for name in ("steps", "group_size", "batch_size", "concurrency"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if args.engine == "scripted" and not args.script:
            raise ConfigError("--engine scripted needs --script MODULE:FUNCTION (the answers)")
        if args.script and args.engine != "scripted":
            raise ConfigError(f"--script is only used by --engine scripted (got --engine "
                              f"{args.engine}); drop --script or add --engine scripted")
        from .training.failures import FailurePolicy

        try:
            args.failure_policy = FailurePolicy(first_n=args.fail_first, window=args.fail_window,
                                                max_rate=args.fail_max_rate)
        except ValueError as exc:
            raise ConfigError(f"--fail-first/--fail-window/--fail-max-rate: {exc}") from exc
        module, agent = _load_agent(args.agent)
        train, test = _datasets(args, module)
    except ConfigError as exc:
        print(f"lightning train: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "log.jsonl", "ab")  # noqa: SIM115 - closed below
    from ._logging import configure_logging

    configure_logging("info", stream=log_file)
    import anyio

    from .training.failures import AgentFailingError

    try:
        summary = anyio.run(_train, args, agent, train, test[: args.eval_tasks], backend="asyncio")
    except (ConfigError, AgentFailingError) as exc:
        return _fail(exc)
    except BaseExceptionGroup as group:  # raised inside the task group
        expected, rest = group.split((ConfigError, AgentFailingError))
        if rest is not None or expected is None:
            raise
        return max(_fail(exc) for exc in _leaves(expected))
    finally:
        from ._logging import repeat_filter

        if (rf := repeat_filter()) is not None:
            rf.flush()  # the counts of repeated warnings, into log.jsonl before it closes
        log_file.close()
    _print_summary(summary, out)
    return 0


def _fail(exc: BaseException) -> int:
    """Print a run-stopping error; exit 2 for configuration, 3 for a failing agent."""
    from .training.failures import AgentFailingError

    if isinstance(exc, AgentFailingError):
        print(f"lightning train: error: {exc.report()}", file=sys.stderr)
        return 3
    print(f"lightning train: error: {exc}", file=sys.stderr)
    return 2


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for exc in group.exceptions for leaf in _leaves(exc)]
    return [group]


def _model_dir(model: str) -> Path:
    if model == "default":
        from .models import default_model_path

        return default_model_path()
    if model == "tiny":
        from .models import tiny_model_path

        return tiny_model_path()
    path = Path(model)
    if not (path / "config.json").exists():
        raise ConfigError(f"--model {model!r} is not a Hugging Face checkpoint directory")
    return path


def _load_policy(model: str) -> tuple[Path, Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_dir(model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    return path, m.eval(), tok


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self._tqdm: Any = None
        if enabled:
            try:
                from tqdm import tqdm

                self._tqdm = tqdm
            except ImportError:
                pass

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", file=sys.stderr, flush=True)

    def step(self, m: dict[str, float]) -> None:
        if not self.enabled:
            return
        fields = {"reward": f"{m.get('rollouts/reward_mean', 0.0):.3f}",
                  "loss": f"{m.get('loss/total', 0.0):+.4f}",
                  "gap": f"{m.get('actor/logprob_gap', 0.0):.4f}"}
        if self.bar is None and self._tqdm is not None:  # created at the first step, so
            # the notes printed before it (loading, evaluating) do not interleave with it
            self.bar = self._tqdm(total=self.total, desc="train", unit="step",
                                  file=sys.stderr, dynamic_ncols=True)
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(1)
        else:
            self.note(f"step {int(m['train/step'])}/{self.total} " +
                      " ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._tqdm = None


async def _train(args: argparse.Namespace, agent: Any, train: list[Any],
                 test: list[Any]) -> dict[str, Any]:
    import anyio
    import torch

    import lightning

    from ._config import DaemonConfig
    from ._daemon import Daemon
    from .engine.torch_engine import TorchEngine
    from .serving import PolicyServer
    from .training.batcher import BatcherConfig
    from .training.service import load_backend, start_trainer
    from .training.trainer import TrainerConfig, finite_metrics

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ours is the one progress bar
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    progress = _Progress(args.steps, not args.no_progress)
    metrics_file = open(out / "metrics.jsonl", "a")  # noqa: SIM115, ASYNC230 - tiny, closed below
    t_start = time.perf_counter()
    history: list[dict[str, float]] = []

    def write(record: dict[str, Any]) -> None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    def on_step(m: dict[str, float]) -> None:
        m = finite_metrics(m)
        m["time/elapsed_s"] = time.perf_counter() - t_start
        history.append(m)
        write({"kind": "train", **m})
        progress.step(m)

    backend_config: dict[str, Any] = {}
    if args.backend_config:
        from ._config import load_toml_dict

        backend_config = load_toml_dict(args.backend_config)
    backend_config.update(lr=args.lr, seed=args.seed)
    # Activation memory grows with the micro-batch: SmolLM2-135M in fp32 on CPU holds about
    # 1.5 GB per 1024 tokens (measured: RSS 3.4-4.2 GB at 1024, 9.7-11 GB at 4096, for 44
    # sequences of ~400 tokens), and a multi-turn task's batch of 4096-token micro-batches
    # plus the engine's cache went past 24 GB. On CPU a smaller micro-batch costs no speed
    # (70 s per step either way there): 1024 there, 4096 on a GPU.
    backend_config.setdefault("micro_batch_tokens", 4096 if torch.cuda.is_available() else 1024)

    try:
        progress.note("loading the model")
        daemon = Daemon(DaemonConfig(bind="tcp://127.0.0.1:0", data_dir=str(out / "data"),
                                     stats_interval_s=0))
        if args.engine == "vllm":
            from .engine.vllm_engine import create_vllm_engine

            from .engine.base import EngineError

            path = _model_dir(args.model)
            try:
                engine = create_vllm_engine(
                    path, max_num_seqs=max(args.concurrency, 1), seed=args.seed,
                    # the CPU trainer is fp32: so is the engine (the landing check compares)
                    dtype="auto" if torch.cuda.is_available() else "float32",
                )
            except (LookupError, EngineError) as exc:  # not installed, untested version
                raise ConfigError(str(exc)) from exc
        elif args.engine == "scripted":
            from .engine.scripted import ScriptedEngine, load_script

            path, model, tok = await anyio.to_thread.run_sync(_load_policy, args.model)
            try:
                script = load_script(args.script)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            engine = ScriptedEngine(tok, script, model=model, max_num_seqs=max(args.concurrency, 1),
                                    seed=args.seed)
        else:
            path, model, tok = await anyio.to_thread.run_sync(_load_policy, args.model)
            engine = TorchEngine(model, tok, max_num_seqs=max(args.concurrency, 1),
                                 seed=args.seed)
        async with anyio.create_task_group() as tg:
            address = await tg.start(daemon.serve)
            await tg.start(engine.serve)
            # one policy: agents that name another model (an SDK default, "gpt-4o") get it too
            server = PolicyServer(engine, model_name=path.name, port=0, capture=daemon.capture,
                                  accept_any_model=True)
            base_url = await tg.start(server.serve)
            backend = await load_backend(args.backend, path, backend_config)
            try:
                batcher_config = BatcherConfig(
                    group_size=args.group_size,
                    batch_size=args.batch_size,
                    estimator=args.estimator,
                    max_staleness=args.max_staleness,
                    group_timeout_s=600.0,
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            trainer = await start_trainer(
                tg, daemon, backend, engine,
                batcher_config=batcher_config,
                trainer_config=TrainerConfig(max_steps=args.steps, save_every=args.save_every),
                air=args.air,
                checkpoint_dir=out / "checkpoints",
                resume=args.resume,
                on_step=on_step,
            )
            async with lightning.session(daemon=address, policy_url=base_url,
                                         policy_model=path.name, spill_dir=str(out / "spill")):
                before = None
                if test:
                    progress.note(f"evaluating the base policy on {len(test)} held-out tasks "
                                  f"x {args.eval_samples}")
                    from .training.runner import evaluate

                    before = await evaluate(agent, test, samples_per_task=args.eval_samples,
                                            concurrency=args.concurrency,
                                            failure_policy=args.failure_policy)
                    write({"kind": "eval", "when": "before", "policy_version": engine.policy_version,
                           "accuracy": before.mean, "stderr": before.stderr,
                           "samples": before.samples})
                    progress.note(f"before: {before.mean:.3f} ± {before.stderr:.3f}")
                from .training.runner import evaluate, run_training_rollouts

                t_train = time.perf_counter()
                await run_training_rollouts(agent, train, group_size=args.group_size,
                                            concurrency=args.concurrency, stop=trainer.done,
                                            seed=args.seed,
                                            consumed=lambda: trainer.consumed_trajectories,
                                            max_ahead=args.batch_size * (2 if args.overlap else 1),
                                            failure_policy=args.failure_policy)
                train_s = time.perf_counter() - t_train
                progress.close()
                after = None
                if test:
                    progress.note("evaluating the trained policy")
                    after = await evaluate(agent, test, samples_per_task=args.eval_samples,
                                           concurrency=args.concurrency,
                                           failure_policy=args.failure_policy)
                    write({"kind": "eval", "when": "after", "policy_version": engine.policy_version,
                           "accuracy": after.mean, "stderr": after.stderr,
                           "samples": after.samples})
            tg.cancel_scope.cancel()
        if hasattr(backend, "close"):  # multi-process backends release their workers
            backend.close()
    finally:
        metrics_file.close()
        progress.close()
    summary = _summary(args, history, before, after, train_s, time.perf_counter() - t_start,
                       trainer.batcher.stats())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        _plot(history, before, after, out / "reward.png")
    except ImportError:
        summary["plot"] = "skipped: matplotlib is not installed (pip install matplotlib)"
    return summary


def _paired(before: Any, after: Any) -> tuple[float, float]:
    """Mean and standard error of the per-task improvement (same tasks before and after)."""
    d = [a - b for a, b in zip(after.per_task, before.per_task)]
    n = len(d)
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    return m, se


def _summary(args: argparse.Namespace, history: list[dict[str, float]], before: Any,
             after: Any, train_s: float, total_s: float, counters: dict[str, int]) -> dict[str, Any]:
    tokens = sum(m.get("perf/tokens", 0.0) for m in history)
    step_s = sum(m.get("perf/train_s", 0.0) for m in history)
    s: dict[str, Any] = {
        "agent": args.agent,
        "model": args.model,
        "steps": len(history),
        "group_size": args.group_size,
        "batch_size": args.batch_size,
        "wall_s": round(total_s, 1),
        "train_phase_s": round(train_s, 1),
        "train_tokens": int(tokens),
        "train_tokens_per_s": round(tokens / step_s, 1) if step_s else None,
        "reward_first_steps": _mean([m.get("rollouts/reward_mean", 0.0) for m in history[:3]]),
        "reward_last_steps": _mean([m.get("rollouts/reward_mean", 0.0) for m in history[-3:]]),
        "batcher": counters,
    }
    if before is not None and after is not None:
        diff, se = _paired(before, after)
        s["eval"] = {
            "tasks": len(before.rewards),
            "samples_per_task": len(before.rewards[0]) if before.rewards else 0,
            "before": round(before.mean, 4),
            "after": round(after.mean, 4),
            "improvement": round(diff, 4),
            "improvement_stderr": round(se, 4),
            "z": round(diff / se, 2) if se > 0 else None,
        }
    return s


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def _plot(history: list[dict[str, float]], before: Any, after: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [m["train/step"] for m in history]
    ax.plot(steps, [m.get("rollouts/reward_mean", 0.0) for m in history], marker="o",
            label="training reward (rollouts since the previous step)")
    if before is not None and after is not None:
        ax.errorbar([0], [before.mean], yerr=[1.96 * before.stderr], fmt="s", color="C3",
                    capsize=4, label="held-out accuracy (95% CI)")
        ax.errorbar([steps[-1] if steps else 1], [after.mean], yerr=[1.96 * after.stderr],
                    fmt="s", color="C3", capsize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title("lightning train")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _print_summary(s: dict[str, Any], out: Path) -> None:
    print(f"steps {s['steps']}  wall {s['wall_s']} s  training tokens/s {s['train_tokens_per_s']}")
    if "eval" in s:
        e = s["eval"]
        print(f"held-out accuracy ({e['tasks']} tasks x {e['samples_per_task']}): "
              f"{e['before']:.3f} -> {e['after']:.3f}  (improvement {e['improvement']:+.3f} "
              f"± {e['improvement_stderr']:.3f} s.e., z = {e['z']})")
    print(f"metrics: {out / 'metrics.jsonl'}  summary: {out / 'summary.json'}  "
          f"plot: {out / 'reward.png'}")


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning train ...`` / ``lightning daemon ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_main(argv[1:])
    if argv[:1] == ["daemon"]:
        from ._cli import daemon_main

        return daemon_main(argv[1:])
    print("usage: lightning {train,daemon} ... (lightning train --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
