#!/usr/bin/env bash
# The GPU check of issue #14, in one command, on a GPU machine without network:
#
#   bash benchmarks/gpu/check.sh [OUT_DIR] [--dry-run]        (OUT_DIR, else $GPU_CHECK_OUT, else $OUT, else runs/gpu-check)
#
# Before it, on a machine with PyPI: `make gpu-wheels` (benchmarks/gpu/prepare.sh) fills .gpu-wheels/, which must
# travel with the checkout. Steps, each under `timeout`; a step that fails or runs out of time is recorded and the next
# one still runs:
#   1. install: each wheel of .gpu-wheels/ whose distribution the image lacks (pip --no-index --no-deps); lmdistill
#      itself is imported from src/ (PYTHONPATH), so nothing needs building
#   2. pytest: `pytest -m gpu` on the test files that hold gpu tests -> OUT_DIR/pytest-gpu.{xml,log}
#   3. bench: benchmarks/gpu/bench.py (the loss alone, the sparse loss, a soft-KD step, labelling) -> results.json
#   4. report: OUT_DIR/gpu-<date>-<gpu>.md, copied to benchmarks/results/ (not with --dry-run)
# About 6-8 minutes on an H100 (at most 8: the timeouts below), plus the machine's start. --dry-run: CPU, tiny
# shapes, torch path only, no wheels needed; it checks the format in well under a minute.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 2

DRY=0
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check.sh: unknown option $arg (usage: check.sh [OUT_DIR] [--dry-run])" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done
OUT_DIR=${OUT_ARG:-${GPU_CHECK_OUT:-${OUT:-runs/gpu-check}}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2

# the interpreter: $PYTHON, else (dry run) the checkout's .venv, else the first python3 / python that has torch
PY=${PYTHON:-}
if [ -z "$PY" ] && [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if "$candidate" -c "import torch" > /dev/null 2>&1; then PY=$candidate; break; fi
  done
  PY=${PY:-python3}
fi
WHEELS=${GPU_WHEELS:-.gpu-wheels}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
[ "$DRY" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""

# time limits (seconds): install, pytest, bench (its own budget is 30 s less, to finish its rows), report
if [ "$DRY" = 1 ]; then T_INSTALL=60 T_PYTEST=60 T_BENCH=120 T_REPORT=60; else T_INSTALL=60 T_PYTEST=150 T_BENCH=240 T_REPORT=30; fi

STEPS="$OUT_DIR/steps.tsv"
: > "$STEPS"
rm -f "$OUT_DIR"/pytest-gpu.xml "$OUT_DIR"/pytest-gpu.log "$OUT_DIR"/results.json "$OUT_DIR"/gpu-*.md  # no stale results

# run_step NAME LIMIT NOTE CMD...: the command's output goes to OUT_DIR/NAME.log (its last lines to the terminal)
run_step() {
  local name=$1 limit=$2 note=$3 start rc
  shift 3
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$note" >> "$STEPS"
  tail -n 8 "$OUT_DIR/$name.log"
  echo "== $name: exit $rc"
}

# 1. install what the image lacks
if [ "$DRY" = 1 ]; then
  printf 'install\tskip\t0\tdry-run: nothing installed\n' >> "$STEPS"
elif ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  printf 'install\t1\t0\tno wheels in %s: run `make gpu-wheels` where PyPI is reachable and carry the folder\n' \
    "$WHEELS" >> "$STEPS"
  echo "== install: no wheels in $WHEELS (TRL / Liger rows will say 'not installed')"
else
  # the wheels of distributions that are not installed (typing-extensions also when older: pydantic needs a new one)
  SELECT=$(mktemp "${TMPDIR:-/tmp}/select_wheels.XXXXXX.py")
  cat > "$SELECT" <<'PY'
import importlib.metadata as md, pathlib, re, sys
from packaging.version import Version
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name, version = whl.name.split("-")[:2]
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        print(whl)
        continue
    if re.sub(r"[-_.]+", "-", name).lower() == "typing-extensions" and Version(have) < Version(version):
        print(whl)
    else:
        print(f"keeping the image's {name} {have} (wheel: {version})", file=sys.stderr)
PY
  mapfile -t TO_INSTALL < <("$PY" "$SELECT" "$WHEELS" 2> "$OUT_DIR/install-kept.log")
  rm -f "$SELECT"
  if [ "${#TO_INSTALL[@]}" -gt 0 ]; then
    run_step install "$T_INSTALL" "${#TO_INSTALL[@]} wheels from $WHEELS" \
      "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-warn-script-location -q "${TO_INSTALL[@]}"
  else
    printf 'install\t0\t0\tthe image already has every wheel of %s\n' "$WHEELS" >> "$STEPS"
  fi
fi

# 2. kernel correctness: the files that hold gpu tests (collecting the others would import every optional package)
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
run_step pytest-gpu "$T_PYTEST" "${GPU_TESTS[*]}" \
  "$PY" -m pytest -m gpu -v -p no:cacheprovider --junitxml="$OUT_DIR/pytest-gpu.xml" "${GPU_TESTS[@]}"

# 3. the benchmark
BENCH_ARGS=(--out "$OUT_DIR" --budget-s "$(( T_BENCH - 30 ))")
[ "$DRY" = 1 ] && BENCH_ARGS+=(--dry-run)
run_step bench "$T_BENCH" "benchmarks/gpu/bench.py ${BENCH_ARGS[*]}" "$PY" benchmarks/gpu/bench.py "${BENCH_ARGS[@]}"

# 4. the results file, from whatever the steps left
REPORT_ARGS=(--render "$OUT_DIR")
if [ "$DRY" = 1 ]; then REPORT_ARGS+=(--dry-run); else REPORT_ARGS+=(--copy-to "$ROOT/benchmarks/results"); fi
timeout "$T_REPORT" "$PY" benchmarks/gpu/bench.py "${REPORT_ARGS[@]}" > "$OUT_DIR/report.log" 2>&1
rc=$?
cat "$OUT_DIR/report.log"
echo
echo "results: $(ls "$OUT_DIR"/gpu-*.md 2>/dev/null | tr '\n' ' ')(and results.json, *.log in $OUT_DIR)"
failed=$(awk -F'\t' '$2 != "0" && $2 != "skip" { print $1 }' "$STEPS" | tr '\n' ' ')
if [ -n "$failed" ]; then echo "steps that failed or ran out of time: $failed"; exit 1; fi
exit "$rc"
