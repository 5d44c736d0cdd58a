"""Multi-hop retrieval QA: an OpenAI Agents SDK agent with a BM25 ``search`` tool.

    lightning train --agent examples/rag/agent.py:agent --steps 6 --group-size 4 \
        --batch-size 8 --concurrency 20 --eval-tasks 40 --air --out runs/rag

A two-hop question needs two facts from two passages ("In which city was the founder of
Habeak Foods born?": the company's passage names the founder, the founder's passage the
city). The agent is a plain Agents SDK ``Agent`` with one function tool, ``search``,
over a local BM25 index (:mod:`.index`, bm25s), pointed at the policy server by
``lightning.llm()``. The reward is the token F1 of the answer against the gold answers
(SQuAD/MuSiQue normalisation, :mod:`.metrics`); exact match is recorded next to it in
the ``final_answer`` span.

Design for a small policy (SmolLM2-135M-Instruct), measured in the README:

- *The first search is given.* The input shows the model a finished call
  ``search(question)`` and its top result (:data:`FIRST_K`), as if it had made it; the model's first own turn
  then either answers or searches for the bridge entity it read. A 135M model almost
  never starts a tool call from an empty turn, but continues one it sees: the first
  search is the question itself (what any first search would be), so nothing is leaked,
  and the second hop still has to be found by the model. ``task["initial_search"] =
  False`` turns it off.
- *A worked example* in the conversation (user question -> search -> results ->
  search -> results -> ``Answer: ...``), with entities absent from the corpus, show the
  ``<tool_call>{"name": "search", "arguments": {"query": ...}}</tool_call>`` format the
  chat template renders and the policy server parses.
- *One-hop questions* of the same facts next to the two-hop ones (``make_data.py``), a
  majority (5 of 8 templates, some with easy-to-copy answers: a year, a profession):
  answerable from the given search alone, so the untrained policy scores sometimes and
  GRPO groups differ from the start; two-hop questions pay only once the policy searches
  a second time, the step AIR's retrieval-hit reward shapes.
- *Partial credit.* F1 gives 0.67 to "Bomin city" for "Bomin", so near misses differ from
  nonsense within a group.

AIR: the model's searches go through :func:`retrieve`, a ``@lightning.tool``. A search
that returns one of the task's gold supporting passages is a successful tool step; one
that does not raises :class:`RetrievalMiss` inside the tool (so its span is recorded with
``status="error"``) and the SDK tool still shows the model what was found. With
``--air`` the built-in ``tool_call`` rule thus gives +w per hit and -w per miss, credited
to the turn that issued the search; no custom rule is needed. The given first search is
not the model's action and is not scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning

from . import data as _data
from .index import Index
from .metrics import best_em, best_f1

__all__ = ["FEW_SHOT", "FIRST_K", "INSTRUCTIONS", "RetrievalMiss", "agent", "dataset", "extract_answer",
           "format_results", "get_index", "retrieve"]

INSTRUCTIONS = (
    "You answer questions using a search tool over an encyclopedia. If the search result "
    "does not answer the question, search for the name it gives you. Reply with 'Answer: ' "
    "and the short answer only, copied from the result."
)

#: A worked example (entities not in the bundled corpus): (question, [(query, results)],
#: answer). The first query is the question itself, like the search the agent gives.
#: One example only: every prompt token is prefill on a CPU demo.
FEW_SHOT: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("In which country is Quarvel Foods headquartered?", (
        ("In which country is Quarvel Foods headquartered?",
         ("Quarvel Foods: Quarvel Foods is a company founded in 1961 by Orlen Tasky. Its "
          "headquarters are in Mirrow.")),
        ("Mirrow", "Mirrow: Mirrow is a river city in Pelladia."),
    ), "Pelladia"),
)

DEFAULT_K = 3
"""Passages per search the model makes."""
FIRST_K = 1
"""Passages in the given first search (``task["first_k"]`` overrides): the top passage
only, so the model reads one short passage, and for a one-hop question the answer is in
it (BM25 on the question ranks the passage of the entity it names first: all 244 held-out
questions). With 3 passages (and a two-hop majority) SmolLM2-135M scored 0 of 77; see the
README for the redesign's base rate."""
DEFAULT_MAX_TURNS = 4
DEFAULT_MAX_TOKENS = 32
#: Sampling temperature unless the task sets one: at 1.0 SmolLM2-135M's answers are
#: mostly noise (measured: F1 0 on 19 held-out tasks); 0.7 keeps groups diverse.
DEFAULT_TEMPERATURE = 0.7

_indexes: dict[str | None, Index] = {}


def get_index(path: str | None = None) -> Index:
    """The index a task names (``None``: the bundled corpus), opened once per process."""
    if path not in _indexes:
        if path is None:
            from .index import read_corpus

            _indexes[None] = Index.from_passages(list(read_corpus(_data.DATA_DIR / "corpus.jsonl")))
        else:
            _indexes[path] = Index.load(path)
    return _indexes[path]


class RetrievalMiss(Exception):
    """Raised inside :func:`retrieve` when no gold supporting passage was found: the
    tool span is then recorded as failed (AIR's ``tool_call`` rule: -1). Carries the
    results, which the agent still shows the model."""

    def __init__(self, query: str, results: list[dict[str, Any]]) -> None:
        super().__init__(f"no supporting passage among the {len(results)} results for "
                         f"{query!r}: {[r['id'] for r in results]}")
        self.results = results


@lightning.tool(name="search")
def retrieve(query: str, *, k: int = DEFAULT_K, supporting: Sequence[str] = (),
             index: str | None = None) -> list[dict[str, Any]]:
    """BM25 search; the span records the query, the gold ids and the passages returned.

    Raises:
        RetrievalMiss: ``supporting`` is non-empty and none of them was returned.
    """
    results = get_index(index).search(query, k)
    if supporting and not {r["id"] for r in results} & set(supporting):
        raise RetrievalMiss(query, results)
    return results


def format_results(results: Sequence[dict[str, Any]]) -> str:
    """Passages as the model reads them: ``Title: text``, one per line."""
    if not results:
        return "No results. Try other words."
    return "\n".join(f"{r['title']}: {r['text']}" for r in results)


_ANSWER = re.compile(r"answer\s*[:\-]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The text after the last ``Answer:`` (first line of it), else the first non-empty
    line, up to the first ``:;,`` or " is "/" was "; quotes and a final period dropped."""
    text = text or ""
    found = _ANSWER.findall(text)
    line = found[-1] if found else next((s for s in text.splitlines() if s.strip()), "")
    line = line.strip().splitlines()[0] if line.strip() else ""
    # a short answer: up to a colon, semicolon, comma or " is "/" was " (small models go
    # on to copy the passage: "Meabrel: Meabrel is a company..." -> "Meabrel")
    line = re.split(r"[:;,]| is | was ", line, maxsplit=1)[0]
    return line.strip().strip("\"'*").rstrip(".").strip()


def _call(i: int, query: str) -> dict[str, Any]:
    return {"type": "function_call", "call_id": f"call_shot{i}", "name": "search",
            "arguments": json.dumps({"query": query})}


def _output(i: int, text: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": f"call_shot{i}", "output": text}


def build_input(question: str, first_results: str | None) -> list[dict[str, Any]]:
    """The run's input items: the worked examples, the question and (unless
    ``first_results`` is None) the given first search with its results."""
    items: list[dict[str, Any]] = []
    n = 0
    for q, steps, answer in FEW_SHOT:
        items.append({"role": "user", "content": q})
        for query, results in steps:
            items += [_call(n, query), _output(n, results)]
            n += 1
        items.append({"role": "assistant", "content": f"Answer: {answer}"})
    items.append({"role": "user", "content": question})
    if first_results is not None:
        items += [_call(n, question), _output(n, first_results)]
    return items


_clients: dict[tuple[str, str, int], Any] = {}


def _client(base_url: str, api_key: str) -> Any:
    """One ``AsyncOpenAI`` per endpoint and event loop (its connection pool is per loop)."""
    import asyncio

    import openai

    key = (base_url, api_key, id(asyncio.get_running_loop()))
    if key not in _clients:
        _clients[key] = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none",
                                           max_retries=2, timeout=600.0)
    return _clients[key]


def _sdk_agent(task: dict[str, Any], ep: lightning.LLMEndpoint) -> Any:
    import agents

    k = int(task.get("k", DEFAULT_K))
    supporting = list(task.get("supporting") or ())
    index = task.get("index")

    @agents.function_tool(name_override="search")
    async def search(query: str) -> str:
        """Search the encyclopedia. Returns the best matching passages.

        Args:
            query: words to look for, such as a name.
        """
        try:
            results = retrieve(query, k=k, supporting=supporting, index=index)
        except RetrievalMiss as miss:
            results = miss.results
        return format_results(results)

    model = agents.OpenAIChatCompletionsModel(model=ep.model,
                                              openai_client=_client(ep.base_url, ep.api_key))
    return agents.Agent(
        name="researcher", instructions=INSTRUCTIONS, tools=[search], model=model,
        model_settings=agents.ModelSettings(
            max_tokens=int(task.get("max_tokens", DEFAULT_MAX_TOKENS)),
            temperature=float(task.get("temperature", DEFAULT_TEMPERATURE)),
        ),
    )


@lightning.rollout(name="rag")
async def agent(task: dict[str, Any]) -> float:
    """Run the Agents SDK loop on one question; return the answer's token F1."""
    import agents

    agents.set_tracing_disabled(True)  # the SDK would export traces to api.openai.com
    ep = lightning.llm()
    first = None
    if task.get("initial_search", True):
        first = format_results(get_index(task.get("index")).search(
            task["question"], int(task.get("first_k", FIRST_K))))
    sdk_agent = _sdk_agent(task, ep)
    items = build_input(task["question"], first)
    config = agents.RunConfig(tracing_disabled=True)
    max_turns = int(task.get("max_turns", DEFAULT_MAX_TURNS))
    text, error = "", None
    try:
        if task.get("stream"):
            result = agents.Runner.run_streamed(sdk_agent, items, max_turns=max_turns,
                                                run_config=config)
            async for _ in result.stream_events():
                pass
        else:
            result = await agents.Runner.run(sdk_agent, items, max_turns=max_turns,
                                             run_config=config)
        text = str(result.final_output or "")
    except agents.exceptions.AgentsException as exc:
        # the policy's fault (turns used up, a call to a tool that does not exist...):
        # a zero reward, not a failed rollout
        error = f"{type(exc).__name__}: {exc}"[:500]
    answer = extract_answer(text)
    golds = list(task["answers"])
    f1, em = best_f1(answer, golds), best_em(answer, golds)
    lightning.emit_span("final_answer", attributes={
        "answer": answer, "text": text[:2000], "f1": f1, "em": em, "error": error,
        "hops": task.get("hops"), "template": task.get("template")})
    return f1


def dataset(seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, test)``: the bundled generated questions (696 train, 244 test; one- and
    two-hop, see ``make_data.py``)."""
    return _data.bundled(seed=seed)


def musique_dataset(train: str | Path, dev: str | Path, index: str | Path,
                    limit: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, dev)`` MuSiQue tasks searching the index at ``index`` (see README)."""
    return (_data.load_musique(train, index=str(index), limit=limit),
            _data.load_musique(dev, index=str(index), limit=limit))
