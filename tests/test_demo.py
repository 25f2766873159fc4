"""`lmdistill demo --quick` end to end on the embedded default: the CI smoke test of the whole comparison path
(real SmolLM2 teacher, real Wikipedia text, pruning, several recipes, scoring, generation, report)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _assets_missing() -> str | None:
    from lmdistill import assets
    from lmdistill.errors import AssetError

    try:
        assets.smollm2_gguf()
        assets.wikipedia_records()
    except AssetError as e:
        return str(e)
    if not (assets.cache_root() / f"smollm2-135m-instruct-v{assets._CONVERSION_VERSION}" / "config.json").is_file():
        try:
            import gguf  # noqa: F401  (needed once, to convert the GGUF teacher)
        except ImportError:
            return f"converting the embedded teacher needs the `gguf` package: {assets.INSTALL_HINT}"
    return None


MISSING = _assets_missing()


@pytest.mark.assets
@pytest.mark.skipif(MISSING is not None, reason=f"embedded default not installed: {MISSING}")
def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "lmdistill", "demo", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out / "report"
    assert f"report: {report / 'report.html'}" in proc.stdout
    results = json.loads((report / "results.json").read_text())
    arms = {a["name"]: a for a in results["arms"]}
    assert list(arms) == ["ce", "soft", "cached_topk"]
    # the core arms always run; an arm whose recipe is absent is skipped with a reason, never silently
    assert arms["ce"]["status"] == "ok" and arms["soft"]["status"] == "ok"
    for a in arms.values():
        assert a["status"] == "ok" or a["reason"], a
        if a["status"] == "ok":
            assert a["metrics"]["kl_to_teacher"] > 0 and Path(a["student_dir"], "config.json").is_file()
    assert arms["soft"]["teacher_bytes_per_token"] == 49152 * 4
    # the table is printed: a row per trained arm and the teacher's reference row
    lines = proc.stdout.splitlines()
    for name in [n for n, a in arms.items() if a["status"] == "ok"] + ["teacher"]:
        assert any(line.startswith(name + " ") for line in lines), name
    assert results["generations"] and set(results["generations"][0]["outputs"]) >= {"teacher", "ce", "soft"}
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
