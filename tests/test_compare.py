"""`lmdistill compare` on tiny models: arms on equal terms, skipped/failed arms with reasons, the report files, and
report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from lmdistill.config import load_config
from lmdistill.errors import ConfigError
from lmdistill.recipes.arms import ARM_KINDS, ArmKind, ResourceMonitor, dense_bytes, id_bytes
from lmdistill.recipes.compare import CompareConfig, run_compare
from lmdistill.report import _winner_lines, console_table, kd_gain_kept, verdicts, winners

ROOT = Path(__file__).parent.parent


def _compare_cfg(teacher_dir: Path, student_dir: Path, data: Path, out: Path, arms: list[dict]) -> CompareConfig:
    return load_config(CompareConfig, None, {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"init": "pretrained", "name_or_path": str(student_dir)},
        "data": {"source": str(data), "block_size": 32, "eval_documents": 30},
        "loss": {"alpha": 1.0},
        "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                  "eval_every": 2, "eval_batches": 2, "save_every": 0, "progress": False},
        "generation": {"n_prompts": 1, "max_new_tokens": 4},
        "arms": arms,
    })


def _broken(ctx):
    raise RuntimeError("this arm is broken on purpose")


@pytest.fixture(scope="module")
def compared(teacher_dir, student_dir, text_file, tmp_path_factory):
    """One comparison: three arms that train, one whose recipe is missing, one that fails."""
    ARM_KINDS["test_missing"] = ArmKind("test_missing", "an arm whose recipe is not installed", _broken,
                                        (("lmdistill.recipes.no_such_recipe", "run"),))
    ARM_KINDS["test_broken"] = ArmKind("test_broken", "an arm that raises", _broken)
    try:
        arms = [{"name": "ce", "kind": "ce"}, {"name": "soft", "kind": "soft"},
                {"name": "soft_rkl", "kind": "soft", "overrides": {"loss.kind": "reverse_kl"}},
                {"name": "missing", "kind": "test_missing"}, {"name": "broken", "kind": "test_broken"}]
        cfg = _compare_cfg(teacher_dir, student_dir, text_file, tmp_path_factory.mktemp("cmp"), arms)
        messages: list[str] = []
        results = run_compare(cfg, echo=messages.append)
    finally:
        del ARM_KINDS["test_missing"], ARM_KINDS["test_broken"]
    return results, messages


def test_every_arm_has_a_row_and_the_report_files_exist(compared):
    results, messages = compared
    report = Path(results["report"]["html"]).parent
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    saved = json.loads((report / "results.json").read_text())
    ok = [a for a in saved["arms"] if a["status"] == "ok"]
    assert [a["name"] for a in ok] == ["ce", "soft", "soft_rkl"]
    for a in ok:
        m = a["metrics"]
        assert {"perplexity", "bits_per_byte", "kl_to_teacher", "agreement", "ece", "student_tokens_per_s"} <= set(m)
        lo, hi = a["intervals"]["bits_per_byte"]
        assert lo <= m["bits_per_byte"] <= hi and saved["teacher_metrics"]["bits_per_byte"] < m["bits_per_byte"]
        assert a["wall_s"] > 0 and a["train_s"] > 0 and a["peak_memory_mb"] is not None
        assert Path(a["log"]).is_file() and Path(a["student_dir"], "config.json").is_file()
        assert f"| {a['name']} |" in md and f"<td class=\"l\">{a['name']}</td>" in html
    # teacher data per token: none for CE, a dense distribution over the 260-token vocab for online soft
    by = {a["name"]: a for a in ok}
    assert by["ce"]["teacher_bytes_per_token"] == 0 and by["soft"]["teacher_bytes_per_token"] == 260 * 4
    # every arm here trains on the shared split, so on the same number of target tokens
    assert by["ce"]["train_target_tokens"] > 0 and len({a["train_target_tokens"] for a in ok}) == 1
    assert "target tokens in train split" in md
    # distillation beats the CE baseline on KL to the teacher at the same steps
    assert by["soft"]["metrics"]["kl_to_teacher"] < by["ce"]["metrics"]["kl_to_teacher"]
    for fig in ("learning_curves", "storage_vs_quality", "final_metrics"):
        assert (report / "figures" / f"{fig}.png").stat().st_size > 5000
        assert f"](figures/{fig}.png)" in md and f'id="fig-{fig}"' in html
    assert "teacher" in md and "## Which arm won" in md and "Generations side by side" in html
    assert any("[1/5] ce" in m for m in messages)
    # one seed: each arm runs in arms/<name>/seed-0, and its metrics get a bootstrap interval over the held-out blocks
    assert saved["seeds"] == [0]
    for a in ok:
        assert f"arms/{a['name']}/seed-0" in a["student_dir"] and [r["seed"] for r in a["seeds"]] == [0]
        assert a["interval_method"] == f"one seed: bootstrap over {saved['eval_blocks']} held-out blocks"
        lo, hi = a["intervals"]["kl_to_teacher"]
        assert lo <= a["metrics"]["kl_to_teacher"] <= hi and lo < hi
        assert f"{a['name']} |" in md
    assert "Cells: mean [95 % interval]" in md and "Cells: mean [95 % interval]" in html
    assert set(saved["verdicts"]) >= {"kl_to_teacher", "perplexity", "bits_per_byte", "agreement"}
    assert "held-out bits / byte" in md and "held-out bits / byte" in html
    for key, v in saved["verdicts"].items():
        assert v["verdict"] in ("winner", "tie", "no interval")
        assert (key in saved["winners"]) == (v["verdict"] == "winner")


def test_every_arm_runs_once_per_seed(teacher_dir, student_dir, text_file, tmp_path):
    """seeds: [0, 1]: two runs per arm, the mean and a t-interval per metric, a winner only when intervals clear."""
    cfg = _compare_cfg(teacher_dir, student_dir, text_file, tmp_path, [{"name": "ce", "kind": "ce"},
                                                                       {"name": "soft", "kind": "soft"}])
    cfg = cfg.model_copy(update={"seeds": [0, 1], "train": cfg.train.model_copy(update={"max_steps": 2,
                                                                                         "eval_every": 0})})
    messages: list[str] = []
    results = run_compare(cfg, echo=messages.append)
    assert results["seeds"] == [0, 1] and any("[2/2] soft (" in m and "seed 1" in m for m in messages)
    for arm in results["arms"]:
        assert arm["status"] == "ok" and [r["seed"] for r in arm["seeds"]] == [0, 1]
        dirs = [r["student_dir"] for r in arm["seeds"]]
        assert all(Path(d).is_relative_to(tmp_path / "arms" / arm["name"] / f"seed-{s}")
                   for s, d in zip((0, 1), dirs, strict=True))
        kls = [r["metrics"]["kl_to_teacher"] for r in arm["seeds"]]
        # different seeds train differently (CE on a pretrained student: the data order differs)
        assert kls[0] != kls[1] and arm["metrics"]["kl_to_teacher"] == pytest.approx(sum(kls) / 2)
        lo, hi = arm["intervals"]["kl_to_teacher"]
        assert lo < min(kls) and hi > max(kls) and arm["interval_method"] == "t-interval over 2 seeds"
        assert arm["intervals"]["wall_s"][0] <= arm["wall_s"] <= arm["intervals"]["wall_s"][1]  # also the run record
    saved = json.loads(Path(results["report"]["results"]).read_text())
    v = saved["verdicts"]["kl_to_teacher"]
    by = {a["name"]: a for a in saved["arms"]}
    clear = by["soft"]["intervals"]["kl_to_teacher"][1] < by["ce"]["intervals"]["kl_to_teacher"][0]
    assert v["verdict"] == ("winner" if clear else "tie")
    md = Path(results["report"]["markdown"]).read_text()
    assert "t-interval over 2 seeds" in md and ("**KL(teacher ‖ student)**: tie: " in md) == (not clear)


def test_topk_sampled_cache_arm_labels_once_and_reports_its_real_bytes(teacher_dir, student_dir, text_file, tmp_path):
    """The cached_topk_sampled kind: `label` with the top-k head + sampled tail encoding, then soft from that cache;
    its bytes per token are the cache's own on disk, and it lands nearer the teacher than its CE twin."""
    arms = [{"name": "ce", "kind": "ce"},
            {"name": "ts", "kind": "cached_topk_sampled", "prepare": {"cache": {"k": 4, "draws": 6}}}]
    cfg = _compare_cfg(teacher_dir, student_dir, text_file, tmp_path, arms)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6, "eval_every": 0})})
    results = run_compare(cfg, echo=lambda _: None)
    by = {a["name"]: a for a in results["arms"]}
    assert by["ts"]["status"] == "ok", by["ts"]
    manifest = json.loads((tmp_path / "arms" / "ts" / "seed-0" / "cache" / "manifest.json").read_text())
    assert manifest["encoding"]["kind"] == "topk_sampled" and manifest["encoding"]["k"] == 4
    from lmdistill.cache.estimate import measure_cache
    measured = measure_cache(tmp_path / "arms" / "ts" / "seed-0" / "cache")["splits"]["train"]["bytes_per_token"]
    assert by["ts"]["teacher_bytes_per_token"] == pytest.approx(measured) and 0 < measured < 260 * 4
    assert by["ts"]["metrics"]["kl_to_teacher"] < by["ce"]["metrics"]["kl_to_teacher"]


def test_skipped_and_failed_arms_show_their_reason(compared):
    results, messages = compared
    by = {a["name"]: a for a in results["arms"]}
    assert by["missing"]["status"] == "skipped"
    assert "recipe lmdistill.recipes.no_such_recipe not available" in by["missing"]["reason"]
    assert by["broken"]["status"] == "failed" and "this arm is broken on purpose" in by["broken"]["reason"]
    md = Path(results["report"]["markdown"]).read_text()
    html = Path(results["report"]["html"]).read_text()
    for text in (md, html):
        assert "recipe lmdistill.recipes.no_such_recipe not available" in text
        assert "this arm is broken on purpose" in text
    assert any("missing" in m and "SKIPPED" in m for m in messages)
    assert "SKIPPED" in console_table(results)
    # a failed arm makes `lmdistill compare` exit non-zero (after the report is written); a skipped one does not
    from lmdistill.recipes.compare import ArmsFailed, raise_if_failed

    with pytest.raises(ArmsFailed, match="1 arm\\(s\\) failed: broken") as err:
        raise_if_failed(results, "out")
    assert err.value.exit_code == 1
    raise_if_failed({"arms": [a for a in results["arms"] if a["name"] != "broken"]}, "out")


def test_learning_curves_come_from_each_runs_log(compared):
    from lmdistill.report import read_curves

    results, _ = compared
    for arm in results["arms"][:3]:
        curves = read_curves(arm["log"])
        assert [s for s, _ in curves["eval/kl_to_teacher"]] == [0, 2, 4]
        assert len(curves["loss"]) == 4
        # the run's own final eval and compare's final scoring see the same student and blocks
        assert curves["eval/kl_to_teacher"][-1][1] == pytest.approx(arm["metrics"]["kl_to_teacher"], rel=1e-4)


def test_arms_cannot_override_the_shared_terms(teacher_dir, student_dir, text_file, tmp_path):
    for overrides, needle in (({"train.max_steps": 100}, "train.max_steps"), ({"data": {"block_size": 64}}, "data")):
        cfg = _compare_cfg(teacher_dir, student_dir, text_file, tmp_path,
                           [{"name": "x", "kind": "soft", "overrides": overrides}])
        with pytest.raises(ConfigError, match=needle):
            run_compare(cfg, echo=lambda m: None)
    cfg = _compare_cfg(teacher_dir, student_dir, text_file, tmp_path, [{"name": "x", "kind": "nope"}])
    with pytest.raises(ConfigError, match="unknown kind `nope`; registered kinds: .*soft"):
        run_compare(cfg, echo=lambda m: None)
    with pytest.raises(ConfigError, match="unique"):
        _compare_cfg(teacher_dir, student_dir, text_file, tmp_path, [{"name": "a", "kind": "ce"}] * 2)


def test_winners_and_kd_gain():
    def arm(name, kind, kl, agree, speed, half=0.05):
        return {"name": name, "kind": kind, "status": "ok", "label": kind, "teacher_bytes_per_token": 0.0,
                "metrics": {"kl_to_teacher": kl, "agreement": agree, "perplexity": 10.0,
                            "student_tokens_per_s": speed},
                "intervals": {"kl_to_teacher": [kl - half, kl + half], "agreement": [agree - half, agree + half],
                              "perplexity": [9.0, 11.0], "teacher_bytes_per_token": [0.0, 0.0]}}

    results = {"arms": [arm("ce", "ce", 2.0, 0.5, 900.0), arm("soft", "soft", 1.0, 0.7, 1000.0),
                        arm("top", "cached_topk", 1.2, 0.7, 800.0),
                        {"name": "s", "kind": "x", "status": "skipped", "reason": "r", "label": "x"}]}
    w, v = winners(results), verdicts(results)
    # soft's interval [0.95, 1.05] clears top's [1.15, 1.25] and ce's: a winner
    assert w["kl_to_teacher"] == ["soft"] and v["kl_to_teacher"]["verdict"] == "winner"
    # equal means, or intervals that overlap: a tie, never a winner
    assert "agreement" not in w and v["agreement"] == {"verdict": "tie", "best": "soft", "arms": ["soft", "top"]}
    assert "perplexity" not in w and v["perplexity"]["verdict"] == "tie"
    assert v["perplexity"]["arms"] == ["ce", "soft", "top"]
    assert v["teacher_bytes_per_token"]["verdict"] == "tie"  # three exact zeros
    # every arm scores the same student architecture: its throughput is shown, never ranked
    assert "student_tokens_per_s" not in w and "student_tokens_per_s" not in v
    assert kd_gain_kept(results) == pytest.approx({"ce": 0.0, "soft": 1.0, "top": 0.8})
    # an interval that overlaps by a hair is a tie; without intervals no winner is named
    results["arms"][2]["intervals"]["kl_to_teacher"] = [1.04, 1.3]
    assert "kl_to_teacher" not in winners(results)
    for a in results["arms"]:
        a.pop("intervals", None)
    v = verdicts(results)
    assert winners(results) == {} and v["kl_to_teacher"] == {"verdict": "no interval", "best": "soft",
                                                              "arms": ["ce", "soft", "top"]}
    lines = dict(_winner_lines(results))
    assert lines["KL(teacher ‖ student)"].startswith("tie: one seed: no interval, no winner named")


def test_intervals_over_seeds_and_over_blocks():
    from lmdistill.report import bootstrap_blocks, summarize_seeds, t_interval

    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    # sd 1, n 3: half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 / 3 ** 0.5, rel=1e-4) and mean - lo == hi - mean
    runs = [{"metrics": {"kl_to_teacher": kl, "perplexity": 10 * kl}, "wall_s": w, "teacher_bytes_per_token": 4.0}
            for kl, w in ((1.0, 5.0), (2.0, 6.0), (3.0, 7.0))]
    s = summarize_seeds(runs)
    assert s["metrics"]["kl_to_teacher"] == 2.0 and s["wall_s"] == 6.0
    assert s["intervals"]["kl_to_teacher"] == pytest.approx([lo, hi])
    assert s["intervals"]["teacher_bytes_per_token"] == [4.0, 4.0] and s["interval_method"] == "t-interval over 3 seeds"
    # one seed: percentile bootstrap over per-block sums [tokens, CE, KL, agreements]
    blocks = [[10.0, 10.0 * c, 10.0 * c / 2, 5.0] for c in (1.0, 1.5, 2.0, 2.5, 3.0, 1.2, 2.2, 2.8)]
    b = bootstrap_blocks(blocks)
    kl_all = sum(r[2] for r in blocks) / sum(r[0] for r in blocks)
    assert b["kl_to_teacher"][0] < kl_all < b["kl_to_teacher"][1] and b["agreement"] == (0.5, 0.5)
    assert b["perplexity"][0] == pytest.approx(math.exp(2 * b["kl_to_teacher"][0]))
    one = summarize_seeds(runs[:1], blocks)
    assert one["interval_method"] == "one seed: bootstrap over 8 held-out blocks"
    assert set(one["intervals"]) == {"kl_to_teacher", "perplexity", "teacher_bytes_per_token"}  # no wall_s interval
    assert summarize_seeds(runs[:1])["interval_method"] == "one seed: no interval"


def test_curves_on_an_arms_own_data_are_marked(tmp_path):
    from lmdistill.report import make_figures

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "eval/kl_to_teacher": 3.0 - s,
                                       "eval/perplexity": 900.0 / (s + 1)}) + "\n" for s in range(3)))
    arms = [{"name": n, "kind": n, "status": "ok", "label": n, "log": str(log), "steps": 2, "teacher_bytes_per_token": 1.0,
             "curve_data": data, "metrics": {"kl_to_teacher": 1.5, "perplexity": 400.0}}
            for n, data in (("ce", ""), ("hard_sequence", "held-out teacher completions"))]
    figures = make_figures({"arms": arms}, tmp_path / "figures")
    caption = next(f.caption for f in figures if f.name == "learning_curves")
    assert "shared blocks (hard_sequence: held-out teacher completions);" in caption  # ce (shared data) not listed
    assert (tmp_path / "figures" / "learning_curves.png").stat().st_size > 5000


def test_bytes_per_token_definitions():
    assert id_bytes(49152) == 2 and id_bytes(256) == 1 and id_bytes(257) == 2 and id_bytes(151_665) == 3
    assert dense_bytes(49152) == 49152 * 4


def test_resource_monitor_sees_a_large_allocation():
    mon = ResourceMonitor()
    with mon.phase("train"):
        x = torch.ones(64 * 2**20 // 4 * 3)  # 192 MiB, touched
        x += 1
        import time

        time.sleep(0.1)
        del x
    assert mon.phases["train"].peak_memory_mb is not None
    if not torch.cuda.is_available() and os.path.exists("/proc/self/statm"):
        assert 150 < mon.phases["train"].peak_memory_mb < 400
    assert mon.phases["train"].seconds >= 0.1


def test_shipped_compare_and_demo_configs_validate():
    from lmdistill.recipes.demo import demo_config

    paths = sorted((ROOT / "configs").glob("compare*.yaml")) + sorted((ROOT / "configs").glob("demo*.yaml"))
    assert paths
    for path in paths:
        assert path.read_text().startswith("# lmdistill "), f"{path}: the first line is the command that runs it"
        load_config(CompareConfig, path)
    # configs/demo*.yaml are exactly what `lmdistill demo [--quick]` runs
    for name, quick in (("demo.yaml", False), ("demo-quick.yaml", True)):
        assert load_config(CompareConfig, ROOT / "configs" / name).model_dump() == demo_config(quick).model_dump()


# ---------------------------------------------------------------------------------------------------------------------
# report.html in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

# Appended to a copy of the report: after load, list what rendered into the DOM, which --dump-dom prints.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.src.slice(0, 22), w: i.naturalWidth, h: i.naturalHeight,
                                               complete: i.complete}));
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const refs = [...document.querySelectorAll('[src],[href]')].map(e => e.getAttribute('src') || e.getAttribute('href'));
  const out = document.createElement('pre');
  out.id = 'render-probe';
  out.textContent = JSON.stringify({imgs, tables, refs, resultRows: document.querySelectorAll('table.results tbody tr').length});
  document.body.appendChild(out);
});
</script>"""


def _chromium(args: list[str], profile: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does it)")
def test_report_html_renders_in_headless_chromium(compared, tmp_path):
    results, _ = compared
    html = Path(results["report"]["html"]).read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        proc = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], profile)
        assert proc.returncode == 0, proc.stderr[-2000:]
        dom = proc.stdout
        start = dom.index('<pre id="render-probe">') + len('<pre id="render-probe">')
        import html as html_lib

        probe_out = json.loads(html_lib.unescape(dom[start : dom.index("</pre>", start)]))
        # every figure decoded into a real image; nothing points outside the file
        assert len(probe_out["imgs"]) == 3
        for img in probe_out["imgs"]:
            assert img["complete"] and img["w"] > 300 and img["h"] > 200, img
            assert img["src"].startswith("data:image/png;base64")
        assert all(r.startswith("data:") for r in probe_out["refs"] if r), probe_out["refs"]
        # the results table: three trained arms and the teacher's reference row
        assert probe_out["resultRows"] == 4
        # and a screenshot of the top of the page is not blank
        shot = tmp_path / "shot.png"
        proc = _chromium(["--virtual-time-budget=10000", f"--screenshot={shot}", "--window-size=1200,1600",
                          Path(results["report"]["html"]).as_uri()], profile)
        assert proc.returncode == 0 and shot.stat().st_size > 0, proc.stderr[-2000:]
    from PIL import Image

    pixels = Image.open(shot).convert("L").getextrema()
    assert pixels[0] < 100 and pixels[1] > 200  # dark text on a light page, not a blank frame
