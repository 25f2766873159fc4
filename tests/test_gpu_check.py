"""`benchmarks/gpu/check.sh --dry-run`: the one-command GPU check runs its steps on CPU and writes its results file.

The dry run uses tiny shapes and the torch path only; what it checks is the plumbing a GPU session relies on: every
step runs and is recorded, the results file has a section per step with numbers in its rows, and the rows that need
CUDA or TRL / Liger say why they are empty.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table under `heading`."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r] for r in rows[2:]]  # without the header and the |---| line


def _is_number(cell: str) -> bool:
    return re.fullmatch(r"[0-9][0-9,]*(\.[0-9]+)?", cell) is not None


def test_dry_run_writes_the_results_file(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/check.sh"), str(tmp_path), "--dry-run"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = list(tmp_path.glob("gpu-*-cpu-dry-run.md"))
    assert len(files) == 1, sorted(p.name for p in tmp_path.iterdir())
    text = files[0].read_text()
    assert "mode: dry-run" in text and "torch " in text
    for heading in ["## Check steps", "## Step 1: kernel correctness", "## Step 2: the loss alone",
                    "## Step 3: sparse", "## Step 4: one soft-KD training step", "## Step 5: labelling",
                    "## Targets"]:  # fmt: skip
        assert heading in text, heading

    steps = {r[0]: r[1] for r in _table_rows(text, "## Check steps")}
    assert steps == {"install": "skipped", "pytest-gpu": "ok", "bench": "ok"}, steps

    # every test of `pytest -m gpu` ran and skipped (no CUDA here), none failed
    assert (tmp_path / "pytest-gpu.xml").is_file()
    tests = _table_rows(text, "## Step 1")
    assert tests and all(r[2] == "0" and int(r[3]) > 0 for r in tests), tests

    loss = _table_rows(text, "## Step 2")
    by_variant: dict[str, list[list[str]]] = {}
    for r in loss:
        by_variant.setdefault(r[2], []).append(r)
    for variant in ("naive (full logits)", "lmdistill torch"):  # measured: ms and agreement are numbers
        assert all(_is_number(r[3]) and re.fullmatch(r"\d\.\de[+-]\d\d", r[10]) for r in by_variant[variant]), variant
    for variant in ("lmdistill triton", "TRL chunked", "Liger FL-JSD"):
        assert all(r[3] in ("skipped: no CUDA", "not installed") for r in by_variant[variant]), variant

    sparse = {r[1]: r for r in _table_rows(text, "## Step 3")}
    assert sparse["Liger FL-CE"][2] == "skipped: no CUDA"
    assert all(_is_number(sparse[v][2]) for v in ("naive CE", "lmdistill chunked CE", "lmdistill sparse top-k + CE"))

    step = {r[0]: r for r in _table_rows(text, "## Step 4")}
    for variant in ("HF SFT", "lmdistill KD (torch)", "lmdistill KD (naive logits)"):
        assert _is_number(step[variant][1]) and _is_number(step[variant][2]), step[variant]  # ms, tokens/s
    assert step["lmdistill KD (triton)"][1] == "skipped: no CUDA"

    label = {r[0]: r for r in _table_rows(text, "## Step 5")}
    assert _is_number(label["teacher forward only"][1]) and _is_number(label["lmdistill label (top-k + tail)"][4])

    targets = _table_rows(text, "## Targets")
    assert len(targets) >= 5 and all(r[2] for r in targets)
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["dry_run"] is True
    # a dry run never lands in benchmarks/results/
    assert not list((ROOT / "benchmarks/results").glob(files[0].name))
