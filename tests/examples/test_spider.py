"""examples/spider: SQL extraction, the guarded executor, the execution-match reward, the
loaders, the bundled set's generator, the LangGraph loop, and the agent end to end."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))  # examples/ is the package root of `spider`

from spider import data, make_data
from spider.sql import (
    SQLError,
    execute,
    execution_match,
    extract_sql,
    gold_is_ordered,
    results_match,
)


@pytest.fixture(autouse=True)
def _spider_cache(tmp_path_factory, monkeypatch):
    """Bundled databases are built into a per-session temporary cache, not ~/.cache."""
    monkeypatch.setenv("LIGHTNING_SPIDER_CACHE", str(tmp_path_factory.getbasetemp() / "spider"))


@pytest.fixture
def db(tmp_path) -> Path:
    path = tmp_path / "t.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, age INTEGER, score REAL);
        INSERT INTO people VALUES (1, 'Ann', 30, 1.5), (2, 'Bob', 25, 2.0), (3, 'Cid', 30, NULL),
                                  (4, 'Dee', 41, 2.0);
        CREATE TABLE pets (id INTEGER PRIMARY KEY, owner_id INTEGER, kind TEXT);
        INSERT INTO pets VALUES (1, 1, 'cat'), (2, 1, 'dog'), (3, 4, 'cat');
    """)
    conn.commit()
    conn.close()
    return path


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize("text, sql", [
    ("SELECT COUNT(*) FROM people", "SELECT COUNT(*) FROM people"),
    ("select name from people;", "select name from people"),
    ("```sql\nSELECT name FROM people WHERE age > 26;\n```", "SELECT name FROM people WHERE age > 26"),
    ("```\nSELECT name\nFROM people\n```\nThis lists every name.", "SELECT name\nFROM people"),
    ("```sqlite\nSELECT 1", "SELECT 1"),  # an unclosed fence
    ("Here is the query:\nSELECT COUNT(*) FROM pets\nThis counts the pets.",
     "SELECT COUNT(*) FROM pets"),
    ("SELECT name FROM people\n\nExplanation: the names.", "SELECT name FROM people"),
    ("SELECT name FROM people WHERE name = 'a;b'; SELECT 2", "SELECT name FROM people WHERE name = 'a;b'"),
    ("WITH t AS (SELECT 1 AS x) SELECT x FROM t", "WITH t AS (SELECT 1 AS x) SELECT x FROM t"),
    ("Do it with a CTE: WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r",
     "WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r"),
    ("The answer is `SELECT age FROM people`.", "SELECT age FROM people."),
    ("```python\nprint(1)\n```\nSELECT id FROM pets", "SELECT id FROM pets"),
    ("SELECT * FROM\nnonsense words here", "SELECT * FROM"),  # nothing parses: first line
])
def test_extract_sql(text, sql):
    got = extract_sql(text)
    assert got is not None
    if sql.endswith("."):  # prose glued to the query: the database reports it
        assert got.startswith(sql[:-1])
    else:
        assert got == sql


@pytest.mark.parametrize("text", ["", "I do not know.", "```\nno query\n```", "selection",
                                  "Answer with a complex query."])
def test_extract_sql_finds_none(text):
    assert extract_sql(text) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.builds(lambda a, b: f"{a}SELECT{b}", st.text(max_size=80),
                                         st.text(max_size=80)))
def test_extract_sql_never_raises(text):
    got = extract_sql(text)
    assert got is None or (got.strip() and got.lstrip()[:6].upper() in ("SELECT", "WITH") or
                           got.lstrip()[:4].upper() == "WITH")


# ------------------------------------------------------------------ guarded execution


def test_execute_returns_columns_and_rows(db):
    r = execute(db, "SELECT name, age FROM people ORDER BY id")
    assert r.columns == ("name", "age")
    assert r.rows == [("Ann", 30), ("Bob", 25), ("Cid", 30), ("Dee", 41)]
    assert not r.truncated
    assert "4 row(s)" in repr(r) and "'Ann'" in r.preview()


def test_a_runaway_recursive_cte_is_stopped(db):
    t0 = time.monotonic()
    with pytest.raises(SQLError, match="interrupted: it ran more than 1,000,000 SQLite steps"):
        execute(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                    "SELECT COUNT(*) FROM r", max_steps=1_000_000)
    assert time.monotonic() - t0 < 30  # stopped by the step budget, not by the test timeout


def test_a_slow_query_hits_the_deadline(db):
    with pytest.raises(SQLError, match="longer than 0.2 s"):
        execute(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                    "SELECT COUNT(*) FROM r", max_steps=10**15, timeout_s=0.2)


def test_an_infinite_result_is_truncated_not_fetched(db):
    r = execute(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                    "SELECT x FROM r", max_rows=50)
    assert r.truncated and len(r.rows) == 50


@pytest.mark.parametrize("sql", [
    "DELETE FROM people",
    "UPDATE people SET age = 0",
    "INSERT INTO people VALUES (9, 'x', 1, 1.0)",
    "DROP TABLE people",
    "CREATE TABLE x (a)",
    "PRAGMA table_info(people)",
    "ATTACH DATABASE ':memory:' AS other",
    "SELECT 1; DELETE FROM people",
])
def test_execution_is_read_only(db, sql):
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    with pytest.raises(SQLError):
        execute(db, sql)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert len(execute(db, "SELECT * FROM people").rows) == 4


def test_huge_values_and_bad_queries_are_errors(db):
    with pytest.raises(SQLError, match="too big"):
        execute(db, "SELECT zeroblob(2000000000)")
    with pytest.raises(SQLError, match="no such table: nope"):
        execute(db, "SELECT * FROM nope")
    with pytest.raises(SQLError):
        execute(db, "SELEC 1")
    with pytest.raises(FileNotFoundError, match="no SQLite database"):
        execute(db.parent / "missing.sqlite", "SELECT 1")


# ------------------------------------------------------------------ reward


@pytest.mark.parametrize("pred, gold, reward", [
    ("SELECT name FROM people WHERE age = 30", "SELECT name FROM people WHERE age = 30", 1.0),
    # a different query with the same result
    ("SELECT name FROM people WHERE id IN (1, 3)", "SELECT name FROM people WHERE age = 30", 1.0),
    # order does not matter without ORDER BY in the gold query...
    ("SELECT name FROM people ORDER BY name DESC", "SELECT name FROM people", 1.0),
    # ...and does with it
    ("SELECT name FROM people ORDER BY name DESC", "SELECT name FROM people ORDER BY name", 0.0),
    ("SELECT name FROM people ORDER BY id", "SELECT name FROM people ORDER BY name", 1.0),
    # duplicates count: a multiset, not a set
    ("SELECT DISTINCT age FROM people", "SELECT age FROM people", 0.0),
    # 2 == 2.0; rounding to 6 decimals
    ("SELECT 2.0", "SELECT COUNT(*) FROM pets WHERE kind = 'cat'", 1.0),
    ("SELECT 1.0000001", "SELECT 1", 1.0),
    ("SELECT 1.001", "SELECT 1", 0.0),
    # text is compared exactly; columns in order
    ("SELECT 'ann'", "SELECT name FROM people WHERE id = 1", 0.0),
    ("SELECT age, name FROM people", "SELECT name, age FROM people", 0.0),
    ("SELECT name FROM people", "SELECT name, age FROM people", 0.0),
    # NULLs match NULLs
    ("SELECT score FROM people WHERE id = 3", "SELECT NULL", 1.0),
    # errors and non-queries score 0
    ("SELECT nope FROM people", "SELECT name FROM people", 0.0),
    ("DELETE FROM people", "SELECT name FROM people", 0.0),
    ("", "SELECT name FROM people", 0.0),
    (None, "SELECT name FROM people", 0.0),
])
def test_execution_match_hand_computed(db, pred, gold, reward):
    assert execution_match(db, pred, gold) == reward


def test_a_failing_gold_query_is_a_data_error(db):
    with pytest.raises(ValueError, match="the gold query fails"):
        execution_match(db, "SELECT 1", "SELECT nope FROM nowhere")


@pytest.mark.parametrize("sql, ordered", [
    ("SELECT a FROM t ORDER BY a", True),
    ("SELECT a FROM t ORDER BY a DESC LIMIT 1", True),
    ("SELECT a FROM t WHERE b IN (SELECT b FROM u ORDER BY b LIMIT 3)", False),
    ("SELECT a FROM t", False),
    ("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1", True),
    ("this is not SQL but mentions order by", True),  # unparsable: a text search
])
def test_gold_is_ordered(sql, ordered):
    assert gold_is_ordered(sql) is ordered


_db_numbers = itertools.count()
values = st.one_of(st.none(), st.integers(-5, 5), st.sampled_from([0.5, 2.0, -1.25]),
                   st.sampled_from(["a", "b", "A", ""]))
rows = st.lists(st.tuples(values, values), max_size=6)


@settings(max_examples=200, deadline=None)
@given(rows, rows, st.booleans())
def test_results_match_is_symmetric(a, b, ordered):
    assert results_match(a, b, ordered=ordered) == results_match(b, a, ordered=ordered)
    assert results_match(a, a, ordered=ordered)
    assert results_match(a, list(reversed(a)), ordered=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(st.tuples(st.integers(-3, 3), st.sampled_from(["x", "y", "z"]),
                                st.one_of(st.none(), st.floats(-10, 10, allow_nan=False))),
                      min_size=0, max_size=12),
       query=st.sampled_from([
           "SELECT a FROM t", "SELECT b, COUNT(*) FROM t GROUP BY b", "SELECT MAX(c) FROM t",
           "SELECT a, b FROM t ORDER BY a, b, c", "SELECT c FROM t WHERE a > 0",
           "SELECT T1.a FROM t AS T1 JOIN t AS T2 ON T1.b = T2.b",
           "SELECT AVG(a) FROM t"]),
       junk=st.text(max_size=60))
def test_the_gold_query_scores_1_and_any_text_scores_0_or_1(tmp_path, table, query, junk):
    path = tmp_path / f"h{next(_db_numbers)}.sqlite"  # a fresh file per example
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INTEGER, b TEXT, c REAL)")
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", table)
    conn.commit()
    conn.close()
    assert execution_match(path, query, query) == 1.0
    assert execution_match(path, junk, query) in (0.0, 1.0)
    assert execution_match(path, extract_sql(junk), query) in (0.0, 1.0)
    path.unlink()


# ------------------------------------------------------------------ the public Spider loader


def _fake_spider(root: Path, items: list[dict], split_file: str = "dev.json") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / split_file).write_text(json.dumps(items))
    for db_id in {i["db_id"] for i in items}:
        (root / "database" / db_id).mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(root / "database" / db_id / f"{db_id}.sqlite")
        conn.execute("CREATE TABLE singer (id INTEGER, name TEXT)")
        conn.execute("INSERT INTO singer VALUES (1, 'Joe'), (2, 'Ann')")
        conn.commit()
        conn.close()


def test_load_spider_reads_the_public_layout(tmp_path):
    items = [{"db_id": "concert_singer", "question": "How many singers do we have?",
              "query": "SELECT count(*) FROM singer", "query_toks": [], "sql": {}},
             {"db_id": "concert_singer", "question": "Names?", "query": "SELECT name FROM singer"}]
    _fake_spider(tmp_path / "spider", items, "train_spider.json")
    tasks = data.load_spider(tmp_path / "spider", "train")
    assert [t["question"] for t in tasks] == ["How many singers do we have?", "Names?"]
    t = tasks[0]
    assert t["db_id"] == "concert_singer" and t["query"] == "SELECT count(*) FROM singer"
    assert t["db_path"] == str(tmp_path / "spider" / "database" / "concert_singer" /
                               "concert_singer.sqlite")
    assert execution_match(t["db_path"], "SELECT COUNT(id) FROM singer", t["query"]) == 1.0
    assert len(data.load_spider(tmp_path / "spider", "train", limit=1)) == 1


def test_load_spider_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load_spider(tmp_path / "nowhere", "dev")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "dev.json") in msg and "spider.zip" in msg
    assert "database/" in msg


def test_load_spider_names_the_missing_database(tmp_path):
    root = tmp_path / "spider"
    root.mkdir()
    (root / "dev.json").write_text(json.dumps(
        [{"db_id": "gone", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(FileNotFoundError, match=r"database/gone/gone\.sqlite is missing"):
        data.load_spider(root, "dev")


def test_the_loader_cli_writes_jsonl_for_lightning_train(tmp_path, capsys):
    items = [{"db_id": "concert_singer", "question": "How many?", "query": "SELECT count(*) FROM singer"}]
    _fake_spider(tmp_path / "spider", items)
    out = tmp_path / "dev.jsonl"
    assert data.main(["--root", str(tmp_path / "spider"), "--out", str(out)]) == 0
    [line] = out.read_text().splitlines()
    assert json.loads(line)["question"] == "How many?"
    assert data.main(["--root", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "dev.json is missing" in capsys.readouterr().err


def test_load_spider_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown Spider split 'test'"):
        data.load_spider(tmp_path, "test")
    root = tmp_path / "s"
    root.mkdir()
    (root / "dev.json").write_text(json.dumps([{"db_id": "x", "question": 3}]))
    with pytest.raises(ValueError, match="question 0 has no question, query"):
        data.load_spider(root, "dev")
    (root / "dev.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.load_spider(root, "dev")


# ------------------------------------------------------------------ the bundled set


def test_the_generator_is_deterministic_and_matches_the_committed_files(tmp_path):
    assert make_data.generate(0) == make_data.generate(0)
    written = make_data.write(tmp_path / "gen", seed=0)
    for path in written:
        committed = data.DATA_DIR / path.name
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: run `python -m spider.make_data` from examples/")
    assert make_data.generate(1)[1] != make_data.generate(0)[1]


def test_the_bundled_split_is_disjoint_and_every_gold_query_answers():
    questions = json.loads((data.DATA_DIR / "questions.json").read_text())
    key = lambda q: (q["db_id"], q["template"], json.dumps(q["params"]))
    train, test = {key(q) for q in questions["train"]}, {key(q) for q in questions["test"]}
    assert len(train) == len(questions["train"]) and len(test) == len(questions["test"])
    assert not train & test
    assert 300 <= len(train) + len(test) <= 600
    train_tasks, test_tasks = data.bundled()
    assert {t["db_id"] for t in test_tasks} == {s.db_id for s in make_data.SCHEMAS}
    assert len({q["template"] for q in questions["test"]}) >= 8
    for t in train_tasks + test_tasks:
        assert execute(t["db_path"], t["query"]).rows, t
        assert execution_match(t["db_path"], t["query"], t["query"]) == 1.0


def test_bundled_databases_are_built_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_SPIDER_CACHE", str(tmp_path / "cache"))
    first = data.bundled_db_path("shop")
    mtime = first.stat().st_mtime_ns
    assert data.bundled_db_path("shop") == first and first.stat().st_mtime_ns == mtime
    assert first.is_relative_to(tmp_path / "cache")
    assert [p.name for p in first.parent.iterdir()] == ["shop.sqlite"]  # no temporary left
    assert execute(first, "SELECT COUNT(*) FROM customers").rows == [(30,)]
    with pytest.raises(FileNotFoundError, match="make_data"):
        data.bundled_db_path("nope")


def test_dataset_seed_shuffles_the_training_order_only():
    from spider.agent import dataset

    a, ta = dataset(seed=0)
    b, tb = dataset(seed=1)
    assert ta == tb and sorted(x["id"] for x in a) == sorted(x["id"] for x in b)
    assert [x["id"] for x in a] != [x["id"] for x in b]
    assert dataset(seed=0) == (a, ta)


# ------------------------------------------------------------------ the prompt and the loop


def test_the_prompt_shows_the_schema_and_two_examples():
    from spider.agent import messages, schema_text

    _, test = data.bundled()
    task = next(t for t in test if t["db_id"] == "shop")
    schema = schema_text(task["db_path"])
    assert schema.splitlines()[0].startswith("CREATE TABLE customers (id INTEGER PRIMARY KEY")
    m = messages(schema, task["question"])
    assert [x["role"] for x in m] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert m[-1]["content"] == f"Schema:\n{schema}\n\nQuestion: {task['question']}"
    assert all(extract_sql(x["content"]) == x["content"] for x in m if x["role"] == "assistant")


async def test_the_graph_rewrites_after_an_error_and_stops_after_max_calls(db):
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from spider.agent import build_graph, messages

    def start() -> dict:
        return {"messages": messages("CREATE TABLE people (...)", "Who?"), "sql": None,
                "error": None, "rows": None, "result": None, "llm_calls": 0}

    llm = FakeListChatModel(responses=["SELECT nope FROM people", "I think SELECT name FROM people"])
    final = await build_graph(llm, str(db)).ainvoke(start())
    assert final["llm_calls"] == 2 and final["sql"] == "SELECT name FROM people"
    assert final["error"] is None and final["rows"] == 4
    feedback = final["messages"][-2]
    assert feedback["role"] == "user" and "no such column: nope" in feedback["content"]

    llm = FakeListChatModel(responses=["no idea", "SELECT x FROM nowhere",
                                       "SELECT name FROM people WHERE age > 99", "SELECT 1"])
    final = await build_graph(llm, str(db), max_llm_calls=3).ainvoke(start())
    assert final["llm_calls"] == 3 and final["rows"] == 0  # stopped: empty, out of calls
    notes = [m["content"] for m in final["messages"][6:] if m["role"] == "user"]
    assert "no SQL query" in notes[0] and "no such table: nowhere" in notes[1]


# ------------------------------------------------------------------ the agent on a live stack


def _policy_stack(tmp_path, make_engine):
    """Daemon (in-memory transport) + the real PolicyServer over ``make_engine()`` + a
    runtime session pointed at both; yields the daemon."""
    import contextlib

    import anyio

    import lightning
    from lightning import DaemonConfig
    from lightning.serving import PolicyServer
    from lightning.testing import Daemon, MemoryHub

    @contextlib.asynccontextmanager
    async def stack():
        hub = MemoryHub()
        daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                        transport=hub)
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.serve)
            engine = make_engine()
            await tg.start(engine.serve)
            server = PolicyServer(engine, model_name="policy", port=0, capture=daemon.capture,
                                  accept_any_model=True)
            base_url = await tg.start(server.serve)
            async with lightning.session(transport=hub.connect(), policy_url=base_url,
                                         policy_model="policy", spill_dir=str(tmp_path / "spill")):
                yield daemon
            tg.cancel_scope.cancel()

    return stack()


async def _trajectories(daemon, n: int) -> list:
    import anyio

    out = []
    with anyio.fail_after(60):
        while len(out) < n:
            out.append(await daemon.buffer.get())
    return out


def _tiny_policy():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning.models import tiny_model_path

    path = str(tiny_model_path(seed=0))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 local_files_only=True).eval()
    return model, tok


async def test_the_agent_on_the_tiny_model_ends_with_a_reward(tmp_path):
    """Whatever garbage a random model writes, each rollout completes with reward 0 or 1,
    one captured transition per LLM call, at most MAX_LLM_CALLS of them."""
    import anyio
    from spider.agent import agent

    from lightning.engine.torch_engine import TorchEngine

    model, tok = _tiny_policy()
    _, test = data.bundled()
    tasks = [{**t, "max_tokens": 12} for t in test[:2]]
    async with _policy_stack(tmp_path, lambda: TorchEngine(model, tok, max_model_len=1024,
                                                           max_num_seqs=4, seed=0)) as daemon:
        rewards = [0.0, 0.0]

        async def one(i):
            rewards[i] = await agent(tasks[i])

        async with anyio.create_task_group() as tg:
            for i in range(2):
                tg.start_soon(one, i)
        trajs = await _trajectories(daemon, 2)
    assert all(r in (0.0, 1.0) for r in rewards)
    for t in trajs:
        assert t.status == "completed" and t.final_reward in (0.0, 1.0), t.error
        assert 1 <= len(t.transitions) <= 3
        assert all(x.trainable and x.logprobs for x in t.transitions)
        [final] = [s for s in t.spans if s.name == "final_answer"]
        assert final.attributes["llm_calls"] == len(t.transitions)


async def test_a_failed_query_is_rewritten_through_the_real_stack(tmp_path):
    """ScriptedEngine behind the real PolicyServer and daemon: the script writes a query
    that errors, then the gold query once it is shown the error. Reward 1, both LLM calls
    captured as transitions of one rollout, the failing and the good SQL run as tool spans,
    and AIR's sql_ok rule scores them -1 then +1."""
    from spider import scripted_policy
    from spider.agent import agent

    from lightning._protocol import unpack_ids
    from lightning.algorithms.air import AIR, sql_ok
    from lightning.engine.scripted import ScriptedEngine

    _, tok = _tiny_policy()
    seen = []

    def script(req):
        seen.append((req.turn, req.last_user))
        return scripted_policy.script(req)

    _, test = data.bundled()
    task = next(t for t in test if t["template"] == "join_text")
    async with _policy_stack(tmp_path, lambda: ScriptedEngine(tok, script)) as daemon:
        reward = await agent(task)
        [traj] = await _trajectories(daemon, 1)
    assert reward == 1.0 and traj.final_reward == 1.0 and traj.status == "completed"

    # the script saw the question, then the database's error
    assert [turn for turn, _ in seen] == [2, 3]  # after the two few-shot answers
    assert seen[0][1].startswith("Schema:\nCREATE TABLE") and task["question"] in seen[0][1]
    assert seen[1][1].startswith("The query failed: no such column: no_such_column")

    first, second = traj.transitions
    assert all(t.trainable and t.policy_version == 0 and t.logprobs for t in (first, second))
    assert scripted_policy.WRONG_QUERY in first.metadata["text"]
    assert second.metadata["text"] == task["query"]
    # the rewrite's prompt extends the first call token for token: one merged sequence
    p1, r1, p2 = (list(unpack_ids(x)) for x in (first.prompt_ids, first.response_ids,
                                                second.prompt_ids))
    assert p2[: len(p1) + len(r1)] == p1 + r1

    runs = [s for s in traj.spans if s.kind == "tool"]
    assert [(s.name, s.status, s.after) for s in runs] == [("run_sql", "error", 1),
                                                           ("run_sql", "ok", 2)]
    assert "no such column" in runs[0].error
    assert runs[1].attributes["input"]["sql"] == task["query"]
    assert [(r.after, r.value) for r in sql_ok(traj)] == [(1, -1.0), (2, 1.0)]
    weighted = [r for r in AIR().step_rewards(traj) if r.rule == "sql_ok"]  # as --air uses it
    assert [(r.after, r.value > 0) for r in weighted] == [(1, False), (2, True)]
    [final] = [s for s in traj.spans if s.name == "final_answer"]
    assert final.attributes == {"task_id": task["id"], "answer": task["query"], "llm_calls": 2,
                                "reward": 1.0}


@pytest.mark.timeout(600)  # a subprocess that imports torch, transformers and langgraph
def test_lightning_train_runs_the_example_from_its_file_path(tmp_path):
    """The README's command shape, on the scripted engine: `--agent
    examples/spider/agent.py:agent` loads the package, dataset() gives the bundled set, and
    evaluation and a training step run (the alternating script: each group of two scores 1
    and 0, so GRPO has a signal)."""
    import subprocess

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train", "--agent",
         str(ROOT / "examples" / "spider" / "agent.py") + ":agent", "--model", "tiny",
         "--engine", "scripted", "--script", "spider.scripted_policy:alternating", "--steps", "1",
         "--group-size", "2", "--batch-size", "2", "--concurrency", "4", "--eval-tasks", "2",
         "--air", "--no-progress", "--out", str(out)],
        check=False, capture_output=True, text=True, env=env, timeout=540, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1
    # first sight of each held-out question: the gold query; second: the wrong one
    assert summary["eval"]["before"] == 1.0 and summary["eval"]["after"] == 0.0
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    [step] = [m for m in train if m["kind"] == "train"]
    assert step["rollouts/reward_mean"] == 0.5


def test_a_database_replaced_at_the_same_path_is_not_scored_stale(db):
    gold = "SELECT COUNT(*) FROM people"
    assert execution_match(db, "SELECT 4", gold) == 1.0
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM people WHERE id = 4")
    conn.commit()
    conn.close()
    assert execution_match(db, "SELECT 3", gold) == 1.0
