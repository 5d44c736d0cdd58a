"""examples/rag: scoring, data, the streamed index, AIR's retrieval hit, and the agent's
real Agents SDK tool loop behind the real policy server (scripted and tiny-model engines)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))  # the example is the package ``rag``

from rag import data, make_data
from rag.index import Index, build_index, read_corpus, tokenize
from rag.metrics import best_em, best_f1, exact_match, f1, normalize_answer

import lightning
from lightning import DaemonConfig
from lightning.testing import Daemon, MemoryHub

np = pytest.importorskip("numpy")


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize(("pred", "gold", "want_f1", "want_em"), [
    ("Bomin", "Bomin", 1.0, 1.0),
    ("The Bomin.", "bomin", 1.0, 1.0),          # article, case, punctuation
    ("Bomin city", "Bomin", 2 / 3, 0.0),        # P 1/2, R 1
    ("New York City", "York, new", 0.8, 0.0),   # P 2/3, R 1
    ("Saint Louis Park", "Louis Saint Denis", 2 / 3, 0.0),  # P 2/3, R 2/3
    ("Paris", "Lyon", 0.0, 0.0),
    ("a", "the", 1.0, 1.0),                     # both empty after normalisation
    ("", "Bomin", 0.0, 0.0),
])
def test_f1_em_hand_computed(pred, gold, want_f1, want_em):
    assert f1(pred, gold) == pytest.approx(want_f1)
    assert exact_match(pred, gold) == want_em


def test_best_over_aliases_and_normalisation():
    assert normalize_answer("  The  U.S.A.! ") == "usa"
    # P 1, R 2/4 against the alias: F1 2/3; 0 against "USA"
    assert best_f1("United States", ["USA", "United States of America"]) == pytest.approx(2 / 3)
    assert best_em("usa", ["United States", "U.S.A."]) == 1.0
    assert best_f1("x", []) == 0.0


_text = st.lists(st.sampled_from(["a", "b", "cd", "The", "the", "an", ",", ".", " ", "B!"]),
                 max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(_text, _text)
def test_f1_properties(a, b):
    v = f1(a, b)
    assert 0.0 <= v <= 1.0
    assert v == f1(b, a)
    assert f1(a, a) == 1.0
    assert exact_match(a, b) <= v + 1e-12  # EM implies F1 = 1


# ------------------------------------------------------------------ data


def _musique_row(i, *, answerable=True):
    return {
        "id": f"2hop__{i}", "question": f"Who is q{i}?", "answer": f"ans{i}",
        "answer_aliases": [f"alias{i}"], "answerable": answerable,
        "paragraphs": [
            {"idx": 0, "title": "T0", "paragraph_text": "shared distractor", "is_supporting": False},
            {"idx": 1, "title": f"S{i}", "paragraph_text": f"support {i}", "is_supporting": True},
        ],
        "question_decomposition": [{"id": 1, "question": "a", "answer": "b"},
                                   {"id": 2, "question": "c", "answer": "d"}],
    }


def test_musique_loader_on_a_fake_file(tmp_path):
    path = tmp_path / "musique_ans_v1.0_dev.jsonl"
    rows = [_musique_row(0), _musique_row(1, answerable=False), _musique_row(2)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = data.load_musique(path, index="idx")
    assert [t["id"] for t in tasks] == ["2hop__0", "2hop__2"]
    assert tasks[0]["answers"] == ["ans0", "alias0"]
    assert tasks[0]["supporting"] == [data.passage_id("S0", "support 0")]
    assert tasks[0]["hops"] == 2 and tasks[0]["index"] == "idx"
    assert len(data.load_musique(path, answerable_only=False)) == 3
    corpus = list(data.musique_corpus(path))
    assert len(corpus) == 4  # the shared distractor once
    assert {c["id"] for c in corpus} >= set(tasks[0]["supporting"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a MuSiQue row"):
        data.load_musique(bad)


def test_missing_files_say_what_to_fetch_and_where(tmp_path):
    missing = tmp_path / "musique_ans_v1.0_train.jsonl"
    with pytest.raises(FileNotFoundError) as exc:
        data.load_musique(missing)
    msg = str(exc.value)
    assert str(missing) in msg and "StonyBrookNLP/musique" in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="corpus file"):
        list(read_corpus(tmp_path / "wiki.jsonl"))
    with pytest.raises(FileNotFoundError, match="not a BM25 index directory"):
        Index.load(tmp_path)


def test_generator_is_deterministic_disjoint_and_committed():
    corpus, train, test = make_data.generate(seed=0)
    assert make_data.generate(seed=0) == (corpus, train, test)
    assert make_data.generate(seed=1)[1] != train
    committed = [[json.loads(x) for x in (make_data.DATA_DIR / f"{n}.jsonl").read_text().splitlines()]
                 for n in ("corpus", "train", "test")]
    assert committed == [corpus, train, test]  # the bundled files are seed 0's output
    assert sum((make_data.DATA_DIR / f"{n}.jsonl").stat().st_size
               for n in ("corpus", "train", "test")) < 1 << 20
    assert len(train) >= 300 and len(test) >= 100
    by_id = {p["id"]: p for p in corpus}

    def first_hop(q):
        return by_id[q["supporting"][0]]["title"]

    assert not {first_hop(q) for q in train} & {first_hop(q) for q in test}
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    hops = {1: 0, 2: 0}
    for q in train + test:
        hops[q["hops"]] += 1
        assert len(q["supporting"]) == q["hops"]
        a = by_id[q["supporting"][0]]
        assert a["title"] in q["question"]
        if q["hops"] == 1:
            assert q["answers"][0] in a["text"]
            continue
        b = by_id[q["supporting"][1]]
        assert q["answers"][0] not in a["text"]
        assert b["title"] in a["text"] and q["answers"][0] in b["text"]  # two hops
    assert hops[1] > hops[2] > 100  # a one-hop majority: the untrained policy scores
    tr, te = data.bundled(seed=0)
    assert sorted(t["id"] for t in tr) == sorted(t["id"] for t in train) and te == [
        {**t, "index": None} for t in test]
    assert [t["id"] for t in data.bundled(seed=1)[0]] != [t["id"] for t in tr]


# ------------------------------------------------------------------ index


def _synthetic_corpus(n, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)] + ["the", "of", "city"]
    weights = [1 / (i + 1) for i in range(len(words))]
    return [{"id": f"d{i}", "title": f"Title {rng.choice(words)}",
             "text": " ".join(rng.choices(words, weights, k=rng.randint(0, 30)))}
            for i in range(n)]


def test_streamed_build_matches_the_in_memory_build(tmp_path):
    passages = _synthetic_corpus(1500)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in passages))
    stats = build_index(path, tmp_path / "idx", chunk_size=97)
    assert stats.documents == 1500 and not (tmp_path / "idx" / "tokens.tmp").exists()
    streamed = Index.load(tmp_path / "idx")
    ref = Index.from_passages(passages)
    assert len(streamed) == 1500 and streamed.passages[7] == passages[7]
    rng = random.Random(1)
    for _ in range(40):
        q = " ".join(f"w{rng.randrange(420)}" for _ in range(rng.randint(1, 4)))
        toks = tokenize([q])[0]
        np.testing.assert_allclose(streamed.retriever.get_scores(toks),
                                   ref.retriever.get_scores(toks), rtol=1e-5, atol=1e-6)
        a, b = streamed.search(q, 5), ref.search(q, 5)
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], rel=1e-5)
    # the saved in-memory index loads the same way
    ref.save(tmp_path / "ref")
    again = Index.load(tmp_path / "ref")
    assert again.search("w3 w5", 3) == ref.search("w3 w5", 3)
    assert streamed.search("the of", 3) == []  # stopwords only: no results


def test_build_from_an_iterable_and_chunk_boundaries(tmp_path):
    passages = _synthetic_corpus(50, seed=3)
    ref = Index.from_passages(passages)
    for chunk in (1, 7, 50, 1000):
        build_index(iter(passages), tmp_path / f"i{chunk}", chunk_size=chunk)
        idx = Index.load(tmp_path / f"i{chunk}")
        for q in ("w1 w2", "w10", "title w0"):
            assert [p["id"] for p in idx.search(q, 4)] == [p["id"] for p in ref.search(q, 4)]
    with pytest.raises(ValueError, match="no passages"):
        build_index(iter([]), tmp_path / "empty")


# ------------------------------------------------------------------ AIR: retrieval hit


def _stack_hub(tmp_path):
    hub = MemoryHub()
    daemon = Daemon(DaemonConfig(data_dir=str(tmp_path / "data"), stats_interval_s=0),
                    transport=hub)
    return hub, daemon


async def _drain(rt):
    with anyio.fail_after(30):
        while rt.pending_events():
            await anyio.sleep(0.01)


async def _trajectories(daemon, n):
    with anyio.fail_after(30):
        while len(daemon.buffer._items) < n:
            await anyio.sleep(0.01)
    return list(daemon.buffer._items)


async def test_retrieval_hit_is_a_successful_tool_step_for_air(tmp_path):
    from rag.agent import RetrievalMiss, get_index, retrieve

    from lightning.algorithms import AIR

    _, test = data.bundled()
    task = next(t for t in test if t["hops"] == 2)
    hit_query = task["question"]                  # finds the first-hop passage
    miss_query = "Pelladia Mirrow river"          # finds neither supporting passage
    assert not {p["id"] for p in get_index().search(miss_query, 3)} & set(task["supporting"])

    @lightning.rollout
    async def searches():
        assert retrieve(hit_query, supporting=task["supporting"])
        with pytest.raises(RetrievalMiss) as miss:
            retrieve(miss_query, supporting=task["supporting"])
        assert len(miss.value.results) == 3  # the results travel with the miss
        assert retrieve(miss_query)  # no gold ids (an unlabelled task): never a miss
        return 0.0

    hub, daemon = _stack_hub(tmp_path)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with lightning.session(transport=hub.connect(), spill_dir=str(tmp_path / "s"),
                                     open_linger_s=0) as rt:
            await searches()
            await _drain(rt)
        (traj,) = await _trajectories(daemon, 1)
        tg.cancel_scope.cancel()
    spans = [s for s in traj.spans if s.kind == "tool"]
    assert [(s.name, s.status) for s in spans] == [("search", "ok"), ("search", "error"),
                                                   ("search", "ok")]
    assert spans[0].attributes["input"]["supporting"] == task["supporting"]
    assert "RetrievalMiss" in spans[1].error
    rewards = AIR()(traj)
    assert [(r.rule, r.value) for r in rewards] == [("tool_call", 0.1), ("tool_call", -0.1),
                                                    ("tool_call", 0.1)]


def test_extract_answer():
    from rag.agent import extract_answer

    assert extract_answer("Answer: Pelladia.") == "Pelladia"
    assert extract_answer("I think so.\nanswer - 'Bomin'\nmore") == "Bomin"
    assert extract_answer("Bomin\nsecond line") == "Bomin"
    assert extract_answer("") == ""


# ------------------------------------------------------------------ live stacks


@pytest.fixture
async def scripted_stack(tmp_path):
    """Daemon (memory transport) + ScriptedEngine + the real PolicyServer on a port."""
    pytest.importorskip("agents")
    scripted = pytest.importorskip("lightning.engine.scripted")
    from transformers import AutoTokenizer

    from lightning.models import tiny_model_path
    from lightning.serving import PolicyServer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_path()), local_files_only=True)
    hub, daemon = _stack_hub(tmp_path)
    requests = []
    replies = {}

    def script(req):
        requests.append(req)
        return replies["fn"](req)

    engine = scripted.ScriptedEngine(tok, script, model=None, max_model_len=4096)
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        await tg.start(engine.serve)
        server = PolicyServer(engine, model_name="scripted", port=0, capture=daemon.capture,
                              accept_any_model=True)
        base_url = await tg.start(server.serve)
        async with lightning.session(transport=hub.connect(), policy_url=base_url,
                                     policy_model="scripted",
                                     spill_dir=str(tmp_path / "spill")) as rt:
            yield scripted, replies, requests, daemon, rt, tok
        tg.cancel_scope.cancel()


def _two_searches_then_answer(scripted, task, corpus):
    """The model's first turn searches the bridge entity, its second searches again with
    both names, its third answers with the gold answer (checked to be in what the tool
    returned)."""
    from rag.agent import FEW_SHOT

    # assistant messages already in the first prompt: the worked example's (a call per
    # search, then the answer) and the given first search
    offset = sum(len(steps) + 1 for _, steps, _ in FEW_SHOT) + 1
    by_id = {p["id"]: p for p in corpus}
    first, second = (by_id[i] for i in task["supporting"])

    def reply(req):
        own = req.turn - offset
        if own == 0:
            return scripted.Reply(text="", tool_calls=[
                scripted.ToolCall("search", {"query": second["title"]})])
        if own == 1:
            return scripted.Reply(text="Let me check.", tool_calls=[
                scripted.ToolCall("search", {"query": f"{second['title']} {first['title']}"})])
        assert own == 2 and any(task["answers"][0] in r for r in req.tool_results)
        return f"Answer: {task['answers'][0]}"

    return reply


@pytest.mark.parametrize("stream", [False, True])
async def test_agents_sdk_tool_loop_on_the_scripted_engine(scripted_stack, stream):
    from rag.agent import agent

    from lightning._protocol import unpack_ids

    scripted, replies, requests, daemon, rt, _ = scripted_stack
    corpus, _, _ = make_data.generate(seed=0)
    _, test = data.bundled()
    task = {**next(t for t in test if t["hops"] == 2), "stream": stream, "max_tokens": 128}
    replies["fn"] = _two_searches_then_answer(scripted, task, corpus)
    reward = await agent(task)
    assert reward == 1.0
    await _drain(rt)
    (traj,) = await _trajectories(daemon, 1)
    assert len(requests) == 3 and all(r.tools == ["search"] for r in requests)
    # the SDK ran its real loop: each later prompt carries the earlier tool results
    n_tool = [sum(m["role"] == "tool" for m in r.messages) for r in requests]
    assert n_tool[1] == n_tool[0] + 1 and n_tool[2] == n_tool[1] + 1
    second = next(p for p in corpus if p["id"] == task["supporting"][1])
    assert second["text"] in requests[1].tool_results[0]
    # captured: three transitions, each what the engine sampled, in order
    assert len(traj.transitions) == 3
    for t, r in zip(traj.transitions, requests):
        assert list(unpack_ids(t.prompt_ids)) == list(r.prompt_token_ids)
        assert t.trainable
    assert [c["name"] for t in traj.transitions[:2] for c in t.metadata["tool_calls"]] == [
        "search", "search"]
    assert traj.final_reward == 1.0
    tools = [s for s in traj.spans if s.kind == "tool"]
    assert [s.status for s in tools] == ["ok", "ok"]  # both searches hit a gold passage
    (fa,) = [s for s in traj.spans if s.name == "final_answer"]
    assert fa.attributes["f1"] == 1.0 and fa.attributes["em"] == 1.0
    # each turn's prompt extends the previous prompt + response token for token (the tool
    # results follow), so the turns merge into one sequence for training
    merged = []
    for a, b in zip(traj.transitions, traj.transitions[1:]):
        prev = list(unpack_ids(a.prompt_ids)) + list(unpack_ids(a.response_ids))
        merged.append(list(unpack_ids(b.prompt_ids))[: len(prev)] == prev)
    # (streamed too: streamed content before a tool call equals the non-streamed content)
    assert all(merged)


async def test_a_call_to_an_unknown_tool_scores_zero_not_a_failed_rollout(scripted_stack):
    from rag.agent import agent

    scripted, replies, _, daemon, rt, _ = scripted_stack
    _, test = data.bundled()
    replies["fn"] = lambda req: scripted.Reply(
        text="", tool_calls=[scripted.ToolCall("lookup", {"q": "x"})])
    assert await agent(test[1]) == 0.0
    await _drain(rt)
    (traj,) = await _trajectories(daemon, 1)
    assert traj.status != "failed"
    (fa,) = [s for s in traj.spans if s.name == "final_answer"]
    assert "lookup" in fa.attributes["error"]


@pytest.mark.timeout(300)
async def test_tiny_model_smoke(tmp_path):
    """The random tiny model writes garbage: the rollouts still end, scored, captured."""
    pytest.importorskip("agents")
    torch = pytest.importorskip("torch")
    from rag.agent import agent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning.engine.torch_engine import TorchEngine
    from lightning.models import tiny_model_path
    from lightning.serving import PolicyServer

    path = tiny_model_path()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 local_files_only=True).eval()
    hub, daemon = _stack_hub(tmp_path)
    _, test = data.bundled()
    tasks = [{**t, "max_tokens": 8, "max_turns": 2} for t in test[:2]]
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.serve)
        async with TorchEngine(model, tok, max_model_len=2048, seed=0) as engine:
            server = PolicyServer(engine, model_name="tiny", port=0, capture=daemon.capture,
                                  accept_any_model=True)
            base_url = await tg.start(server.serve)
            async with lightning.session(transport=hub.connect(), policy_url=base_url,
                                         policy_model="tiny",
                                         spill_dir=str(tmp_path / "spill")) as rt:
                rewards = [await agent(t) for t in tasks]
                await _drain(rt)
            trajs = await _trajectories(daemon, 2)
        tg.cancel_scope.cancel()
    assert all(0.0 <= r <= 1.0 for r in rewards)
    assert all(t.transitions and t.status != "failed" for t in trajs)


@pytest.mark.timeout(300)
def test_lightning_train_cli_on_the_scripted_engine(tmp_path):
    """The README's command at CI size: `lightning train --agent examples/rag/agent.py:agent`
    on the scripted policy (tiny model's log-probs); the usual outputs come out."""
    import subprocess

    pytest.importorskip("agents")
    pytest.importorskip("lightning.engine.scripted")
    out = tmp_path / "run"
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning", "train", "--agent", "examples/rag/agent.py:agent",
         "--model", "tiny", "--engine", "scripted", "--script", "rag.policy:script",
         "--steps", "1", "--group-size", "2", "--batch-size", "2", "--concurrency", "4",
         "--eval-tasks", "2", "--air", "--no-progress", "--threads", "1", "--out", str(out)],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["eval"]["tasks"] == 2
    kinds = [json.loads(x)["kind"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 1 and kinds.count("eval") == 2
