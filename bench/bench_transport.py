"""Transport benchmark: transitions/s into the daemon vs HTTP/JSON, and runtime overhead.

    python -m bench.bench_transport            # full run (about a minute)
    python -m bench.bench_transport --quick    # smoke run

Payload per transition: prompt 512 token ids, response 128 token ids with 128 log-probs.

Providers (each peer in its own fresh process, tcp loopback, one client process):
- ``zmq``: the lightning runtime (``record_transition`` inside rollouts) streaming to a
  ``lightning-daemon --ingest-only`` process, which validates, de-duplicates, writes its
  write-ahead log and acknowledges. Rate = transitions / (first record -> last ack).
- ``http_json``: the same payload as a JSON body (token ids as lists of ints), one POST per
  transition over a keep-alive httpx client, to a minimal ASGI endpoint under uvicorn that
  parses the JSON and counts: what an HTTP span/trace store does.
- ``http_json_batch64``: as above with 64 transitions per POST (a generous baseline).

Also ``runtime_overhead``: the time ``record_transition`` takes in the app thread while the
runtime streams in the background, p50/p99 in microseconds, with token ids given as Python
lists (what an OpenAI response holds) and pre-packed.

Median of repeats; rows appended to bench/data/results.csv via bench.harness.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, RESPONSE = 512, 128


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run_json(args: list[str], timeout: float = 600) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_transport", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args[:2]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ zmq provider


def _zmq_client(address: str, n: int, per_rollout: int, spill_dir: str) -> dict:
    import anyio  # noqa: F401  (imported by lightning anyway)

    import lightning
    from lightning._protocol import pack_ids, pack_logprobs

    rt = lightning.init(daemon=address, spill_dir=spill_dir, max_queue_events=n + 10,
                        max_queue_bytes=8 << 30, replay_orphans=False)
    prompt = pack_ids(list(range(PROMPT)))
    response = pack_ids(list(range(RESPONSE)))
    logprobs = pack_logprobs([-0.5] * RESPONSE)
    # wait for the session so connection set-up is not timed
    while not rt.stats()["connected"]:
        time.sleep(0.01)

    @lightning.rollout
    def agent(k: int) -> float:
        for _ in range(k):
            lightning.record_transition(prompt, response, logprobs, policy_version=1)
        return 1.0

    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(per_rollout, n - done)
        agent(k)
        done += k
    t_recorded = time.perf_counter()
    while rt.pending_events():
        time.sleep(0.0005)
    t1 = time.perf_counter()
    stats = rt.stats()
    lightning.shutdown()
    return {"seconds": t1 - t0, "record_seconds": t_recorded - t0, "acked": stats["events_acked"],
            "frames": stats["frames_sent"]}


def bench_zmq(n: int, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            addr = f"tcp://127.0.0.1:{_free_port()}"
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lightning._cli", "--bind", addr, "--data-dir",
                 f"{tmp}/data", "--ingest-only", "--print-address", "--stats-interval-s", "0", "--model", "none",
                 "--log-level", "warning", "--buffer-size", str(10**6)],
                stdout=subprocess.PIPE, env=_env(),
            )
            try:
                daemon.stdout.readline()
                r = _run_json(["--role", "zmq-client", "--address", addr, "--n", str(n),
                               "--spill-dir", f"{tmp}/spill"])
            finally:
                daemon.terminate()
                daemon.wait(30)
                daemon.stdout.close()
            n_events = n + 2 * ((n + 999) // 1000)  # transitions + rollout start/end
            assert r["acked"] == n_events, r
            rates.append(n / r["seconds"])
    return rates


# ------------------------------------------------------------------ http provider

_ASGI_APP = '''
import json
count = 0
async def app(scope, receive, send):
    global count
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    data = json.loads(body)
    items = data if isinstance(data, list) else [data]
    for t in items:
        assert len(t["prompt_ids"]) == 512 and len(t["logprobs"]) == len(t["response_ids"])
    count += len(items)
    out = json.dumps({"count": count}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out})
'''


def _http_client(port: int, n: int, batch: int) -> dict:
    import httpx

    payload = {
        "rollout_id": "r" * 32,
        "index": 0,
        "prompt_ids": list(range(PROMPT)),
        "response_ids": list(range(RESPONSE)),
        "logprobs": [-0.5] * RESPONSE,
        "policy_version": 1,
    }
    url = f"http://127.0.0.1:{port}/v1/transitions"
    with httpx.Client(timeout=30) as client:
        client.post(url, json=payload).raise_for_status()  # connect outside the timing
        t0 = time.perf_counter()
        sent = 0
        while sent < n:
            k = min(batch, n - sent)
            body = payload if batch == 1 else [payload] * k
            client.post(url, json=body).raise_for_status()
            sent += k
        t1 = time.perf_counter()
    return {"seconds": t1 - t0}


def bench_http(n: int, batch: int, repeats: int) -> list[float]:
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "bench_asgi_app.py").write_text(_ASGI_APP)
        for _ in range(repeats):
            port = _free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "bench_asgi_app:app", "--port", str(port),
                 "--log-level", "warning", "--no-access-log"],
                cwd=tmp, env=_env(),
            )
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                r = _run_json(["--role", "http-client", "--port", str(port), "--n", str(n),
                               "--batch", str(batch)])
            finally:
                server.terminate()
                server.wait(30)
            rates.append(n / r["seconds"])
    return rates


# ------------------------------------------------------------------ app overhead


def _overhead_client(address: str, n: int, spill_dir: str, packed: bool) -> dict:
    import lightning
    from lightning._protocol import pack_ids, pack_logprobs

    rt = lightning.init(daemon=address, spill_dir=spill_dir, replay_orphans=False)
    while not rt.stats()["connected"]:
        time.sleep(0.01)
    prompt, response, logprobs = list(range(PROMPT)), list(range(RESPONSE)), [-0.5] * RESPONSE
    if packed:
        prompt, response, logprobs = pack_ids(prompt), pack_ids(response), pack_logprobs(logprobs)
    samples = []
    record = lightning.record_transition
    clock = time.perf_counter_ns

    @lightning.rollout
    def agent():
        for _ in range(1000):
            t0 = clock()
            record(prompt, response, logprobs, policy_version=1)
            samples.append(clock() - t0)
            if len(samples) % 50 == 0:
                time.sleep(0.0005)  # an app does other things between LLM calls

    for _ in range(n // 1000):
        agent()
    while rt.pending_events():
        time.sleep(0.001)
    lightning.shutdown()
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] / 1e3,
            "p99_us": samples[int(len(samples) * 0.99)] / 1e3}


def bench_overhead(n: int, packed: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        addr = f"tcp://127.0.0.1:{_free_port()}"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lightning._cli", "--bind", addr, "--data-dir",
             f"{tmp}/data", "--ingest-only", "--print-address", "--stats-interval-s", "0", "--model", "none",
             "--log-level", "warning"],
            stdout=subprocess.PIPE, env=_env(),
        )
        try:
            daemon.stdout.readline()
            return _run_json(["--role", "overhead-client", "--address", addr, "--n", str(n),
                              "--spill-dir", f"{tmp}/spill"] + (["--packed"] if packed else []))
        finally:
            daemon.terminate()
            daemon.wait(30)
            daemon.stdout.close()


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--role", default="main")
    p.add_argument("--address")
    p.add_argument("--port", type=int)
    p.add_argument("--n", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--spill-dir")
    p.add_argument("--packed", action="store_true")
    a = p.parse_args()
    if a.role == "zmq-client":
        print(json.dumps(_zmq_client(a.address, a.n, 1000, a.spill_dir)))
        return
    if a.role == "http-client":
        print(json.dumps(_http_client(a.port, a.n, a.batch)))
        return
    if a.role == "overhead-client":
        print(json.dumps(_overhead_client(a.address, a.n, a.spill_dir, a.packed)))
        return

    from bench.harness import BenchResult, record

    repeats = 2 if a.quick else a.repeats
    n_zmq = 20_000 if a.quick else 300_000
    n_http = 2_000 if a.quick else 20_000
    size = f"p{PROMPT}/r{RESPONSE}+lp"
    zmq = statistics.median(bench_zmq(n_zmq, repeats))
    http1 = statistics.median(bench_http(n_http, 1, repeats))
    http64 = statistics.median(bench_http(n_http * 4, 64, repeats))
    rows = [
        BenchResult("transport", "zmq", size, "transitions_per_s", zmq, "1/s",
                    f"n={n_zmq} median of {repeats}"),
        BenchResult("transport", "http_json", size, "transitions_per_s", http1, "1/s",
                    f"n={n_http} one POST per transition"),
        BenchResult("transport", "http_json_batch64", size, "transitions_per_s", http64, "1/s",
                    f"n={n_http * 4} 64 per POST"),
        BenchResult("transport", "zmq/http_json", size, "speedup", zmq / http1, "x"),
        BenchResult("transport", "zmq/http_json_batch64", size, "speedup", zmq / http64, "x"),
    ]
    n_over = 20_000 if a.quick else 100_000
    for packed in (False, True):
        o = bench_overhead(n_over, packed)
        prov = "runtime_packed" if packed else "runtime_lists"
        rows += [
            BenchResult("record_transition", prov, size, "p50", o["p50_us"], "us",
                        "app-thread time per call while streaming"),
            BenchResult("record_transition", prov, size, "p99", o["p99_us"], "us"),
        ]
    record(rows)


if __name__ == "__main__":
    main()
