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

import csv
import dataclasses
import datetime as _dt
import functools
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
