#!/usr/bin/env bash
# CI stage: the app side on Python 3.10, 3.12 and 3.13 (the full suite runs on 3.11, where
# torch has its CPU wheel here). Each version gets a venv with the package's core
# dependencies and the openai client only - no torch - and runs: `import lightning` (light),
# the protocol, runtime, rollout, capture, logging and ingest tests, and `lightning-daemon
# --model none` started, fed by a real runtime and stopped.
#
#   bash .ci/stage_pyversions.sh [3.10 3.12 3.13]
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/stage_lib.sh

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.12 3.13)
TESTS=(tests/test_protocol.py tests/test_runtime.py tests/test_rollout.py tests/test_log.py
       tests/test_daemon.py tests/test_zmq_end_to_end.py tests/test_logging.py
       tests/test_sequences.py tests/test_exported_members.py
       tests/capture/test_openai.py tests/capture/test_records.py)
fail=0
for v in "${versions[@]}"; do
    base=$(pyenv prefix "$v" 2>/dev/null || true)
    if [ -z "$base" ] || [ ! -x "$base/bin/python$v" ]; then
        # a latest patch release of that minor version, if pyenv lists one
        base=$(pyenv root)/versions/$(pyenv versions --bare | grep -E "^${v//./\\.}\.[0-9]+$" | tail -1)
    fi
    if [ ! -x "$base/bin/python$v" ]; then
        echo "pyversions stage: Python $v is not installed (pyenv install $v)" >&2
        fail=1
        continue
    fi
    VENV="${XDG_CACHE_HOME:-$HOME/.cache}/lightning/venv-py$v"
    STAGE_START=$(date +%s)
    rm -rf "$VENV"
    "$base/bin/python$v" -m venv "$VENV"
    PY="$VENV/bin/python"
    # the core package (no extras: no torch) + what these tests use
    pip_q -e . "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "openai>=1.40" \
        "starlette>=0.37" "uvicorn>=0.30" "httpx>=0.27"
    installed=$(date +%s)
    set +e
    "$PY" - <<'PYEOF'
import sys
import lightning
heavy = [m for m in ("torch", "transformers", "numpy", "opentelemetry") if m in sys.modules]
assert not heavy, heavy
try:
    import torch  # noqa: F401
    raise SystemExit("torch is installed in the app-side venv: this stage must run without it")
except ImportError:
    pass
print(f"pyversions stage: Python {sys.version.split()[0]}: import lightning is light")
PYEOF
    rc=$?
    if [ "$rc" -eq 0 ]; then
        "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
        rc=$?
        [ "$rc" -eq 5 ] && { echo "pyversions stage: no tests collected" >&2; rc=1; }
    fi
    set -e
    end=$(date +%s)
    echo "pyversions stage: Python $v: install $((installed - STAGE_START)) s, tests $((end - installed)) s, rc $rc"
    [ "$rc" -eq 0 ] || fail=1
done
exit "$fail"
