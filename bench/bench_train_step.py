"""One RL update on CPU: TorchBackend.train_step vs TRL's GRPOTrainer on the same model and batch.

    OMP_NUM_THREADS=2 python -m bench.bench_train_step --rounds 3   # tiny model, ~8 min on 2 cores
    OMP_NUM_THREADS=2 python -m bench.bench_train_step --model smollm2 --batch 4 --prompt 48 \
        --completion 16 --micro 2 --rounds 3 --repeat 3 --warmup 1 --providers ours,trl,trl_compact

TRL is not a dependency of this project. Install it for the bench only, next to (never into)
the environment's packages; the bench appends that folder to ``sys.path`` (``--trl-site``,
default ``$LIGHTNING_BENCH_TRL_SITE`` or ``/tmp/trl-site``), so the installed torch and
transformers always win::

    pip install --no-deps --target /tmp/trl-site trl datasets pandas "pyarrow==24.0.0" \\
        "dill<0.4.2" "multiprocess<0.70.20" pytz tzdata  # tested: trl 1.16.0, datasets 5.2.0

Without it the TRL rows are skipped with a message.

What is timed: one optimizer step on a precomputed batch (forward + backward of every
micro-batch, gradient clipping, AdamW step, zero_grad); never generation, rewards or
advantage computation. Each provider runs in ``--rounds`` fresh subprocesses, interleaved
with the other providers' (libgomp's thread pool and the allocator start clean, and drift on
a shared machine hits every provider alike); each does ``--warmup`` steps, then ``--repeat``
timed steps. The median and min over all timed steps are reported, plus tokens/s =
B * (P + C) / median and action tokens/s = B * C / median, and the ratio of the medians.
Peak memory comes from one more fresh subprocess (allocations >= 128 KiB served by mmap):
the extra RSS at the peak of one step after a warm-up step. On a machine shared with other
jobs, single steps can take several times their quiet-machine time (two OpenMP threads
spin while one is descheduled): compare providers within one run, read the p25-p75 column
of the table, and treat the min as the closest to the uncontended cost.

The batch (identical token ids for every provider): B sequences of P prompt tokens + C
completion tokens, random ids from the vocabulary (seed 0), no padding, one advantage per
sequence (standard normal, seed 0), old log-probs = the model's own log-probs before the
first step (so the ratio starts at 1), micro-batches of ``--micro`` sequences (gradient
accumulation over B / micro of them), fp32, lr 1e-6, AdamW betas (0.9, 0.999), eps 1e-8,
weight decay 0, gradient-norm clip 1.0, no KL term, no reference model.

Providers:
- ``ours``: ``TorchBackend.train_step`` with ``loss="ppo"``, ``loss_agg="token-mean"``,
  clip 0.2 / 0.2, ``clip_ratio_c=None`` (no dual clip: TRL has none),
  ``micro_batch_tokens = micro * (P + C)``; log-probs from the fastest kernel available
  (on CPU the prebuilt C++ ``lightning._ext`` kernel: chunked over the vocabulary, only
  action tokens).
- ``ours_reference`` (diagnostic): as ``ours`` with ``logprob_impl="reference"`` (pure
  torch, materialises the ``[N, V]`` fp32 logits of the N action tokens): how much of the
  gap is our kernel.
- ``trl``: GRPOTrainer (``loss_type="dapo"``: PPO-clip, token-mean over the whole
  accumulated batch; ``epsilon=0.2``, ``beta=0``, ``bf16=False``,
  ``per_device_train_batch_size=micro``, ``gradient_accumulation_steps=B/micro``). The step
  is what ``transformers.Trainer`` does per optimizer step: ``trainer.training_step`` per
  micro-batch (TRL's ``_compute_loss`` + ``accelerator.backward``; generation is bypassed
  by handing it the micro-batch in its own post-generation format: prompt_ids/mask,
  completion_ids/mask, advantages, old_per_token_logps, num_items_in_batch), then
  ``_clip_grad_norm``, ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()``.
  Trainer callbacks, logging and the dataloader are not run.
- ``trl_compact`` (diagnostic, not TRL as shipped): as ``trl`` with TRL's GPU choice of
  scoring only the completion positions forced on CPU (``trl.trainer.utils._use_triton``
  patched to True; the kernel itself stays TRL's torch fallback).

What differs between ``ours`` and ``trl`` (so the ratio is not a pure framework overhead):
1. LM-head positions. On a device without Triton (CPU), TRL's fused LM head scores *every*
   position of the ``[b, P + C]`` micro-batch (``compact = False``) and masks the prompt
   afterwards: B * (P + C - 1) rows through the ``[V, H]`` head instead of B * C. We score
   only action tokens. With a 49k vocabulary this dominates on the tiny model;
   ``trl_compact`` shows TRL without it.
2. The log-prob kernel: TRL's chunked torch fallback (``trl.kernels.chunked_logprob``, no
   Triton on CPU; recomputes the logits tiles in backward) that always also computes the
   per-token entropy for its metrics; ours is a C++ kernel without entropy.
3. Optimizer kernel: TRL's default ``optim`` is ``adamw_torch_fused``; ours is
   ``torch.optim.AdamW`` with torch's default (foreach) implementation. Same math.
4. TRL logs clip ratios and entropy with ``.item()`` calls each micro-batch (host syncs,
   free on CPU); we compute comparable stats (clip fraction, approx KL, log-prob gap).
5. Attention: both run the HF model's default attention (sdpa) on a right-padded
   ``[b, L]`` batch with an all-ones mask here (no padding in this batch); we also pass
   ``position_ids``.
The loss math is the same: per-token ``-min(r A, clip(r, 0.8, 1.2) A)`` averaged over all
completion tokens of the batch; one optimizer step per batch. Checked on the tiny model
(fp32, 16 x (96 + 32), micro 8): the first two steps give the same policy loss (0.32812,
0.32738) and pre-clip gradient norm (2.875247, 2.870818) on both paths to the printed
digits, so the two measure the same update. Single process: accelerate's distributed type
is NO (no DDP wrapper, no gradient sync), as for ours.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench.harness import BenchResult, peak_rss_delta, record, run_isolated

BENCH = "train_step"
PROVIDERS = ("ours", "ours_reference", "trl", "trl_compact")
SEED = 0


class Unavailable(Exception):
    """This provider cannot run here; the message says why."""


# --------------------------------------------------------------------------- inputs


def _model_path(name: str) -> Path:
    from lightning.models import default_model_path, tiny_model_path

    if name == "tiny":
        return tiny_model_path()
    if name == "smollm2":
        return default_model_path()
    raise ValueError(f"--model must be tiny or smollm2, got {name!r}")


def _token_batch(args: argparse.Namespace, vocab: int) -> tuple[Any, Any]:
    """Token ids ``[B, P + C]`` and per-sequence advantages ``[B]`` (seeded)."""
    import torch

    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(
        0, vocab, (args.batch, args.prompt + args.completion), generator=g
    )  # [B, L]
    adv = torch.randn(args.batch, generator=g)  # [B]
    return ids, adv


def _packed(ids: Any, adv: Any, prompt: int) -> Any:
    """The same tokens as a packed :class:`TrainBatch` (action = the last C of each)."""
    from array import array

    from lightning._sequences import TokenSequence
    from lightning.training import pack_sequences

    B, L = ids.shape
    seqs = [
        TokenSequence(
            token_ids=array("i", ids[b].tolist()),
            action_mask=bytearray(b"\x00" * prompt + b"\x01" * (L - prompt)),
            logprobs=array("f", [0.0] * L),
            policy_versions=array("i", [-1] * prompt + [0] * (L - prompt)),
            transitions=[0],
            prompt_len=prompt,
        )
        for b in range(B)
    ]
    return pack_sequences(seqs, adv.tolist())


# --------------------------------------------------------------------------- providers


def _make_ours(
    args: argparse.Namespace, path: Path, *, logprob_impl: str | None = None
) -> tuple[Any, str]:
    from lightning_backends._torch import TorchBackend, TorchBackendConfig
    from transformers import AutoConfig

    backend = TorchBackend()
    backend.setup(
        str(path),
        TorchBackendConfig(
            lr=1e-6,
            max_grad_norm=1.0,
            micro_batch_tokens=args.micro * (args.prompt + args.completion),
            loss="ppo",
            loss_agg="token-mean",
            clip_ratio_low=0.2,
            clip_ratio_high=0.2,
            clip_ratio_c=None,
            kl_coef=0.0,
            device="cpu",
            dtype="float32",
            seed=SEED,
            logprob_impl=logprob_impl,
        ),
    )
    ids, adv = _token_batch(args, AutoConfig.from_pretrained(str(path)).vocab_size)
    batch = _packed(ids, adv, args.prompt)
    batch.old_logprobs = backend.compute_logprobs(batch)  # [T]: ratio 1 at the first step

    def step() -> dict[str, float]:
        m = backend.train_step(batch)
        assert m["perf/micro_batches"] == args.batch // args.micro, m
        return m

    mbt = args.micro * (args.prompt + args.completion)
    impl = logprob_impl or "fastest (cpp on CPU)"
    return step, f"TorchBackend ppo token-mean, micro_batch_tokens={mbt}, logprob_impl={impl}"


def _import_trl(site: str) -> Any:
    if site and Path(site).is_dir() and site not in sys.path:
        sys.path.append(site)  # after site-packages: the installed torch/transformers win
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:
        raise Unavailable(
            f"trl not importable ({type(exc).__name__}: {exc}); install it for the bench with "
            f"pip install --no-deps --target {site or '/tmp/trl-site'} trl datasets pandas pyarrow "
            '"dill<0.4.2" "multiprocess<0.70.20" pytz tzdata'
        ) from exc
    return trl


def _make_trl(args: argparse.Namespace, path: Path, *, compact: bool) -> tuple[Any, str]:
    trl = _import_trl(args.trl_site)
    import torch
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    if compact:
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True  # score only completion positions, as on GPU

    class PrecomputedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose ``_prepare_inputs`` takes an already generated, scored micro-batch."""

        def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
            return inputs

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ga = args.batch // args.micro
    out_dir = tempfile.mkdtemp(prefix="bench-trl-")
    cfg = GRPOConfig(
        output_dir=out_dir,
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=ga,
        num_generations=args.micro,
        max_completion_length=args.completion,
        loss_type="dapo",
        epsilon=0.2,
        beta=0.0,
        num_iterations=1,
        temperature=1.0,
        seed=SEED,
        logging_steps=10**9,
        save_strategy="no",
    )
    trainer = PrecomputedGRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=cfg,
        # never iterated (no generation); a fixed fingerprint skips datasets' dill hashing
        train_dataset=Dataset(
            InMemoryTable.from_pydict({"prompt": ["x"] * args.batch}), fingerprint="bench"
        ),
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    # as Trainer._inner_training_loop does before its first step (single process: no wrapping)
    model, trainer.optimizer, trainer.lr_scheduler = trainer.accelerator.prepare(
        trainer.model, trainer.optimizer, trainer.lr_scheduler
    )
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = ga

    ids, adv = _token_batch(args, model.config.vocab_size)
    P, C = args.prompt, args.completion
    # old log-probs: TorchBackend's own computation on the same weights (ratio 1 at step one)
    old = _old_logprobs_like_ours(args, path, ids, adv).view(args.batch, P + C)[:, P:]  # [B, C]
    n_items = torch.tensor(float(args.batch * C))
    micro = []
    for s in range(0, args.batch, args.micro):
        e = s + args.micro
        micro.append(
            {
                "prompt_ids": ids[s:e, :P],  # [b, P]
                "prompt_mask": torch.ones(e - s, P, dtype=torch.long),  # [b, P]
                "completion_ids": ids[s:e, P:],  # [b, C]
                "completion_mask": torch.ones(e - s, C, dtype=torch.long),  # [b, C]
                "advantages": adv[s:e],  # [b]
                "old_per_token_logps": old[s:e].contiguous(),  # [b, C]
                "num_items_in_batch": n_items,  # action tokens of the whole batch (dapo)
            }
        )

    def step() -> dict[str, float]:
        loss = 0.0
        for i, mb in enumerate(micro):
            trainer.accelerator.gradient_state._set_sync_gradients(i == len(micro) - 1)
            loss += float(
                trainer.training_step(model, mb, None)
            )  # dapo: each is already / N of the batch
        grad_norm = float(trainer._clip_grad_norm(model))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return {"loss/policy": loss, "actor/grad_norm": grad_norm}

    opt = (
        trainer.optimizer.optimizer
        if hasattr(trainer.optimizer, "optimizer")
        else trainer.optimizer
    )
    fused = opt.defaults.get("fused")
    note = (
        f"trl {trl.__version__} GRPOTrainer dapo, micro={args.micro} x GA {ga}, optim={cfg.optim}"
        f"(fused={fused}){', completion-only LM head (patched)' if compact else ', LM head on all positions (CPU)'}"
    )
    return step, note


def _old_logprobs_like_ours(args: argparse.Namespace, path: Path, ids: Any, adv: Any) -> Any:
    """The initial model's log-probs of the batch, packed ``[T]``, via TorchBackend."""
    from lightning_backends._torch import TorchBackend, TorchBackendConfig

    backend = TorchBackend()
    backend.setup(str(path), TorchBackendConfig(device="cpu", dtype="float32"))
    lp = backend.compute_logprobs(_packed(ids, adv, args.prompt))  # [T]
    del backend
    return lp


def make_step(provider: str, args: argparse.Namespace) -> tuple[Any, str]:
    path = _model_path(args.model)
    if provider in ("ours", "ours_reference"):
        return _make_ours(
            args, path, logprob_impl="reference" if provider == "ours_reference" else None
        )
    if provider in ("trl", "trl_compact"):
        return _make_trl(args, path, compact=provider == "trl_compact")
    raise ValueError(f"unknown provider {provider!r}")


# --------------------------------------------------------------------------- child / parent


def _child(provider: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    try:
        step, note = make_step(provider, args)
    except Unavailable as exc:
        return {"unavailable": str(exc)}
    if mode == "mem":
        step()  # optimizer state and lazy buffers exist before the baseline
        peak, _ = peak_rss_delta(step)
        return {"peak": peak, "note": note}
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"times": times, "cpu": cpu, "note": note, "threads": torch.get_num_threads()}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (B)")
    ap.add_argument("--prompt", type=int, default=96, help="prompt tokens per sequence (P)")
    ap.add_argument("--completion", type=int, default=32, help="completion tokens per sequence (C)")
    ap.add_argument(
        "--micro", type=int, default=8, help="sequences per micro-batch (B / micro = GA)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="timed steps per fresh process")
    ap.add_argument(
        "--rounds", type=int, default=3, help="fresh processes per provider, interleaved"
    )
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-record", action="store_true", help="print, do not append to results.csv")
    ap.add_argument(
        "--trl-site",
        default=os.environ.get("LIGHTNING_BENCH_TRL_SITE", "/tmp/trl-site"),
        help="folder trl was pip-installed into with --target (appended to sys.path)",
    )
    ap.add_argument("--child", nargs=2, metavar=("PROVIDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.batch % args.micro:
        ap.error(f"--batch ({args.batch}) must be a multiple of --micro ({args.micro})")
    if min(args.prompt, args.completion, args.repeat, args.rounds) < 1 or args.warmup < 0:
        ap.error("--prompt, --completion, --repeat and --rounds must be >= 1, --warmup >= 0")
    return args


def _forward_args(args: argparse.Namespace) -> list[str]:
    return [
        "--model", args.model, "--batch", str(args.batch), "--prompt", str(args.prompt),
        "--completion", str(args.completion), "--micro", str(args.micro),
        "--warmup", str(args.warmup), "--repeat", str(args.repeat), "--trl-site", args.trl_site,
    ]  # fmt: skip


def measure(provider: str, args: argparse.Namespace) -> dict[str, Any]:
    """One fresh-process timing round of ``provider``: ``{"times": [...], "note": ...}``."""
    res = run_isolated(__spec__.name, [*_forward_args(args), "--child", provider, "time"])
    if "unavailable" in res:
        raise Unavailable(res["unavailable"])
    return res


def measure_memory(provider: str, args: argparse.Namespace) -> int:
    """Bytes of extra RSS at the peak of one step (fresh process, mmap for big allocations)."""
    return run_isolated(
        __spec__.name, [*_forward_args(args), "--child", provider, "mem"], for_memory=True
    )["peak"]


def main(argv: list[str] | None = None) -> list[BenchResult]:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args)), flush=True)
        return []
    B, P, C = args.batch, args.prompt, args.completion
    size = f"{args.model}:{B}x({P}+{C})/mb{args.micro}"
    tokens, actions = B * (P + C), B * C
    rows: list[BenchResult] = []
    measured: dict[str, dict] = {}
    wanted = args.providers.split(",")
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):  # rounds interleave the providers: shared-box drift hits all alike
        for provider in list(wanted):
            try:
                res = measure(provider, args)
            except Unavailable as exc:
                print(f"{BENCH}: skipping {provider}: {exc}", file=sys.stderr)
                wanted.remove(provider)
                continue
            m = measured.setdefault(provider, {"times": [], "cpu": [], "note": res["note"]})
            m["times"] += res["times"]
            m["cpu"] += res["cpu"]
    if not args.no_mem:
        for provider in wanted:
            measured[provider]["peak"] = measure_memory(provider, args)
    load = f"load avg {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    shared = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, shared box ({load}), median of "
        f"{args.rounds} fresh processes x {args.repeat} steps after {args.warmup} warm-up each"
    )
    for provider, m in measured.items():
        med, lo = statistics.median(m["times"]), min(m["times"])
        m["median"] = med
        rows += [
            BenchResult(BENCH, provider, size, "step_time_median", med, "s", m["note"]),
            BenchResult(BENCH, provider, size, "step_time_min", lo, "s", shared),
            BenchResult(
                BENCH, provider, size, "tokens_per_s", tokens / med, "tok/s", "B*(P+C) / median"
            ),
            BenchResult(
                BENCH, provider, size, "action_tokens_per_s", actions / med, "tok/s", "B*C / median"
            ),
            BenchResult(
                BENCH,
                provider,
                size,
                "cpu_s_per_step_median",
                statistics.median(m["cpu"]),
                "s",
                "process CPU time (all threads) per step: less sensitive to other jobs",
            ),
        ]
        if m.get("peak") is not None:
            rows.append(
                BenchResult(
                    BENCH,
                    provider,
                    size,
                    "peak_mem_step",
                    m["peak"] / 2**20,
                    "MiB",
                    "extra RSS at the peak of one step after one warm-up step (fresh process)",
                )
            )
    if "ours" in measured:
        for p in ("ours_reference", "trl", "trl_compact"):
            if p in measured:
                rows.append(
                    BenchResult(
                        BENCH,
                        "ours",
                        size,
                        f"speedup_vs_{p}",
                        measured[p]["median"] / measured["ours"]["median"],
                        "x",
                        f"{p} median step time / ours",
                    )
                )
    if args.no_record:
        for r in rows:
            print(f"{r.provider:>12} {r.metric:>22} {r.value:>12.4g} {r.unit:6} {r.note}")
    else:
        record(rows)
    _print_table(size, measured, tokens, actions)
    return rows


def _print_table(size: str, measured: dict[str, dict], tokens: int, actions: int) -> None:
    print(f"\n{BENCH} {size}  (tokens/step {tokens}, action tokens/step {actions})")
    print(
        f"{'provider':>14} {'median s':>9} {'p25-p75 s':>12} {'min s':>7} {'tok/s':>7} "
        f"{'act tok/s':>9} {'cpu s':>7} {'peak MiB':>9} {'vs ours':>8}"
    )
    ours = measured.get("ours", {}).get("median")
    for p, r in measured.items():
        q = statistics.quantiles(r["times"], n=4) if len(r["times"]) > 1 else [r["median"]] * 3
        peak = f"{r['peak'] / 2**20:9.1f}" if r.get("peak") is not None else f"{'-':>9}"
        rel = f"{r['median'] / ours:7.2f}x" if ours else f"{'-':>8}"
        print(
            f"{p:>14} {r['median']:9.3f} {q[0]:5.2f}-{q[2]:<6.2f} {min(r['times']):7.3f} "
            f"{tokens / r['median']:7.0f} {actions / r['median']:9.0f} "
            f"{statistics.median(r['cpu']):7.2f} {peak} {rel}"
        )
    print(
        "vs ours = provider's median step time / ours (> 1: ours is faster); "
        "cpu s = median process CPU seconds per step"
    )


if __name__ == "__main__":
    main()
