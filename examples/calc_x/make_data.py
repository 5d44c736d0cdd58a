"""Generate the bundled Calc-X problems (``python examples/calc_x/make_data.py``).

Word problems that take one, two or three arithmetic operations ("buys 3 packs of 12 and
gives away 7..."), each with its gold ``answer`` (a positive integer: divisions are
exact) and the gold ``expression`` that computes it in one line. They are made from
:data:`TEMPLATES` with a seeded RNG, so the same seed always gives the same problems:
no download, no network.

:func:`generate` draws problems until it has ``n_train + n_test`` distinct questions and
splits them after drawing, so the two splits share no question text; the split is
``(train, test)``. Running this file writes ``data/train.jsonl`` and ``data/test.jsonl``
beside it from seed 0 (the files the example ships; a test checks they match).

A curriculum mix (:data:`MIX`): 40 % of the problems take one operation on small numbers
(``a + b`` with ``a, b <= 20``, a one-digit product...), 40 % two and 20 % three. A 135M
model solves some of the one-operation problems from the start, so GRPO's groups differ in
reward from the first step, while the two- and three-step problems are what it has to learn
(with the calculator: the way to be right on them).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["DATA_DIR", "TEMPLATES", "Template", "generate", "main", "write_jsonl"]

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Where the bundled ``train.jsonl`` / ``test.jsonl`` live."""

_NAMES = ("Ann", "Ben", "Mia", "Leo", "Sam", "Zoe", "Tom", "Ava")
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "cards")


class Template(NamedTuple):
    """A problem shape: its text, how to draw its numbers, and the gold expression."""

    ops: int
    """Arithmetic operations the solution takes."""
    text: str
    """``str.format`` text over ``{name}``, ``{item}`` and the drawn numbers."""
    draw: Callable[[random.Random], dict[str, int]]
    """Draws the numbers (so that every intermediate and the answer are positive integers)."""
    expression: str
    """The gold calculation over the drawn numbers (Python syntax)."""


def _r(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


def _small_plus(rng: random.Random) -> dict[str, int]:
    return {"a": _r(rng, 2, 20), "b": _r(rng, 2, 20)}


def _small_minus(rng: random.Random) -> dict[str, int]:
    a = _r(rng, 6, 30)
    return {"a": a, "b": _r(rng, 1, a - 1)}


def _small_times(rng: random.Random) -> dict[str, int]:
    return {"a": _r(rng, 2, 9), "b": _r(rng, 2, 9)}


def _small_div(rng: random.Random) -> dict[str, int]:
    b = _r(rng, 2, 9)
    return {"a": b * _r(rng, 2, 9), "b": b}


def _packs_minus(rng: random.Random) -> dict[str, int]:
    a, b = _r(rng, 2, 9), _r(rng, 3, 12)
    return {"a": a, "b": b, "c": _r(rng, 1, a * b - 1)}


def _plus_minus(rng: random.Random) -> dict[str, int]:
    a, b = _r(rng, 5, 60), _r(rng, 2, 40)
    return {"a": a, "b": b, "c": _r(rng, 1, a + b - 1)}


def _plus_times(rng: random.Random) -> dict[str, int]:
    return {"a": _r(rng, 2, 40), "b": _r(rng, 2, 9), "c": _r(rng, 2, 12)}


def _div_plus(rng: random.Random) -> dict[str, int]:
    b = _r(rng, 2, 9)
    return {"a": b * _r(rng, 2, 12), "b": b, "c": _r(rng, 1, 9)}


def _times_plus(rng: random.Random) -> dict[str, int]:
    return {"a": _r(rng, 2, 30), "b": _r(rng, 2, 9), "c": _r(rng, 1, 30)}


def _sum_div(rng: random.Random) -> dict[str, int]:
    c = _r(rng, 2, 8)
    total = c * _r(rng, 3, 12)
    a = _r(rng, 1, total - 1)
    return {"a": a, "b": total - a, "c": c}


def _packs_minus_div(rng: random.Random) -> dict[str, int]:
    d = _r(rng, 2, 6)
    a, b = _r(rng, 2, 8), _r(rng, 4, 12)
    rest = d * _r(rng, 1, (a * b - 1) // d) if a * b > d else d
    return {"a": a, "b": b, "c": a * b - rest, "d": d} if a * b - rest > 0 else _packs_minus_div(rng)


def _two_products(rng: random.Random) -> dict[str, int]:
    return {"a": _r(rng, 2, 9), "b": _r(rng, 2, 12), "c": _r(rng, 2, 9), "d": _r(rng, 2, 12)}


def _money(rng: random.Random) -> dict[str, int]:
    b, c = _r(rng, 2, 6), _r(rng, 2, 9)
    return {"a": b * c + _r(rng, 1, 40), "b": b, "c": c, "d": _r(rng, 1, 20)}


TEMPLATES: tuple[Template, ...] = (
    Template(1, "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
             _small_plus, "{a} + {b}"),
    Template(1, "{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} "
             "have left?", _small_minus, "{a} - {b}"),
    Template(1, "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} "
             "buy?", _small_times, "{a} * {b}"),
    Template(1, "{a} {item} are shared equally among {b} children. How many {item} does each "
             "child get?", _small_div, "{a} / {b}"),
    Template(2, "{name} buys {a} packs of {b} {item} and gives away {c}. How many {item} does "
             "{name} have now?", _packs_minus, "{a} * {b} - {c}"),
    Template(2, "A shop has {a} boxes with {b} {item} in each box and sells {c} {item}. How many "
             "{item} are left?", _packs_minus, "{a} * {b} - {c}"),
    Template(2, "{name} has {a} {item}, gets {b} more and then gives {c} to a friend. How many "
             "{item} does {name} have left?", _plus_minus, "{a} + {b} - {c}"),
    Template(2, "{name} has {a} {item} and buys {b} bags with {c} {item} in each bag. How many "
             "{item} does {name} have now?", _plus_times, "{a} + {b} * {c}"),
    Template(2, "{a} {item} are shared equally among {b} children, and then each child gets {c} "
             "more. How many {item} does each child have?", _div_plus, "{a} / {b} + {c}"),
    Template(2, "{name} reads {a} pages a day for {b} days and then {c} more pages. How many "
             "pages did {name} read in all?", _times_plus, "{a} * {b} + {c}"),
    Template(2, "A class has {a} girls and {b} boys. They stand in rows of {c}. How many rows "
             "are there?", _sum_div, "({a} + {b}) / {c}"),
    Template(3, "{name} buys {a} packs of {b} {item}, gives away {c}, and shares the rest equally "
             "among {d} friends. How many {item} does each friend get?", _packs_minus_div,
             "({a} * {b} - {c}) / {d}"),
    Template(3, "A baker makes {a} trays of {b} cookies and {c} trays of {d} cookies. How many "
             "cookies does the baker make?", _two_products, "{a} * {b} + {c} * {d}"),
    Template(3, "{name} has {a} dollars, buys {b} toys at {c} dollars each and then earns {d} "
             "dollars. How many dollars does {name} have now?", _money, "{a} - {b} * {c} + {d}"),
)


MIX: dict[int, float] = {1: 0.4, 2: 0.4, 3: 0.2}
"""Share of the problems by operations: a curriculum mix (see the module docstring)."""

_KINDS = tuple(sorted(MIX))
_BY_OPS = {k: [i for i, t in enumerate(TEMPLATES) if t.ops == k] for k in _KINDS}


def _answer(expression: str) -> int:
    # the generator's own expressions only (numbers and + - * / parentheses)
    from .calc_server import evaluate

    value = evaluate(expression)
    if not isinstance(value, int) or value <= 0:
        raise AssertionError(f"template made a non-positive or inexact answer: {expression}")
    return value


def generate(n_train: int = 320, n_test: int = 80, *, seed: int = 0
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)`` problems with distinct questions; deterministic for a seed.

    Each problem is ``{"id", "question", "answer", "expression", "ops", "template"}``.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for _ in range(100 * (n_train + n_test)):
        if len(out) == n_train + n_test:
            break
        ops = rng.choices(_KINDS, weights=[MIX[k] for k in _KINDS])[0]
        t = rng.choice(_BY_OPS[ops])
        tpl = TEMPLATES[t]
        nums = tpl.draw(rng)
        question = tpl.text.format(name=rng.choice(_NAMES), item=rng.choice(_ITEMS), **nums)
        if question in seen:
            continue
        seen.add(question)
        expression = tpl.expression.format(**nums)
        out.append({"question": question, "answer": _answer(expression), "expression": expression,
                    "ops": tpl.ops, "template": t})
    else:
        raise ValueError(f"only {len(out)} distinct problems found; ask for fewer")
    rng.shuffle(out)
    train = [{"id": f"calcx-train-{i}", **p} for i, p in enumerate(out[:n_train])]
    test = [{"id": f"calcx-test-{i}", **p} for i, p in enumerate(out[n_train:])]
    return train, test


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--test", type=int, default=80)
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    train, test = generate(args.train, args.test, seed=args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} train and {len(test)} test problems to {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    # run as a script: make the package importable so the relative import above works
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "calc_x"
    sys.exit(main())
