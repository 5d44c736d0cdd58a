#!/usr/bin/env bash
# Fetch, here, the wheels bench/run_gpu.sh installs on the GPU machine (which has no network):
#
#     bash bench/fetch_gpu_wheels.sh [DIR]      # default DIR: .gpu-wheels/ (git-ignored)
#
# That machine (Python 3.12, torch, triton, transformers, tokenizers, accelerate, peft, ninja,
# nvcc) lacks only what `import lightning` and the checked paths need besides: msgspec and
# structlog; anyio is carried too, so the engine runs on the anyio version tested here, with the
# typing_extensions it needs (anyio 4.16 wants >= 4.16; newer is backward compatible). Each
# is pinned to the version installed in this environment (the one the test suite ran with),
# or the newest when it is not installed. --no-deps: their other dependency (idna) is
# already on that machine; run_gpu.sh's import check names anything
# missing. Carry DIR with the run (device `carry: [".gpu-wheels"]`); it must stay far under
# the 64 MiB a call may carry, and this script fails if it grows past 8 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.gpu-wheels}
PACKAGES=(msgspec structlog anyio typing_extensions)
PY=${PYTHON:-python3}
LIMIT_KIB=8192

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    pins+=("${name}${version:+==$version}")
done

rm -rf "$DIR"
mkdir -p "$DIR"
# pip matches manylinux_2_N tags exactly: list the glibc levels these projects publish for.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DIR" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    "${pins[@]}"

count=$(find "$DIR" -name '*.whl' | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
    echo "fetch_gpu_wheels: expected ${#PACKAGES[@]} wheels in $DIR, found $count" >&2
    exit 1
fi
size_kib=$(du -sk "$DIR" | cut -f1)
ls -l "$DIR"
echo "fetch_gpu_wheels: ${pins[*]} -> $DIR (${size_kib} KiB)"
if [ "$size_kib" -gt "$LIMIT_KIB" ]; then
    echo "fetch_gpu_wheels: $DIR is ${size_kib} KiB, over the ${LIMIT_KIB} KiB this script allows" >&2
    exit 1
fi
