"""SQL for the Spider example: pull a query out of model text, run it safely, score it.

- :func:`extract_sql`: the model writes prose, code fences, several statements, or half a
  query; we take the first ``SELECT``/``WITH`` statement and cut trailing prose by keeping
  the longest line prefix sqlglot can parse (the database reports the error otherwise, and
  the agent shows that error to the model).
- :func:`execute`: a read-only connection (``mode=ro``, and an authorizer that allows
  reads only: no writes, ``ATTACH`` or ``PRAGMA``), a VM step budget and a wall-clock
  deadline enforced by SQLite's progress handler (a runaway recursive CTE or a huge cross
  join is interrupted, never hangs a rollout), a row cap and a value-length cap.
- :func:`run_sql`: :func:`execute` as a ``@lightning.tool``, so every query the agent runs
  is a ``kind="tool"`` span; a failed query raises, so the span is ``status="error"`` and
  AIR's ``tool_call`` / ``sql_ok`` rules turn "the SQL ran / errored" into step rewards.
- :func:`execution_match`: the reward. Both queries run on the database; the results match
  when their rows are equal as multisets (as lists when the gold query's outermost
  statement has an ``ORDER BY``), after normalising values (ints and floats compare as
  numbers rounded to 6 decimals; text compares exactly). Columns compare in order.
"""

from __future__ import annotations

import functools
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import lightning

__all__ = [
    "Execution",
    "SQLError",
    "execute",
    "execution_match",
    "extract_sql",
    "gold_is_ordered",
    "normalise_rows",
    "results_match",
    "run_sql",
]

MAX_STEPS = 20_000_000
"""SQLite VM instructions one query may run (checked every 1,000) before it is interrupted.
Deterministic, unlike a deadline: a query stopped here is stopped on any machine."""
TIMEOUT_S = 10.0
"""Wall-clock backstop per query (a slow box must not fail correct gold queries, so this
is generous; the step budget is what normally stops a runaway query)."""
MAX_ROWS = 10_000
"""Rows fetched per query; a longer result is marked ``truncated``."""
MAX_VALUE_BYTES = 1_000_000
"""Longest string or blob a query may build (``SQLITE_LIMIT_LENGTH``)."""

_ALLOWED_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
     sqlite3.SQLITE_RECURSIVE}
)


class SQLError(Exception):
    """A query that could not run: syntax error, unknown table, interrupted, not read-only."""


class Execution:
    """A query's result: column names and rows (at most ``MAX_ROWS``).

    Its ``repr`` is short (row count and the first rows): that is what the ``run_sql``
    tool span records as its output, not the whole result.
    """

    __slots__ = ("columns", "rows", "truncated")

    def __init__(self, columns: Sequence[str], rows: list[tuple[Any, ...]], truncated: bool):
        self.columns = tuple(columns)
        self.rows = rows
        self.truncated = truncated

    def preview(self, max_rows: int = 5) -> str:
        """The result as the model sees it: columns, the first rows, the row count."""
        if not self.rows:
            return f"columns ({', '.join(self.columns)}): no rows"
        more = "+" if self.truncated else ""
        head = "; ".join(_row_text(r) for r in self.rows[:max_rows])
        tail = " ..." if len(self.rows) > max_rows else ""
        return (f"{len(self.rows)}{more} row(s), columns ({', '.join(self.columns)}): "
                f"{head}{tail}")

    def __repr__(self) -> str:
        return f"Execution({self.preview(3)})"


def _row_text(row: tuple[Any, ...]) -> str:
    return "(" + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in row) + ")"


def _authorize(action: int, *_: Any) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def execute(
    db_path: str | Path,
    sql: str,
    *,
    max_steps: int = MAX_STEPS,
    timeout_s: float = TIMEOUT_S,
    max_rows: int = MAX_ROWS,
) -> Execution:
    """Run one read-only query on the SQLite file ``db_path``.

    Raises :class:`SQLError` with SQLite's message when the query fails, writes, is more
    than one statement, or runs past ``max_steps`` VM instructions or ``timeout_s``
    seconds; :class:`FileNotFoundError` when the database file does not exist.
    """
    path = Path(db_path)
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True,
                           timeout=1.0, check_same_thread=False)
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        conn.text_factory = lambda b: b.decode("utf-8", "replace")
        deadline = time.monotonic() + timeout_s
        steps = [0]
        why: list[str] = []

        def progress() -> int:
            steps[0] += 1_000
            if steps[0] > max_steps:
                why.append(f"it ran more than {max_steps:,} SQLite steps")
                return 1
            if time.monotonic() > deadline:
                why.append(f"it ran longer than {timeout_s:g} s")
                return 1
            return 0

        conn.set_progress_handler(progress, 1_000)
        conn.set_authorizer(_authorize)
        try:
            cur = conn.execute(sql)
            rows = cur.fetchmany(max_rows + 1)
            columns = [d[0] for d in cur.description or ()]
        except sqlite3.Error as exc:
            if why:
                raise SQLError(f"query interrupted: {why[0]}") from exc
            msg = str(exc)
            if "not authorized" in msg:
                msg += " (only read-only SELECT queries are allowed)"
            raise SQLError(msg) from exc
        except (OverflowError, ValueError, MemoryError) as exc:  # e.g. a NUL in the text
            raise SQLError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    truncated = len(rows) > max_rows
    return Execution(columns, [tuple(r) for r in rows[:max_rows]], truncated)


@lightning.tool(name="run_sql")
def run_sql(sql: str, db_path: str) -> Execution:
    """The agent's SQL tool: :func:`execute` recorded as a tool span (errors raise)."""
    return execute(db_path, sql)


# ------------------------------------------------------------------ extraction

_FENCE = re.compile(r"```[ \t]*(?:sqlite|sql)?[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# SELECT, or WITH that opens a common table expression ("with a join" in prose is not SQL)
_START = re.compile(r"\bSELECT\b|\bWITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\([^()]*\)\s*)?AS\s*\(",
                    re.IGNORECASE)


def extract_sql(text: str) -> str | None:
    """The first SQL query in the model's reply, or None when there is none.

    Looks inside the first code fence when there is one (closed or not); takes the text
    from the first ``SELECT``/``WITH``; ends the statement at the first ``;`` outside
    quotes, else at a blank line; then drops trailing lines of prose by keeping the longest
    line prefix sqlglot parses (when no prefix parses, the first line is kept so the
    database's error message can be shown to the model).
    """
    if not isinstance(text, str) or not text:
        return None
    m = _FENCE.search(text)
    body = m.group(1) if m and _START.search(m.group(1)) else text
    start = _START.search(body)
    if start is None:
        return None
    stmt = _first_statement(body[start.start():])
    stmt = re.split(r"\n[ \t]*\n", stmt, maxsplit=1)[0].replace("`", "").strip()
    lines = stmt.splitlines()
    for n in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:n]).strip()
        if _parses(candidate):
            return candidate
    return lines[0].strip() if lines else None


def _first_statement(sql: str) -> str:
    """``sql`` up to its first ``;`` that is not inside a quoted string or identifier."""
    quote_char: str | None = None
    for i, ch in enumerate(sql):
        if quote_char is not None:
            if ch == quote_char:
                quote_char = None
        elif ch in "'\"":
            quote_char = ch
        elif ch == ";":
            return sql[:i]
    return sql


@functools.lru_cache(maxsize=4096)
def _parses(sql: str) -> bool:
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
    except (SqlglotError, ValueError, RecursionError):
        return False
    return tree is not None and tree.key in ("select", "union", "intersect", "except", "with")


# ------------------------------------------------------------------ reward


def _norm(value: Any) -> Any:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        f = float(value)
        return "nan" if math.isnan(f) else round(f, 6)  # NaN != NaN would break equality
    if isinstance(value, bytes):
        return value.hex()
    return value


def normalise_rows(rows: Sequence[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Rows with comparable values: numbers as floats rounded to 6 decimals (so ``1`` ==
    ``1.0``), blobs as hex, text and NULL unchanged."""
    return [tuple(_norm(v) for v in row) for row in rows]


def results_match(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]], *,
                  ordered: bool) -> bool:
    """Whether two results are equal: as lists when ``ordered``, else as multisets of rows
    (values normalised, columns in order). Symmetric in ``a`` and ``b``."""
    na, nb = normalise_rows(a), normalise_rows(b)
    if ordered:
        return na == nb
    try:
        return Counter(na) == Counter(nb)
    except TypeError:  # an unhashable value: compare sorted reprs instead
        return sorted(map(repr, na)) == sorted(map(repr, nb))


@functools.lru_cache(maxsize=4096)
def gold_is_ordered(gold_sql: str) -> bool:
    """Whether the gold query's outermost statement has an ``ORDER BY`` (its row order is
    then part of the answer). Falls back to a text search when sqlglot cannot parse it."""
    import sqlglot
    from sqlglot.errors import SqlglotError

    try:
        tree = sqlglot.parse_one(gold_sql, read="sqlite")
    except (SqlglotError, ValueError, RecursionError):
        tree = None
    if tree is None:
        return re.search(r"\border\s+by\b", gold_sql, re.IGNORECASE) is not None
    return tree.args.get("order") is not None


def _gold(db_path: str, gold_sql: str) -> Execution:
    """The gold query's result, cached per database file version: the key holds the file's
    inode, size and mtime, so a database replaced at the same path is not served stale."""
    st = Path(db_path).stat()
    return _gold_cached(db_path, gold_sql, (st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=1024)
def _gold_cached(db_path: str, gold_sql: str, _version: tuple[int, int, int]) -> Execution:
    try:
        return execute(db_path, gold_sql)
    except SQLError as exc:
        raise ValueError(f"the gold query fails on {db_path}: {exc}; query: {gold_sql}") from exc


def execution_match(db_path: str | Path, predicted: str | Execution | None, gold_sql: str) -> float:
    """1.0 when the predicted query (SQL text, or its :class:`Execution`) returns the gold
    query's result on ``db_path``, else 0.0 (also for no query, a failing or truncated one).

    Raises ``ValueError`` when the *gold* query fails: that is a data bug, not a miss.
    """
    gold = _gold(str(db_path), gold_sql)
    if predicted is None:
        return 0.0
    if isinstance(predicted, str):
        try:
            predicted = execute(db_path, predicted)
        except SQLError:
            return 0.0
    if predicted.truncated != gold.truncated:
        return 0.0
    return 1.0 if results_match(gold.rows, predicted.rows,
                                ordered=gold_is_ordered(gold_sql)) else 0.0
