"""One harness for every benchmark under ``bench/``.

Each ``bench_<target>.py`` builds its inputs in a ``_setup()`` function, times named
providers (``reference``, ``cpp``, ``triton``, ``zmq``, ``http_json``...) and hands
:class:`BenchResult` rows to :func:`record`, which prints them and appends them to
``bench/data/results.csv`` together with the machine and the git SHA, so numbers from
different runs and machines can be compared side by side.

Timing rules:
- CPU paths: the median (and min) of several repeats; benchmarks that measure a whole
  process pipeline (transport) run the peers in fresh subprocesses.
- GPU paths: ``triton.testing.do_bench`` quantiles (0.5, 0.2, 0.8).
- Always time the real alternative in the same run and report the ratio: these machines
  are noisy, absolute numbers from different runs are not comparable.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS_CSV = Path(__file__).resolve().parent / "data" / "results.csv"

FIELDS = [
    "timestamp",
    "git_sha",
    "machine",
    "device",
    "bench",
    "provider",
    "size",
    "metric",
    "value",
    "unit",
    "note",
]


@dataclasses.dataclass(frozen=True)
class BenchInput:
    """One point of a sweep: a human-readable size label plus free-form parameters."""

    size: str
    params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BenchResult:
    bench: str
    provider: str
    size: str
    metric: str
    value: float
    unit: str
    note: str = ""


@functools.cache
def git_sha() -> str:
    """The checkout's short SHA (``-dirty`` with uncommitted changes); ``$LIGHTNING_GIT_SHA``
    when set, for copies of the tree that have no ``.git`` (a GPU machine's)."""
    if os.environ.get("LIGHTNING_GIT_SHA"):
        return os.environ["LIGHTNING_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.node()}|{cpu}|{os.cpu_count()}cpu|py{platform.python_version()}"


def device() -> str:
    """The accelerator name when torch is already imported and sees one, else ``cpu``."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def record(results: Iterable[BenchResult], path: Path | None = None) -> list[BenchResult]:
    """Print rows and append them to the results CSV (``path`` or ``bench/data/results.csv``)."""
    path = path or Path(os.environ.get("LIGHTNING_BENCH_CSV", RESULTS_CSV))
    path.parent.mkdir(parents=True, exist_ok=True)
    results = list(results)
    new = not path.exists() or path.stat().st_size == 0
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in results:
            row = dict(
                timestamp=now,
                git_sha=git_sha(),
                machine=machine(),
                device=device(),
                **dataclasses.asdict(r),
            )
            w.writerow(row)
            print(
                f"{r.bench:>18} {r.provider:>14} {r.size:>16} {r.metric:>22} "
                f"{r.value:>14.4g} {r.unit}  {r.note}",
                flush=True,
            )
    return results


def time_cpu(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Wall-clock seconds of ``fn()``: median and min over ``repeat`` runs after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times)}


# --------------------------------------------------------------------------- memory and isolation
#
# Peak memory, CPU: tracemalloc does not see torch's allocations, so a provider runs in a
# fresh subprocess (``run_isolated``) that allocates its inputs, resets the kernel's
# peak-RSS counter (``/proc/self/clear_refs`` <- 5), runs the call once and reports
# VmHWM - VmRSS(before): the extra resident memory the call needed at its peak. glibc is
# told to serve every allocation >= 128 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed
# buffers go back to the OS and are not silently reused from an earlier call.
# Peak memory, GPU: torch.cuda.max_memory_allocated() - memory_allocated() before the call.


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_delta(fn: Callable[[], object]) -> tuple[int, object]:
    """(bytes of resident memory ``fn()`` added at its peak, ``fn()``'s result). Linux only."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS")
    out = fn()
    peak = _proc_status_kib("VmHWM")
    return max(0, peak - before) * 1024, out


def peak_cuda_delta(fn: Callable[[], object]) -> tuple[int, object]:
    """(bytes of CUDA memory ``fn()`` allocated at its peak above what was allocated before)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, out


def time_gpu(fn: Callable[[], object], *, quantiles=(0.5, 0.2, 0.8)) -> dict[str, float]:
    """Seconds: ``triton.testing.do_bench`` quantiles (median, p20, p80)."""
    from triton.testing import do_bench

    med, lo, hi = do_bench(fn, quantiles=list(quantiles))
    return {"median": med / 1e3, "p20": lo / 1e3, "p80": hi / 1e3}


def run_isolated(module: str, args: list[str], *, timeout: float = 1800, for_memory: bool = False) -> dict:
    """Run ``python -m module *args`` in a fresh process; it prints one JSON line last.

    ``for_memory``: serve allocations >= 128 KiB with mmap (returned to the OS when freed),
    so RSS peaks are honest; not for timing runs, where it adds page faults to every call.
    """
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if for_memory else {})}
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- kernel sweeps


class Unavailable(Exception):
    """This provider cannot run here (not installed, no GPU...); the message says why."""


def _parse(argv: list[str] | None, description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller sizes only")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per point (CPU)")
    ap.add_argument("--child", nargs=4, metavar=("PROVIDER", "SIZE", "DEVICE", "MODE"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _child(mod, provider: str, size: str, device: str, mode: str, repeat: int) -> None:
    """Fresh-process measurement of one point (``mode`` "mem" or "time"); prints one JSON line."""
    import torch

    torch.manual_seed(0)
    try:
        mod.warm_up(provider, device)  # JIT loads, imports: before the memory baseline
        fn, note = mod.make_fn(provider, size, device)
    except Unavailable as exc:
        print(json.dumps({"unavailable": str(exc)}))
        return
    if mode == "mem":
        peak, _ = peak_rss_delta(fn)
        print(json.dumps({"peak": peak, "note": note}))
    else:
        t = time_cpu(fn, repeat=repeat, warmup=1)
        res = {"median": t["median"], "min": t["min"], "note": note}
        if hasattr(mod, "error_vs_reference"):
            del fn
            res["err"] = mod.error_vs_reference(provider, size, device)
        print(json.dumps(res))


def run_sweep(mod, bench: str, argv: list[str] | None = None) -> list[BenchResult]:
    """Command-line sweep of a kernel benchmark module.

    ``mod`` defines ``__doc__``, ``SIZES``, ``QUICK_SIZES``, ``providers(device)``,
    ``repeat_for(provider, size)``, ``warm_up(provider, device)``,
    ``make_fn(provider, size, device) -> (fn, note)`` (raising :class:`Unavailable` when
    the provider cannot run) and ``derived(bench, size, device, measured) -> rows``, and
    optionally ``error_vs_reference(provider, size, device) -> float`` (stored as "err").
    On CPU each (size, provider) runs in two fresh subprocesses (``--child``): one for the
    peak extra RSS of the first full-size call, one for median/min wall time of ``repeat``
    calls after one warm-up call. On CUDA it
    runs in process: ``do_bench`` quantiles and ``max_memory_allocated`` deltas. Rows:
    ``time_median``/``time_min`` (s), ``peak_mem`` (MiB), plus the derived ones.
    """
    args = _parse(argv, mod.__doc__.splitlines()[0])
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        provider, size, dev, mode = args.child
        _child(mod, provider, size, dev, mode, args.repeat or mod.repeat_for(provider, size))
        return []
    sizes = mod.QUICK_SIZES if args.quick else mod.SIZES
    wanted = mod.providers(device) if args.providers is None else args.providers.split(",")
    rows: list[BenchResult] = []
    measured: dict[tuple[str, str], dict] = {}
    for size in sizes:
        for provider in wanted:
            try:
                if device == "cpu":
                    extra = ["--repeat", str(args.repeat)] if args.repeat else []
                    res = run_isolated(mod.__spec__.name, ["--child", provider, size, device, "mem", *extra], for_memory=True)
                    if "unavailable" in res:
                        raise Unavailable(res["unavailable"])
                    res.update(run_isolated(mod.__spec__.name, ["--child", provider, size, device, "time", *extra]))
                else:
                    mod.warm_up(provider, device)
                    fn, note = mod.make_fn(provider, size, device)
                    peak, _ = peak_cuda_delta(fn)
                    t = time_gpu(fn)
                    res = {"median": t["median"], "min": t["p20"], "peak": peak, "note": note}
                    del fn
                    if hasattr(mod, "error_vs_reference"):
                        res["err"] = mod.error_vs_reference(provider, size, device)
            except Unavailable as exc:
                print(f"{bench}: skipping {provider} at {size}: {exc}", file=sys.stderr)
                continue
            measured[(size, provider)] = res
            batch = [
                BenchResult(bench, provider, size, "time_median", res["median"], "s", res.get("note", "")),
                BenchResult(bench, provider, size, "time_min", res["min"], "s"),
                BenchResult(bench, provider, size, "peak_mem", res["peak"] / 2**20, "MiB",
                            "extra RSS at peak (fresh process)" if device == "cpu" else "max_memory_allocated delta"),
            ]
            rows += record(batch)
        rows += record(mod.derived(bench, size, device, measured))
    return rows
