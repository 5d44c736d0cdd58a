"""Tasks: the bundled generated set, and MuSiQue's JSONL for users who have it.

A task is a dict the agent reads::

    {"id": str, "question": str, "answers": [str, ...],   # gold answer first, then aliases
     "supporting": [passage id, ...],                     # gold supporting passages
     "index": str | None}                                 # index directory (None: bundled)

Nothing here downloads. MuSiQue (Trivedi et al., 2022, "MuSiQue: Multihop Questions via
Single-hop Question Composition") ships ``musique_ans_v1.0_{train,dev,test}.jsonl``; each
line has ``id``, ``question``, ``answer``, ``answer_aliases``, ``answerable``,
``paragraphs`` (``[{idx, title, paragraph_text, is_supporting}]``, 20 per question) and
``question_decomposition``. Its paragraphs become the retrieval corpus
(:func:`musique_corpus`, one passage per distinct title + text, id = a hash of both), so
a question's supporting paragraphs are found by id among everything the index holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "MUSIQUE_URL", "bundled", "load_musique", "musique_corpus",
           "passage_id"]

DATA_DIR = Path(__file__).resolve().parent / "data"
MUSIQUE_URL = "https://github.com/StonyBrookNLP/musique (README: 'Download data')"


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc


def bundled(*, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The generated ``(train, test)`` questions in ``data/`` (see ``make_data.py``);
    ``seed`` shuffles the training order only (the test set is fixed)."""
    out = []
    for split in ("train", "test"):
        path = DATA_DIR / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: regenerate the bundled data with "
                                    "python examples/rag/make_data.py")
        out.append([{**t, "index": None} for _, t in _read_jsonl(path)])
    random.Random(seed).shuffle(out[0])
    return out[0], out[1]


def passage_id(title: str, text: str) -> str:
    """The corpus id of a MuSiQue paragraph: the same title and text, the same id."""
    return "m" + hashlib.sha1(f"{title}\n{text}".encode()).hexdigest()[:15]


def _musique_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"MuSiQue file {p} not found. This example never downloads data: fetch "
            f"musique_ans_v1.0_train.jsonl / musique_ans_v1.0_dev.jsonl from {MUSIQUE_URL}, "
            f"unpack them, and pass that path (e.g. data/musique/musique_ans_v1.0_dev.jsonl)")
    return p


def load_musique(path: str | os.PathLike[str], *, index: str | None = None,
                 answerable_only: bool = True, limit: int | None = None
                 ) -> list[dict[str, Any]]:
    """Tasks from a MuSiQue JSONL file (``musique_ans_v1.0_{train,dev}.jsonl``).

    Args:
        path: the file. Missing: ``FileNotFoundError`` naming it and where to get it.
        index: the index directory the agent searches (built from :func:`musique_corpus`
            with ``python -m rag.index``); stored in each task.
        answerable_only: skip ``"answerable": false`` rows (the ``musique_full`` files).
        limit: at most this many tasks.
    """
    p = _musique_path(path)
    tasks = []
    for n, row in _read_jsonl(p):
        try:
            if answerable_only and row.get("answerable") is False:
                continue
            answers = [row["answer"], *row.get("answer_aliases", [])]
            supporting = [passage_id(q["title"], q["paragraph_text"])
                          for q in row["paragraphs"] if q.get("is_supporting")]
            tasks.append({
                "id": str(row["id"]), "question": row["question"],
                "answers": [a for a in answers if isinstance(a, str)],
                "supporting": supporting,
                "hops": len(row.get("question_decomposition", [])) or None,
                "index": index,
            })
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{p}:{n} is not a MuSiQue row (needs id, question, answer, "
                             f"paragraphs[{{title, paragraph_text, is_supporting}}]): "
                             f"{exc!r}") from exc
        if limit is not None and len(tasks) >= limit:
            break
    return tasks


def musique_corpus(*paths: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Stream the distinct paragraphs of MuSiQue files as ``{id, title, text}`` passages
    (the input of ``rag.index.build_index``). Holds only the set of ids seen (16 bytes
    each)."""
    seen: set[str] = set()
    for path in paths:
        p = _musique_path(path)
        for _, row in _read_jsonl(p):
            for q in row.get("paragraphs", ()):
                pid = passage_id(q["title"], q["paragraph_text"])
                if pid not in seen:
                    seen.add(pid)
                    yield {"id": pid, "title": q["title"], "text": q["paragraph_text"]}
