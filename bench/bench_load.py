"""Load: many app processes streaming rollouts into one daemon that also serves HTTP.

``python -m bench.bench_load [--apps 8 --rollouts 100 --seconds 120 --fsync never]`` starts one
``lightning-daemon`` (tiny model, policy server on, training off: ``--ingest-only``), then
``--apps`` app processes, each running ``--rollouts`` concurrent rollouts of transitions of
512 prompt + 128 response tokens (with log-probs) for ``--seconds``. Meanwhile this process
probes ``/health`` and a chat completion and samples the daemon's RSS. Rows (see
bench/harness.py): events/s, daemon RSS at warm-up and at the end (bounded: flat after
warm-up), ``record_transition`` p50/p99 in the apps, ``/health`` and chat p50/p99, and
stored - sent (0: nothing lost or duplicated, read back from the data directory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, RESPONSE, STEPS = 512, 128, 4


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ------------------------------------------------------------------ one app process


def _app(address: str, spill: str, rollouts: int, seconds: float) -> dict:
    import anyio

    import lightning
    from lightning._protocol import pack_ids, pack_logprobs

    prompt = pack_ids(list(range(PROMPT)))
    response = pack_ids(list(range(RESPONSE)))
    logprobs = pack_logprobs([-0.5] * RESPONSE)
    samples: list[int] = []
    clock = time.perf_counter_ns
    ended = 0

    @lightning.rollout
    async def agent() -> float:
        for _ in range(STEPS):
            await anyio.sleep(0.01)  # an LLM call's worth of waiting, compressed
            t0 = clock()
            lightning.record_transition(prompt, response, logprobs, policy_version=0)
            samples.append(clock() - t0)
        return 1.0

    async def worker(deadline: float) -> None:
        nonlocal ended
        while time.monotonic() < deadline:
            await agent()
            ended += 1

    async def main() -> dict:
        async with lightning.session(daemon=address, spill_dir=spill, replay_orphans=False) as rt:
            deadline = time.monotonic() + seconds
            async with anyio.create_task_group() as tg:
                for _ in range(rollouts):
                    tg.start_soon(worker, deadline)
            with anyio.move_on_after(120):
                while rt.pending_events():
                    await anyio.sleep(0.01)
            stats = rt.stats()
        samples.sort()
        return {"rollouts": ended, "events": ended * (STEPS + 2), "acked": stats["events_acked"],
                "p50_us": samples[len(samples) // 2] / 1e3,
                "p99_us": samples[int(len(samples) * 0.99)] / 1e3}

    return anyio.run(main)


# ------------------------------------------------------------------ the run


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _timeline(rss: list[tuple[float, float]], points: int = 8) -> str:
    """RSS at ``points`` evenly spaced samples: ``t=MiB`` pairs (flat = bounded)."""
    step = max(1, len(rss) // points)
    return " ".join(f"{t:.0f}s={m:.0f}" for t, m in rss[::step])


def _quantiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return xs[len(xs) // 2], xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def _probe(base: str, stop: threading.Event, health: list, chat: list) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            http.get(base[:-3] + "/health").raise_for_status()
            health.append(time.perf_counter() - t0)
            if len(health) % 10 == 0:
                t0 = time.perf_counter()
                r = http.post("/chat/completions", json={
                    "model": "tiny", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "hi"}]})
                r.raise_for_status()
                chat.append(time.perf_counter() - t0)
            stop.wait(0.05)


def run(apps: int, rollouts: int, seconds: float, fsync: str = "never") -> list:
    from bench.harness import BenchResult
    from lightning.models import tiny_model_path
    from lightning.testing import recover

    from tests.lightning_test_helpers import free_tcp_address

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        addr = free_tcp_address()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lightning._cli", "--bind", addr, "--data-dir", f"{tmp}/data",
             "--model", str(tiny_model_path(seed=0)), "--http-port", "0", "--served-model-name",
             "tiny", "--max-model-len", "512", "--ingest-only", "--print-address",
             "--stats-interval-s", "0", "--log-level", "warning", "--buffer-size", str(10**7),
             "--fsync", fsync],
            stdout=subprocess.PIPE, env=_env(), cwd=ROOT)
        try:
            daemon.stdout.readline()
            base = daemon.stdout.readline().decode().strip()
            stop, health, chat, rss = threading.Event(), [], [], []
            prober = threading.Thread(target=_probe, args=(base, stop, health, chat), daemon=True)
            prober.start()
            procs = [subprocess.Popen(
                [sys.executable, "-m", "bench.bench_load", "--role", "app", "--address", addr,
                 "--spill-dir", f"{tmp}/spill{i}", "--rollouts", str(rollouts),
                 "--seconds", str(seconds)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(), cwd=ROOT)
                for i in range(apps)]
            t0 = time.monotonic()
            while any(p.poll() is None for p in procs):
                rss.append((time.monotonic() - t0, _rss_mib(daemon.pid)))
                time.sleep(1.0)
            wall = time.monotonic() - t0
            results = [json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs]
            stop.set()
            prober.join(60)
        finally:
            daemon.terminate()
            daemon.wait(60)
            daemon.stdout.close()
        # --ingest-only marks trajectories used as they complete: count stored events
        state, _, _ = recover(f"{tmp}/data")
        sent = sum(r["events"] for r in results)
        stored = state.counters["events_accepted"]
        acked = sum(r["acked"] for r in results)
    size = f"{apps}x{rollouts} {seconds:g}s p{PROMPT}/r{RESPONSE}"
    if fsync != "never":
        size += f" fsync={fsync}"
    warm = [m for t, m in rss if t >= min(30.0, seconds / 4)] or [rss[-1][1]]
    h50, h99 = _quantiles(health)
    c50, c99 = _quantiles(chat) if chat else (float("nan"), float("nan"))
    p50 = statistics.median(r["p50_us"] for r in results)
    p99 = max(r["p99_us"] for r in results)
    B = BenchResult
    rows += [
        B("load", "zmq+http", size, "events_per_s", sent / wall, "1/s", f"wall={wall:.0f}s"),
        B("load", "zmq+http", size, "daemon_rss_after_warmup", warm[0], "MiB"),
        B("load", "zmq+http", size, "daemon_rss_end", rss[-1][1], "MiB",
          f"max={max(m for _, m in rss):.0f} over time: {_timeline(rss)}"),
        B("load", "zmq+http", size, "record_transition_p50", p50, "us", "median over apps"),
        B("load", "zmq+http", size, "record_transition_p99", p99, "us", "worst app"),
        B("load", "zmq+http", size, "health_p50", h50 * 1e3, "ms", f"n={len(health)}"),
        B("load", "zmq+http", size, "health_p99", h99 * 1e3, "ms"),
        B("load", "zmq+http", size, "chat_p50", c50 * 1e3, "ms", f"n={len(chat)}"),
        B("load", "zmq+http", size, "chat_p99", c99 * 1e3, "ms"),
        B("load", "zmq+http", size, "stored_minus_sent", stored - sent, "events",
          f"sent={sent} acked={acked} stored={stored}"),
    ]
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--apps", type=int, default=8)
    p.add_argument("--rollouts", type=int, default=100)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--quick", action="store_true", help="2 apps x 20 rollouts for 10 s")
    p.add_argument("--fsync", choices=("never", "always"), default="never",
                   help="the daemon's --fsync (always: a group commit per round)")
    p.add_argument("--role", default="main")
    p.add_argument("--address")
    p.add_argument("--spill-dir")
    a = p.parse_args()
    if a.role == "app":
        print(json.dumps(_app(a.address, a.spill_dir, a.rollouts, a.seconds)))
        return
    from bench.harness import record

    if a.quick:
        a.apps, a.rollouts, a.seconds = 2, 20, 10.0
    record(run(a.apps, a.rollouts, a.seconds, a.fsync))


if __name__ == "__main__":
    main()
