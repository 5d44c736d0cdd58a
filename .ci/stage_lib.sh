# Shared by the CI stages (source it): a venv of the stage's own outside the clone, quiet
# pip, and the stage's closing line. Sets VENV, PY and STAGE_START.
#
#   stage_venv NAME DEFAULT_DIR_NAME   # NAME: "verl" -> LIGHTNING_VERL_VENV, LIGHTNING_VERL_FRESH
#   pip_q ARGS...                      # pip install -q into the venv
#   has DIST VERSION-PREFIX            # is DIST installed at a version starting with it?
#   stage_end NAME INSTALLED_AT RC     # prints the timings, exits (pytest's 5 is a failure)

stage_venv() {
    local upper
    upper=$(echo "$1" | tr '[:lower:]' '[:upper:]')
    local venv_var="LIGHTNING_${upper}_VENV" fresh_var="LIGHTNING_${upper}_FRESH"
    VENV="${!venv_var:-${XDG_CACHE_HOME:-$HOME/.cache}/lightning/$2}"
    STAGE_START=$(date +%s)
    if [ "${!fresh_var:-0}" = "1" ]; then
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
}

# quiet pip, less the "Location 'file:...' is ignored" lines of a machine's local indexes
pip_q() {
    "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location 'file:" || true; }
    return "${PIPESTATUS[0]}"
}

has() {
    "$PY" - "$1" "$2" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).startswith(sys.argv[2]) else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

stage_end() {
    local end
    end=$(date +%s)
    echo "$1 stage: install $(($2 - STAGE_START)) s, tests $((end - $2)) s, total $((end - STAGE_START)) s"
    if [ "$3" -eq 5 ]; then
        echo "$1 stage: pytest collected no tests: treating as failure" >&2
        exit 1
    fi
    exit "$3"
}
