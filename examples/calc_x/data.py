"""Data for the Calc-X example: the bundled generated problems and the public Calc-X JSONL.

Tasks are dicts with at least ``question`` (str) and ``answer`` (a number); the agent
passes them through unchanged, so extra fields (``id``, ``expression``...) are fine.

- :func:`bundled` reads the problems shipped in ``data/`` (made by ``make_data.py``).
- :func:`load_calc_x` reads a file of the public Calc-X collection (MU-NLPC's Calc-gsm8k,
  Calc-ape210k, Calc-mawps, Calc-svamp...; Agent Lightning's Calc-X data uses the same rows),
  exported as JSON Lines with the fields ``question``, ``chain`` (the calculator-annotated
  solution), ``result`` (the answer as text: ``"24"``, ``"2/3"``, ``"C"``) and, in some
  subsets, ``result_float``. Nothing is ever downloaded: a missing file is a
  :class:`FileNotFoundError` that names the file and how to get it.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from .make_data import DATA_DIR

__all__ = ["CALC_X_HELP", "bundled", "load_calc_x", "parse_result", "read_jsonl"]

CALC_X_HELP = (
    "Calc-X is not bundled and is never downloaded. Get a split of the Calc-X collection "
    "(e.g. MU-NLPC/Calc-gsm8k or MU-NLPC/Calc-ape210k on the Hugging Face Hub) on a machine "
    "with network access, export it as JSON Lines with one row per line holding 'question' "
    "and 'result' (e.g. datasets.load_dataset('MU-NLPC/Calc-gsm8k', split='test')"
    ".to_json('calc-gsm8k-test.jsonl')), and put the file at the path you passed"
)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON Lines file (blank lines skipped); errors name the line."""
    path = Path(path)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n} is not a JSON object")  # noqa: TRY004 - bad data
        rows.append(row)
    return rows


def bundled(split: str) -> list[dict[str, Any]]:
    """The shipped ``train`` or ``test`` problems (``data/{split}.jsonl``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = DATA_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python {DATA_DIR.parent / 'make_data.py'}")
    return read_jsonl(path)


_NUMBER = re.compile(r"^[-+]?(?:\d[\d,]*)?(?:\.\d+)?(?:[eE][-+]?\d+)?$")


def parse_result(result: Any) -> float | None:
    """A Calc-X ``result`` as a number, or None when it is not one.

    Accepts numbers, ``"24"``, ``"1,200"``, ``"-3.5"``, fractions ``"2/3"``, mixed numbers
    ``"1 1/2"`` and percentages ``"12%"`` (as 12). Multiple-choice letters (the AQuA-RAT
    rows, ``"C"``) and anything else give None.
    """
    if isinstance(result, bool):
        return None
    if isinstance(result, (int, float)):
        return float(result) if math.isfinite(result) else None
    if not isinstance(result, str):
        return None
    s = result.strip().rstrip("%").strip()
    try:
        if "/" in s:
            whole, _, frac = s.rpartition(" ")
            value = Fraction(frac.replace(",", ""))
            if whole:
                w = Fraction(whole.replace(",", ""))
                value = w + value if w >= 0 else w - value
            return float(value)
        if s and _NUMBER.match(s) and any(c.isdigit() for c in s):
            return float(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def load_calc_x(path: str | Path, *, limit: int | None = None) -> tuple[list[dict[str, Any]], int]:
    """Tasks from a Calc-X JSON Lines file, and how many rows were skipped.

    Each task is ``{"id", "question", "answer", "chain"}`` (``answer`` is ``result_float``
    when the row has it, else :func:`parse_result` of ``result``). Rows whose answer is not
    a number (multiple-choice letters) are skipped and counted, never guessed.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says how to get the data).
        ValueError: a line is not a JSON object, or a row has no ``question``/``result``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Calc-X file {path} not found. {CALC_X_HELP} ({path}).")
    tasks: list[dict[str, Any]] = []
    skipped = 0
    for i, row in enumerate(read_jsonl(path)):
        if "question" not in row or ("result" not in row and "result_float" not in row):
            raise ValueError(f"{path}: row {i + 1} has no 'question'/'result' field (fields: "
                             f"{sorted(row)}); is this a Calc-X file?")
        answer = row.get("result_float")
        answer = parse_result(answer if answer is not None else row.get("result"))
        if answer is None:
            skipped += 1
            continue
        tasks.append({"id": str(row.get("id", f"{path.stem}-{i}")), "question": row["question"],
                      "answer": answer, "chain": row.get("chain", "")})
        if limit is not None and len(tasks) >= limit:
            break
    return tasks, skipped
