"""Text-to-SQL on Spider-style databases: a LangGraph agent trained with lightning.

    lightning train --agent examples/spider/agent.py:agent --steps 10 --group-size 8 \\
        --batch-size 32 --concurrency 16 --air --eval-tasks 40 --out runs/spider

The graph (LangGraph, LangChain ``ChatOpenAI`` pointed at :func:`lightning.llm`)::

    write_query (LLM) -> run_query (SQLite tool) -> check --ok--> END
                              ^                       |
                              +--- rewrite_query <----+ error / no rows / no SQL
                                   (LLM, sees the error or the empty result)

``check`` ends the rollout when the query ran and returned rows, or after ``MAX_LLM_CALLS``
LLM calls. It sees only what a deployed agent sees (the error, the row count); the gold
query is used for the reward alone. Each LLM call is captured by lightning (token ids and
log-probs, one transition each); each query run is a ``@lightning.tool`` span
(:func:`spider.sql.run_sql`), so ``lightning train --air`` adds a step reward for "the SQL
ran" (+1) or "it errored" (-1) after the call that wrote it.

Reward (the return value): execution match of the last query against the gold query on
the task's database (:func:`spider.sql.execution_match`): 1.0 or 0.0.

Data: :func:`dataset` gives the bundled generated set (five databases, a few hundred
questions, built offline by :mod:`spider.make_data`). For the real Spider, build tasks
with :func:`spider.data.load_spider` and write them as JSONL for ``--dataset``.

Prompt: the schema as its ``CREATE TABLE`` text, two solved examples on another database
(a 135M model needs to see the format), then the question. A task may set
``temperature``, ``max_tokens`` and ``max_llm_calls`` to override the defaults below.
"""

from __future__ import annotations

import functools
import random
import sqlite3
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import quote

import anyio

import lightning

from .data import bundled
from .sql import SQLError, execution_match, extract_sql, run_sql

__all__ = [
    "FEW_SHOT",
    "MAX_LLM_CALLS",
    "SYSTEM_PROMPT",
    "agent",
    "build_graph",
    "dataset",
    "feedback",
    "messages",
    "schema_text",
]

MAX_LLM_CALLS = 3
"""LLM calls per rollout: the first query and at most two rewrites."""
MAX_TOKENS = 64
"""Tokens per reply: a join with a WHERE clause takes about 40."""
TEMPERATURE = 1.0
"""Sampling temperature of training rollouts (GRPO needs diverse samples)."""

SYSTEM_PROMPT = ("You write SQLite queries. Given a database schema and a question, reply "
                 "with one SQL query that answers the question, and nothing else.")

_EXAMPLE_SCHEMA = "CREATE TABLE pets (id INTEGER PRIMARY KEY, name TEXT, species TEXT, age INTEGER)"

#: Two solved examples (schema, question, query) on a database that is not in the data: one
#: without a WHERE clause (with two filtered examples, a 135M model adds a made-up WHERE
#: to every query), one with a text filter, phrased as the generated questions are.
FEW_SHOT: tuple[tuple[str, str, str], ...] = (
    (_EXAMPLE_SCHEMA, "How many pets are there?", "SELECT COUNT(*) FROM pets"),
    (_EXAMPLE_SCHEMA, "List the names of the pets whose species is cat.",
     "SELECT name FROM pets WHERE species = 'cat'"),
)


def _user(schema: str, question: str) -> str:
    return f"Schema:\n{schema}\n\nQuestion: {question}"


@functools.lru_cache(maxsize=256)
def schema_text(db_path: str) -> str:
    """The database's ``CREATE TABLE`` statements, one per line (whitespace collapsed), in
    the order they were created."""
    conn = sqlite3.connect(f"file:{quote(str(Path(db_path).resolve()))}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
            "AND name NOT LIKE 'sqlite_%' ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return "\n".join(" ".join(r[0].split()) for r in rows)


def messages(schema: str, question: str) -> list[dict[str, str]]:
    """The first request: system prompt, the few-shot examples, then the question."""
    out = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex_schema, q, sql in FEW_SHOT:
        out += [{"role": "user", "content": _user(ex_schema, q)},
                {"role": "assistant", "content": sql}]
    out.append({"role": "user", "content": _user(schema, question)})
    return out


def feedback(sql: str | None, error: str | None, rows: int | None) -> str:
    """What the model is told before a rewrite: the error, or that nothing came back."""
    if sql is None:
        return ("Your reply has no SQL query. Reply with one SQLite query that starts with "
                "SELECT, and nothing else.")
    if error is not None:
        return f"The query failed: {error}\nWrite a corrected SQLite query, and nothing else."
    return ("The query returned no rows. Check the table names, column names and values, "
            "then write a corrected SQLite query, and nothing else.")


class SQLState(TypedDict):
    """The graph's state (LangGraph keeps it between nodes)."""

    messages: list[dict[str, str]]
    sql: str | None
    error: str | None
    rows: int | None
    result: Any
    llm_calls: int


def build_graph(llm: Any, db_path: str, *, max_llm_calls: int = MAX_LLM_CALLS) -> Any:
    """The compiled LangGraph: write_query -> run_query -> check -> (rewrite_query ->
    run_query)* -> END, with at most ``max_llm_calls`` calls to ``llm``."""
    from langgraph.graph import END, START, StateGraph

    async def ask(state: SQLState, chat: list[dict[str, str]]) -> dict[str, Any]:
        reply = await llm.ainvoke(chat)
        text = reply.content if isinstance(reply.content, str) else str(reply.content)
        return {"messages": [*chat, {"role": "assistant", "content": text}],
                "sql": extract_sql(text), "llm_calls": state["llm_calls"] + 1}

    async def write_query(state: SQLState) -> dict[str, Any]:
        return await ask(state, state["messages"])

    async def rewrite_query(state: SQLState) -> dict[str, Any]:
        note = feedback(state["sql"], state["error"], state["rows"])
        return await ask(state, [*state["messages"], {"role": "user", "content": note}])

    async def run_query(state: SQLState) -> dict[str, Any]:
        sql = state["sql"]
        if sql is None:
            return {"error": None, "rows": None, "result": None}
        try:
            # a worker thread: a slow query must not stall the event loop (other rollouts,
            # the runtime); the progress handler bounds how long it can take
            result = await anyio.to_thread.run_sync(functools.partial(run_sql, sql, db_path))
        except SQLError as exc:
            return {"error": str(exc), "rows": None, "result": None}
        return {"error": None, "rows": len(result.rows), "result": result}

    def check(state: SQLState) -> Literal["done", "rewrite"]:
        ok = state["sql"] is not None and state["error"] is None and bool(state["rows"])
        return "done" if ok or state["llm_calls"] >= max_llm_calls else "rewrite"

    g = StateGraph(SQLState)
    g.add_node("write_query", write_query)
    g.add_node("run_query", run_query)
    g.add_node("rewrite_query", rewrite_query)
    g.add_edge(START, "write_query")
    g.add_edge("write_query", "run_query")
    g.add_conditional_edges("run_query", check, {"done": END, "rewrite": "rewrite_query"})
    g.add_edge("rewrite_query", "run_query")
    return g.compile()


def _chat_model(task: dict[str, Any], http: Any) -> Any:
    from langchain_openai import ChatOpenAI

    ep = lightning.llm()
    return ChatOpenAI(
        model=ep.model, base_url=ep.base_url, api_key=ep.api_key or "none",
        temperature=float(task.get("temperature", TEMPERATURE)),
        max_tokens=int(task.get("max_tokens", MAX_TOKENS)),
        max_retries=2, timeout=600.0,
        # our own client, closed below: LangChain's cached default one would outlive the
        # event loop it was made on (each test, each `anyio.run`)
        http_async_client=http,
    )


@lightning.rollout(name="spider")
async def agent(task: dict[str, Any]) -> float:
    """Answer ``task["question"]`` with SQL on ``task["db_path"]``; 1.0 when its result
    matches the gold query's (``task["query"]``), else 0.0."""
    import openai

    db_path = str(task["db_path"])
    max_calls = int(task.get("max_llm_calls", MAX_LLM_CALLS))
    http = openai.DefaultAsyncHttpxClient(timeout=600.0)
    try:
        graph = build_graph(_chat_model(task, http), db_path, max_llm_calls=max_calls)
        state: SQLState = {
            "messages": messages(schema_text(db_path), task["question"]),
            "sql": None, "error": None, "rows": None, "result": None, "llm_calls": 0,
        }
        final = await graph.ainvoke(state, {"recursion_limit": 4 * max_calls + 4})
    finally:
        await http.aclose()
    reward = execution_match(db_path, final["result"], task["query"])  # None: 0.0
    lightning.emit_span("final_answer", attributes={
        "task_id": str(task.get("id", "")), "answer": final["sql"] or "", "llm_calls": final["llm_calls"], "reward": reward})
    return reward


def dataset(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundled set: ``(train, test)`` tasks; ``seed`` shuffles the training order."""
    train, test = bundled()
    random.Random(seed).shuffle(train)
    return train, test
