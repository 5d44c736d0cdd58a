"""The engine shares one Hugging Face tokenizer between threads: the event loop renders
chat templates and encodes prompts while the worker thread detokenizes sampled tokens.
Under real concurrency every call must give the single-threaded answer, and none may fail.

A fast tokenizer called with other truncation/padding settings reconfigures the shared
Rust tokenizer during the call, which silently cuts other threads' encodings (seen here
while writing these tests); so the engine works on its own copy of the tokenizer."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from lightning.engine.base import render_chat
from lightning.engine.torch_engine import TorchEngine, _Detokenizer

_TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


def _jobs(vocab: int, seed: int) -> list[tuple[str, Any, Any]]:
    """Deterministic per seed: chat renders (with and without tools), encodes, detoks."""
    rng = random.Random(seed)
    jobs: list[tuple[str, Any, Any]] = []
    for i in range(60):
        if i % 3 == 0:
            messages = [{"role": "system", "content": "You add numbers."},
                        {"role": "user", "content": f"What is {rng.randint(0, 999)} + 7? " * 3}]
            jobs.append(("chat", messages, _TOOLS if i % 2 else None))
        elif i % 3 == 1:
            jobs.append(("encode", " ".join(str(rng.random()) for _ in range(40)), None))
        else:
            jobs.append(("detok", [rng.randrange(vocab) for _ in range(64)], None))
    return jobs


def _run(tokenizer: Any, jobs: list[tuple[str, Any, Any]]) -> list[Any]:
    """The engine's own uses of the tokenizer (no truncation, no padding)."""
    out: list[Any] = []
    for kind, a, b in jobs:
        if kind == "chat":
            out.append(render_chat(tokenizer, a, tools=b))
        elif kind == "encode":
            out.append(tokenizer.encode(a, add_special_tokens=False))
        else:
            d = _Detokenizer(tokenizer, [1, 2, 3], ("</s>",))
            for t in a:
                d.add(t)
            d.flush()
            out.append(d.take(final=True))
    return out


def _in_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(len(fns))

    def wrap(fn: Callable[[], None]) -> None:
        try:
            start.wait()
            fn()
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _checker(tokenizer: Any, jobs: list[Any], expected: list[Any]) -> Callable[[], None]:
    def check() -> None:
        for _ in range(3):
            assert _run(tokenizer, jobs) == expected

    return check


def test_the_engines_tokenizer_uses_are_thread_safe(tiny_tokenizer: Any) -> None:
    work = [_jobs(len(tiny_tokenizer), seed) for seed in range(6)]
    expected = [_run(tiny_tokenizer, jobs) for jobs in work]
    _in_threads([_checker(tiny_tokenizer, j, e) for j, e in zip(work, expected)])


def test_callers_reconfiguring_their_tokenizer_do_not_reach_the_engine(
    make_engine: Callable[..., TorchEngine], tiny_tokenizer: Any
) -> None:
    engine = make_engine()
    assert engine.tokenizer is not tiny_tokenizer
    work = [_jobs(len(tiny_tokenizer), seed) for seed in range(4)]
    expected = [_run(tiny_tokenizer, jobs) for jobs in work]
    text = " ".join(str(i) for i in range(200))

    def caller() -> None:  # the app's own use of its tokenizer, with truncation
        for _ in range(150):
            assert len(tiny_tokenizer(text, truncation=True, max_length=8)["input_ids"]) == 8

    _in_threads([caller, caller, *(_checker(engine.tokenizer, j, e)
                                   for j, e in zip(work, expected))])
