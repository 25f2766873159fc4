#!/usr/bin/env bash
# Download, where PyPI is reachable, the wheels the GPU check installs on a GPU machine that has no network:
#
#   bash benchmarks/gpu/prepare.sh [--with-datasets]          (or: make gpu-wheels)
#
# Into .gpu-wheels/ (git-ignored; $GPU_WHEELS overrides), for CPython 3.12 on x86-64 Linux, without dependencies: the
# list and the reasons are benchmarks/gpu/wheels.txt. Nothing of what the GPU image has (torch, triton, transformers,
# accelerate, ...) is downloaded. The folder travels with the checkout to the GPU machine (a device call carries 64 MiB
# in all), so its size is printed. --with-datasets adds `datasets` and pyarrow/pandas (~70 MB more, too big to carry).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DEST=${GPU_WHEELS:-.gpu-wheels}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

WITH_DATASETS=0
for arg in "$@"; do
  case "$arg" in
    --with-datasets) WITH_DATASETS=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

mapfile -t REQS < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' benchmarks/gpu/wheels.txt | grep -v '^datasets:' | grep .)
if [ "$WITH_DATASETS" = 1 ]; then
  mapfile -t -O "${#REQS[@]}" REQS < <(sed -n 's/^datasets:[[:space:]]*//p' benchmarks/gpu/wheels.txt | sed 's/[[:space:]]*$//')
fi

# Into a fresh folder, then swapped in: no wheel of an older list stays behind (check.sh installs every wheel it finds).
TMP=$(mktemp -d "${DEST%/}.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
# Platform tags: pure wheels are py3-none-any; pydantic-core, jiter, xxhash are manylinux2014 (= manylinux_2_17);
# pandas and pyarrow only manylinux_2_28 (the GPU image's torch wheels need glibc >= 2.28 too).
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$TMP" "${REQS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
if [ "$(ls "$TMP"/*.whl 2>/dev/null | wc -l)" -ne "${#REQS[@]}" ]; then
  echo "prepare.sh: expected ${#REQS[@]} wheels, got $(ls "$TMP"/*.whl 2>/dev/null | wc -l); see the pip output above" >&2
  exit 1
fi
rm -rf "$DEST"
mv "$TMP" "$DEST"
trap - EXIT

echo "wheels in $DEST:"
ls -l "$DEST" | awk 'NR > 1 { printf "  %8.1f KiB  %s\n", $5 / 1024, $9 }'
total=$(du -sk "$DEST" | cut -f1)
printf 'total: %d wheels, %.1f MiB\n' "$(ls "$DEST"/*.whl | wc -l)" "$(echo "$total / 1024" | bc -l)"
if [ "$total" -gt $(( 60 * 1024 )) ]; then
  echo "warning: over 60 MiB; a device call carries 64 MiB in all (carry: [\"$DEST\"])" >&2
fi
echo "next, on the GPU machine (carry: [\"$DEST\"]): bash benchmarks/gpu/check.sh \"\$OUT\""
