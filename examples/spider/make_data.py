"""Generate the bundled Spider-style set: five small SQLite databases and their questions.

    python -m spider.make_data          # from examples/ (or: python examples/spider/make_data.py)

Writes ``data/<db_id>.sql`` (each database as a SQL dump: its ``CREATE TABLE`` text, which
is what the prompt shows, then the rows) and ``data/questions.json`` (the train and test
splits). Everything comes from one seeded ``random.Random``: running it again writes the
same bytes (a test checks this against the committed files). The ``.sqlite`` files are
built from the dumps on first use (:func:`spider.data.bundled_db_path`).

Questions come from templates over each table's columns: count, list, filter (text and
number), aggregate, arg-max, group-by, top-k with ``ORDER BY``, and joins along foreign
keys. A question is kept only when its gold query returns rows and its answer is not
ambiguous (no ties at an ``ORDER BY ... LIMIT`` boundary). The split is by question
instance: no (template, parameters) pair of the test split is in the train split.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "SCHEMAS", "generate", "main"]

DATA_DIR = Path(__file__).resolve().parent / "data"
SEED = 0
PER_TEMPLATE = 10
"""At most this many questions per (database, template): keeps the mix balanced."""
TEST_SHARE = 0.25


@dataclass(frozen=True)
class Table:
    name: str
    singular: str
    plural: str
    label: str
    """The column that names a row (name, title, code)."""
    label_phrase: str
    create: str
    text: tuple[tuple[str, str], ...] = ()
    """Categorical text columns: (column, phrase)."""
    numbers: tuple[tuple[str, str], ...] = ()
    """Numeric columns: (column, phrase)."""
    parents: tuple[tuple[str, str, str], ...] = ()
    """Foreign keys: (column, parent table, relation phrase, as in 'orders placed by')."""


@dataclass(frozen=True)
class Schema:
    db_id: str
    tables: tuple[Table, ...]
    fill: Callable[[random.Random], dict[str, list[tuple[Any, ...]]]] = field(repr=False)


FIRST = ("Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Marco", "Nina", "Omar", "Paula", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe")
LAST = ("Smith", "Garcia", "Kim", "Novak", "Okafor", "Rossi", "Silva", "Tanaka", "Weber",
        "Young", "Dubois", "Ivanova", "Haddad", "Larsen", "Moreau", "Patel")
CITIES = ("Paris", "Lagos", "Lima", "Osaka", "Berlin", "Toronto", "Madrid", "Seoul")


def _names(rng: random.Random, n: int) -> list[str]:
    pool = [f"{f} {s}" for f in FIRST for s in LAST]
    return rng.sample(pool, n)


def _fill_shop(rng: random.Random) -> dict[str, list[tuple[Any, ...]]]:
    customers = [(i, name, rng.choice(CITIES), rng.randint(18, 75))
                 for i, name in enumerate(_names(rng, 30), 1)]
    items = {"books": ("Atlas", "Novel", "Cookbook", "Diary", "Comic"),
             "toys": ("Robot", "Puzzle", "Kite", "Yo-yo", "Blocks"),
             "food": ("Coffee", "Tea", "Honey", "Olive Oil", "Chocolate"),
             "garden": ("Shovel", "Hose", "Seeds", "Rake", "Gloves")}
    products = []
    for cat, names in items.items():
        for name in names:
            products.append((len(products) + 1, name, cat, round(rng.uniform(2, 80), 2)))
    orders = [(i, rng.randint(1, len(customers)), rng.randint(1, len(products)),
               rng.randint(1, 9), rng.randint(2019, 2024)) for i in range(1, 81)]
    return {"customers": customers, "products": products, "orders": orders}


def _fill_school(rng: random.Random) -> dict[str, list[tuple[Any, ...]]]:
    subjects = ("math", "physics", "history", "biology", "art")
    teachers = [(i, name, subjects[(i - 1) % len(subjects)], rng.randint(1, 35))
                for i, name in enumerate(_names(rng, 10), 1)]
    students = [(i, name, rng.randint(9, 12), rng.choice(CITIES[:5]))
                for i, name in enumerate(_names(rng, 40), 1)]
    titles = ("Algebra", "Geometry", "Mechanics", "Optics", "Ancient Rome", "Modern Europe",
              "Genetics", "Ecology", "Drawing", "Sculpture", "Calculus", "Astronomy")
    courses = [(i, title, rng.randint(1, len(teachers)), rng.randint(1, 6))
               for i, title in enumerate(titles, 1)]
    pairs = rng.sample([(s, c) for s in range(1, 41) for c in range(1, len(titles) + 1)], 90)
    enrollments = [(i, s, c, rng.randint(40, 100)) for i, (s, c) in enumerate(sorted(pairs), 1)]
    return {"teachers": teachers, "students": students, "courses": courses,
            "enrollments": enrollments}


def _fill_flights(rng: random.Random) -> dict[str, list[tuple[Any, ...]]]:
    ports = (("CDG", "Paris", "France"), ("ORY", "Paris", "France"), ("LOS", "Lagos", "Nigeria"),
             ("LIM", "Lima", "Peru"), ("KIX", "Osaka", "Japan"), ("HND", "Tokyo", "Japan"),
             ("BER", "Berlin", "Germany"), ("MUC", "Munich", "Germany"),
             ("YYZ", "Toronto", "Canada"), ("MAD", "Madrid", "Spain"), ("ICN", "Seoul", "Korea"))
    airports = [(i, *p) for i, p in enumerate(ports, 1)]
    lines = (("Blue Sky", "France"), ("Sun Air", "Spain"), ("Maple Wings", "Canada"),
             ("Kestrel", "Germany"), ("Orchid Air", "Japan"), ("Condor Line", "Peru"))
    airlines = [(i, *a) for i, a in enumerate(lines, 1)]
    flights = []
    for i in range(1, 71):
        a, b = rng.sample(range(1, len(airports) + 1), 2)
        flights.append((i, f"{lines[(i - 1) % len(lines)][0][:2].upper()}{100 + i}",
                        rng.randint(1, len(airlines)), a, b, rng.randint(300, 9800),
                        round(rng.uniform(40, 900), 2)))
    return {"airports": airports, "airlines": airlines, "flights": flights}


def _fill_library(rng: random.Random) -> dict[str, list[tuple[Any, ...]]]:
    nations = ("British", "French", "Nigerian", "Japanese", "Peruvian", "German")
    authors = [(i, name, rng.choice(nations), rng.randint(1900, 1990))
               for i, name in enumerate(_names(rng, 14), 1)]
    words = ("Silent", "Red", "Last", "Hidden", "Golden", "Broken", "Northern", "Glass")
    nouns = ("River", "Garden", "Letter", "Winter", "Harbor", "Crown", "Forest", "Mirror")
    genres = ("mystery", "fantasy", "romance", "history", "poetry")
    titles = rng.sample([f"The {w} {n}" for w in words for n in nouns], 45)
    books = [(i, t, rng.randint(1, len(authors)), rng.choice(genres), rng.randint(90, 900),
              rng.randint(1950, 2023)) for i, t in enumerate(titles, 1)]
    members = [(i, name, rng.choice(CITIES[3:])) for i, name in enumerate(_names(rng, 20), 1)]
    loans = [(i, rng.randint(1, len(books)), rng.randint(1, len(members)), rng.randint(2018, 2024))
             for i in range(1, 76)]
    return {"authors": authors, "books": books, "members": members, "loans": loans}


def _fill_music(rng: random.Random) -> dict[str, list[tuple[Any, ...]]]:
    bands = ("The Owls", "Neon Tide", "Paper Moons", "Iron Lotus", "Velvet Storm",
             "Sky Harbor", "Quiet Riot Club", "Amber Road", "Lunar Fox", "Echo Park")
    countries = ("USA", "UK", "Brazil", "Japan", "Nigeria", "Sweden")
    artists = [(i, b, rng.choice(countries), rng.randint(1965, 2015))
               for i, b in enumerate(bands, 1)]
    genres = ("rock", "pop", "jazz", "folk", "electronic")
    words = ("Night", "Fire", "Ocean", "Dream", "Stone", "Light", "Echo", "Rain", "Gold", "Wild")
    album_titles = rng.sample([f"{a} {b}" for a in words for b in words if a != b], 30)
    albums = [(i, t, rng.randint(1, len(artists)), rng.choice(genres), rng.randint(1970, 2023),
               rng.randint(5, 900) * 1000) for i, t in enumerate(album_titles, 1)]
    song_words = ("Hello", "Running", "Blue", "Home", "Falling", "Summer", "Shadow", "Heart")
    song_titles = rng.sample([f"{a} {b}" for a in song_words for b in words], 80)
    songs = [(i, t, rng.randint(1, len(albums)), rng.randint(120, 420))
             for i, t in enumerate(song_titles, 1)]
    return {"artists": artists, "albums": albums, "songs": songs}


SCHEMAS: tuple[Schema, ...] = (
    Schema("shop", (
        Table("customers", "customer", "customers", "name", "names",
              "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, age INTEGER)",
              text=(("city", "city"),), numbers=(("age", "age"),)),
        Table("products", "product", "products", "name", "names",
              "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, "
              "price REAL)",
              text=(("category", "category"),), numbers=(("price", "price"),)),
        Table("orders", "order", "orders", "id", "ids",
              "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES "
              "customers(id), product_id INTEGER REFERENCES products(id), quantity INTEGER, "
              "order_year INTEGER)",
              numbers=(("quantity", "quantity"), ("order_year", "order year")),
              parents=(("customer_id", "customers", "placed by"),
                       ("product_id", "products", "for"))),
    ), _fill_shop),
    Schema("school", (
        Table("teachers", "teacher", "teachers", "name", "names",
              "CREATE TABLE teachers (id INTEGER PRIMARY KEY, name TEXT, subject TEXT, "
              "years_experience INTEGER)",
              text=(("subject", "subject"),), numbers=(("years_experience", "years of experience"),)),
        Table("students", "student", "students", "name", "names",
              "CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT, grade INTEGER, "
              "city TEXT)",
              text=(("city", "city"),), numbers=(("grade", "grade"),)),
        Table("courses", "course", "courses", "title", "titles",
              "CREATE TABLE courses (id INTEGER PRIMARY KEY, title TEXT, teacher_id INTEGER "
              "REFERENCES teachers(id), credits INTEGER)",
              numbers=(("credits", "credits"),), parents=(("teacher_id", "teachers", "taught by"),)),
        Table("enrollments", "enrollment", "enrollments", "id", "ids",
              "CREATE TABLE enrollments (id INTEGER PRIMARY KEY, student_id INTEGER REFERENCES "
              "students(id), course_id INTEGER REFERENCES courses(id), score INTEGER)",
              numbers=(("score", "score"),),
              parents=(("student_id", "students", "of"), ("course_id", "courses", "in"))),
    ), _fill_school),
    Schema("flights", (
        Table("airports", "airport", "airports", "code", "codes",
              "CREATE TABLE airports (id INTEGER PRIMARY KEY, code TEXT, city TEXT, country TEXT)",
              text=(("city", "city"), ("country", "country"))),
        Table("airlines", "airline", "airlines", "name", "names",
              "CREATE TABLE airlines (id INTEGER PRIMARY KEY, name TEXT, country TEXT)",
              text=(("country", "country"),)),
        Table("flights", "flight", "flights", "number", "numbers",
              "CREATE TABLE flights (id INTEGER PRIMARY KEY, number TEXT, airline_id INTEGER "
              "REFERENCES airlines(id), origin_id INTEGER REFERENCES airports(id), "
              "destination_id INTEGER REFERENCES airports(id), distance INTEGER, price REAL)",
              numbers=(("distance", "distance"), ("price", "price")),
              parents=(("airline_id", "airlines", "operated by"),
                       ("origin_id", "airports", "departing from"),
                       ("destination_id", "airports", "arriving at"))),
    ), _fill_flights),
    Schema("library", (
        Table("authors", "author", "authors", "name", "names",
              "CREATE TABLE authors (id INTEGER PRIMARY KEY, name TEXT, nationality TEXT, "
              "birth_year INTEGER)",
              text=(("nationality", "nationality"),), numbers=(("birth_year", "birth year"),)),
        Table("books", "book", "books", "title", "titles",
              "CREATE TABLE books (id INTEGER PRIMARY KEY, title TEXT, author_id INTEGER "
              "REFERENCES authors(id), genre TEXT, pages INTEGER, published_year INTEGER)",
              text=(("genre", "genre"),),
              numbers=(("pages", "number of pages"), ("published_year", "publication year")),
              parents=(("author_id", "authors", "written by"),)),
        Table("members", "member", "members", "name", "names",
              "CREATE TABLE members (id INTEGER PRIMARY KEY, name TEXT, city TEXT)",
              text=(("city", "city"),)),
        Table("loans", "loan", "loans", "id", "ids",
              "CREATE TABLE loans (id INTEGER PRIMARY KEY, book_id INTEGER REFERENCES books(id), "
              "member_id INTEGER REFERENCES members(id), loan_year INTEGER)",
              numbers=(("loan_year", "loan year"),),
              parents=(("book_id", "books", "of"), ("member_id", "members", "made by"))),
    ), _fill_library),
    Schema("music", (
        Table("artists", "artist", "artists", "name", "names",
              "CREATE TABLE artists (id INTEGER PRIMARY KEY, name TEXT, country TEXT, "
              "formed_year INTEGER)",
              text=(("country", "country"),), numbers=(("formed_year", "year formed"),)),
        Table("albums", "album", "albums", "title", "titles",
              "CREATE TABLE albums (id INTEGER PRIMARY KEY, title TEXT, artist_id INTEGER "
              "REFERENCES artists(id), genre TEXT, release_year INTEGER, sales INTEGER)",
              text=(("genre", "genre"),),
              numbers=(("release_year", "release year"), ("sales", "sales")),
              parents=(("artist_id", "artists", "by"),)),
        Table("songs", "song", "songs", "title", "titles",
              "CREATE TABLE songs (id INTEGER PRIMARY KEY, title TEXT, album_id INTEGER "
              "REFERENCES albums(id), duration_seconds INTEGER)",
              numbers=(("duration_seconds", "duration in seconds"),),
              parents=(("album_id", "albums", "on"),)),
    ), _fill_music),
)


def _sql_str(v: str) -> str:
    return "'" + v.replace("'", "''") + "'"


def _build(schema: Schema, rng: random.Random) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    rows = schema.fill(rng)
    for t in schema.tables:
        conn.execute(t.create)
        width = len(rows[t.name][0])
        conn.executemany(f"INSERT INTO {t.name} VALUES ({', '.join('?' * width)})", rows[t.name])
    conn.commit()
    return conn


Question = tuple[str, tuple[Any, ...], str, str]
"""(template, parameters, question, gold SQL)."""


def _questions(schema: Schema, conn: sqlite3.Connection) -> Iterator[Question]:
    by_name = {t.name: t for t in schema.tables}

    def values(table: str, col: str) -> list[Any]:
        return [r[0] for r in conn.execute(f"SELECT DISTINCT {col} FROM {table} ORDER BY {col}")]

    for t in schema.tables:
        yield ("count_all", (t.name,), f"How many {t.plural} are there?",
               f"SELECT COUNT(*) FROM {t.name}")
        if t.label != "id":
            yield ("list_label", (t.name,), f"List the {t.label_phrase} of all {t.plural}.",
                   f"SELECT {t.label} FROM {t.name}")
        for col, phrase in t.text:
            yield ("group_count", (t.name, col), f"How many {t.plural} are there for each {phrase}?",
                   f"SELECT {col}, COUNT(*) FROM {t.name} GROUP BY {col}")
            for v in values(t.name, col):
                yield ("filter_text", (t.name, col, v),
                       f"List the {t.label_phrase} of the {t.plural} whose {phrase} is {v}.",
                       f"SELECT {t.label} FROM {t.name} WHERE {col} = {_sql_str(v)}")
                yield ("count_text", (t.name, col, v),
                       f"How many {t.plural} have the {phrase} {v}?",
                       f"SELECT COUNT(*) FROM {t.name} WHERE {col} = {_sql_str(v)}")
        for col, phrase in t.numbers:
            for agg, word in (("AVG", "average"), ("MAX", "maximum"), ("MIN", "minimum"),
                              ("SUM", "total")):
                yield ("aggregate", (t.name, col, agg),
                       f"What is the {word} {phrase} of all {t.plural}?",
                       f"SELECT {agg}({col}) FROM {t.name}")
            vs = values(t.name, col)
            for v in (vs[len(vs) // 4], vs[len(vs) // 2], vs[3 * len(vs) // 4]):
                yield ("filter_number", (t.name, col, v),
                       f"List the {t.label_phrase} of the {t.plural} with {phrase} greater than {v}.",
                       f"SELECT {t.label} FROM {t.name} WHERE {col} > {v}")
            for order, word in (("DESC", "highest"), ("ASC", "lowest")):
                yield ("argmax", (t.name, col, order),
                       (f"Which {t.singular} has the {word} {phrase}? Give its "
                        f"{t.label_phrase.removesuffix('s')}."),
                       f"SELECT {t.label} FROM {t.name} ORDER BY {col} {order} LIMIT 1")
                yield ("top3", (t.name, col, order),
                       (f"List the {t.label_phrase} of the three {t.plural} with the {word} "
                        f"{phrase}, in order."),
                       f"SELECT {t.label} FROM {t.name} ORDER BY {col} {order} LIMIT 3")
        for fk, parent_name, rel in t.parents:
            p = by_name[parent_name]
            for pcol, pphrase in p.text:
                for v in values(p.name, pcol):
                    yield ("join_text", (t.name, fk, pcol, v),
                           f"How many {t.plural} {rel} {p.plural} whose {pphrase} is {v} are there?",
                           (f"SELECT COUNT(*) FROM {t.name} AS T1 JOIN {p.name} AS T2 "
                            f"ON T1.{fk} = T2.id WHERE T2.{pcol} = {_sql_str(v)}"))
            if p.label != "id":
                for v in values(p.name, p.label):
                    yield ("join_label", (t.name, fk, v),
                           f"How many {t.plural} {rel} the {p.singular} {v} are there?",
                           (f"SELECT COUNT(*) FROM {t.name} AS T1 JOIN {p.name} AS T2 "
                            f"ON T1.{fk} = T2.id WHERE T2.{p.label} = {_sql_str(v)}"))


def _unambiguous(conn: sqlite3.Connection, template: str, sql: str) -> bool:
    """Gold returns rows (a count above 0), and an ORDER BY ... LIMIT k has no tie at k."""
    rows = conn.execute(sql).fetchall()
    if not rows or rows[0][0] is None:
        return False
    if template in ("count_text", "join_text", "join_label") and rows[0][0] == 0:
        return False
    if template in ("argmax", "top3"):
        k = 1 if template == "argmax" else 3
        order_col = sql.split("ORDER BY ")[1].split()[0]
        table = sql.split("FROM ")[1].split()[0]
        desc = " DESC" in sql
        top = conn.execute(f"SELECT {order_col} FROM {table} ORDER BY {order_col}"
                           f"{' DESC' if desc else ''} LIMIT {k + 1}").fetchall()
        return len({r[0] for r in top}) == len(top)  # the first k+1 values are distinct
    return True


def generate(seed: int = SEED) -> tuple[dict[str, str], dict[str, Any]]:
    """``({db_id: SQL dump}, questions)``, deterministic in ``seed``."""
    rng = random.Random(seed)
    dumps: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    for schema in SCHEMAS:
        conn = _build(schema, rng)
        dumps[schema.db_id] = "\n".join(conn.iterdump()) + "\n"
        by_template: dict[str, list[Question]] = {}
        for q in _questions(schema, conn):
            if _unambiguous(conn, q[0], q[3]):
                by_template.setdefault(q[0], []).append(q)
        conn.close()
        for template in sorted(by_template):
            qs = by_template[template]
            for template_, params, question, sql in rng.sample(qs, min(PER_TEMPLATE, len(qs))):
                kept.append({"db_id": schema.db_id, "question": question, "query": sql,
                             "template": template_, "params": list(params)})
    rng.shuffle(kept)
    n_test = round(len(kept) * TEST_SHARE)
    for i, q in enumerate(kept):
        q["id"] = f"bundled-{i:04d}"
    test, train = kept[:n_test], kept[n_test:]
    order = ("id", "db_id", "question", "query", "template", "params")
    return dumps, {
        "seed": seed,
        "train": [{k: q[k] for k in order} for q in train],
        "test": [{k: q[k] for k in order} for q in test],
    }


def write(out: Path = DATA_DIR, seed: int = SEED) -> list[Path]:
    """Write the dumps and ``questions.json`` under ``out``; returns the paths written."""
    dumps, questions = generate(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for db_id, dump in dumps.items():
        path = out / f"{db_id}.sql"
        path.write_text(dump)
        paths.append(path)
    path = out / "questions.json"
    path.write_text(json.dumps(questions, indent=1, ensure_ascii=False) + "\n")
    paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    for path in write(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
