"""Tasks for the Spider example: the public Spider layout, or the bundled generated set.

A task is a JSON-like dict: ``id``, ``db_id``, ``question``, ``query`` (the gold SQL) and
``db_path`` (the SQLite file to run it on). Nothing here downloads anything.

- :func:`load_spider` reads the public Spider release as unpacked from its archive::

      ROOT/train_spider.json     (also train_others.json: split="train_others")
      ROOT/dev.json
      ROOT/database/<db_id>/<db_id>.sqlite

  A missing file raises :class:`FileNotFoundError` naming the file and where it goes.
- :func:`bundled` reads ``data/questions.json`` (made by :mod:`spider.make_data`) and
  builds each database from its committed dump ``data/<db_id>.sql`` on first use, into a
  cache folder (``$LIGHTNING_SPIDER_CACHE``, else ``~/.cache/lightning/spider``) keyed by
  the dump's hash, with an atomic rename: concurrent first uses are safe, and a changed
  dump gets a fresh file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "SPIDER_SPLITS", "bundled", "bundled_db_path", "cache_dir", "load_spider", "main"]

DATA_DIR = Path(__file__).resolve().parent / "data"
SPIDER_SPLITS = {"train": "train_spider.json", "train_others": "train_others.json",
                 "dev": "dev.json"}
_SPIDER_HINT = ("get the Spider release (https://yale-lily.github.io/spider, spider.zip) and "
                "unpack it so that {root} holds train_spider.json, dev.json and database/")


def load_spider(root: str | Path, split: str = "dev", *, limit: int | None = None) -> list[dict[str, Any]]:
    """Spider's ``split`` ("train", "train_others" or "dev") as tasks.

    Raises ``ValueError`` for an unknown split and ``FileNotFoundError`` (saying what to
    fetch and where to put it) for a missing JSON file or database.
    """
    if split not in SPIDER_SPLITS:
        raise ValueError(f"unknown Spider split {split!r}: use one of {', '.join(SPIDER_SPLITS)}")
    root = Path(root)
    path = root / SPIDER_SPLITS[split]
    if not path.is_file():
        raise FileNotFoundError(f"Spider file {path} is missing: " + _SPIDER_HINT.format(root=root))
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-extract it from spider.zip") from exc
    if not isinstance(items, list):
        raise ValueError(  # noqa: TRY004 - the file's content is wrong, not an argument's type
            f"{path} must hold a JSON list of questions, got {type(items).__name__}")
    tasks: list[dict[str, Any]] = []
    for n, item in enumerate(items[:limit] if limit is not None else items):
        missing = [k for k in ("db_id", "question", "query") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"{path}: question {n} has no {', '.join(missing)} (a string each)")
        db = root / "database" / item["db_id"] / f"{item['db_id']}.sqlite"
        if not db.is_file():
            raise FileNotFoundError(
                f"Spider database {db} is missing (question {n} of {path.name} uses it): "
                + _SPIDER_HINT.format(root=root))
        tasks.append({"id": f"spider-{split}-{n:05d}", "db_id": item["db_id"],
                      "question": item["question"], "query": item["query"], "db_path": str(db)})
    return tasks


def cache_dir() -> Path:
    """Where bundled databases are built: ``$LIGHTNING_SPIDER_CACHE`` or
    ``~/.cache/lightning/spider``."""
    env = os.environ.get("LIGHTNING_SPIDER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lightning" / "spider"


def bundled_db_path(db_id: str, *, data_dir: Path = DATA_DIR) -> Path:
    """The SQLite file of bundled database ``db_id``, built from its dump if needed."""
    dump_path = data_dir / f"{db_id}.sql"
    try:
        dump = dump_path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"bundled database dump {dump_path} is missing: run `python -m spider.make_data` "
            "from examples/ to regenerate the bundled set") from None
    digest = hashlib.sha256(dump).hexdigest()[:16]
    final = cache_dir() / digest / "database" / db_id / f"{db_id}.sqlite"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{db_id}-", suffix=".sqlite", dir=final.parent)
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(dump.decode("utf-8"))
            conn.commit()
        finally:
            conn.close()
        os.replace(tmp, final)  # atomic: readers see no file or the whole file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def bundled(*, data_dir: Path = DATA_DIR) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundled set as ``(train, test)`` tasks (databases built on first use)."""
    path = data_dir / "questions.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: run `python -m spider.make_data` from examples/") from None
    paths: dict[str, str] = {}

    def task(q: dict[str, Any]) -> dict[str, Any]:
        if q["db_id"] not in paths:
            paths[q["db_id"]] = str(bundled_db_path(q["db_id"], data_dir=data_dir))
        return {"id": q["id"], "db_id": q["db_id"], "question": q["question"],
                "query": q["query"], "db_path": paths[q["db_id"]], "template": q["template"]}

    return [task(q) for q in data["train"]], [task(q) for q in data["test"]]


def main(argv: list[str] | None = None) -> int:
    """``python -m spider.data --root SPIDER --split dev --out dev.jsonl``: Spider as JSONL
    tasks for ``lightning train --dataset`` / ``--eval-dataset``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description="write Spider tasks as JSONL (no download)")
    p.add_argument("--root", required=True, help="the unpacked spider/ folder")
    p.add_argument("--split", default="dev", choices=sorted(SPIDER_SPLITS))
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, default=None, help="the first N questions only")
    args = p.parse_args(argv)
    try:
        tasks = load_spider(args.root, args.split, limit=args.limit)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks)
    print(f"wrote {len(tasks)} tasks to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
