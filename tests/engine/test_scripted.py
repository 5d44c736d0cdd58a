"""The scripted engine: the prompt parses back into the conversation, replies are the
chat template's own tokens, and the engine keeps the InferenceEngine contract."""

from __future__ import annotations

import math

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning.engine.base import EngineClosedError, InvalidRequestError, SamplingParams
from lightning.engine.scripted import Reply, ScriptedEngine, ToolCall, load_script, parse_chatml

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tiny_model_dir), local_files_only=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, local_files_only=True).eval()


TOOLS = [{"type": "function", "function": {"name": n, "description": "d",
                                           "parameters": {"type": "object", "properties": {}}}}
         for n in ("search", "add")]

_text = st.text(st.characters(codec="utf-8", exclude_characters="<>|\r\x00",
                              exclude_categories=("Cs", "Cc")), min_size=1, max_size=30)
_args = st.dictionaries(st.sampled_from(["q", "a", "b"]),
                        st.one_of(st.integers(-99, 99), _text), max_size=2)
_call = st.builds(lambda n, a: {"name": n, "arguments": a}, st.sampled_from(["search", "add"]), _args)


@st.composite
def conversations(draw):
    msgs = [{"role": "system", "content": draw(_text).strip() or "sys"}]
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(_text)})
        calls = draw(st.lists(_call, max_size=2))
        content = draw(_text).strip() or "ok"
        if calls:
            msgs.append({"role": "assistant", "content": content, "tool_calls": calls})
            for _ in calls:
                msgs.append({"role": "tool", "content": draw(_text).strip() or "r"})
        else:
            msgs.append({"role": "assistant", "content": content})
    return msgs


def _render(tok, msgs, tools=TOOLS):
    wire = []
    for m in msgs:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = [{"type": "function", "function": {
                "name": c["name"], "arguments": __import__("json").dumps(c["arguments"])}}
                for c in m["tool_calls"]]
        wire.append(m)
    return tok.apply_chat_template(wire, tools=tools, tokenize=False, add_generation_prompt=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=conversations())
def test_rendered_conversations_parse_back(tok, msgs):
    parsed, tools = parse_chatml(_render(tok, msgs))
    assert tools == ["search", "add"]
    assert parsed == msgs


def test_text_outside_the_template_is_one_user_message():
    assert parse_chatml("plain prompt") == ([{"role": "user", "content": "plain prompt"}], [])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.just(""), _text), calls=st.lists(_call, min_size=0, max_size=3))
def test_a_reply_is_the_templates_own_tokens(tok, content, calls):
    """What the engine samples is what the template renders when the framework sends the
    assistant message back, so turns merge into one sequence."""
    reply = Reply(text=content, tool_calls=[ToolCall(c["name"], c["arguments"]) for c in calls])
    msg = {"role": "assistant", "content": reply.render() if not calls else
           (content.rstrip() or None)}
    if calls:
        msg["tool_calls"] = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
    head = [{"role": "user", "content": "q"}]
    prompt = _render(tok, head)
    full = _render(tok, [*head, msg] if msg["content"] or calls else head)
    if not (msg["content"] or calls):
        return
    if msg.get("content") is None:
        msg["content"] = ""
        full = _render(tok, [*head, msg])
    assert full.startswith(prompt)
    assert full[len(prompt):] == reply.render() + "<|im_end|>\n<|im_start|>assistant\n"


async def _collect(engine, prompt, params):
    deltas = [d async for d in engine.generate_stream(prompt, params)]
    return deltas


async def test_stream_stop_length_and_n(tok):
    seen = []

    def script(req):
        seen.append((req.index, req.turn, req.last_user, req.tools))
        return "Hello world. STOP here"

    async with ScriptedEngine(tok, script) as engine:
        prompt = engine.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS)
        res = await engine.generate(prompt, SamplingParams(n=2, max_tokens=64))
        assert [c.text for c in res.choices] == ["Hello world. STOP here"] * 2
        assert all(c.finish_reason == "stop" and c.token_ids[-1] == tok.convert_tokens_to_ids(
            "<|im_end|>") for c in res.choices)
        assert seen == [(0, 0, "hi", ["search", "add"]), (1, 0, "hi", ["search", "add"])]
        assert all(len(c.logprobs) == len(c.token_ids) and max(c.logprobs) <= -0.01
                   for c in res.choices)
        deltas = await _collect(engine, prompt, SamplingParams(stop=("STOP",)))
        assert "".join(d.text for d in deltas) == "Hello world. "
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == "STOP"
        assert all(len(d.token_ids) == 1 for d in deltas)
        res = await engine.generate(prompt, SamplingParams(max_tokens=2))
        assert res.choices[0].finish_reason == "length" and len(res.choices[0].token_ids) == 2
        with pytest.raises(InvalidRequestError):
            await engine.generate([], SamplingParams())
    with pytest.raises(EngineClosedError):
        await engine.generate(prompt, SamplingParams())


async def test_a_script_returning_junk_fails_its_request(tok):
    async with ScriptedEngine(tok, lambda req: 42) as engine:
        with pytest.raises(InvalidRequestError, match="must return a Reply or a str"):
            await engine.generate([1, 2, 3], SamplingParams())


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20), SamplingParams(temperature=0.0),
])
async def test_log_probs_are_the_models_processed_log_probs(tok, tiny, params):
    """With a model, each token's log-prob is the model's under the request's processing,
    computed independently here from the logits."""
    async with ScriptedEngine(tok, lambda req: "The answer is 42.", model=tiny) as engine:
        prompt = engine.apply_chat_template([{"role": "user", "content": "6 * 7?"}])
        choice = (await engine.generate(prompt, params)).choices[0]
    with torch.no_grad():
        logits = tiny(torch.tensor([prompt + choice.token_ids])).logits[0].float()
    for pos, tid in enumerate(choice.token_ids):
        z = logits[len(prompt) - 1 + pos]
        if not params.greedy:
            z = z / params.temperature
            order = z.sort(descending=True)
            keep = torch.zeros_like(z, dtype=torch.bool)
            k = params.top_k if params.top_k > 0 else z.numel()
            probs = order.values[:k].softmax(-1)
            before = probs.cumsum(-1) - probs
            n_keep = int((before < params.top_p).sum())
            keep[order.indices[: max(n_keep, 1)]] = True
            keep[tid] = True
            z = z.masked_fill(~keep, -math.inf)
        want = z.log_softmax(-1)[tid].item()
        assert choice.logprobs[pos] == pytest.approx(want, abs=1e-5, rel=1e-5)


async def test_update_weights_waits_for_requests_and_loads_into_the_model(tok, tiny_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, local_files_only=True).eval()
    gate = anyio.Event()
    async with ScriptedEngine(tok, lambda req: "a b c d e f", model=model) as engine:
        prompt = engine.apply_chat_template([{"role": "user", "content": "x"}])
        before = (await engine.generate(prompt)).choices[0].logprobs
        versions = []

        async def slow():
            async for d in engine.generate_stream(prompt):
                versions.append(d.policy_version)
                await gate.wait()

        name, w = next(iter(model.state_dict().items()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(engine.update_weights, {name: torch.zeros_like(w) + 0.5})
            await anyio.wait_all_tasks_blocked()
            assert engine.policy_version == 0  # the stream in flight holds the update
            gate.set()
        assert set(versions) == {0} and engine.policy_version == 1
        after = (await engine.generate(prompt)).choices[0]
        assert after.policy_version == 1 and after.logprobs != before


def test_load_script(tmp_path, monkeypatch):
    (tmp_path / "my_script.py").write_text(
        "def reply(req):\n    return 'x'\n"
        "def factory():\n    n = []\n    def s(req):\n        n.append(1)\n        return str(len(n))\n"
        "    return s\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_script("my_script:reply")(None) == "x"
    s = load_script("my_script:factory")
    assert [s(None), s(None)] == ["1", "2"]
    for bad, msg in [("my_script", "must look like"), ("my_script:nope", "has no attribute"),
                     ("no_such_mod:x", "No module"), ("my_script:NOT_CALLABLE", "not callable")]:
        with pytest.raises(ValueError, match=msg):
            load_script(bad)
