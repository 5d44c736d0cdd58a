"""Generate the bundled multi-hop corpus and questions (fictional entities, seeded).

    python examples/rag/make_data.py            # rewrites examples/rag/data/*.jsonl

Why generated: MuSiQue and Wikipedia are large downloads and this example must run
offline. Why fictional: a model cannot answer from what it memorised in pre-training, so
every correct answer has to come from the retrieved passages, as in MuSiQue.

The world: countries, cities (each in one country), people (each born in one city, with
a profession) and companies (each founded by one person in a year, headquartered in one
city). One passage per entity states its facts, so every two-hop question needs two
passages, found by two searches, the second query built from what the first returned:

- ``founder_city``: "In which city was the founder of <company> born?"
  company passage (founder) -> person passage (birth city)
- ``person_country``: "In which country was <person> born?"
  person passage (birth city) -> city passage (country)
- ``hq_country``: "In which country is <company> headquartered?"
  company passage (headquarters city) -> city passage (country)

and, so that a small policy that does not yet search again can score (see the agent's
docstring), the one-hop questions of the same passages, a majority (5 of 8 per company and
person pair of templates), some with answers that are easy to copy (a year, a profession):

- ``founder``: "Who founded <company>?" (company passage)
- ``founded_year``: "In which year was <company> founded?" (company passage)
- ``hq_city``: "In which city is <company> headquartered?" (company passage)
- ``birth_city``: "In which city was <person> born?" (person passage)
- ``profession``: "What is the profession of <person>?" (person passage)

Train and test are disjoint by *first-hop entity*: every question about a given company
or person is in one split only (the passages are shared: it is one encyclopedia).
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "generate", "main", "write"]

DATA_DIR = Path(__file__).resolve().parent / "data"

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io")
_CODAS = ("", "", "l", "n", "r", "s", "th", "m", "k")
_COMPANY_KINDS = ("Group", "Labs", "Industries", "Works", "Systems", "Foods", "Motors",
                  "Textiles", "Media", "Shipping")
_PROFESSIONS = ("engineer", "chemist", "painter", "banker", "architect", "pilot", "teacher",
                "physician", "composer", "farmer")
_CITY_WORDS = ("port city", "mountain town", "river city", "coastal town", "old market town")


def _word(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return (s + rng.choice(_CODAS)).capitalize()


def _names(rng: random.Random, n: int, make: Any, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = make()
        key = name.lower()
        if key not in taken and not any(key in t or t in key for t in taken if len(t) > 3):
            taken.add(key)
            out.append(name)
    return out


def generate(*, seed: int = 0, n_countries: int = 10, n_cities: int = 40, n_people: int = 130,
             n_companies: int = 110, test_fraction: float = 0.25
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(corpus, train, test)``: passages ``{id, title, text}`` and questions ``{id,
    question, answers, supporting, template, hops}`` (``supporting``: the gold passage ids,
    one per hop)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _names(rng, n_countries, lambda: _word(rng, 2) + "ia", taken)
    cities = _names(rng, n_cities, lambda: _word(rng, rng.choice((2, 3))), taken)
    firsts = _names(rng, n_people, lambda: _word(rng, 2), taken)
    lasts = _names(rng, n_people, lambda: _word(rng, 2), taken)
    people = [f"{a} {b}" for a, b in zip(firsts, lasts)]
    companies = [f"{w} {rng.choice(_COMPANY_KINDS)}"
                 for w in _names(rng, n_companies, lambda: _word(rng, 2), taken)]

    country_of = {c: countries[i % n_countries] if i < n_countries else rng.choice(countries)
                  for i, c in enumerate(cities)}
    born_in = {p: rng.choice(cities) for p in people}
    job = {p: rng.choice(_PROFESSIONS) for p in people}
    founder = {c: rng.choice(people) for c in companies}
    hq = {c: rng.choice(cities) for c in companies}
    year = {c: rng.randint(1890, 2015) for c in companies}

    corpus: list[dict[str, Any]] = []
    pid: dict[str, str] = {}

    def passage(title: str, text: str) -> None:
        pid[title] = f"p{len(corpus)}"
        corpus.append({"id": pid[title], "title": title, "text": text})

    for c in countries:
        n = sum(1 for v in country_of.values() if v == c)
        passage(c, f"{c} is a country with {n} major cities.")
    for c in cities:
        passage(c, f"{c} is a {rng.choice(_CITY_WORDS)} in {country_of[c]}.")
    for p in people:
        article = "an" if job[p][0] in "aeiou" else "a"
        passage(p, f"{p} is {article} {job[p]} who was born in {born_in[p]}.")
    for c in companies:
        passage(c, f"{c} is a company founded in {year[c]} by {founder[c]}. "
                   f"Its headquarters are in {hq[c]}.")

    questions: dict[str, list[dict[str, Any]]] = {}
    for c in companies:
        p = founder[c]
        questions[c] = [
            {"question": f"In which city was the founder of {c} born?",
             "answers": [born_in[p]], "supporting": [pid[c], pid[p]], "template": "founder_city",
             "hops": 2},
            {"question": f"In which country is {c} headquartered?",
             "answers": [country_of[hq[c]]], "supporting": [pid[c], pid[hq[c]]],
             "template": "hq_country", "hops": 2},
            {"question": f"Who founded {c}?", "answers": [p], "supporting": [pid[c]],
             "template": "founder", "hops": 1},
            {"question": f"In which year was {c} founded?", "answers": [str(year[c])],
             "supporting": [pid[c]], "template": "founded_year", "hops": 1},
            {"question": f"In which city is {c} headquartered?", "answers": [hq[c]],
             "supporting": [pid[c]], "template": "hq_city", "hops": 1},
        ]
    for p in people:
        questions[p] = [
            {"question": f"In which country was {p} born?",
             "answers": [country_of[born_in[p]]], "supporting": [pid[p], pid[born_in[p]]],
             "template": "person_country", "hops": 2},
            {"question": f"In which city was {p} born?", "answers": [born_in[p]],
             "supporting": [pid[p]], "template": "birth_city", "hops": 1},
            {"question": f"What is the profession of {p}?", "answers": [job[p]],
             "supporting": [pid[p]], "template": "profession", "hops": 1},
        ]
    firsts_hop = list(questions)
    rng.shuffle(firsts_hop)
    n_test = round(len(firsts_hop) * test_fraction)
    test_keys, train_keys = firsts_hop[:n_test], firsts_hop[n_test:]

    def split(keys: list[str], name: str) -> list[dict[str, Any]]:
        out = [q for k in keys for q in questions[k]]
        return [{"id": f"{name}-{i}", **q} for i, q in enumerate(out)]

    return corpus, split(train_keys, "train"), split(test_keys, "test")


def write(directory: Path = DATA_DIR, *, seed: int = 0) -> dict[str, int]:
    """Write ``corpus.jsonl``, ``train.jsonl``, ``test.jsonl``; returns the line counts."""
    corpus, train, test = generate(seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, rows in (("corpus", corpus), ("train", train), ("test", test)):
        with open(directory / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        counts[name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(write(args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
