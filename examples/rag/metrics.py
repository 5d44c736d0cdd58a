"""Answer scoring: SQuAD / MuSiQue token F1 and exact match.

The normalisation is the one SQuAD's and MuSiQue's official evaluation scripts use:
lower-case, drop punctuation, drop the articles ``a``, ``an``, ``the``, collapse
whitespace. F1 is over the bag of normalised tokens; with several gold answers (MuSiQue's
``answer`` plus ``answer_aliases``) the score is the best over them. When the prediction
or the gold answer normalises to no tokens at all, F1 is 1 if both are empty, else 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

__all__ = ["best_em", "best_f1", "exact_match", "f1", "normalize_answer"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when both normalise to the same string, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings (symmetric, in [0, 1])."""
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, golds: Iterable[str]) -> float:
    """Max F1 over the gold answers (0.0 if there are none)."""
    return max((f1(prediction, g) for g in golds), default=0.0)


def best_em(prediction: str, golds: Iterable[str]) -> float:
    """Max exact match over the gold answers (0.0 if there are none)."""
    return max((exact_match(prediction, g) for g in golds), default=0.0)
