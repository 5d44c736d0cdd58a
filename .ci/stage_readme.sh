#!/usr/bin/env bash
# CI stage: the README's main command on a fresh venv, as a new user runs it. Its install
# part is read out of README.md (.ci/readme_command.py), so the two cannot drift; then a
# short `lightning train` on the embedded default (Calc-X, SmolLM2-135M-Instruct, the GGUF
# converted afresh) must exit 0 and write summary.json with a before/after evaluation.
#
#   bash .ci/stage_readme.sh                       # a fresh venv every time (the point)
#   LIGHTNING_README_FRESH=0 bash .ci/stage_readme.sh   # reuse it (quicker, less honest)
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/stage_lib.sh
export LIGHTNING_README_FRESH="${LIGHTNING_README_FRESH:-1}"
stage_venv readme venv-readme

install=$(python .ci/readme_command.py main --install)
echo "readme stage: $install"
(
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    eval "$install"
) 2>&1 | { grep -v -e "^WARNING: Location 'file:" -e "^WARNING: Running pip as the 'root'" || true; }
installed=$(date +%s)

out=$(mktemp -d)
cache=$(mktemp -d)  # no converted model from an earlier run: the first-use conversion runs too
set +e
LIGHTNING_CACHE_DIR="$cache" HF_HUB_OFFLINE=1 "$VENV/bin/lightning" train --out "$out/run" \
    --steps 1 --group-size 2 --batch-size 4 --concurrency 8 --eval-tasks 4 --no-progress \
    > "$out/stdout" 2> "$out/stderr"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    echo "readme stage: lightning train exited $rc" >&2
    tail -40 "$out/stderr" >&2
    stage_end readme "$installed" "$rc"
fi
set +e
"$PY" - "$out/run" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1] + "/summary.json"))
assert s["steps"] == 1, s
assert s["eval"]["tasks"] == 4, s
print(f"readme stage: lightning train (embedded default, 1 step): held-out "
      f"{s['eval']['before']:.2f} -> {s['eval']['after']:.2f}, wall {s['wall_s']} s")
PYEOF
rc=$?
rm -rf "$out" "$cache"
stage_end readme "$installed" "$rc"
