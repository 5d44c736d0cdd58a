"""``lightning-daemon inspect DATA_DIR``: what a daemon stored, rollout by rollout.

A user who integrated an agent needs to see that its calls are captured as they expect:
how many transitions each rollout has, their token counts, rewards and policy versions,
whether the multi-turn merge joined the turns (or why it split them), which transitions
are trainable, and whether training has used the rollout yet. This reads a data directory
without changing it (a running daemon may own it): the snapshot and the write-ahead log
are replayed into a fresh ingest state, exactly as recovery does, and the trainer's newest
checkpoint says what was used.

Trajectories that a compaction folded into the snapshot after training used them are gone
from the log; they are counted, not listed. Decoded text needs a tokenizer (``--text``,
with ``--tokenizer PATH`` or the embedded default), the only part that imports transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._ingest import Trajectory
from ._protocol import unpack_ids, unpack_logprobs
from ._sequences import merge_transitions

__all__ = ["describe", "inspect_main", "load_rollouts"]


class Stored(msgspec.Struct, kw_only=True):
    """What a data directory holds."""

    trajectories: list[Trajectory]
    """Finished rollouts still in the snapshot or the log, in completion order."""
    open_rollouts: list[str]
    """Ids of rollouts started and not yet ended."""
    committed_through: int
    """The daemon's cursor: trajectories up to this index were used by training."""
    used_through: int
    """The newest checkpoint's watermark: every index up to it was used."""
    used_above: set[int]
    """... and the indices above the watermark that it records as used."""
    compacted_away: int
    """Finished trajectories before the snapshot whose records compaction removed."""
    unreadable_records: int


def load_rollouts(data_dir: str | Path) -> Stored:
    """Replay ``data_dir`` read-only into :class:`Stored` (raises FileNotFoundError).

    The replay is recovery's own (:func:`lightning._daemon.recover`): a record recovery
    would quarantine is counted here as unreadable, and nothing is moved or written.
    """
    from ._daemon import recover

    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (pass the daemon's --data-dir)")
    state, trajectories, committed = recover(root, include_committed=True)
    return Stored(trajectories=trajectories, open_rollouts=sorted(state.open),
                  committed_through=committed, **_used_by_checkpoint(root),
                  compacted_away=state.completed - len(trajectories),
                  unreadable_records=state.counters["wal_records_quarantined"])


def _used_by_checkpoint(root: Path) -> dict[str, Any]:
    """The used set of the newest complete checkpoint (``trainer.json``, see
    :mod:`lightning.training.trainer`), read without importing the trainer (torch)."""
    done = sorted(d for d in (root / "checkpoints").glob("step-*") if (d / "trainer.json").exists())
    if not done:
        return {"used_through": -1, "used_above": set()}
    consumed = json.loads((done[-1] / "trainer.json").read_text()).get("consumed") or {}
    return {"used_through": int(consumed.get("through", -1)),
            "used_above": {int(i) for i in consumed.get("above", ())}}


def _transition_row(t: Any, decode: Any) -> dict[str, Any]:
    prompt, response = unpack_ids(t.prompt_ids), unpack_ids(t.response_ids)
    row: dict[str, Any] = {
        "index": t.index,
        "prompt_tokens": len(prompt),
        "response_tokens": len(response),
        "logprobs": "yes" if t.logprobs else "missing",
        "policy_version": t.policy_version,
        "trainable": t.trainable,
        "finish_reason": t.finish_reason,
        "model": t.model,
    }
    if t.logprobs:
        lp = unpack_logprobs(t.logprobs)
        row["mean_logprob"] = round(sum(lp) / len(lp), 4) if len(lp) else None
    if decode is not None:
        row["response_text"] = decode(list(response))
        row["prompt_tail_text"] = decode(list(prompt[-64:]))
    return row


def is_used(traj: Trajectory, stored: Stored) -> bool:
    """Whether training used ``traj`` (the cursor, or the newest checkpoint's used set)."""
    return (traj.index <= max(stored.committed_through, stored.used_through)
            or traj.index in stored.used_above)


def describe(traj: Trajectory, used: bool, decode: Any = None) -> dict[str, Any]:
    """One rollout as a JSON-able dict (what ``inspect`` prints, and the policy server's
    ``GET /v1/rollouts/{id}`` returns)."""
    counters: Counter[str] = Counter()
    seqs = merge_transitions(traj.transitions, counters, rollout_id=traj.rollout_id)
    return {
        "rollout_id": traj.rollout_id,
        "index": traj.index,
        "name": traj.name,
        "status": traj.status,
        "error": traj.error,
        "group_key": traj.group_key,
        "attempt": traj.attempt,
        "split": (traj.metadata or {}).get("split"),
        "client_id": traj.client_id,
        "final_reward": traj.final_reward,
        "rewards": [{"value": r.value, "name": r.name, "after": r.after} for r in traj.rewards],
        "spans": len(traj.spans),
        "transitions": [_transition_row(t, decode) for t in traj.transitions],
        "sequences": len(seqs),
        "merge": {k: v for k, v in sorted(counters.items())},
        "trainable_tokens": sum(sum(s.action_mask) for s in seqs),
        "used_by_training": used,
        "warnings": list(traj.warnings),
    }


def _decoder(tokenizer: str) -> Any:
    from transformers import AutoTokenizer

    if tokenizer == "default":
        from .models import default_model_path

        tokenizer = str(default_model_path())
    tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def _print_table(rows: list[dict[str, Any]], stored: Stored, shown: int, total: int) -> None:
    print(f"{total} finished rollouts stored ({stored.compacted_away} more compacted away "
          f"after training used them), {len(stored.open_rollouts)} open; cursor "
          f"{stored.committed_through}; {stored.unreadable_records} unreadable records")
    if shown < total:
        print(f"showing the last {shown} (--all for every one, --rollout ID for one)")
    for r in rows:
        merged = ", ".join(f"{k} {v}" for k, v in r["merge"].items()) or "-"
        print(f"\n{r['rollout_id']}  #{r['index']} {r['name']} {r['status']}"
              f"{' (' + r['error'] + ')' if r['error'] else ''}  group {r['group_key']} "
              f"attempt {r['attempt']}  split {r['split'] or '-'}  final reward "
              f"{r['final_reward']}  used by training: {'yes' if r['used_by_training'] else 'no'}")
        if r["rewards"]:
            print("  rewards: " + ", ".join(f"{x['value']:g} after {x['after']}" for x in r["rewards"]))
        print(f"  {len(r['transitions'])} transitions -> {r['sequences']} sequences, "
              f"{r['trainable_tokens']} trainable tokens; merge: {merged}")
        for t in r["transitions"]:
            print(f"    [{t['index']}] prompt {t['prompt_tokens']} + response {t['response_tokens']}"
                  f" tokens, log-probs {t['logprobs']}, version {t['policy_version']}, "
                  f"{'trainable' if t['trainable'] else 'not trainable'}, finish "
                  f"{t['finish_reason'] or '-'}, model {t['model'] or '-'}")
            if "response_text" in t:
                print(f"        response: {t['response_text']!r}")
        for w in r["warnings"]:
            print(f"  warning: {w}")


def inspect_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lightning-daemon inspect",
        description="List what a daemon stored: rollouts, their transitions (token counts, "
        "log-probs, policy versions, trainable or not), rewards, how the multi-turn merge "
        "joined or split them, and whether training used them. Read-only.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="the daemon's --data-dir")
    p.add_argument("--rollout", default=None, metavar="ID", help="only this rollout")
    p.add_argument("--last", type=int, default=20, metavar="N",
                   help="the last N finished rollouts (default 20)")
    p.add_argument("--all", action="store_true", help="every stored rollout")
    p.add_argument("--json", action="store_true", help="one JSON object per rollout")
    p.add_argument("--text", action="store_true", help="decode the response text")
    p.add_argument("--tokenizer", default="default", metavar="PATH",
                   help="tokenizer for --text (default: the embedded model's)")
    args = p.parse_args(argv)
    from ._logging import configure_logging

    configure_logging("warning")  # stdout is the listing; the merge's info lines are in it
    try:
        stored = load_rollouts(args.data_dir)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"lightning-daemon inspect: error: {exc}", file=sys.stderr)
        return 2
    trajs = stored.trajectories
    if args.rollout is not None:
        trajs = [t for t in trajs if t.rollout_id == args.rollout]
        if not trajs:
            state = "open (not ended yet)" if args.rollout in stored.open_rollouts else "not stored"
            print(f"lightning-daemon inspect: rollout {args.rollout!r} is {state}", file=sys.stderr)
            return 1
    elif not args.all:
        trajs = trajs[-max(args.last, 0):] if args.last else []
    decode = _decoder(args.tokenizer) if args.text else None
    rows = [describe(t, is_used(t, stored), decode) for t in trajs]
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print_table(rows, stored, len(rows), len(stored.trajectories))
    return 0
