"""A BM25 passage index (bm25s): built in memory, or streamed from a corpus on disk.

Two ways to build the same index (the tests check they retrieve the same passages with
the same scores):

- :meth:`Index.from_passages`: a list of passages, indexed in memory by ``bm25s`` itself.
  For the bundled corpus (290 passages, milliseconds).
- :func:`build_index`: a JSONL corpus (``{"id", "title", "text"}`` per line, e.g. a
  Wikipedia passage dump) streamed from disk in chunks, written straight into the
  directory layout ``bm25s.BM25.save`` writes, so :meth:`Index.load` (``bm25s.BM25.load``
  with ``mmap=True``) opens it without reading it into memory.

Streaming, two passes over the data, never the whole corpus in memory:

1. Read ``chunk_size`` lines at a time; tokenise (bm25s's tokenizer, English stopwords,
   no stemming) title + text; grow the vocabulary; count document frequencies and
   document lengths; append the token ids to a temporary file and the passage to the
   index's own ``corpus.jsonl``.
2. The CSC score matrix (documents x vocabulary, the layout bm25s queries) has exactly
   ``df[t]`` entries in column ``t``, so its ``indptr`` is the cumulative sum of the
   document frequencies and each chunk's scores can be placed at their final positions
   in memory-mapped ``.npy`` files: read the chunk's token ids back, compute BM25 (Lucene
   variant, bm25s's default) term scores, write them into their columns.

Memory (anonymous, what the build needs beyond the page cache): the vocabulary dict
(about 100-150 bytes per distinct token in CPython), 8 bytes per vocabulary entry for
each of ``df``/``indptr``/fill counters, 4 bytes per document for its length, and one
chunk's tokens and score triples (about 100 bytes per token of the chunk). The output
arrays (8 bytes per document-term pair) are written through memory maps that are
reopened per chunk, so they are file-backed pages the kernel writes back and reclaims,
not heap. See the README for the measured numbers.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BuildStats", "Index", "build_index", "read_corpus", "tokenize"]

K1, B = 1.5, 0.75  # bm25s's defaults (method "lucene")
_FILES = {"data": "data.csc.index.npy", "indices": "indices.csc.index.npy",
          "indptr": "indptr.csc.index.npy"}


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """bm25s's tokenizer: lower-case, ``\\w\\w+`` words, English stopwords removed."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def _doc_text(p: dict[str, Any]) -> str:
    return f"{p.get('title', '')} {p.get('text', '')}"


class Index:
    """Search passages by BM25. ``search(query, k)`` -> passages, best first."""

    def __init__(self, retriever: Any, passages: Sequence[dict[str, Any]]) -> None:
        self.retriever = retriever
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def from_passages(cls, passages: Sequence[dict[str, Any]]) -> Index:
        """Index ``{id, title, text}`` passages in memory (the non-streamed reference)."""
        import bm25s

        if not passages:
            raise ValueError("cannot index an empty list of passages")
        retriever = bm25s.BM25(k1=K1, b=B, method="lucene")
        retriever.index(tokenize([_doc_text(p) for p in passages]), show_progress=False)
        return cls(retriever, list(passages))

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, mmap: bool = True) -> Index:
        """Open an index saved by :func:`build_index` or :meth:`save` (memory-mapped)."""
        import bm25s

        d = Path(directory)
        missing = [n for n in (*_FILES.values(), "params.index.json", "vocab.index.json",
                               "corpus.jsonl") if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{d} is not a BM25 index directory (missing {', '.join(missing)}); build one "
                f"with: python -m rag.index CORPUS.jsonl {d}")
        retriever = bm25s.BM25.load(str(d), load_corpus=True, mmap=mmap, show_progress=False,
                                    verbosity=0)
        passages = retriever.corpus
        retriever.corpus = None  # we map indices to passages ourselves
        return cls(retriever, passages)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save in bm25s's layout, passages in ``corpus.jsonl``."""
        self.retriever.save(str(directory), corpus=self.passages, show_progress=False)

    def search(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` best passages for ``query`` (fewer if the corpus is smaller); each a
        copy of the passage with its ``score``. Passages with score 0 (no query term) are
        left out."""
        tokens = tokenize([query])
        if not any(t in self.retriever.vocab_dict for t in tokens[0]):
            return []
        k = min(k, len(self.passages))
        docs, scores = self.retriever.retrieve(tokens, k=k, show_progress=False,
                                               return_as="tuple", n_threads=0)
        out = []
        for i, s in zip(docs[0].tolist(), scores[0].tolist()):
            if s > 0:
                out.append({**self.passages[int(i)], "score": float(s)})
        return out


def read_corpus(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Stream ``{id, title, text}`` passages from a JSONL file (clear error if missing)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"corpus file {p} not found: it must be a JSONL file with one "
            '{"id": ..., "title": ..., "text": ...} object per line (for Wikipedia, convert '
            "a passage dump such as DPR's psgs_w100.tsv or MuSiQue's paragraphs to it)")
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{p}:{n} is not valid JSON: {exc}") from exc
            if not isinstance(doc, dict) or "text" not in doc or "id" not in doc:
                raise ValueError(f"{p}:{n} must be an object with 'id' and 'text' "
                                 f"(and optionally 'title'), got {str(doc)[:80]}")
            yield {"id": str(doc["id"]), "title": str(doc.get("title", "")),
                   "text": str(doc["text"])}


def _chunks(it: Iterable[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _rss_anon_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@dataclass(frozen=True)
class BuildStats:
    documents: int
    vocabulary: int
    nonzeros: int
    seconds: float
    peak_rss_mb: float
    """Peak resident set of the process (``ru_maxrss``), file-backed pages included."""
    peak_anon_mb: float
    """Peak anonymous (heap) resident memory sampled after each chunk (Linux)."""
    index_mb: float


def build_index(corpus: str | os.PathLike[str] | Iterable[dict[str, Any]],
                out_dir: str | os.PathLike[str], *, chunk_size: int = 10_000,
                k1: float = K1, b: float = B) -> BuildStats:
    """Stream ``corpus`` (a JSONL path, or an iterable of passages) into an index in
    ``out_dir`` that :meth:`Index.load` opens. See the module docstring for the passes
    and the memory they use."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = read_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else iter(corpus)
    vocab: dict[str, int] = {}
    df = np.zeros(1024, dtype=np.int64)
    lengths: list[np.ndarray] = []
    peak_anon = 0.0
    tmp_tokens = out / "tokens.tmp"
    # pass 1: vocabulary, document frequencies, lengths; token ids and passages to disk
    with open(tmp_tokens, "wb") as tok_f, open(out / "corpus.jsonl", "w", encoding="utf-8") as cf:
        for chunk in _chunks(docs, chunk_size):
            toks = tokenize([_doc_text(p) for p in chunk])
            ids = [np.fromiter((vocab.setdefault(t, len(vocab)) for t in doc), dtype=np.int32,
                               count=len(doc)) for doc in toks]
            lens = np.fromiter((len(x) for x in ids), dtype=np.int32, count=len(ids))
            flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
            if len(vocab) > len(df):
                df = np.concatenate([df, np.zeros(max(len(vocab), 2 * len(df)) - len(df),
                                                  np.int64)])
            local = np.repeat(np.arange(len(ids), dtype=np.int64), lens)
            pairs = np.unique(local * len(vocab) + flat)  # one per (document, token)
            df[: len(vocab)] += np.bincount(pairs % len(vocab), minlength=len(vocab))
            flat.tofile(tok_f)
            lengths.append(lens)
            cf.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in chunk)
            peak_anon = max(peak_anon, _rss_anon_mb())
    if not lengths:
        tmp_tokens.unlink()
        raise ValueError(f"corpus {corpus!r} has no passages")
    vocab.setdefault("", len(vocab))  # bm25s's empty token: a column with no entries
    n_vocab = len(vocab)
    df = df[:n_vocab].copy() if len(df) >= n_vocab else np.pad(df, (0, n_vocab - len(df)))
    doc_len = np.concatenate(lengths)
    del lengths
    n_docs = len(doc_len)
    avg_len = float(doc_len.mean())
    idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)  # Lucene idf
    indptr = np.zeros(n_vocab + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    nnz = int(indptr[-1])
    int_dtype = np.int32 if n_docs < 2**31 else np.int64
    # the output arrays, as .npy files filled in place
    np.save(out / _FILES["indptr"], indptr)
    for name, dtype in (("data", np.float32), ("indices", int_dtype)):
        np.lib.format.open_memmap(out / _FILES[name], mode="w+", dtype=dtype,
                                  shape=(max(nnz, 0),)).flush()
    fill = np.zeros(n_vocab, dtype=np.int64)
    # pass 2: term scores, written into their columns chunk by chunk
    all_tokens = np.memmap(tmp_tokens, dtype=np.int32, mode="r") if nnz else None
    pos = 0
    for start in range(0, n_docs, chunk_size):
        lens = doc_len[start : start + chunk_size]
        n_tok = int(lens.sum())
        flat = np.array(all_tokens[pos : pos + n_tok], dtype=np.int64) if n_tok else \
            np.zeros(0, np.int64)
        pos += n_tok
        local = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        keys, tf = np.unique(local * n_vocab + flat, return_counts=True)
        doc = keys // n_vocab
        tok = keys % n_vocab
        norm = k1 * ((1 - b) + b * lens[doc].astype(np.float64) / avg_len)
        score = (idf[tok] * (tf / (norm + tf))).astype(np.float32)
        order = np.lexsort((doc, tok))  # column-major, documents ascending in a column
        tok, doc, score = tok[order], doc[order], score[order]
        first = np.searchsorted(tok, tok, side="left")
        dest = indptr[tok] + fill[tok] + (np.arange(len(tok)) - first)
        fill += np.bincount(tok, minlength=n_vocab)
        data = np.load(out / _FILES["data"], mmap_mode="r+")
        indices = np.load(out / _FILES["indices"], mmap_mode="r+")
        data[dest] = score
        indices[dest] = doc + start
        data.flush()
        indices.flush()
        del data, indices
        peak_anon = max(peak_anon, _rss_anon_mb())
    del all_tokens
    tmp_tokens.unlink()
    assert np.array_equal(fill, df), "internal error: column fill does not match df"
    with open(out / "vocab.index.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    import bm25s

    params = {"k1": k1, "b": b, "delta": 0.5, "method": "lucene", "idf_method": "lucene",
              "dtype": "float32", "int_dtype": np.dtype(int_dtype).name, "num_docs": n_docs,
              "version": bm25s.__version__, "backend": "numpy"}
    (out / "params.index.json").write_text(json.dumps(params, indent=1))
    from bm25s.utils.corpus import find_newline_positions, save_mmindex

    save_mmindex(find_newline_positions(out / "corpus.jsonl", show_progress=False),
                 path=out / "corpus.jsonl")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return BuildStats(
        documents=n_docs, vocabulary=n_vocab, nonzeros=nnz,
        seconds=round(time.perf_counter() - t0, 2),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        peak_anon_mb=round(peak_anon, 1), index_mb=round(size / 2**20, 1),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m rag.index CORPUS.jsonl OUT_DIR [--chunk-size N]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m rag.index",
                                description="Stream a JSONL passage corpus into a BM25 index.")
    p.add_argument("corpus", help="JSONL, one {id, title, text} per line")
    p.add_argument("out", help="index directory (created)")
    p.add_argument("--chunk-size", type=int, default=10_000, help="passages per chunk")
    args = p.parse_args(argv)
    stats = build_index(args.corpus, args.out, chunk_size=args.chunk_size)
    print(json.dumps(stats.__dict__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
