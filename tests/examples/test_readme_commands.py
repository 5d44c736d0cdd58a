"""The main README's showcase commands are the examples' own (their tests run those at CI
size), and each names an agent that `lightning train` loads: a file-path `--agent` whose
module is a rollout with a dataset()."""

import re
import shlex
from pathlib import Path

import pytest

from lightning._train import _load_agent

ROOT = Path(__file__).resolve().parents[2]


def _commands(markdown: str) -> list[str]:
    """Every `lightning train ...` command, continuation lines joined, spaces folded."""
    text = markdown.replace("\\\n", " ")
    found = re.findall(r"(?:^|`)(lightning train [^`\n]*)", text, re.MULTILINE)
    return [" ".join(c.split()) for c in found]


MAIN = [c for c in _commands((ROOT / "README.md").read_text()) if "examples/" in c]


def test_the_main_readme_lists_the_three_showcase_commands():
    agents = sorted(re.search(r"--agent (\S+)", c).group(1) for c in MAIN)
    assert agents == ["examples/calc_x/agent.py:agent", "examples/rag/agent.py:agent",
                      "examples/spider/agent.py:agent"]


@pytest.mark.parametrize("command", MAIN, ids=lambda c: c.split("examples/")[1].split("/")[0])
def test_each_command_is_its_examples_own_and_loads(command, monkeypatch):
    spec = re.search(r"--agent (\S+)", command).group(1)
    example = ROOT / spec.split(":")[0]
    assert command in _commands((example.parent / "README.md").read_text())
    monkeypatch.chdir(ROOT)  # the commands run from the repository root
    module, agent = _load_agent(spec)
    assert hasattr(agent, "__lightning_rollout__")
    train, test = module.dataset()
    assert len(train) > 0 and len(test) > 0
    assert shlex.split(command)[:2] == ["lightning", "train"]
