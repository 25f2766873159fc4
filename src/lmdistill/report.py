"""The comparison report: a table, the winner of each metric, figures, side-by-side generations.

Every metric is shown as the mean over the arm's seeds and a 95 % interval: a t-interval over the seeds when there are
two or more, a bootstrap over the held-out blocks with one (for the metrics that are sums over blocks: perplexity,
bits per byte, KL to the teacher, agreement; the others then have none). A winner is named only when its interval
clears every other arm's; otherwise the report says "tie". Bits per byte (lower is better) does not depend on the
tokenizer: it compares students of different vocabularies, and the teacher, on the same text.

`write_report(results, out_dir)` turns the results of `lmdistill compare` into
    report.md        tables + figures/*.png linked beside it
    report.html      the same, self-contained: the figures are embedded as base64 PNGs, no external reference
    results.json     everything measured, for other tools
Figures: learning curves per arm (training loss, held-out KL to the teacher, held-out perplexity, read from each run's
log.jsonl), storage vs quality (teacher bytes per token against held-out KL), and the final metrics per arm.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdistill.io import write_text

Format = Callable[[float], str]
_ONE, _INT = "{:,.1f}".format, "{:,.0f}".format


def _scaled(decimals: int) -> Format:
    """For quantities whose scale varies by orders of magnitude between runs (perplexity, bytes per token)."""
    return lambda v: f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{decimals}f}"


# (key, header, better: "min" | "max" | "", format) for the main table. Keys are looked up in arm["metrics"], then
# arm. "" = shown but never ranked: every arm's student has the same architecture (compare's equal terms), so the
# scoring throughput differs between arms only by timing noise, and naming a winner on it would be a false claim.
METRICS: list[tuple[str, str, str, Format]] = [
    ("perplexity", "held-out perplexity", "min", _scaled(2)),
    ("bits_per_byte", "held-out bits / byte", "min", "{:.4f}".format),
    ("kl_to_teacher", "KL(teacher ‖ student)", "min", "{:.4f}".format),
    ("agreement", "top-1 agreement", "max", "{:.3f}".format),
    ("ece", "ECE", "min", "{:.4f}".format),
    ("onpolicy_reverse_kl", "on-policy reverse KL", "min", "{:.4f}".format),
    ("teacher_nll_greedy", "teacher NLL of greedy answers", "min", "{:.4f}".format),
    ("answer_length", "answer length", "", "{:.1f}".format),
    ("teacher_bytes_per_token", "teacher bytes / token", "min", _scaled(1)),
    ("wall_s", "wall-clock (s)", "min", _ONE),
    ("peak_memory_mb", "peak memory (MB)", "min", _INT),
    ("student_tokens_per_s", "eval tokens/s", "", _INT),
]
CURVES: list[tuple[str, str]] = [("loss", "training loss (each arm's own objective)"),
                                 ("eval/kl_to_teacher", "held-out KL(teacher ‖ student)"),
                                 ("eval/perplexity", "held-out perplexity")]


# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# run-record keys (besides the scored metrics) that are averaged over seeds and get an interval
RUN_KEYS = ("wall_s", "prepare_s", "train_s", "peak_memory_mb", "prepare_peak_memory_mb", "train_tokens_per_s",
            "teacher_bytes_per_token")
# fixed by the method, not measured: the same at every seed, an exact (zero-width) interval
EXACT_KEYS = ("teacher_bytes_per_token",)
BOOTSTRAP_RESAMPLES = 2000


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % t-interval of the mean of >= 2 values."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def bootstrap_blocks(blocks: list[list[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of perplexity, CE, KL to the teacher, agreement and bits per byte from per-block
    sums [tokens, CE, KL, agreements, bytes] (`evaluate_models(block_sums=...)`; bits per byte only when every block
    has its bytes), resampling the blocks with replacement."""
    import torch

    rows = [b for b in blocks if b[0] > 0]
    if len(rows) < 2:
        return {}
    x = torch.tensor(rows, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(rows), (resamples, len(rows)), generator=g)
    sums = x[idx].sum(dim=1)  # [R, 4 or 5]
    tokens = sums[:, 0]
    stats = {"ce": sums[:, 1] / tokens, "kl_to_teacher": sums[:, 2] / tokens, "agreement": sums[:, 3] / tokens}
    stats["perplexity"] = stats["ce"].clamp(max=50.0).exp()
    if x.shape[1] > 4 and bool((x[:, 4] > 0).any()):
        stats["bits_per_byte"] = sums[:, 1] / (math.log(2) * sums[:, 4])
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    return {k: (float(torch.quantile(v, q)[0]), float(torch.quantile(v, q)[1])) for k, v in stats.items()}


def summarize_seeds(per_seed: list[dict[str, Any]], blocks: list[list[float]] | None = None) -> dict[str, Any]:
    """An arm over its seeds: {"metrics": means, <RUN_KEYS>: means, "intervals": {key: [low, high]},
    "interval_method": how}. `per_seed` are the run rows (each with its "metrics"); `blocks` the per-block sums of
    the one seed when there is one."""
    n = len(per_seed)
    metric_keys = sorted({k for r in per_seed for k, v in r["metrics"].items() if isinstance(v, int | float)})
    out: dict[str, Any] = {"metrics": {}, "intervals": {}}
    series: dict[str, list[float]] = {}
    for key in metric_keys:
        vals = [float(r["metrics"][key]) for r in per_seed if isinstance(r["metrics"].get(key), int | float)]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            series[key] = vals
            out["metrics"][key] = sum(vals) / len(vals)
    for key in RUN_KEYS:
        vals = [float(r[key]) for r in per_seed if isinstance(r.get(key), int | float)]
        if vals:
            series[key] = vals
            out[key] = sum(vals) / len(vals)
    if n >= 2:
        out["interval_method"] = f"t-interval over {n} seeds"
        for key, vals in series.items():
            if len(vals) >= 2:
                _, lo, hi = t_interval(vals)
                out["intervals"][key] = [lo, hi]
    else:
        boot = bootstrap_blocks(blocks or [])
        out["interval_method"] = (f"one seed: bootstrap over {len(blocks or [])} held-out blocks" if boot
                                  else "one seed: no interval")
        out["intervals"] = {k: list(v) for k, v in boot.items() if k in out["metrics"]}
    for key in EXACT_KEYS:
        if key in series and len(set(series[key])) == 1:
            out["intervals"][key] = [series[key][0], series[key][0]]
    return out


def interval(arm: dict[str, Any], key: str) -> tuple[float, float] | None:
    """The arm's 95 % interval of a metric, None where it has none."""
    iv = (arm.get("intervals") or {}).get(key)
    return (float(iv[0]), float(iv[1])) if iv is not None else None


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    path: Path


def value(arm: dict[str, Any], key: str) -> float | None:
    """A metric of an arm, from its scored metrics or its run record; None where it does not apply."""
    v = (arm.get("metrics") or {}).get(key, arm.get(key))
    if v is None or not isinstance(v, int | float) or (isinstance(v, float) and math.isnan(v)):
        return None
    return float(v)


def scored_arms(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in results["arms"] if a["status"] == "ok" and a.get("metrics")]


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per ranked metric: {"verdict": "winner" | "tie" | "no interval", "best": the arm with the best mean, "arms":
    the winner, or the arms whose intervals overlap the best one's (all arms when one lacks an interval)}.

    A winner is named only when its 95 % interval clears every other arm's (strictly above or below it); a single
    scored arm has no rival to clear. Metrics no arm has are left out. The teacher never competes.
    """
    out: dict[str, dict[str, Any]] = {}
    arms = scored_arms(results)
    for key, _, better, _ in METRICS:
        if not better:
            continue
        vals = [(a, v) for a in arms if (v := value(a, key)) is not None]
        if not vals:
            continue
        best, _ = (min if better == "min" else max)(vals, key=lambda av: av[1])
        others = [a for a, _ in vals if a is not best]
        b_iv = interval(best, key)
        if others and (b_iv is None or any(interval(a, key) is None for a in others)):
            out[key] = {"verdict": "no interval", "best": best["name"], "arms": [a["name"] for a, _ in vals]}
            continue

        overlap = [a["name"] for a in others if not _clears(b_iv, interval(a, key), better)]
        out[key] = ({"verdict": "winner", "best": best["name"], "arms": [best["name"]]} if not overlap else
                    {"verdict": "tie", "best": best["name"], "arms": [best["name"], *overlap]})
    return out


def _clears(best: tuple[float, float] | None, other: tuple[float, float] | None, better: str) -> bool:
    """Whether the best arm's interval lies strictly on the better side of the other's."""
    if best is None or other is None:
        return False
    return best[1] < other[0] if better == "min" else best[0] > other[1]


def winners(results: dict[str, Any]) -> dict[str, list[str]]:
    """The arm per metric whose 95 % interval clears every other arm's; metrics with a tie (or no intervals) are
    left out."""
    return {k: v["arms"] for k, v in verdicts(results).items() if v["verdict"] == "winner"}


def _fmt(v: float | None, fmt: Format) -> str:
    return "—" if v is None else fmt(v)


def _fmt_iv(arm: dict[str, Any], key: str, fmt: Format) -> str:
    """Mean and 95 % interval: "1.23 [1.20, 1.26]"; the mean alone where there is no interval or it is exact."""
    v, iv = value(arm, key), interval(arm, key)
    if v is None or iv is None or iv[0] == iv[1]:
        return _fmt(v, fmt)
    return f"{fmt(v)} [{fmt(iv[0])}, {fmt(iv[1])}]"


def interval_note(results: dict[str, Any]) -> str:
    """How the intervals of the table were made."""
    methods = sorted({str(a["interval_method"]) for a in scored_arms(results) if a.get("interval_method")})
    return "; ".join(methods) or "no interval"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells and a `won` flag per cell, for the arms that ran plus the teacher as a reference row."""
    header = ["arm", "method"] + [h for _, h, _, _ in METRICS]
    win = winners(results)
    rows, flags = [], []
    for arm in results["arms"]:
        if arm["status"] != "ok":
            continue
        rows.append([arm["name"], arm["label"]] + [_fmt_iv(arm, k, f) for k, _, _, f in METRICS])
        flags.append([False, False] + [arm["name"] in win.get(k, []) for k, _, _, _ in METRICS])
    t = results.get("teacher_metrics")
    if t:
        ref = {k: t.get(k) for k in ("perplexity", "bits_per_byte", "ece", "student_tokens_per_s")}
        rows.append(["teacher", f"reference: {results.get('teacher')}"]
                    + [_fmt(ref.get(k), f) if k in ref else "—" for k, _, _, f in METRICS])
        flags.append([False] * len(header))
    return header, rows, flags


def kd_gain_kept(results: dict[str, Any]) -> dict[str, float]:
    """Share of the online-KD improvement over CE (in held-out KL) each arm keeps: (KL_ce - KL_arm) / (KL_ce - KL_soft).

    Empty unless both a `ce` and a `soft` kind arm were scored and soft actually improved on CE.
    """
    arms = scored_arms(results)
    ce = next((value(a, "kl_to_teacher") for a in arms if a["kind"] == "ce"), None)
    soft = next((value(a, "kl_to_teacher") for a in arms if a["kind"] == "soft"), None)
    if ce is None or soft is None or ce - soft <= 0:
        return {}
    out = {}
    for a in arms:
        kl = value(a, "kl_to_teacher")
        if kl is not None:
            out[a["name"]] = (ce - kl) / (ce - soft)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# figures


def read_curves(log_path: str | None) -> dict[str, list[tuple[int, float]]]:
    """{curve key: [(step, value), ...]} for the keys of CURVES, from a run's log.jsonl.

    A co-distillation log names the student's loss `loss_student` (its teacher's is `loss_teacher`); it is read as
    the student's `loss`.
    """
    from lmdistill.train.logging import read_log

    curves: dict[str, list[tuple[int, float]]] = {k: [] for k, _ in CURVES}
    if not log_path or not Path(log_path).is_file():
        return curves
    for row in read_log(log_path):
        for key in curves:
            v = row.get(key, row.get("loss_student") if key == "loss" else None)
            if isinstance(v, int | float) and math.isfinite(v):
                curves[key].append((int(row["step"]), float(v)))
    return curves


def _saved(fig: Any, fig_dir: Path, name: str) -> Path:
    """Write `fig` as `<fig_dir>/<name>.png` and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = fig_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(results: dict[str, Any], fig_dir: Path) -> list[Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig_dir.mkdir(parents=True, exist_ok=True)
    arms = scored_arms(results)
    colors = {a["name"]: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(arms)}
    figures = []

    # 1. learning curves; a star marks the final scoring against the frozen teacher, the same for every arm
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5.2 * len(CURVES), 4.0))
    missing: dict[str, list[str]] = {}
    for ax, (key, title) in zip(axes, CURVES, strict=True):
        for a in arms:
            pts = read_curves(a.get("log"))[key]
            final = value(a, key.removeprefix("eval/")) if key != "loss" else None
            own_ref = key == "eval/kl_to_teacher" and (a.get("kl_reference") or "teacher") != "teacher"
            on_own_data = key != "loss" and bool(a.get("curve_data"))
            notes = ([f"vs {a['kl_reference']}"] if own_ref else []) + (
                [f"on {a['curve_data']}"] if on_own_data else [])
            label = a["name"] + (f" ({'; '.join(notes)})" if notes else "")
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, ms=3, label=label, color=colors[a["name"]],
                        ls="--" if notes else "-")
            else:
                missing.setdefault(title, []).append(a["name"])
            if final is not None and a.get("steps"):
                iv = interval(a, key.removeprefix("eval/")) if key != "loss" else None
                if iv is not None:
                    ax.errorbar([a["steps"]], [final], yerr=[[final - iv[0]], [iv[1] - final]], fmt="none",
                                ecolor=colors[a["name"]], capsize=3, zorder=3)
                ax.scatter([a["steps"]], [final], marker="*", s=90, color=colors[a["name"]], zorder=4,
                           edgecolors="black", linewidths=0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        if key != "loss":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            lo, hi = ax.get_ylim()
            # over a decade or less the minor ticks carry the only labels; over more they would overprint
            if hi / max(lo, 1e-300) <= 12:
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = _saved(fig, fig_dir, "learning_curves")
    note = " ".join(f"No {t} was logged by: {', '.join(n)}." for t, n in missing.items())
    refs = sorted({f"{a['name']}: {a['kl_reference']}" for a in arms
                   if a.get("kl_reference") not in (None, "teacher")})
    own_data = sorted(f"{a['name']}: {a['curve_data']}" for a in arms if a.get("curve_data"))
    figures.append(Figure(
        "learning_curves", "Learning curves",
        "Per arm, against optimizer steps: the training loss (each arm's own objective, so levels differ by method), "
        "and the held-out KL to the teacher and perplexity logged every train.eval_every steps. Stars: the final "
        "scoring of every student against the frozen teacher on the same blocks (with several seeds: the curves "
        "of the first seed, the stars the mean over seeds), with its 95 % interval."
        + (f" Dashed KL curves are logged against another reference ({'; '.join(refs)})." if refs else "")
        + (f" Dashed held-out curves of some arms are logged on their own held-out data, not the shared blocks "
           f"({'; '.join(own_data)}); their stars are on the shared blocks." if own_data else "")
        + (f" {note}" if note else ""), path))

    # 2. storage vs quality
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0))
    for ax, key, label in ((axes[0], "kl_to_teacher", "held-out KL(teacher ‖ student)"),
                           (axes[1], "perplexity", "held-out perplexity")):
        for a in arms:
            x, y = value(a, "teacher_bytes_per_token"), value(a, key)
            if x is None or y is None:
                continue
            iv = interval(a, key)
            if iv is not None:
                ax.errorbar([x], [y], yerr=[[y - iv[0]], [iv[1] - y]], fmt="none", ecolor=colors[a["name"]],
                            capsize=3, zorder=2)
            ax.scatter([x], [y], s=60, color=colors[a["name"]], zorder=3)
            ax.annotate(a["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("teacher data per token (bytes, symlog)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    t = results.get("teacher_metrics") or {}
    if t.get("perplexity"):
        axes[1].axhline(t["perplexity"], color="gray", ls="--", lw=1, label="teacher")
        axes[1].legend(fontsize=8)
    fig.suptitle("storage vs quality: lower-left is better", fontsize=10)
    path = _saved(fig, fig_dir, "storage_vs_quality")
    figures.append(Figure("storage_vs_quality", "Storage vs quality",
                          "Each trained arm at its teacher bytes per token (0 for CE, V x 4 for a dense online "
                          "teacher) against its final held-out KL to the teacher and perplexity; bars: 95 % "
                          "intervals.", path))

    # 3. final metrics
    keys = [("perplexity", "perplexity ↓"), ("kl_to_teacher", "KL to teacher ↓"), ("agreement", "agreement ↑"),
            ("ece", "ECE ↓")]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.6))
    names = [a["name"] for a in arms]
    for ax, (key, label) in zip(axes, keys, strict=True):
        vals = [value(a, key) for a in arms]
        ivs = [interval(a, key) if v is not None else None for a, v in zip(arms, vals, strict=True)]
        err = [[(v - iv[0]) if v is not None and iv else 0.0 for v, iv in zip(vals, ivs, strict=True)],
               [(iv[1] - v) if v is not None and iv else 0.0 for v, iv in zip(vals, ivs, strict=True)]]
        ax.bar(range(len(arms)), [v if v is not None else 0 for v in vals], color=[colors[n] for n in names],
               yerr=err if any(ivs) else None, capsize=4, ecolor="black")
        ax.set_xticks(range(len(arms)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    path = _saved(fig, fig_dir, "final_metrics")
    figures.append(Figure("final_metrics", "Final held-out metrics",
                          "The students after the same number of steps, scored on the same held-out blocks: the "
                          f"mean and its 95 % interval ({interval_note(results)}).", path))
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# markdown and HTML


def _terms_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in (results.get("equal_terms") or {}).items()]


def _winner_lines(results: dict[str, Any]) -> list[tuple[str, str]]:
    ver = verdicts(results)
    by = {a["name"]: a for a in scored_arms(results)}
    out = []
    for key, header, better, fmt in METRICS:
        if key not in ver:
            continue
        v, direction = ver[key], "lower" if better == "min" else "higher"
        best = f"{v['best']} {_fmt_iv(by[v['best']], key, fmt)}"
        if v["verdict"] == "winner":
            text = f"{v['best']} ({_fmt_iv(by[v['best']], key, fmt)}, {direction} is better; its 95 % interval " \
                   "clears every other arm's)"
        elif v["verdict"] == "tie":
            text = f"tie: {', '.join(v['arms'])} (their 95 % intervals overlap; best mean {best}, {direction} is better)"
        else:
            text = (f"tie: {'one seed: no interval' if len(results.get('seeds') or [0]) < 2 else 'no interval'}, "
                    f"no winner named (best mean {best}, {direction} is better)")
        out.append((header, text))
    return out


def _cost_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in results["arms"]:
        if a["status"] != "ok":
            continue
        rows.append([a["name"], _fmt(value(a, "prepare_s"), _ONE), _fmt(value(a, "train_s"), _ONE),
                     _fmt(value(a, "train_target_tokens"), _INT), _fmt(value(a, "train_tokens_per_s"), _INT), _fmt(value(a, "peak_memory_mb"), _INT),
                     _fmt(value(a, "prepare_peak_memory_mb"), _INT), a.get("bytes_note") or ""])
    return rows


# "target tokens in train split": an arm that trains on other text than the shared split (hard_sequence: the
# teacher's answers) can have far fewer, which the quality columns alone would hide
COST_HEADER = ["arm", "teacher prep (s)", "training (s)", "target tokens in train split", "train tokens/s",
               "train peak memory (MB)", "prep peak memory (MB)", "teacher data"]


def _not_run(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in results["arms"] if a["status"] != "ok"]


def _md_table(header: list[str], rows: list[list[str]], bold: list[list[bool]] | None = None) -> str:
    def cell(text: str, b: bool) -> str:
        text = text.replace("|", "\\|").replace("\n", " ")
        return f"**{text}**" if b and text != "—" else text

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    for i, row in enumerate(rows):
        flags = bold[i] if bold else [False] * len(row)
        lines.append("| " + " | ".join(cell(c, f) for c, f in zip(row, flags, strict=True)) + " |")
    return "\n".join(lines)


def render_markdown(results: dict[str, Any], figures: list[Figure], fig_rel: str = "figures") -> str:
    header, rows, flags = table_rows(results)
    out = [f"# {results['title']}", "",
           f"{results.get('created', '')} on {results.get('device', 'cpu')}; total {results.get('total_wall_s', '?')} s. "
           f"Cells: mean [95 % interval] ({interval_note(results)}). Bold: the arm whose interval clears every other "
           "arm's on that metric.", "", "## Equal terms", ""]
    out += [f"- **{k}**: {v}" for k, v in _terms_lines(results)]
    out += ["", "## Results", "", _md_table(header, rows, flags), ""]
    if results.get("eval_blocks"):
        out += [f"Held-out metrics over {results['eval_blocks']} blocks the students never trained on. "
                f"Peak memory: {_memory_method(results)}.", ""]
    skipped = _not_run(results)
    if skipped:
        out += ["### Arms not run", ""]
        out += [f"- **{a['name']}** ({a['kind']}): {a['status'].upper()}: {a['reason']}" for a in skipped]
        out += [""]
    out += ["## Which arm won", ""]
    out += [f"- **{k}**: {v}" for k, v in _winner_lines(results)] or ["- no arm was scored"]
    gain = kd_gain_kept(results)
    if gain:
        out += ["", "Share of the online-KD gain over CE (held-out KL) each arm keeps: "
                + ", ".join(f"{n} {g:.0%}" for n, g in gain.items()) + "."]
    out += ["", "## Cost", "", _md_table(COST_HEADER, _cost_rows(results)), "", "## Figures", ""]
    for f in figures:
        out += [f"### {f.title}", "", f"![{f.title}]({fig_rel}/{f.path.name})", "", f.caption, ""]
    out += _md_generations(results)
    return "\n".join(out) + "\n"


def _memory_method(results: dict[str, Any]) -> str:
    methods = {a.get("memory_method") for a in results["arms"] if a.get("memory_method")}
    return "; ".join(sorted(m for m in methods if m)) or "not measured"


def _md_generations(results: dict[str, Any]) -> list[str]:
    gens = results.get("generations") or []
    if not gens:
        return []
    out = ["## Generations side by side", ""]
    for i, g in enumerate(gens, 1):
        out += [f"### Prompt {i}", "", "```", g["prompt"], "```", ""]
        rows = [[name, o["greedy"]["text"], o["sampled"]["text"]] for name, o in g["outputs"].items()]
        out += [_md_table(["model", "greedy", "sampled"], rows), ""]
    return out


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.88rem}
th,td{border:1px solid #ccc;padding:.3rem .55rem;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.l,th.l{text-align:left}td.win{font-weight:700;background:#e6f4ea}
tr.ref td{color:#666;font-style:italic}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.85rem}
pre{background:#f7f7f7;padding:.5rem;white-space:pre-wrap}.skip{color:#a33}.gen td{text-align:left;max-width:30rem}
"""


def _html_table(header: list[str], rows: list[list[str]], flags: list[list[bool]] | None = None,
                left_cols: int = 1, cls: str = "", ref_names: tuple[str, ...] = (), left_last: bool = False) -> str:
    e = html.escape
    n = len(header)

    def left(j: int) -> bool:
        return j < left_cols or (left_last and j == n - 1)

    parts = [f'<table class="{cls}">' if cls else "<table>", "<thead><tr>"]
    parts += [f'<th class="l">{e(h)}</th>' if left(j) else f"<th>{e(h)}</th>" for j, h in enumerate(header)]
    parts.append("</tr></thead><tbody>")
    for i, row in enumerate(rows):
        parts.append('<tr class="ref">' if row[0] in ref_names else "<tr>")
        for j, c in enumerate(row):
            classes = (["l"] if left(j) else []) + (["win"] if flags and flags[i][j] else [])
            attr = f' class="{" ".join(classes)}"' if classes else ""
            parts.append(f"<td{attr}>{e(c)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def render_html(results: dict[str, Any], figures: list[Figure]) -> str:
    e = html.escape
    header, rows, flags = table_rows(results)
    body = [f"<h1>{e(results['title'])}</h1>",
            f"<p>{e(str(results.get('created', '')))} on {e(str(results.get('device', 'cpu')))}; total "
            f"{e(str(results.get('total_wall_s', '?')))} s. Cells: mean [95 % interval] "
            f"({e(interval_note(results))}). Highlighted: the arm whose interval clears every other arm's on that "
            "metric.</p>",
            "<h2>Equal terms</h2><ul>"]
    body += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _terms_lines(results)]
    body += ["</ul>", "<h2>Results</h2>",
             _html_table(header, rows, flags, left_cols=2, cls="results", ref_names=("teacher",))]
    if results.get("eval_blocks"):
        body.append(f"<p>Held-out metrics over {results['eval_blocks']} blocks the students never trained on. "
                    f"Peak memory: {e(_memory_method(results))}.</p>")
    skipped = _not_run(results)
    if skipped:
        body.append('<h3>Arms not run</h3><ul class="skipped">')
        body += [f'<li class="skip"><b>{e(a["name"])}</b> ({e(a["kind"])}): {e(a["status"].upper())}: '
                 f'{e(str(a["reason"]))}</li>' for a in skipped]
        body.append("</ul>")
    body.append('<h2>Which arm won</h2><ul class="winners">')
    body += [f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in _winner_lines(results)] or ["<li>no arm was scored</li>"]
    body.append("</ul>")
    gain = kd_gain_kept(results)
    if gain:
        body.append("<p>Share of the online-KD gain over CE (held-out KL) each arm keeps: "
                    + e(", ".join(f"{n} {g:.0%}" for n, g in gain.items())) + ".</p>")
    body += ["<h2>Cost</h2>", _html_table(COST_HEADER, _cost_rows(results), cls="cost", left_last=True),
             "<h2>Figures</h2>"]
    for f in figures:
        data = base64.b64encode(f.path.read_bytes()).decode("ascii")
        body.append(f'<figure id="fig-{e(f.name)}"><h3>{e(f.title)}</h3>'
                    f'<img alt="{e(f.title)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{e(f.caption)}</figcaption></figure>")
    gens = results.get("generations") or []
    if gens:
        body.append("<h2>Generations side by side</h2>")
        for i, g in enumerate(gens, 1):
            gen_rows = [[name, o["greedy"]["text"], o["sampled"]["text"]] for name, o in g["outputs"].items()]
            body += [f"<h3>Prompt {i}</h3><pre>{e(g['prompt'])}</pre>",
                     _html_table(["model", "greedy", "sampled"], gen_rows, left_cols=3, cls="gen",
                                 ref_names=("teacher",))]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(results['title'])}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md (+ figures/), self-contained report.html and results.json; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = make_figures(results, out / "figures") if scored_arms(results) else []
    results = {**results, "winners": winners(results), "verdicts": verdicts(results),
               "kd_gain_kept": kd_gain_kept(results)}
    paths = {"markdown": out / "report.md", "html": out / "report.html", "results": out / "results.json"}
    write_text(paths["markdown"], render_markdown(results, figures), "comparison report")
    write_text(paths["html"], render_html(results, figures), "comparison report")
    write_text(paths["results"], json.dumps(results, indent=2, default=str), "comparison results")
    return paths


def console_table(results: dict[str, Any]) -> str:
    """The results table as plain aligned text, for the terminal."""
    header, rows, _ = table_rows(results)
    header = [h for i, h in enumerate(header) if i != 1]  # the method description is long; the report has it
    rows = [[c for i, c in enumerate(r) if i != 1] for r in rows]
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if j == 0 else h.rjust(w) for j, (h, w) in enumerate(zip(header, widths,
                                                                                          strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths,
                                                                                               strict=True))))
    for a in _not_run(results):
        lines.append(f"{a['name']}: {a['status'].upper()}: {a['reason']}")
    return "\n".join(lines)
