"""One prepared GPU check: every GPU path of the project proven in a single short run.

    bash bench/run_gpu.sh OUTDIR [--dry-run] [--only STEP,...]   # entry point: sets the paths
    python -m bench.gpu_check --out OUTDIR [--dry-run] [--only STEP,...] [--budget-s S]

Steps, in order. Each is guarded: an exception or a failed expectation is recorded (the
traceback goes to the log) and the next step runs; the exit status is 1 when any step failed
or was not run.

- ``env``: versions, the device and the two ceilings the bounds below divide by: the
  device-to-device copy bandwidth (bytes read + written per second) and the dense matmul
  rate (bf16 on CUDA, fp32 on CPU).
- ``ext``: ``lightning._ext.load()`` (prebuilt, or JIT-built with torch's cpp_extension by
  the project's ``_ext`` glue); on CUDA it must have compiled the CUDA GAE kernel.
- ``parity``: every Triton kernel (``lightning/kernels/*/triton.py``: GAE; group stats and
  masked whitening; log-probs from logits and from hidden states, forward and both
  gradients, with temperature and entropy) and the CUDA GAE kernel against the pure-torch
  reference (the spec) run in fp32 on the same rounded inputs, in fp32 and bf16. One row
  per comparison with the largest absolute error; :data:`TOLERANCES` decide pass or fail.
- ``kernels``: GAE, group stats (GRPO advantages broadcast to tokens; masked whitening) and
  chunked log-probs (from logits and from hidden states; forward, and forward + backward)
  on the bench modules' own inputs and providers (``bench/bench_*.py`` ``make_fn``), timed
  against the naive torch version (``speedup_vs_naive``) and against the bound
  (``x_bound`` = time / bound: the op's minimum bytes moved / copy bandwidth, or for the
  log-probs from hidden states, which are matmul-bound, its minimum FLOPs / matmul rate).
  GAE and group stats have no backward: advantages are constants of the loss.
- ``train``: ``TorchBackend.train_step`` (``backends/_torch.py``) in bf16 on random weights
  of Qwen2.5-0.5B's architecture (built from its config: no download) over a packed batch
  of 64 sequences of 512 prompt + 512 completion tokens in micro-batches of 16k tokens:
  step time, tokens/s, peak memory, model FLOP/s (6 x parameters x tokens) and its share
  of the measured matmul rate.
- ``engine``: ``TorchEngine`` (``lightning/engine/torch_engine.py``) on the same checkpoint:
  generated tokens/s at batch 1, 16 and 64 (128-token prompts, 128 new tokens, greedy),
  then a weight update from the trained backend and its landing check: the engine's
  log-probs of a probe (``probe_logprobs``) differ from the trainer's by more than the
  tolerance before the update (so the probe can see it) and by at most the tolerance after
  it, the version is bumped and a completion after it reports the new version.

Output in OUTDIR: ``results.csv`` (rows through :func:`bench.harness.record`, the format of
``bench/data/results.csv``, with the machine and git SHA; ``$LIGHTNING_GIT_SHA`` where the
tree has no ``.git``), ``results.md`` (a status table per step, then every row), both
rewritten after each step so a killed run still leaves what it measured.

``--dry-run``: the same steps on CPU at tiny sizes (:data:`DRY_PLAN`), the Triton kernels
under ``TRITON_INTERPRET=1`` (set here, before triton is imported) in fp32 and fp16 (bf16 is
wrong in the interpreter), the C++ ``cpp`` kernel of the same ``lightning_rl::gae`` op in
place of the CUDA one. ``tests/bench/test_run_gpu.py`` runs it in the default suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.harness import BenchResult, git_sha, machine, record

ROOT = Path(__file__).resolve().parent.parent

#: Qwen2.5-0.5B's architecture (494M parameters, tied embeddings); weights are random.
QWEN2_05B: dict[str, Any] = {
    "vocab_size": 151_936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32_768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
#: The dry run's model: the same architecture class, tiny.
TINY_QWEN2: dict[str, Any] = {
    **QWEN2_05B,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
}

#: ``(op, dtype) -> (atol, rtol)`` of the values, and of the gradients, against the fp32
#: reference on the same rounded inputs. GAE and group stats compute in fp32 whatever the
#: input dtype (only reassociation and atomics' order differ: a few ulps). Log-probs from
#: logits: fp32 math, only the gradient is rounded to the input dtype (bf16: 2^-9 relative).
#: From hidden states the GEMM output is rounded to the input dtype too (logits ~ N(0, 9):
#: a bf16 half-ulp is up to 0.03 at |z| ~ 12).
TOLERANCES: dict[tuple[str, str], tuple[tuple[float, float], tuple[float, float]]] = {
    ("scan", "float32"): ((1e-4, 1e-4), (0.0, 0.0)),
    ("scan", "float16"): ((1e-4, 1e-4), (0.0, 0.0)),
    ("scan", "bfloat16"): ((1e-4, 1e-4), (0.0, 0.0)),
    ("logits", "float32"): ((1e-4, 1e-4), (1e-5, 1e-4)),
    ("logits", "float16"): ((1e-4, 1e-4), (1e-3, 2e-3)),
    ("logits", "bfloat16"): ((1e-4, 1e-4), (4e-3, 1.6e-2)),
    ("hidden", "float32"): ((2e-4, 2e-4), (2e-4, 2e-4)),
    ("hidden", "float16"): ((3e-2, 3e-2), (3e-2, 3e-2)),
    ("hidden", "bfloat16"): ((1e-1, 2e-2), (5e-2, 5e-2)),
}
#: Largest probe log-prob gap between engine and trainer that counts as "landed" (same
#: weights, same dtype and device: only kernel-selection noise), per engine dtype.
LANDING_ATOL = {"float32": 2e-3, "float16": 5e-2, "bfloat16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run does: the GPU's sizes (:data:`GPU_PLAN`) or the dry run's (:data:`DRY_PLAN`)."""

    device: str
    low_precision: str
    """The second dtype every kernel is checked in (besides fp32)."""
    ext_impl: str
    """The ``lightning_rl::gae`` kernel checked: ``cuda``, or ``cpp`` in the dry run."""
    gae_lengths: tuple[int, ...]
    """Parity: packed sequence lengths (odd, one past a Triton chunk, one long)."""
    group_parity: tuple[int, int, int]
    """Parity: (samples, distinct group labels, whitened tokens)."""
    logprob_shapes: tuple[tuple[int, int, int], ...]
    """Parity: (tokens N, vocabulary V, hidden H) per case."""
    gae_size: str
    group_size: str
    logprobs_size: str
    """Timing sizes, in the bench modules' notation (``BxL``, ``NxV``)."""
    model: dict[str, Any]
    train_batch: tuple[int, int, int]
    """(sequences, prompt tokens, completion tokens) of the training batch."""
    micro_batch_tokens: int
    dtype: str
    """Model dtype of the training step and the engine."""
    timed_steps: int
    engine_batches: tuple[int, ...]
    engine_prompt: int
    engine_tokens: int
    copy_bytes: int
    matmul_n: int
    cpu_repeat: int = 2
    """Timed repeats per point when timing on CPU (the dry run)."""


GPU_PLAN = Plan(
    device="cuda",
    low_precision="bfloat16",
    ext_impl="cuda",
    gae_lengths=(1, 7, 300, 1025, 4099, 33_000),
    group_parity=(100_003, 997, 1_000_003),
    logprob_shapes=((1, 17, 8), (13, 1000, 32), (40, 2500, 16), (37, 151_936, 896)),
    gae_size="2048x4096",
    group_size="2048x4096",
    logprobs_size="16384x151936",
    model=QWEN2_05B,
    train_batch=(64, 512, 512),
    micro_batch_tokens=16_384,
    dtype="bfloat16",
    timed_steps=3,
    engine_batches=(1, 16, 64),
    engine_prompt=128,
    engine_tokens=128,
    copy_bytes=1 << 30,
    matmul_n=8192,
)
DRY_PLAN = Plan(
    device="cpu",
    low_precision="float16",
    ext_impl="cpp",
    gae_lengths=(1, 7, 300, 1025),
    group_parity=(203, 17, 3001),
    logprob_shapes=((1, 17, 8), (13, 1000, 32)),
    gae_size="4x64",
    group_size="16x64",
    logprobs_size="8x512",
    model=TINY_QWEN2,
    train_batch=(4, 12, 6),
    micro_batch_tokens=36,
    dtype="bfloat16",
    timed_steps=2,
    engine_batches=(1, 16, 64),
    engine_prompt=8,
    engine_tokens=4,
    copy_bytes=1 << 22,
    matmul_n=128,
)


@dataclasses.dataclass(frozen=True)
class StepResult:
    name: str
    status: str  # "ok", "failed" or "not run"
    seconds: float
    detail: str = ""


# --------------------------------------------------------------------------- the run


class Check:
    """State shared by the steps: the plan, the rows, the failures of the current step, and
    the objects later steps reuse (ceilings, the checkpoint, the trained backend)."""

    def __init__(self, plan: Plan, out: Path, *, budget_s: float = math.inf) -> None:
        self.plan = plan
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.rows: list[BenchResult] = []
        self.failures: list[str] = []
        self._pending: list[BenchResult] = []
        self._tmp: Path | None = None
        self._ceilings: tuple[float, float] | None = None
        self._model_dir: Path | None = None
        self._trainer: tuple[Any, Any] | None = None
        self.versions: dict[str, str] = {}

    # rows and expectations

    def row(self, bench: str, provider: str, size: str, metric: str, value: float, unit: str, note: str = "") -> None:  # fmt: skip
        self._pending.append(BenchResult(bench, provider, size, metric, float(value), unit, note))

    def put(self, bench: str, provider: str, size: str, rows: Iterable[tuple[str, float, str, str]]) -> None:  # fmt: skip
        """One row per ``(metric, value, unit, note)`` of ``bench``/``provider``/``size``."""
        for metric, value, unit, note in rows:
            self.row(bench, provider, size, metric, value, unit, note)

    def expect(self, ok: bool, what: str) -> bool:
        """Record ``what`` as a failure of the current step unless ``ok``."""
        if not ok:
            self.failures.append(what)
            print(f"gpu_check: FAIL {what}", flush=True)
        return ok

    def flush(self) -> None:
        """Append the rows of the current step to ``results.csv`` (and print them)."""
        if self._pending:
            self.rows += record(self._pending, path=self.out / "results.csv")
            self._pending = []

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="lightning-gpu-check-"))
        return self._tmp

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # measuring

    def sync(self) -> None:
        import torch

        if self.plan.device == "cuda":
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> tuple[float, float]:
        """(median, low) seconds: ``do_bench`` median and p20 on CUDA, median and min of
        ``cpu_repeat`` calls after one warm-up on CPU."""
        from bench.harness import time_cpu, time_gpu

        if self.plan.device == "cuda":
            t = time_gpu(fn)
            return t["median"], t["p20"]
        t = time_cpu(fn, repeat=self.plan.cpu_repeat, warmup=1)
        return t["median"], t["min"]

    def peak(self, fn: Callable[[], object]) -> tuple[int, object]:
        """(bytes ``fn()`` allocates at its peak above what was allocated before, its result):
        CUDA allocator on CUDA, resident memory on CPU."""
        from bench.harness import peak_cuda_delta, peak_rss_delta

        return (peak_cuda_delta if self.plan.device == "cuda" else peak_rss_delta)(fn)

    def ceilings(self) -> tuple[float, float]:
        """(copy bandwidth in bytes/s, matmul rate in FLOP/s), measured once per run."""
        if self._ceilings is None:
            import torch

            dev, n = self.plan.device, self.plan.matmul_n
            x = torch.empty(self.plan.copy_bytes, dtype=torch.uint8, device=dev)
            y = torch.empty_like(x)
            bw = 2 * x.numel() / self.time(lambda: y.copy_(x))[0]
            del x, y
            dtype = torch.bfloat16 if dev == "cuda" else torch.float32
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            flops = 2 * n**3 / self.time(lambda: a @ b)[0]
            self._ceilings = (bw, flops)
        return self._ceilings

    # the checkpoint and the trainer, shared by the train and engine steps

    def model_dir(self) -> Path:
        if self._model_dir is None:
            self._model_dir = build_checkpoint(
                self.tmp / "model", self.plan.model, self.plan.device, self.plan.dtype
            )
        return self._model_dir

    def trainer(self) -> tuple[Any, Any]:
        """(a set-up ``TorchBackend``, its packed training batch with old log-probs)."""
        if self._trainer is None:
            from lightning_backends._torch import TorchBackend, TorchBackendConfig

            from bench import bench_train_step

            plan = self.plan
            B, P, C = plan.train_batch
            backend = TorchBackend()
            backend.setup(
                str(self.model_dir()),
                TorchBackendConfig(
                    device=plan.device,
                    dtype=plan.dtype,
                    micro_batch_tokens=plan.micro_batch_tokens,
                    loss="ppo",
                    # large enough that bf16 weights move (1e-6 is below their resolution),
                    # so the engine's landing check sees the update; speed does not depend on it
                    lr=1e-3,
                    seed=0,
                ),
            )
            shape = SimpleNamespace(batch=B, prompt=P, completion=C)
            ids, adv = bench_train_step._token_batch(
                shape, plan.model["vocab_size"]
            )  # [B, P + C], [B]
            batch = bench_train_step._packed(ids, adv, P)
            batch.old_logprobs = backend.compute_logprobs(batch)  # [T]: ratio 1 at the first step
            self._trainer = (backend, batch)
        return self._trainer


def run_steps(
    check: Check, steps: Sequence[tuple[str, Callable[[Check], None]]]
) -> list[StepResult]:
    """Run ``steps`` in order, each guarded; rewrite the report after each one."""
    results: list[StepResult] = []
    for name, fn in steps:
        if check.over_budget():
            results.append(
                StepResult(
                    name, "not run", 0.0, f"the run is over its {check.budget_s:.0f} s budget"
                )
            )
            write_report(check, results)
            continue
        print(f"\n===== gpu_check: {name}", flush=True)
        check.failures = []
        t0 = time.perf_counter()
        try:
            fn(check)
        except Exception as exc:  # noqa: BLE001 - recorded; the next step runs
            traceback.print_exc()
            check.failures.append(f"{type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t0
        try:
            check.flush()
        except Exception as exc:  # noqa: BLE001
            check.failures.append(f"writing results.csv: {exc!r}")
        status = "failed" if check.failures else "ok"
        results.append(StepResult(name, status, seconds, "; ".join(check.failures)))
        print(f"===== gpu_check: {name} {status} in {seconds:.1f} s", flush=True)
        write_report(check, results)
    return results


def write_report(check: Check, results: Sequence[StepResult]) -> None:
    """``results.md``: run facts, one status line per step, then every row."""
    plan = check.plan
    lines = [
        "# lightning GPU check",
        "",
        f"- mode: {'GPU' if plan.device == 'cuda' else 'dry run (CPU, tiny sizes, Triton interpreter)'}",
        f"- git: {git_sha()}; machine: {machine()}",
        *(f"- {k}: {v}" for k, v in check.versions.items()),
        f"- wall time so far: {time.perf_counter() - check.t0:.0f} s",
        "",
        "| step | status | seconds | failures |",
        "| --- | --- | ---: | --- |",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {_md(r.detail)} |")
    lines += [
        "",
        "| bench | provider | size | metric | value | unit | note |",
        "| --- | --- | --- | --- | ---: | --- | --- |",
    ]
    for r in check.rows:
        lines.append(
            f"| {r.bench} | {r.provider} | {r.size} | {r.metric} | {r.value:.4g} | {r.unit} | {_md(r.note)} |"
        )
    (check.out / "results.md").write_text("\n".join(lines) + "\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- env and ext


def step_env(check: Check) -> None:
    import torch

    plan = check.plan
    v = check.versions
    v["python"] = sys.version.split()[0]
    v["torch"] = f"{torch.__version__} (CUDA {torch.version.cuda})"
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = "not installed"
    import transformers

    v["transformers"] = transformers.__version__
    if plan.device == "cuda":
        if not check.expect(
            torch.cuda.is_available(), "torch sees no CUDA device (use --dry-run on CPU)"
        ):
            return
        v["device"] = (
            f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
        )
    else:
        v["device"] = "cpu, TRITON_INTERPRET=" + os.environ.get("TRITON_INTERPRET", "")
    bw, flops = check.ceilings()
    dt = "bf16" if plan.device == "cuda" else "fp32"
    check.row("env", "copy", f"{plan.copy_bytes >> 20}MiB", "bandwidth", bw / 1e9, "GB/s", "device copy, read + write")  # fmt: skip
    check.row("env", f"matmul_{dt}", f"{plan.matmul_n}^3", "rate", flops / 1e12, "TFLOP/s", "torch a @ b")  # fmt: skip


def step_ext(check: Check) -> None:
    import torch

    from lightning import _ext

    t0 = time.perf_counter()
    info = _ext.load()
    seconds = time.perf_counter() - t0
    check.versions["lightning/_ext"] = f"{info.source} {info.path} (cuda={info.cuda})"
    check.row("ext", info.source, "-", "load_s", seconds, "s", f"cuda={info.cuda}; a JIT build includes compiling")  # fmt: skip
    want = check.plan.ext_impl
    dispatch_key = "CUDA" if want == "cuda" else "CPU"
    check.expect(
        _ext.has_kernel("gae", dispatch_key),
        f"lightning_rl::gae has no {dispatch_key} kernel ({info})",
    )
    if want == "cuda":
        check.expect(
            info.cuda and torch.version.cuda is not None,
            f"the extension was built without CUDA ({info})",
        )


# --------------------------------------------------------------------------- parity


def _compare(
    check: Check, where: tuple[str, str, str, str], got: Any, exp: Any, atol: float, rtol: float
) -> None:
    """Row ``where`` = (bench, provider, size, metric) with ``got``'s largest absolute error
    against ``exp``; a failure if any element is off by more than ``atol + rtol * |exp|``
    (NaN counts as off)."""
    label = " ".join(where)
    shape = None if got is None else tuple(got.shape)
    if not check.expect(shape == tuple(exp.shape), f"{label}: shape {shape} != {tuple(exp.shape)}"):
        return
    got, exp = got.detach().float().cpu(), exp.detach().float().cpu()
    err = (got - exp).abs()  # [...]
    ok = bool((err <= atol + rtol * exp.abs()).all())
    worst = float(err.nan_to_num(math.inf).max()) if err.numel() else 0.0
    check.row(*where, worst, "abs", f"{'ok' if ok else 'FAIL'} (atol {atol:g}, rtol {rtol:g})")
    check.expect(ok, f"{label}: max abs err {worst:.3g} over atol {atol:g} + rtol {rtol:g} x |ref|")


def _dtypes(check: Check) -> tuple[str, str]:
    return ("float32", check.plan.low_precision)


def _parity_gae(check: Check) -> None:
    import torch

    from lightning import kernels
    from lightning.kernels.gae import reference

    plan, dev = check.plan, check.plan.device
    lengths = plan.gae_lengths
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev
    )  # [B + 1]
    r32 = torch.randn(T, generator=g).to(dev)  # [T]
    v32 = torch.randn(T, generator=g).to(dev)  # [T]
    mask = (torch.rand(T, generator=g) >= 0.3).to(dev)  # [T] bool
    for dtype in _dtypes(check):
        (atol, rtol), _ = TOLERANCES[("scan", dtype)]
        r, v = r32.to(getattr(torch, dtype)), v32.to(getattr(torch, dtype))  # [T]
        for label, values, m in (("gae", v, mask), ("returns", None, mask), ("unmasked", v, None)):
            exp = reference.gae(
                r.float(), None if values is None else values.float(), m, cu, gamma=0.97, lam=0.9
            )
            for impl in ("triton", plan.ext_impl):
                case = f"{impl}/{dtype}/{label}/T={T}"
                got = kernels.gae(r, values, m, cu, gamma=0.97, lam=0.9, impl=impl)
                _compare(
                    check,
                    ("parity", "gae", case, "advantages_max_abs_err"),
                    got[0],
                    exp[0],
                    atol,
                    rtol,
                )
                _compare(
                    check,
                    ("parity", "gae", case, "returns_max_abs_err"),
                    got[1],
                    exp[1],
                    atol,
                    rtol,
                )


def _parity_group_stats(check: Check) -> None:
    import torch

    from lightning import kernels
    from lightning.kernels.group_stats import reference

    dev = check.plan.device
    n, labels, T = check.plan.group_parity
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, labels, (n,), generator=g) * 7 + 3).to(dev)  # [n] sparse labels
    s32 = (torch.randn(n, generator=g) * 3 + 100).to(dev)  # [n]: a large offset must not cancel
    x32 = (torch.randn(T, generator=g) * 2 + 1).to(dev)  # [T]
    mask = (torch.rand(T, generator=g) > 0.3).to(dev)  # [T]
    for dtype in _dtypes(check):
        (atol, rtol), _ = TOLERANCES[("scan", dtype)]
        s, x = s32.to(getattr(torch, dtype)), x32.to(getattr(torch, dtype))
        case = f"triton/{dtype}/N={n}"
        got = kernels.group_stats(s, ids, impl="triton")
        exp = reference.group_stats(s.float(), ids)
        _compare(
            check,
            ("parity", "group_stats", case, "mean_max_abs_err"),
            got.mean,
            exp.mean,
            atol,
            rtol,
        )
        _compare(
            check, ("parity", "group_stats", case, "std_max_abs_err"), got.std, exp.std, atol, rtol
        )
        check.expect(
            torch.equal(got.count.cpu(), exp.count.cpu()), f"group_stats {case}: counts differ"
        )
        for shift in (True, False):
            case = f"triton/{dtype}/T={T}/shift_mean={shift}"
            got_w = kernels.masked_whiten(x, mask, shift_mean=shift, impl="triton")
            exp_w = reference.masked_whiten(x.float(), mask, shift_mean=shift)
            _compare(
                check,
                ("parity", "masked_whiten", case, "out_max_abs_err"),
                got_w,
                exp_w,
                atol,
                rtol,
            )


def _logprob_inputs(N: int, V: int, H: int, device: str):
    import torch

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(N, H, generator=g)  # [N, H]
    weight = torch.randn(V, H, generator=g) / H**0.5 * 3  # [V, H]: logits ~ N(0, 9)
    ids = torch.randint(0, V, (N,), generator=g)  # [N]
    g_lp = torch.randn(N, generator=g)  # [N]
    g_ent = torch.randn(N, generator=g)  # [N]
    return [t.to(device) for t in (hidden, weight, ids, g_lp, g_ent)]


def _lp_forward_backward(
    fn: Callable[..., Any], leaves: list[Any], g_lp: Any, g_ent: Any
) -> tuple[Any, Any, list[Any]]:
    """(logprobs, entropy, gradients of each leaf) of ``sum(g_lp * lp + g_ent * ent)``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    ((out.logprobs * g_lp).sum() + (out.entropy * g_ent).sum()).backward()
    return out.logprobs, out.entropy, [t.grad for t in leaves]


def _lp_op(src: str, impl: str | None, ids: Any, temperature: float) -> Callable[..., Any]:
    """``logprobs_from_<src>`` (with entropy) as a function of its differentiable inputs:
    ``impl`` through the public dispatch, or the reference when ``impl`` is None."""
    from lightning import kernels
    from lightning.kernels.logprobs import reference

    kw: dict[str, Any] = {"temperature": temperature, "return_entropy": True}
    if impl is not None:
        kw["impl"] = impl
    fn = {
        ("logits", False): kernels.logprobs_from_logits,
        ("hidden", False): kernels.logprobs_from_hidden,
        ("logits", True): reference.logprobs_from_logits,
        ("hidden", True): reference.logprobs_from_hidden,
    }[(src, impl is None)]
    return lambda *xs: fn(*xs, ids, **kw)


def _parity_logprobs(check: Check) -> None:
    import torch

    for N, V, H in check.plan.logprob_shapes:
        hidden32, weight32, ids, g_lp, g_ent = _logprob_inputs(N, V, H, check.plan.device)
        for dtype in _dtypes(check):
            dt = getattr(torch, dtype)
            hidden, weight = hidden32.to(dt), weight32.to(dt)  # [N, H], [V, H]
            with torch.no_grad():
                logits = hidden @ weight.T  # [N, V] in dtype: the given logits
            for src, leaves in (("logits", [logits]), ("hidden", [hidden, weight])):
                (atol, rtol), (gatol, grtol) = TOLERANCES[(src, dtype)]
                case = f"triton/{dtype}/from_{src}/{N}x{V}x{H}"
                lp, ent, grads = _lp_forward_backward(
                    _lp_op(src, "triton", ids, 0.7), leaves, g_lp, g_ent
                )
                exp = _lp_forward_backward(
                    _lp_op(src, None, ids, 0.7), [t.float() for t in leaves], g_lp, g_ent
                )
                _compare(
                    check,
                    ("parity", "logprobs", case, "logprobs_max_abs_err"),
                    lp,
                    exp[0],
                    atol,
                    rtol,
                )
                _compare(
                    check,
                    ("parity", "logprobs", case, "entropy_max_abs_err"),
                    ent,
                    exp[1],
                    atol,
                    rtol,
                )
                for name, got, want in zip(("d_" + src, "d_weight"), grads, exp[2]):
                    _compare(
                        check,
                        ("parity", "logprobs", case, f"{name}_max_abs_err"),
                        got,
                        want,
                        gatol,
                        grtol,
                    )
            del logits


def step_parity(check: Check) -> None:
    for part in (_parity_gae, _parity_group_stats, _parity_logprobs):
        try:
            part(check)
        except Exception as exc:  # noqa: BLE001 - one op's crash must not hide the others'
            traceback.print_exc()
            check.expect(False, f"{part.__name__}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- kernel timings


def _kernel_benches(check: Check) -> list[tuple[Any, str, str, list[str]]]:
    """(bench module, name, size, providers); the first provider is the naive one."""
    from bench import bench_gae, bench_group_stats, bench_logprobs

    plan = check.plan
    lp = [
        f"{impl}/{mode}"
        for mode in ("fwd", "train")
        for impl in ("reference", "triton", "reference_logits", "triton_logits")
    ]
    return [
        (bench_gae, "gae", plan.gae_size, ["reference", "triton", plan.ext_impl]),
        (
            bench_group_stats,
            "group_stats",
            plan.group_size,
            ["grpo/reference", "grpo/triton", "whiten/reference", "whiten/triton"],
        ),
        (bench_logprobs, "logprobs", plan.logprobs_size, lp),
    ]


def _naive(bench: str, provider: str) -> str:
    """The naive torch provider ``provider`` is compared with."""
    if bench == "gae":
        return "reference"
    if bench == "group_stats":
        return provider.split("/")[0] + "/reference"
    impl, mode = provider.split("/")
    return ("reference_logits" if impl.endswith("_logits") else "reference") + "/" + mode


def _bound(check: Check, bench: str, provider: str, size: str) -> tuple[float, str]:
    """(seconds the op needs at least, what bounds it): minimum traffic / copy bandwidth, or
    for log-probs from hidden states minimum FLOPs / matmul rate."""
    import torch

    from bench import bench_gae, bench_logprobs

    bw, flops = check.ceilings()
    a, b = map(int, size.split("x"))
    if bench == "gae":
        return (
            a * b * bench_gae.BYTES_PER_TOKEN / bw,
            f"{bench_gae.BYTES_PER_TOKEN} B/token at copy bandwidth",
        )
    if bench == "group_stats":
        per = 5 if provider.startswith("grpo") else 9  # mask in + fp32 out; whiten also reads x
        return a * b * per / bw, f"{per} B/token at copy bandwidth"
    impl, mode = provider.split("/")
    item = torch.finfo(bench_logprobs._dtype(check.plan.device)).bits // 8
    if impl.endswith("_logits"):
        passes = (
            1 if mode == "fwd" else 3
        )  # fwd reads the logits; bwd reads them and writes dlogits
        return a * b * item * passes / bw, f"{passes} pass(es) over [N, V] at copy bandwidth"
    gemms = 1 if mode == "fwd" else 3  # logits; + dhidden and dweight
    return (
        2 * a * b * bench_logprobs.H * gemms / flops,
        f"{gemms} [N, V, H] GEMM(s) at the matmul rate",
    )


def _measure(
    check: Check, mod: Any, provider: str, size: str
) -> tuple[float, float, int, str, Any]:
    """(median s, low s, peak bytes, note, output) of one bench provider on the bench's own
    (seeded, so every provider's same) inputs."""
    mod.warm_up(provider, check.plan.device)
    fn, note = mod.make_fn(provider, size, check.plan.device)
    peak, out = check.peak(fn)
    median, low = check.time(fn)
    return median, low, peak, note, out


def _agreement(
    check: Check, bench: str, provider: str, size: str, out: Any, naive_out: Any
) -> None:
    """Rows: the largest difference of ``provider``'s outputs from the naive provider's at
    the benchmark's size (parity covers odd shapes; this covers the large ones)."""
    from bench import bench_logprobs

    if bench == "logprobs":
        key = (
            "logits" if "_logits" in provider else "hidden",
            str(bench_logprobs._dtype(check.plan.device)).removeprefix("torch."),
        )
    else:
        key = ("scan", "float32")  # the bench inputs are fp32
    (atol, rtol), _ = TOLERANCES[key]
    outs, naive_outs = (out, naive_out) if isinstance(out, tuple) else ((out,), (naive_out,))
    for i, (got, exp) in enumerate(zip(outs, naive_outs)):
        _compare(
            check, (bench, provider, size, f"out{i}_max_abs_err_vs_naive"), got, exp, atol, rtol
        )


def step_kernels(check: Check) -> None:
    import torch

    from bench.harness import Unavailable

    dev = check.plan.device
    for mod, bench, size, providers in _kernel_benches(check):
        medians: dict[str, float] = {}
        outputs: dict[str, Any] = {}
        for provider in providers:
            try:
                median, low, peak, note, out = _measure(check, mod, provider, size)
            except Exception as exc:  # noqa: BLE001 - Unavailable too: every provider must run
                if not isinstance(exc, Unavailable):
                    traceback.print_exc()
                check.expect(False, f"{bench} {provider} at {size}: {type(exc).__name__}: {exc}")
                continue
            finally:
                if dev == "cuda":
                    torch.cuda.empty_cache()
            bound, why = _bound(check, bench, provider, size)
            low_note = "p20 (do_bench), as bench.harness" if dev == "cuda" else "min"
            check.put(bench, provider, size, [
                ("time_median", median, "s", note),
                ("time_min", low, "s", low_note),
                ("peak_mem", peak / 2**20, "MiB", "allocated at the peak of one call, over its inputs"),
                ("x_bound", median / bound, "x", f"time / bound; bound {bound:.3g} s = {why}"),
            ])  # fmt: skip
            naive = _naive(bench, provider)
            if naive == provider:
                medians[provider], outputs[provider] = median, out
            elif naive in medians:
                speedup = medians[naive] / median
                check.row(bench, provider, size, "speedup_vs_naive", speedup, "x", f"{naive} time / this")  # fmt: skip
                _agreement(check, bench, provider, size, out, outputs[naive])
            del out


# --------------------------------------------------------------------------- train step


def build_checkpoint(path: Path, arch: dict[str, Any], device: str, dtype: str) -> Path:
    """Write a Qwen2 checkpoint with random weights (seed 0) of architecture ``arch`` and a
    word-level tokenizer over its whole vocabulary (``t0`` ... ``t{V-1}``; eos ``t{V-1}``) to
    ``path``: what ``from_pretrained`` loads, offline, with nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    V = arch["vocab_size"]
    config = Qwen2Config(**arch, bos_token_id=0, eos_token_id=V - 1, pad_token_id=V - 2)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(str(path))
    del model
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="t0",
        eos_token=f"t{V - 1}",
        pad_token=f"t{V - 2}",
        unk_token="t0",
    )
    tokenizer.save_pretrained(str(path))
    return path


def _model_size(check: Check) -> str:
    arch = check.plan.model
    return f"qwen2-{arch['num_hidden_layers']}L-{arch['hidden_size']}h-{arch['vocab_size']}v"


def step_train(check: Check) -> None:
    import torch

    plan = check.plan
    t0 = time.perf_counter()
    backend, batch = check.trainer()
    setup_s = time.perf_counter() - t0
    B, P, C = plan.train_batch
    size = f"{_model_size(check)}:{B}x({P}+{C})/mbt{plan.micro_batch_tokens}/{plan.dtype}"
    n_params = sum(p.numel() for p in backend.model.parameters())
    expected_micro = math.ceil(B * (P + C) / plan.micro_batch_tokens)
    first = backend.train_step(batch)  # warm-up: optimizer state, kernels, allocator
    check.expect(
        all(math.isfinite(v) for v in first.values()),
        f"non-finite metrics after the first step: {first}",
    )
    check.expect(
        first["perf/micro_batches"] == expected_micro,
        f"{first['perf/micro_batches']} micro-batches, expected {expected_micro}",
    )
    check.expect(first["actor/grad_norm"] > 0, f"zero gradient norm: {first}")
    times, metrics = [], first
    for _ in range(plan.timed_steps):
        check.sync()
        t = time.perf_counter()
        metrics = backend.train_step(batch)
        check.sync()
        times.append(time.perf_counter() - t)
    extra, _ = check.peak(lambda: backend.train_step(batch))  # one more step, for its peak memory
    # peak_cuda_delta reset the peak counter just before that step: this is the step's peak
    total = torch.cuda.max_memory_allocated() if plan.device == "cuda" else None
    check.expect(all(math.isfinite(v) for v in metrics.values()), f"non-finite metrics: {metrics}")
    med = statistics.median(times) if times else math.nan
    tokens, actions = B * (P + C), B * C
    _, flops = check.ceilings()
    model_flops = 6 * n_params * tokens / med  # attention FLOPs not counted
    note = f"TorchBackend ppo token-mean, {n_params / 1e6:.0f}M params, median of {len(times)} steps after a warm-up"
    rows = [
        ("setup_s", setup_s, "s", "random checkpoint written, loaded, old log-probs"),
        ("step_time_median", med, "s", note),
        ("tokens_per_s", tokens / med, "tok/s", "B*(P+C) / median"),
        ("action_tokens_per_s", actions / med, "tok/s", "B*C / median"),
        ("model_tflops", model_flops / 1e12, "TFLOP/s", "6 x params x tokens / step time"),
        ("mfu_vs_matmul", model_flops / flops, "x", "model FLOP/s / measured matmul rate"),
        ("peak_mem_step_extra", extra / 2**30, "GiB", "peak of one step over weights + optimizer state"),
    ]  # fmt: skip
    if total is not None:
        rows.append(("peak_mem_step_total", total / 2**30, "GiB", "max_memory_allocated over one step"))  # fmt: skip
    check.put("train", "torch_backend", size, rows)


# --------------------------------------------------------------------------- engine


async def _generate_all(engine: Any, prompts: list[list[int]], params: Any) -> int:
    import anyio

    produced = 0

    async def one(p: list[int]) -> None:
        nonlocal produced
        result = await engine.generate(p, params)
        produced += len(result.choices[0].token_ids)

    async with anyio.create_task_group() as tg:
        for p in prompts:
            tg.start_soon(one, p)
    return produced


async def _engine_throughput(check: Check, engine: Any, size: str) -> None:
    import torch

    from lightning.engine import SamplingParams

    plan = check.plan
    g = torch.Generator().manual_seed(3)
    V = plan.model["vocab_size"]
    greedy = SamplingParams(max_tokens=plan.engine_tokens, temperature=0.0, ignore_eos=True)
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for batch in plan.engine_batches:
        prompts = torch.randint(0, V - 2, (batch, plan.engine_prompt), generator=g).tolist()
        await _generate_all(engine, prompts, warm)  # slab rows, kernels for this batch shape
        t0 = time.perf_counter()
        produced = await _generate_all(engine, prompts, greedy)
        wall = time.perf_counter() - t0
        check.expect(
            produced == batch * plan.engine_tokens,
            f"batch {batch}: {produced} tokens, expected {batch * plan.engine_tokens}",
        )
        check.row("engine", "torch_engine", f"{size}/b{batch}", "tokens_per_s", produced / wall, "tok/s",
                  f"{batch} concurrent requests, {plan.engine_prompt}-token prompts, {plan.engine_tokens} new tokens, greedy")  # fmt: skip


async def _landing_check(check: Check, engine: Any, size: str) -> None:
    import anyio
    import torch

    from lightning.engine import SamplingParams
    from lightning.engine.vllm_engine import probe_logprobs

    backend, batch = check.trainer()
    while backend.step < 3:  # the engine step alone (--only engine): the weights must move
        await anyio.to_thread.run_sync(backend.train_step, batch)
    probe = torch.randint(
        0, check.plan.model["vocab_size"] - 2, (64,), generator=torch.Generator().manual_seed(4)
    ).tolist()

    async def gap() -> float:
        ours = await anyio.to_thread.run_sync(probe_logprobs, engine.model, probe)
        trainer = await anyio.to_thread.run_sync(probe_logprobs, backend.model, probe)
        return max(abs(a - b) for a, b in zip(ours, trainer))

    atol = LANDING_ATOL[check.plan.dtype]
    before = await gap()
    version0 = engine.policy_version
    t0 = time.perf_counter()
    version = await engine.update_weights(backend.export_weights())
    update_s = time.perf_counter() - t0
    after = await gap()
    result = await engine.generate(
        probe[:8], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    )
    check.put("engine", "torch_engine", size, [
        ("weight_update_s", update_s, "s", "update_weights(backend.export_weights()), in place"),
        ("landing_gap_before", before, "nats", f"max |engine - trainer| probe log-prob, old weights; must exceed {atol:g}"),
        ("landing_gap_after", after, "nats", f"the same after the update; must be <= {atol:g}"),
    ])  # fmt: skip
    check.expect(before > atol, f"the probe cannot see the update: gap {before:.3g} <= {atol:g} before it")  # fmt: skip
    check.expect(after <= atol, f"the weights did not land: probe gap {after:.3g} > {atol:g} after the update")  # fmt: skip
    now = engine.policy_version
    check.expect(version == version0 + 1 == now, f"version {version0} -> {version} (engine: {now})")
    seen = result.policy_version
    check.expect(seen == version, f"a completion after the update reports version {seen}, not {version}")  # fmt: skip


def step_engine(check: Check) -> None:
    import anyio
    import torch

    from lightning.engine.torch_engine import TorchEngine

    plan = check.plan
    engine = TorchEngine.from_pretrained(
        check.model_dir(),
        device=plan.device,
        dtype=getattr(torch, plan.dtype),
        max_num_seqs=max(plan.engine_batches),
        max_model_len=plan.engine_prompt + plan.engine_tokens + 1,
        max_prefill_tokens=max(plan.engine_batches) * plan.engine_prompt,
        seed=0,
    )
    size = f"{_model_size(check)}/{plan.dtype}"

    async def main() -> None:
        async with engine:
            await _engine_throughput(check, engine, size)
            await _landing_check(check, engine, size)

    anyio.run(main)


STEPS: dict[str, Callable[[Check], None]] = {
    "env": step_env,
    "ext": step_ext,
    "parity": step_parity,
    "kernels": step_kernels,
    "train": step_train,
    "engine": step_engine,
}


# --------------------------------------------------------------------------- entry point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for results.md and results.csv")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument(
        "--only", default=",".join(STEPS), help=f"comma-separated steps, of {','.join(STEPS)}"
    )
    ap.add_argument(
        "--budget-s", type=float, default=450.0, help="start no step after this many seconds"
    )
    args = ap.parse_args(argv)
    args.steps = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or not args.steps:
        ap.error(f"--only: unknown or no steps {unknown}; choose from {','.join(STEPS)}")
    return args


#: What the steps import; ``lightning`` must be this checkout's, not PyTorch Lightning.
REQUIRED = ("torch", "triton", "transformers", "tokenizers", "msgspec", "structlog", "anyio", "lightning", "lightning_backends")  # fmt: skip


def missing_modules() -> list[str]:
    """The :data:`REQUIRED` modules that do not import here (or import from elsewhere), each
    with the reason."""
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is reported
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
            continue
        if name.startswith("lightning") and ROOT not in Path(mod.__file__).resolve().parents:
            missing.append(f"{name} (imported from {mod.__file__}, not from {ROOT})")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    else:
        os.environ.pop("TRITON_INTERPRET", None)  # the real kernels, never the interpreter
    missing = missing_modules()
    if missing:
        print(
            f"gpu_check: cannot import {'; '.join(missing)}. Run it through bench/run_gpu.sh (it "
            "puts this checkout first on PYTHONPATH) with the wheels of bench/fetch_gpu_wheels.sh",
            file=sys.stderr,
        )
        return 2
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: torch sees no CUDA device; on CPU run with --dry-run", file=sys.stderr
            )
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.csv").unlink(missing_ok=True)
    check = Check(DRY_PLAN if args.dry_run else GPU_PLAN, args.out, budget_s=args.budget_s)
    try:
        results = run_steps(check, [(name, STEPS[name]) for name in args.steps])
    finally:
        check.close()
    failed = [r.name for r in results if r.status != "ok"]
    print(
        f"\ngpu_check: {len(results) - len(failed)} of {len(results)} steps ok"
        + (f"; not ok: {', '.join(failed)}" if failed else "")
    )
    print(f"gpu_check: {args.out / 'results.md'}, {args.out / 'results.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
