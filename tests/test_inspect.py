"""``lightning-daemon inspect``: what a real daemon stored, as a user checks their integration.

A runtime sends rollouts to ``lightning-daemon`` (a subprocess): a two-turn rollout whose
second prompt extends the first (one merged sequence), one whose history was rewritten
(split, with the reason), one without log-probs, one cancelled mid-call. ``inspect`` must list each
with its transitions, token counts, rewards, versions and merge counters, and mark as used
what the newest checkpoint says training used.
"""

import json
import subprocess
import sys

import anyio

import lightning
from lightning._inspect import load_rollouts

from lightning_test_helpers import ROOT


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "lightning._cli", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


async def _send(address: str, spill) -> None:
    async with lightning.session(daemon=address, spill_dir=str(spill), open_linger_s=0):

        @lightning.rollout(name="merged")
        async def merged(task):
            lightning.record_transition([1, 2, 3], [4, 5], [-0.5, -0.25], policy_version=3)
            lightning.emit_reward(0.25)
            lightning.record_transition([1, 2, 3, 4, 5, 9, 9], [6], [-1.0], policy_version=3)
            return 1.0

        @lightning.rollout(name="split")
        async def split(task):
            lightning.record_transition([1, 2], [3], [-0.1], policy_version=4)
            lightning.record_transition([7, 8, 9], [3], [-0.1], policy_version=4)  # rewritten
            return 0.0

        @lightning.rollout(name="no_logprobs")
        async def no_logprobs(task):
            lightning.record_transition([1], [2, 3], None, trainable=False)
            return 0.5

        with lightning.rollout_options(group_key="g", attempt=0):
            await merged({})
        await split({})
        await no_logprobs({})

        @lightning.rollout(name="left_open")
        async def left_open(task):
            lightning.record_transition([1], [2], [-1.0])
            await anyio.sleep_forever()

        with anyio.move_on_after(0.5):
            await left_open({})  # cancelled: the rollout ends as cancelled


def test_inspect_lists_what_the_daemon_stored(daemon_process, tmp_path):
    d = daemon_process().start()
    anyio.run(_send, d.address, tmp_path / "spill", backend="asyncio")
    assert d.stop() == 0
    stored = load_rollouts(d.data_dir)
    names = [t.name for t in stored.trajectories]
    assert names == ["merged", "split", "no_logprobs", "left_open"]
    # a checkpoint says trajectory 1 was used (above a watermark of -1)
    ckpt = d.data_dir / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"consumed": {"through": -1, "above": [1]}}))

    proc = _inspect(d.data_dir, "--json", "--all")
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    m = rows["merged"]
    assert m["status"] == "completed" and m["final_reward"] == 1.0 and m["group_key"] == "g"
    assert [(t["prompt_tokens"], t["response_tokens"], t["policy_version"]) for t in m["transitions"]] \
        == [(3, 2, 3), (7, 1, 3)]
    assert m["rewards"] == [{"value": 0.25, "name": "reward", "after": 1}]
    assert m["sequences"] == 1 and m["merge"].get("merged_turns") == 1
    assert m["trainable_tokens"] == 3 and m["used_by_training"] is False
    s = rows["split"]
    assert s["sequences"] == 2 and s["merge"].get("split.prefix_mismatch") == 1
    assert s["used_by_training"] is True  # the checkpoint's used set
    n = rows["no_logprobs"]
    assert n["transitions"][0]["logprobs"] == "missing" and n["transitions"][0]["trainable"] is False
    assert n["trainable_tokens"] == 0
    assert rows["left_open"]["status"] == "cancelled"

    text = _inspect(d.data_dir)
    assert text.returncode == 0
    assert "4 finished rollouts stored" in text.stdout
    assert "2 transitions -> 1 sequences, 3 trainable tokens; merge: merged_turns 1" in text.stdout
    one = _inspect(d.data_dir, "--rollout", m["rollout_id"], "--json")
    assert [json.loads(x)["name"] for x in one.stdout.splitlines()] == ["merged"]
    missing = _inspect(d.data_dir, "--rollout", "nope")
    assert missing.returncode == 1 and "'nope' is not stored" in missing.stderr
    bad = _inspect(tmp_path / "nowhere")
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
