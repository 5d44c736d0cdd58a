"""Peak memory of the streamed index build on a generated Wikipedia-like corpus.

    PYTHONPATH=examples python -m rag.measure_index --passages 50000 100000 200000

Writes a corpus of N passages of ~100 words (DPR's Wikipedia passages are 100 words),
the words drawn from a Zipf distribution over a vocabulary that grows with N like real
text (Heaps' law), then builds the index in a fresh process (``python -m rag.index``) so
the generator's memory is not counted, and prints one JSON line per size with the build's
peak RSS (``ru_maxrss``: file-backed pages of the memory-mapped output included) and its
peak anonymous memory (``RssAnon``, sampled after each chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["main", "write_corpus"]


def write_corpus(path: Path, n: int, *, words: int = 100, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab_size = int(40 * (n * words) ** 0.5)  # Heaps' law, K ~ 40, beta ~ 0.5
    vocab = np.array([f"t{i:x}" for i in range(vocab_size)])
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 5000):
            m = min(5000, n - start)
            ids = (rng.zipf(1.1, size=(m, words)) - 1) % vocab_size
            for j in range(m):
                text = " ".join(vocab[ids[j]])
                f.write(json.dumps({"id": str(start + j), "title": f"t{ids[j, 0]:x}",
                                    "text": text}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, nargs="+", default=[200_000])
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--chunk-size", type=int, default=10_000)
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    for n in args.passages:
        with tempfile.TemporaryDirectory(prefix="rag-mem-") as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, n, words=args.words)
            out = subprocess.run(
                [sys.executable, "-m", "rag.index", str(corpus), str(Path(tmp) / "idx"),
                 "--chunk-size", str(args.chunk_size)],
                check=True, capture_output=True, text=True, env=env).stdout
            stats = json.loads(out.strip().splitlines()[-1])
            print(json.dumps({"passages": n, "words": args.words,
                              "corpus_mb": round(corpus.stat().st_size / 2**20, 1),
                              "chunk_size": args.chunk_size, **stats}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
