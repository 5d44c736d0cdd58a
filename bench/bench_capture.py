"""Capture overhead per LLM call, and policy-server throughput (concurrent vs sequential).

    python -m bench.bench_capture            # full run
    python -m bench.bench_capture --quick    # smoke run

1. ``capture``: the same ``client.chat.completions.create`` calls with the official
   ``openai`` client, (a) plain, without lightning, and (b) inside ``@lightning.rollout``
   with the runtime streaming to a real ``lightning-daemon`` process, capture on. The
   server is the deterministic fake OpenAI server of the capture tests, in-process through
   ``httpx.MockTransport``, so network noise does not hide the difference. Blocks of plain
   and captured calls alternate; per-call p50/p99 of each and their difference.
2. ``server``: the policy server on the tiny model (real socket, httpx client): N requests
   of ``max_tokens`` tokens one after another vs all at once; requests/s, generated
   tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "capture"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_capture(n_calls: int, blocks: int) -> dict[str, float]:
    import httpx
    import openai
    from fake_openai import FakeOpenAI, mock_handler

    import lightning

    fake = FakeOpenAI()
    base = "http://fake.local/lightning/v1"
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(
                               mock_handler(fake, httpx))))
    prompt = [{"role": "system", "content": "You are a calculator agent. " * 20},
              {"role": "user", "content": "What is 17 * 23? Think step by step. " * 10}]

    def call() -> None:
        client.chat.completions.create(model="m", messages=prompt, max_tokens=16)

    def call_same_fields() -> None:
        # what capture asks the server for, requested by hand: isolates capture's own cost
        client.chat.completions.create(model="m", messages=prompt, max_tokens=16,
                                       logprobs=True, extra_body={"return_token_ids": True})

    with tempfile.TemporaryDirectory() as tmp:
        addr = f"tcp://127.0.0.1:{_free_port()}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "lightning._cli", "--bind", addr, "--data-dir", f"{tmp}/d",
             "--ingest-only", "--model", "none", "--print-address", "--log-level", "warning",
             "--stats-interval-s", "0"], stdout=subprocess.PIPE, env=env)
        try:
            daemon.stdout.readline()
            plain: list[float] = []
            same: list[float] = []
            captured: list[float] = []

            @lightning.rollout
            def agent(k: int) -> None:
                for _ in range(k):
                    t0 = time.perf_counter()
                    call()
                    captured.append(time.perf_counter() - t0)

            for _ in range(20):  # warm-up
                call()
            per_block = max(1, n_calls // blocks)
            for _ in range(blocks):
                for _ in range(per_block):
                    t0 = time.perf_counter()
                    call()
                    plain.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    call_same_fields()
                    same.append(time.perf_counter() - t0)
                rt = lightning.init(daemon=addr, spill_dir=f"{tmp}/spill",
                                    token_id_urls=(base,), replay_orphans=False)
                while not rt.stats()["connected"]:
                    time.sleep(0.01)
                agent(per_block)
                while rt.pending_events():
                    time.sleep(0.005)
                acked = rt.counters["events_acked"]
                lightning.shutdown()
                assert acked == per_block + 2, acked  # every call became a transition
        finally:
            daemon.terminate()
            daemon.wait(30)
            daemon.stdout.close()
    return {
        "plain_p50_us": _pct(plain, 0.5) * 1e6, "plain_p99_us": _pct(plain, 0.99) * 1e6,
        "same_p50_us": _pct(same, 0.5) * 1e6, "same_p99_us": _pct(same, 0.99) * 1e6,
        "captured_p50_us": _pct(captured, 0.5) * 1e6,
        "captured_p99_us": _pct(captured, 0.99) * 1e6,
    }


def bench_server(n_requests: int, max_tokens: int, repeats: int,
                 model: str = "tiny") -> dict[str, float]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import anyio
    import httpx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning.engine.torch_engine import TorchEngine
    from lightning.models import default_model_path, tiny_model_path
    from lightning.serving import PolicyServer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = tiny_model_path(seed=0) if model == "tiny" else default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 1.0,
            "messages": [{"role": "user", "content": "Tell me a story about a robot."}]}
    results: dict[str, list[float]] = {"seq_s": [], "conc_s": [], "seq_tok": [], "conc_tok": []}

    async def main() -> None:
        async with TorchEngine(model, tok, max_model_len=1024, seed=0) as engine:
            server = PolicyServer(engine, model_name="tiny", port=0)
            async with anyio.create_task_group() as tg:
                base = await tg.start(server.serve)
                async with httpx.AsyncClient(base_url=base, timeout=300) as http:
                    async def one(i: int) -> int:
                        r = await http.post("/chat/completions", json={**body, "seed": i})
                        return r.json()["usage"]["completion_tokens"]

                    await one(0)  # warm-up
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        toks = [await one(i) for i in range(n_requests)]
                        results["seq_s"].append(time.perf_counter() - t0)
                        results["seq_tok"].append(sum(toks))
                        t0 = time.perf_counter()
                        out: list[int] = []

                        async def run(i: int) -> None:
                            out.append(await one(i))

                        async with anyio.create_task_group() as g:
                            for i in range(n_requests):
                                g.start_soon(run, i)
                        results["conc_s"].append(time.perf_counter() - t0)
                        results["conc_tok"].append(sum(out))
                tg.cancel_scope.cancel()

    anyio.run(main)
    seq_s, conc_s = statistics.median(results["seq_s"]), statistics.median(results["conc_s"])
    seq_tok = statistics.median(results["seq_tok"])
    conc_tok = statistics.median(results["conc_tok"])
    return {"seq_rps": n_requests / seq_s, "conc_rps": n_requests / conc_s,
            "seq_tps": seq_tok / seq_s, "conc_tps": conc_tok / conc_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    import logging

    import structlog

    from bench.harness import BenchResult, record

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    c = bench_capture(300 if a.quick else 3000, 3 if a.quick else 10)
    size = "chat,~2.4k-char prompt"
    rows = [
        BenchResult("capture", "plain_openai", size, "p50", c["plain_p50_us"], "us"),
        BenchResult("capture", "plain_openai", size, "p99", c["plain_p99_us"], "us"),
        BenchResult("capture", "lightning", size, "p50", c["captured_p50_us"], "us"),
        BenchResult("capture", "lightning", size, "p99", c["captured_p99_us"], "us"),
        BenchResult("capture", "same_fields_openai", size, "p50", c["same_p50_us"], "us",
                    "plain call asking for token ids + logprobs itself"),
        BenchResult("capture", "same_fields_openai", size, "p99", c["same_p99_us"], "us"),
        BenchResult("capture", "lightning-same_fields", size, "p50_added",
                    c["captured_p50_us"] - c["same_p50_us"], "us",
                    "capture + recording; target < 100 us"),
        BenchResult("capture", "lightning-same_fields", size, "p99_added",
                    c["captured_p99_us"] - c["same_p99_us"], "us"),
        BenchResult("capture", "lightning-plain", size, "p50_added",
                    c["captured_p50_us"] - c["plain_p50_us"], "us",
                    "includes parsing the token ids + logprobs the server now returns"),
        BenchResult("capture", "lightning-plain", size, "p99_added",
                    c["captured_p99_us"] - c["plain_p99_us"], "us"),
    ]
    n, m = (8, 16) if a.quick else (16, 32)
    for model in ("tiny",) if a.quick else ("tiny", "smollm2-135m"):
        s = bench_server(n, m, 1 if a.quick or model != "tiny" else 3, model)
        rows += _server_rows(f"{model},{n}req x {m}tok", s)
    record(rows)


def _server_rows(size: str, s: dict[str, float]) -> list:
    from bench.harness import BenchResult

    note = ("the tiny model's forward is trivial: per-step work outside the model "
            "(sampling over the 49k vocabulary, HTTP) weighs more" if size.startswith("tiny")
            else "")
    return [
        BenchResult("server", "sequential", size, "requests_per_s", s["seq_rps"], "1/s"),
        BenchResult("server", "concurrent", size, "requests_per_s", s["conc_rps"], "1/s"),
        BenchResult("server", "sequential", size, "tokens_per_s", s["seq_tps"], "1/s"),
        BenchResult("server", "concurrent", size, "tokens_per_s", s["conc_tps"], "1/s"),
        BenchResult("server", "concurrent/sequential", size, "token_throughput_ratio",
                    s["conc_tps"] / s["seq_tps"], "x", "target > 3x; " + note),
    ]


if __name__ == "__main__":
    main()
