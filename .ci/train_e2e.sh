#!/usr/bin/env bash
# `lightning train` end to end with the tests' toy agent on the tiny model, 3 steps, then
# checks the metrics: versions 1..3 published, trainer vs sampler log-probs within 1e-3.
#
#   bash .ci/train_e2e.sh PYTHON LABEL [lightning train flags...]
#   e.g. bash .ci/train_e2e.sh "$VENV/bin/python" "--backend verl" --backend verl
set -uo pipefail
cd "$(dirname "$0")/.."
PY="$1"
LABEL="$2"
shift 2
out=$(mktemp -d)
TINY=$("$PY" -c 'from lightning.models import tiny_model_path; print(tiny_model_path())')
PYTHONPATH=tests/training OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m lightning train "$@" \
    --agent toy_agent:agent --model "$TINY" --out "$out" --steps 3 --group-size 4 \
    --batch-size 8 --lr 0.02 --eval-tasks 0 --no-progress > "$out/stdout" 2>&1
rc=$?
if [ "$rc" -ne 0 ]; then
    tail -40 "$out/stdout"
    exit "$rc"
fi
"$PY" - "$out" "$LABEL" <<'PYEOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1] + "/metrics.jsonl")]
steps = [r for r in rows if r["kind"] == "train"]
assert [r["train/policy_version"] for r in steps] == [1.0, 2.0, 3.0], steps
gap = max(r["actor/logprob_gap"] for r in steps)
assert gap < 1e-3, f"trainer vs sampler log-prob gap {gap}"
print(f"lightning train {sys.argv[2]}: 3 steps, max trainer/sampler log-prob gap {gap:.2e}")
PYEOF
