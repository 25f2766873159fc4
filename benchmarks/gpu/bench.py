"""The GPU check's benchmark (issue #14, steps 2-5) and the results file of the whole check.

    python benchmarks/gpu/bench.py --out DIR                 # CUDA: the sizes below, within --budget-s seconds
    python benchmarks/gpu/bench.py --out DIR --dry-run       # CPU, tiny shapes, torch path only (the format)
    python benchmarks/gpu/bench.py --render DIR [--copy-to benchmarks/results]   # results file from what ran

`benchmarks/gpu/check.sh` runs it after `pytest -m gpu`; read that script first. Sections (every number of a table is
measured in the same run, so the ratios are ratios of this machine's numbers):

- step 2, ``loss``: one loss forward + backward from hidden states (bf16, V = 151,936, Hs = 896, Ht = 1536,
  N = 4k, 16k, 64k tokens; forward KL and JSD(0.5)): lmdistill's torch and Triton paths, TRL 1.16's chunked
  divergence, Liger 0.8.5's fused linear JSD, and the naive reference on materialised logits where it fits. The
  variants are those of ``benchmarks/fused_loss.py``.
- step 3, ``sparse``: the sparse loss a cache trains with (top-32 + tail, with and without the folded CE) and
  lmdistill's chunked CE against Liger's fused linear cross-entropy (the hard-label loss of the same shape) and
  naive CE.
- step 4, ``step``: one optimizer step of online soft KD (forward KL, alpha 0.9) with a randomly initialised
  Qwen2.5-0.5B-shaped student and 1.5B-shaped teacher (bf16, AdamW, 4 x 2048 tokens) through
  ``lmdistill.recipes.soft.soft_step_loss``, against an HF SFT step of the same student and a KD step whose loss is
  Liger's fused linear JSD (same objective: 0.9 forward KL + 0.1 CE). Variants run one after another, each with its
  own student and optimizer, so the peak is that variant's whole footprint (teacher included for KD).
- step 5, ``label``: ``lmdistill label``'s path (the teacher forward, log-softmax, top-32 + tail, fp16 values, shards
  written by ``CacheWriter``) against the teacher forward alone over the same blocks.

Each row catches its own failure (CUDA OOM included) and the table says what happened. Results go to
``DIR/results.json`` after every row and ``DIR/gpu-<date>-<device>.md`` is rendered from it each time, so a run cut
short still leaves its tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE.parent))

from _measure import cpu_peak_bytes, cuda_peak_bytes, median_seconds  # noqa: E402
from fused_loss import bf16_tflops, import_trl_chunked_divergence, make_inputs  # noqa: E402
from fused_loss import variants as loss_variants  # noqa: E402
from kd_step import SHAPES  # noqa: E402
from kd_step import build as build_model  # noqa: E402

from lmdistill.losses import Head, SparseTargets, fused_loss  # noqa: E402
from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count  # noqa: E402

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------------
# Issue #14's figures. ANCHORS: (section, *group, variant) -> the figure the issue quotes from an earlier H100 run of
# the same shapes, shown beside the measured row. TARGETS: what the issue asks of the numbers (same run, same device).
ISSUE_FIGURES = True
ANCHORS: dict[tuple, str] = {
    ("loss", "forward_kl", 16384, "naive"): "152 ms, 65 GiB",
    ("loss", "forward_kl", 16384, "trl"): "77.4 ms, 2.1 GiB",
    ("loss", "forward_kl", 16384, "liger"): "60.2 ms, 1.7 GiB",
    ("loss", "jsd", 16384, "trl"): "106.5 ms, 2.1 GiB",
    ("loss", "jsd", 16384, "liger"): "87.4 ms, 2.6 GiB",
    ("loss", "forward_kl", 65536, "trl"): "315 ms, 2.3 GiB",
    ("loss", "forward_kl", 65536, "liger"): "229 ms, 1.8 GiB",
    ("step", "hf_sft"): "58.3k tok/s, 32.5 GiB",
    ("step", "liger_kd"): "44.9k tok/s, 18.0 GiB",
}


@dataclass(frozen=True)
class Target:
    text: str
    section: str  # "pytest" or a section of the benchmark
    variant: str = ""
    metric: str = ""  # a row field: "ms", "peak", "tok_s", "floor" (time over the matmul floor)
    ref: str = ""  # the variant of the same group it is compared with; "" compares the metric with `factor` itself
    factor: float = 1.0  # met when metric <= factor * ref's (>= when higher_is_better)
    higher_is_better: bool = False
    n: int | None = None  # only rows of this N (loss sections)


TARGETS = [
    Target("every `pytest -m gpu` test passes", "pytest"),
    Target("N=16,384: triton loss >= 1.3x faster than Liger (both divergences)", "loss", "ours_triton", "ms", "liger",
           1 / 1.3, n=16384),  # fmt: skip
    Target("N=16,384: triton loss peak memory <= Liger's", "loss", "ours_triton", "peak", "liger", n=16384),
    Target("N=16,384: triton loss within 1.5x of the matmul floor", "loss", "ours_triton", "floor", "", 1.5, n=16384),
    Target("sparse loss faster than Liger's fused linear CE", "sparse", "lmdistill_sparse_ce", "ms", "liger_flce"),
    Target("KD step: >= 1.5x the Liger-based KD step's tokens/s", "step", "lmdistill_kd_triton", "tok_s", "liger_kd",
           1.5, True),  # fmt: skip
    Target("KD step: peak <= 18 GiB", "step", "lmdistill_kd_triton", "peak", "", 18 * 2**30),
    Target("labelling >= 90% of the teacher's forward-only throughput", "label", "label", "tok_s", "forward", 0.9,
           True),  # fmt: skip
]

# The sections in the order they run, and each one's share of the benchmark's time budget (rows past a section's
# deadline are recorded as "skipped: time budget", so a slow section cannot starve the ones after it).
SECTIONS = ("loss", "sparse", "step", "label")
BUDGET_SHARE = {"loss": 0.45, "sparse": 0.15, "step": 0.25, "label": 0.15}
# Issue #14's shapes: Qwen2.5-0.5B student / 1.5B teacher widths, V = 151,936, bf16.
FULL: dict[str, dict[str, Any]] = {
    "loss": {"dtype": "bfloat16", "vocab": 151936, "hs": 896, "ht": 1536, "n": [4096, 16384, 65536],
             "kinds": ["forward_kl", "jsd"], "reps": 5},
    "sparse": {"dtype": "bfloat16", "vocab": 151936, "hs": 896, "k": 32, "n": [4096, 16384, 65536], "reps": 5},
    "step": {"shape": SHAPES["gpu"], "reps": 5},
    "label": {"blocks": 64, "seq": 2048, "batch": 4, "k": 32, "shard_blocks": 16, "reps": 3},
}
# --dry-run: tiny shapes on CPU, the torch path only; checks the plumbing, measures nothing worth reporting.
DRY: dict[str, dict[str, Any]] = {
    "loss": {"dtype": "float32", "vocab": 2048, "hs": 32, "ht": 48, "n": [256], "kinds": ["forward_kl", "jsd"],
             "reps": 2},
    "sparse": {"dtype": "float32", "vocab": 2048, "hs": 32, "k": 8, "n": [256], "reps": 2},
    "step": {"shape": SHAPES["cpu"], "reps": 2},
    "label": {"blocks": 8, "seq": 64, "batch": 4, "k": 8, "shard_blocks": 4, "reps": 2},
}

LABELS = {
    "naive": "naive (full logits)", "ours": "lmdistill torch", "ours_triton": "lmdistill triton",
    "trl": "TRL chunked", "liger": "Liger FL-JSD", "liger_flce": "Liger FL-CE", "naive_ce": "naive CE",
    "lmdistill_ce": "lmdistill chunked CE", "lmdistill_sparse": "lmdistill sparse top-k",
    "lmdistill_sparse_ce": "lmdistill sparse top-k + CE", "hf_sft": "HF SFT", "lmdistill_kd": "lmdistill KD (torch)",
    "lmdistill_kd_triton": "lmdistill KD (triton)", "lmdistill_kd_naive": "lmdistill KD (naive logits)",
    "liger_kd": "Liger KD (FL-JSD)", "forward": "teacher forward only", "label": "lmdistill label (top-k + tail)",
}  # fmt: skip
# the module each optional variant needs
NEEDS = {"ours_triton": "triton", "trl": "trl", "liger": "liger_kernel", "liger_flce": "liger_kernel",
         "lmdistill_kd_triton": "triton", "liger_kd": "liger_kernel"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# measuring


def failure(e: BaseException) -> str:
    """What a table says about a row that raised (the traceback goes to the log)."""
    traceback.print_exception(e, file=sys.stderr)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "OOM"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"error: {type(e).__name__}: {first[:100]}"


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def missing(name: str, cuda: bool) -> str:
    """Why an optional variant has no row: no CUDA, the package is absent, or its import failed."""
    if not cuda:
        return "skipped: no CUDA"
    module = NEEDS.get(name, "")
    if module and importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        if module == "trl":
            import_trl_chunked_divergence()
        elif module == "liger_kernel":
            import liger_kernel.chunked_loss  # noqa: F401
            import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return "import failed: " + failure(e)
    return "not available"


def liger(cls: str) -> Any:
    """A Liger 0.8.5 loss class by name (LigerFusedLinearJSDLoss, LigerFusedLinearCrossEntropyLoss)."""
    if cls == "LigerFusedLinearJSDLoss":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        return LigerFusedLinearJSDLoss
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss


def run_group(fns: dict[str, Callable[[], Any]], cuda: bool, reps: int, deadline: float) -> dict[str, dict]:
    """Warm up each function (compile, autotune), measure its peak memory alone, then time the ones that ran,
    interleaved run by run. Returns name -> {status, ms, peak, value}; a failure stays in its own row."""
    out: dict[str, dict] = {}
    for name, fn in fns.items():
        if time.monotonic() > deadline:
            out[name] = {"status": "skipped: time budget"}
            continue
        try:
            value = fn()
            peak = cuda_peak_bytes(fn) if cuda else cpu_peak_bytes(fn)
            out[name] = {"status": "ok", "peak": peak, "value": None if value is None else float(value)}
        except Exception as e:  # noqa: BLE001 - OOM or a library's failure: recorded in the row
            out[name] = {"status": failure(e)}
        finally:
            free(cuda)
    ok = {n: fns[n] for n, r in out.items() if r["status"] == "ok"}
    if not ok:
        return out
    if time.monotonic() > deadline:
        for n in ok:
            out[n]["status"] = "skipped: time budget (untimed)"
        return out
    try:
        times = median_seconds(ok, reps=reps, warmup=0, cuda=cuda)
    except Exception:  # noqa: BLE001 - time them one by one, so one failure does not lose the others
        times = {}
        for n, fn in ok.items():
            try:
                times.update(median_seconds({n: fn}, reps=reps, warmup=0, cuda=cuda))
            except Exception as e:  # noqa: BLE001
                out[n]["status"] = failure(e)
            free(cuda)
    for n, sec in times.items():
        out[n]["ms"] = sec * 1e3
    return out


# ----------------------------------------------------------------------------------------------------------------
# the sections


class Bench:
    def __init__(self, out_dir: Path, dry_run: bool, budget_s: float, sections: list[str]) -> None:
        self.out_dir, self.dry_run, self.sections = out_dir, dry_run, sections
        self.cuda = torch.cuda.is_available() and not dry_run
        self.device = "cuda" if self.cuda else "cpu"
        self.sizes = DRY if dry_run else FULL
        self.t0, self.budget = time.monotonic(), budget_s
        self._teacher: torch.nn.Module | None = None
        self._n_student = 0
        self.results: dict[str, Any] = {"meta": {**environment(self.cuda, dry_run), "budget_s": budget_s},
                                        "sections": {}}
        self._write()  # a results.json of an earlier run never stands in for this one's

    def _write(self) -> None:
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=1))
        render(self.out_dir)

    def deadline(self, section: str) -> float:
        share = sum(BUDGET_SHARE[s] for s in SECTIONS[: SECTIONS.index(section) + 1] if s in self.sections)
        total = sum(BUDGET_SHARE[s] for s in self.sections)
        return self.t0 + self.budget * share / total

    def save(self, name: str, section: dict) -> None:
        self.results["sections"][name] = section
        self._write()

    def teacher(self, shape: dict) -> torch.nn.Module:
        if self._teacher is None:
            dtype = getattr(torch, shape["dtype"])
            self._teacher = build_model(shape, "teacher", dtype, self.device, seed=1).eval().requires_grad_(False)
        return self._teacher

    def run(self) -> None:
        for name in self.sections:
            print(f"== {name}", file=sys.stderr, flush=True)
            section: dict[str, Any] = {"rows": [], "notes": []}
            try:
                getattr(self, f"section_{name}")(self.sizes[name], self.deadline(name), section, name)
            except Exception as e:  # noqa: BLE001 - a section that cannot run at all (e.g. its models fail to build)
                section["notes"].append(f"section failed: {failure(e)}")
            self.save(name, section)
            free(self.cuda)

    # -- step 2 ---------------------------------------------------------------------------------------------------
    def section_loss(self, cfg: dict, deadline: float, section: dict, name: str) -> None:
        dtype = getattr(torch, cfg["dtype"])
        v, hs, ht = cfg["vocab"], cfg["hs"], cfg["ht"]
        rate = bf16_tflops(max(cfg["n"]), v, hs) if self.cuda else None
        section["config"] = (f"{cfg['dtype']}, V={v:,}, Hs={hs}, Ht={ht}, forward + backward, median of {cfg['reps']}"
                             + (f", bf16 GEMM {rate:.0f} TFLOP/s" if rate else ""))  # fmt: skip
        if rate:
            section["notes"].append("x floor: time over the matmul floor 2 N V (3 Hs + Ht) FLOPs at the bf16 GEMM "
                                    "rate measured at the start of the run")  # fmt: skip
        section["notes"].append("agree: relative difference of the loss value to naive's (to lmdistill torch's where "
                                "naive did not run)")  # fmt: skip
        order = ["naive", "ours", "ours_triton", "trl", "liger"]
        for kind in cfg["kinds"]:
            for n in cfg["n"]:
                if time.monotonic() > deadline:
                    res = {variant: {"status": "skipped: time budget"} for variant in order}
                else:
                    x = make_inputs(n, v, hs, ht, dtype, self.device)
                    fns = loss_variants(x, kind, chunk_size=None)
                    res = {}
                    # the naive reference's fp32 logits, log-probs and gradients take >= 24 bytes per logit
                    need = 24 * n * v
                    if self.cuda and need > 2 * torch.cuda.get_device_properties(0).total_memory:
                        res["naive"] = {"status": f"skipped: needs ~{need / 2**30:.0f} GiB"}
                        del fns["naive"]
                    res.update(run_group(fns, self.cuda, cfg["reps"], deadline))
                    del x, fns
                    free(self.cuda)
                ref = res.get("naive", {}).get("value") or res.get("ours", {}).get("value")
                for variant in order:
                    r = res.get(variant) or {"status": missing(variant, self.cuda)}
                    row = {"kind": kind, "n": n, "variant": variant, **r}
                    if rate and "ms" in r:
                        row["floor"] = r["ms"] / 1e3 / (2 * n * v * (3 * hs + ht) / (rate * 1e12))
                    if ref and r.get("value") is not None:
                        row["agree"] = abs(r["value"] - ref) / max(abs(ref), 1e-12)
                    section["rows"].append(row)
                    print("  ", row, file=sys.stderr, flush=True)
                self.save(name, section)

    # -- step 3 ---------------------------------------------------------------------------------------------------
    def section_sparse(self, cfg: dict, deadline: float, section: dict, name: str) -> None:
        dtype = getattr(torch, cfg["dtype"])
        v, h, k = cfg["vocab"], cfg["hs"], cfg["k"]
        section["config"] = (f"{cfg['dtype']}, V={v:,}, H={h}, top-{k} + tail targets, forward + backward, median of "
                             f"{cfg['reps']}")  # fmt: skip
        section["notes"].append("Liger FL-CE, naive CE and lmdistill chunked CE score the one label per token; the "
                                "sparse rows score the teacher's top-k + tail (forward KL), + CE with alpha 0.9")
        order = ["liger_flce", "naive_ce", "lmdistill_ce", "lmdistill_sparse", "lmdistill_sparse_ce"]
        for n in cfg["n"]:
            if time.monotonic() > deadline:
                res = {variant: {"status": "skipped: time budget"} for variant in order}
            else:
                fns, res = self._sparse_variants(n, v, h, k, dtype)
                res.update(run_group(fns, self.cuda, cfg["reps"], deadline))
                del fns
                free(self.cuda)
            for variant in order:
                r = res.get(variant) or {"status": missing(variant, self.cuda)}
                section["rows"].append({"n": n, "variant": variant, **r})
            self.save(name, section)

    def _sparse_variants(self, n: int, v: int, h: int, k: int, dtype: torch.dtype) -> tuple[dict, dict]:
        g = torch.Generator(device=self.device).manual_seed(0)
        dev = self.device
        hs = torch.randn(n, h, generator=g, device=dev).to(dtype).requires_grad_()
        ws = (torch.randn(v, h, generator=g, device=dev) * 2 / math.sqrt(h)).to(dtype).requires_grad_()
        labels = torch.randint(0, v, (n,), generator=g, device=dev)
        # k distinct ids per token (a random start, then every v // k-th id) and a proper distribution over them + tail
        ids = (torch.randint(0, v, (n, 1), generator=g, device=dev) + torch.arange(k, device=dev) * (v // k)) % v
        lp = torch.log_softmax(torch.randn(n, k + 1, generator=g, device=dev) * 2, dim=-1)
        targets = SparseTargets(ids=ids, logprobs=lp[:, :k].contiguous(), tail_logprob=lp[:, k].contiguous())

        def clear() -> None:
            hs.grad = ws.grad = None

        def backward(loss: torch.Tensor) -> torch.Tensor:
            loss.backward()
            return loss.detach()

        def naive_ce() -> torch.Tensor:
            clear()
            return backward(torch.nn.functional.cross_entropy((hs @ ws.t()).float(), labels))

        def lmdistill_ce() -> torch.Tensor:
            clear()
            total, count = chunked_ce_sum_and_count(hs, Head(ws), labels)
            return backward(total / count)

        def sparse(with_ce: bool) -> torch.Tensor:
            clear()
            kw: dict[str, Any] = {"labels": labels, "alpha": 0.9} if with_ce else {}
            sums = fused_loss(hs, Head(ws), sparse=targets, **kw)
            return backward(sums.total / sums.tokens)

        fns: dict[str, Callable[[], Any]] = {}
        res: dict[str, dict] = {}
        if self.cuda and importlib.util.find_spec("liger_kernel") is not None:
            try:
                flce = liger("LigerFusedLinearCrossEntropyLoss")()  # mean over the labelled tokens

                def liger_flce() -> torch.Tensor:
                    clear()
                    return backward(flce(ws, hs, labels))  # Liger 0.8.5: forward(lin_weight, _input, target)

                fns["liger_flce"] = liger_flce
            except Exception as e:  # noqa: BLE001
                res["liger_flce"] = {"status": "import failed: " + failure(e)}
        need = 14 * n * v  # bf16 logits, their fp32 copy, log-probs and gradient
        if self.cuda and need > 2 * torch.cuda.get_device_properties(0).total_memory:
            res["naive_ce"] = {"status": f"skipped: needs ~{need / 2**30:.0f} GiB"}
        else:
            fns["naive_ce"] = naive_ce
        fns["lmdistill_ce"] = lmdistill_ce
        fns["lmdistill_sparse"] = lambda: sparse(False)
        fns["lmdistill_sparse_ce"] = lambda: sparse(True)
        return fns, res

    # -- step 4 ---------------------------------------------------------------------------------------------------
    def section_step(self, cfg: dict, deadline: float, section: dict, name: str) -> None:
        from lmdistill.config import LossConfig
        from lmdistill.models import decoder_hidden, lm_head
        from lmdistill.recipes.soft import soft_step_loss
        from lmdistill.teachers import HFTeacher

        shape, cuda, dev = cfg["shape"], self.cuda, self.device
        dtype = getattr(torch, shape["dtype"])
        b, t, v = shape["batch"], shape["seq"], shape["vocab"]
        s, te = shape["student"], shape["teacher"]
        section["config"] = (f"{shape['dtype']}, {b} x {t} tokens, V={v:,}, student {s['hidden_size']}x"
                             f"{s['num_hidden_layers']}, teacher {te['hidden_size']}x{te['num_hidden_layers']}, "
                             f"AdamW, forward KL alpha 0.9, median of {cfg['reps']} steps after a warm-up "
                             "step")  # fmt: skip
        section["notes"].append("peak: max_memory_allocated over the timed steps (weights, gradients, optimizer "
                                "state, activations; the teacher's weights for the KD rows)" if cuda else
                                "peak (CPU): extra resident memory of one step, without the weights")  # fmt: skip
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, v, (b, t), generator=g).to(dev)
        labels = ids.roll(-1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
        n_tokens = (labels != IGNORE_INDEX).sum()

        def make_loss(variant: str, student: torch.nn.Module) -> Callable[[], torch.Tensor]:
            if variant == "hf_sft":
                return lambda: student(input_ids=ids, labels=ids).loss
            teacher = self.teacher(shape)
            if variant.startswith("lmdistill"):
                fused = variant != "lmdistill_kd_naive"
                loss_cfg = LossConfig(kind="forward_kl", alpha=0.9, fused=fused,
                                      backend="triton" if variant.endswith("triton") else "torch")  # fmt: skip
                hf_teacher = HFTeacher(teacher, v)

                def lmdistill_loss() -> torch.Tensor:
                    targets = hf_teacher.targets(batch) if fused else hf_teacher.logits(batch)
                    return soft_step_loss(student, batch, targets, loss_cfg, v).loss_sum / n_tokens

                return lmdistill_loss
            jsd = liger("LigerFusedLinearJSDLoss")(weight_hard_loss=0.1, weight_soft_loss=0.9, beta=0.0)
            s_head, t_head = lm_head(student, v), lm_head(teacher, v)

            def liger_loss() -> torch.Tensor:
                h_s = decoder_hidden(student, ids, batch["attention_mask"])
                with torch.no_grad():
                    h_t = decoder_hidden(teacher, ids, batch["attention_mask"])
                return jsd(h_s.reshape(-1, h_s.shape[-1]), s_head.weight, h_t.reshape(-1, h_t.shape[-1]),
                           t_head.weight, labels.reshape(-1))  # fmt: skip

            return liger_loss

        order = ["hf_sft", "lmdistill_kd", "lmdistill_kd_triton", "lmdistill_kd_naive", "liger_kd"]
        for variant in order:  # hf_sft first: it runs before the teacher is built, so its peak has no teacher in it
            if variant in NEEDS and (not cuda or importlib.util.find_spec(NEEDS[variant]) is None):
                r: dict[str, Any] = {"status": missing(variant, cuda)}
            elif time.monotonic() > deadline:
                r = {"status": "skipped: time budget"}
            else:
                r = self._time_step(shape, dtype, cfg["reps"], make_loss, variant)
            if "ms" in r:
                r["tok_s"] = b * t / (r["ms"] / 1e3)
            section["rows"].append({"variant": variant, **r})
            print("  ", section["rows"][-1], file=sys.stderr, flush=True)
            self.save(name, section)
        if self._teacher is not None and self._n_student:
            n_s, n_t = self._n_student, sum(p.numel() for p in self._teacher.parameters())
            ideal = 1 / (1 + n_t / (3 * n_s))
            section["notes"].append(f"FLOP-ideal KD/SFT speed: 1 / (1 + N_t / (3 N_s)) = {ideal:.2f} (N_s = "
                                    f"{n_s / 1e6:,.2f}M, N_t = {n_t / 1e6:,.2f}M parameters)")  # fmt: skip

    def _time_step(self, shape: dict, dtype: torch.dtype, reps: int,
                   make_loss: Callable[[str, torch.nn.Module], Callable[[], torch.Tensor]], variant: str) -> dict:
        """One variant's own student and optimizer: a warm-up step, then `reps` timed steps and their peak."""
        free(self.cuda)
        try:
            return self._timed_steps(shape, dtype, reps, make_loss, variant)
        except Exception as e:  # noqa: BLE001
            return {"status": failure(e)}
        finally:
            free(self.cuda)  # the student and its optimizer state are gone with _timed_steps' frame

    def _timed_steps(self, shape: dict, dtype: torch.dtype, reps: int,
                     make_loss: Callable[[str, torch.nn.Module], Callable[[], torch.Tensor]], variant: str) -> dict:
        cuda = self.cuda
        student = build_model(shape, "student", dtype, self.device, seed=0).train()
        self._n_student = sum(p.numel() for p in student.parameters())
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=cuda)
        loss_fn = make_loss(variant, student)

        def step() -> None:
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: optimizer state, kernels compiled
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() if cuda else cpu_peak_bytes(step)
        return {"status": "ok", "ms": statistics.median(times) * 1e3, "peak": peak}

    # -- step 5 ---------------------------------------------------------------------------------------------------
    def section_label(self, cfg: dict, deadline: float, section: dict, name: str) -> None:
        from lmdistill.cache import CacheWriter, build_header
        from lmdistill.config import CacheConfig
        from lmdistill.data import TokenBlocks
        from lmdistill.teachers import check_finite

        shape = self.sizes["step"]["shape"]
        v, nb, seq, bs, k = shape["vocab"], cfg["blocks"], cfg["seq"], cfg["batch"], cfg["k"]
        section["config"] = (f"teacher {shape['teacher']['hidden_size']}x{shape['teacher']['num_hidden_layers']} "
                             f"({shape['dtype']}), {nb} blocks x {seq} tokens, batch {bs}, top-{k} + tail, fp16 "
                             f"values, median of {cfg['reps']}")  # fmt: skip
        section["notes"].append("peak: memory the pass adds to the teacher's weights")
        teacher, dev = self.teacher(shape), self.device
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, v, (nb, seq), generator=g)
        labels = ids.roll(-1, dims=1)
        labels[:, -1] = IGNORE_INDEX
        blocks = TokenBlocks(ids, labels, torch.ones_like(ids))
        tokens = blocks.n_target_tokens
        cache_cfg = CacheConfig(k=k, tail=True, values="fp16", batch_size=bs, shard_blocks=cfg["shard_blocks"],
                                splits=["train"])  # fmt: skip
        header = build_header(teacher={"name_or_path": "bench-teacher", "fingerprint": "bench"},
                              tokenizer_fingerprint="bench", vocab=v, data_params={"source": "bench"},
                              splits={"train": blocks}, cfg=cache_cfg)  # fmt: skip
        scratch = self.out_dir / "label-scratch"
        written: dict[str, int] = {}

        def logits_fn(batch: dict[str, torch.Tensor]) -> torch.Tensor:  # as lmdistill.recipes.label.run_label's
            mask = batch["attention_mask"].to(dev)
            out = teacher(input_ids=batch["input_ids"].to(dev), attention_mask=mask, use_cache=False)
            logits = out.logits[..., :v]
            check_finite(logits, "logits", mask)
            return logits

        @torch.no_grad()
        def forward() -> None:
            for start in range(0, nb, bs):
                logits_fn(blocks.batch(list(range(start, min(start + bs, nb)))))

        def label() -> None:
            shutil.rmtree(scratch, ignore_errors=True)
            writer = CacheWriter(scratch, header)
            writer.write_split("train", blocks, logits_fn)
            written["bytes"] = sum(s.bytes for s in writer.merge().shards)

        try:
            res = run_group({"forward": forward, "label": label}, self.cuda, cfg["reps"], deadline)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for variant in ("forward", "label"):
            r = res[variant]
            row = {"variant": variant, **r}
            if "ms" in r:
                row["tok_s"] = tokens / (r["ms"] / 1e3)
            if variant == "label" and "bytes" in written:
                row["bytes_per_token"] = written["bytes"] / tokens
            section["rows"].append(row)


# ----------------------------------------------------------------------------------------------------------------
# environment, and the results file


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(cuda: bool, dry_run: bool) -> dict[str, Any]:
    commit = "-"
    if (ROOT / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            pass
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "device": device,
        "slug": "cpu-dry-run" if dry_run else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-"),
        "dry_run": dry_run,
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "-",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "liger-kernel": _version("liger-kernel"),
        "python": platform.python_version(),
        "lmdistill": commit,
    }


def pytest_results(out_dir: Path) -> dict[str, Any] | None:
    """Per-test outcome of `pytest -m gpu`: from its junit XML, or from the -v log when pytest was cut short."""
    tests: dict[str, tuple[str, str]] = {}
    xml = out_dir / "pytest-gpu.xml"
    log = out_dir / "pytest-gpu.log"
    source = ""
    if xml.is_file():
        try:
            for case in ET.parse(xml).getroot().iter("testcase"):
                test = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
                outcome, message = "passed", ""
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                        message = (child.get("message") or "").strip().splitlines()[0][:160] if child.get("message") \
                            else ""  # fmt: skip
                tests[test] = (outcome, message)
            source = xml.name
        except ET.ParseError:
            tests = {}
    if not tests and log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            m = re.match(r"^\S*?(test_\w+\.py)::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", line)
            if m:
                tests[f"{m.group(1)[:-3]}::{m.group(2)}"] = (m.group(3).lower().replace("xpass", "passed"), "")
        source = f"{log.name} (no junit XML: pytest did not finish)"
    if not tests:
        return None
    counts: dict[str, int] = {}
    for outcome, _ in tests.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {"tests": tests, "counts": counts, "source": source}


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip


def _num(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def _ratio(row: dict, group: list[dict], ref: str, key: str, invert: bool = False) -> str:
    base = next((r for r in group if r["variant"] == ref), None)
    if base is None or row.get(key) is None or not base.get(key):
        return "-"
    return f"{(base[key] / row[key]) if invert else (row[key] / base[key]):.2f}"


def _cell(row: dict, key: str, scale: float = 1.0, digits: int = 1, status: bool = False) -> str:
    """The number; where there is none, the row's status (in the column that says it) or "-"."""
    if row.get(key) is not None:
        return _num(row[key] / scale, digits)
    return row.get("status", "-") if status else "-"


def _anchor(section: str, *key: Any) -> str:
    return ANCHORS.get((section, *key), "-")


GIB = 2**30


def render_section(name: str, sec: dict) -> list[str]:
    rows = sec.get("rows", [])

    def groups(keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
        out: dict[tuple, list[dict]] = {}
        for r in rows:
            out.setdefault(tuple(r[k] for k in keys), []).append(r)
        return out

    table: list[list[str]] = []
    if name == "loss":
        header = ["kind", "N", "variant", "ms", "peak GiB", "time/TRL", "mem/TRL", "time/naive", "mem/naive",
                  "x floor", "agree", "anchor (issue)"]  # fmt: skip
        for (kind, n), group in groups(("kind", "n")).items():
            for r in group:
                table.append([kind, f"{n:,}", LABELS[r["variant"]], _cell(r, "ms", status=True),
                              _cell(r, "peak", GIB, digits=2), _ratio(r, group, "trl", "ms"),
                              _ratio(r, group, "trl", "peak"),
                              _ratio(r, group, "naive", "ms"), _ratio(r, group, "naive", "peak"),
                              _num(r.get("floor")), f"{r['agree']:.1e}" if "agree" in r else "-",
                              _anchor(name, kind, n, r["variant"])])  # fmt: skip
    elif name == "sparse":
        header = ["N", "variant", "ms", "peak GiB", "time/Liger FL-CE", "mem/Liger FL-CE", "time/naive CE",
                  "anchor (issue)"]  # fmt: skip
        for (n,), group in groups(("n",)).items():
            for r in group:
                table.append([f"{n:,}", LABELS[r["variant"]], _cell(r, "ms", status=True),
                              _cell(r, "peak", GIB, digits=2),
                              _ratio(r, group, "liger_flce", "ms"), _ratio(r, group, "liger_flce", "peak"),
                              _ratio(r, group, "naive_ce", "ms"), _anchor(name, n, r["variant"])])  # fmt: skip
    elif name == "step":
        header = ["variant", "step ms", "tokens/s", "peak GiB", "speed/HF SFT", "mem/HF SFT", "speed/Liger KD",
                  "anchor (issue)"]  # fmt: skip
        for r in rows:
            table.append([LABELS[r["variant"]], _cell(r, "ms", digits=0, status=True), _cell(r, "tok_s"),
                          _cell(r, "peak", GIB, digits=2),
                          _ratio(r, rows, "hf_sft", "ms", invert=True), _ratio(r, rows, "hf_sft", "peak"),
                          _ratio(r, rows, "liger_kd", "ms", invert=True), _anchor(name, r["variant"])])  # fmt: skip
    elif name == "label":
        header = ["variant", "tokens/s", "ms", "speed/forward", "bytes/token", "peak GiB", "anchor (issue)"]
        for r in rows:
            table.append([LABELS[r["variant"]], _cell(r, "tok_s", status=True), _cell(r, "ms", digits=0),
                          _ratio(r, rows, "forward", "ms", invert=True), _num(r.get("bytes_per_token"), 1),
                          _cell(r, "peak", GIB, digits=2), _anchor(name, r["variant"])])  # fmt: skip
    out = [f"Setup: {sec['config']}.", ""] if sec.get("config") else []
    if table:
        out += md_table(header, table)
    out += [f"\n{note}." if not note.endswith(".") else f"\n{note}" for note in sec.get("notes", [])]
    return out


TITLES = {
    "loss": "Step 2: the loss alone",
    "sparse": "Step 3: sparse (cache) loss vs Liger fused linear cross-entropy",
    "step": "Step 4: one soft-KD training step",
    "label": "Step 5: labelling throughput",
}


def evaluate_target(target: Target, sections: dict, tests: dict | None) -> tuple[str, str]:
    """(what was measured, met / missed by how much / not measured)."""
    if target.section == "pytest":
        if tests is None:
            return "no pytest results", "not measured"
        c = tests["counts"]
        bad = c.get("failed", 0) + c.get("error", 0)
        measured = ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
        if c.get("passed", 0) == 0:
            return measured, "not measured (nothing passed)"
        return measured, "met" if bad == 0 else f"missed: {bad} of {sum(c.values())} failed"
    rows = sections.get(target.section, {}).get("rows", [])
    keys = [k for k in ("kind", "n") if rows and k in rows[0]]
    worst: tuple[float, str] | None = None
    for r in rows:
        if r["variant"] != target.variant or r.get(target.metric) is None:
            continue
        if target.n is not None and r.get("n") != target.n:
            continue
        if target.ref:
            ref = next((b for b in rows if b["variant"] == target.ref and all(b[k] == r[k] for k in keys)), None)
            if ref is None or not ref.get(target.metric):
                continue
            ratio = r[target.metric] / ref[target.metric]
        else:
            ratio = float(r[target.metric])
        # the shortfall against the target: > 0 means missed, by that fraction
        short = 1 - ratio / target.factor if target.higher_is_better else ratio / target.factor - 1
        where = " ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in keys)
        if worst is None or short > worst[0]:
            what = f"{ratio:.2f}x {LABELS[target.ref]}" if target.ref else f"{ratio:,.4g} {target.metric}"
            worst = (short, what + (f" at {where}" if where else ""))
    if worst is None:
        why = {f"{LABELS[r['variant']]}: {r['status']}" for r in rows
               if r["variant"] in (target.variant, target.ref) and r.get(target.metric) is None}
        return "-", "not measured" + (f" ({'; '.join(sorted(why))})" if why else "")
    short, text = worst
    return f"worst: {text}", "met" if short <= 0 else f"missed by {short:.0%}"


def render(out_dir: Path, copy_to: Path | None = None, dry_run: bool = False) -> Path:
    """Write DIR/gpu-<date>-<device>.md from results.json, steps.tsv (check.sh) and the pytest results."""
    path = out_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    meta = results.get("meta") or environment(torch.cuda.is_available() and not dry_run, dry_run)
    sections = results.get("sections", {})
    tests = pytest_results(out_dir)
    mode = ("dry-run: CPU, tiny shapes, torch path only (checks the format, not the numbers)" if meta.get("dry_run")
            else f"full, time budget {meta.get('budget_s', '-')} s")  # fmt: skip
    lines = [
        f"# lmdistill GPU check (issue #14), {meta['date']}",
        "",
        f"**{meta['device']}** · torch {meta['torch']} (CUDA {meta['cuda']}) · triton {meta['triton']} · "
        f"transformers {meta['transformers']} · TRL {meta['trl']} · Liger {meta['liger-kernel']} · "
        f"Python {meta['python']} · lmdistill {meta['lmdistill']} · mode: {mode}",
        "",
        "Written by `bash benchmarks/gpu/check.sh` (benchmarks/gpu/bench.py). Ratios divide numbers of this run only.",
        "",
        "## Check steps",
        "",
    ]
    steps = out_dir / "steps.tsv"
    step_rows = []
    if steps.is_file():
        for line in steps.read_text().splitlines():
            step, rc, secs, *note = line.split("\t")
            status = {"0": "ok", "124": "timed out", "137": "killed (time)", "skip": "skipped"}.get(rc, f"exit {rc}")
            step_rows.append([step, status, secs, note[0] if note else ""])
    lines += md_table(["step", "status", "seconds", "note"], step_rows) if step_rows else ["(no steps.tsv: bench.py "
                                                                                           "run alone)"]  # fmt: skip
    lines += ["", "## Step 1: kernel correctness (`pytest -m gpu`)", ""]
    if tests is None:
        lines.append("No pytest results in this directory.")
    else:
        c = tests["counts"]
        lines.append(f"{', '.join(f'{v} {k}' for k, v in sorted(c.items()))} (from {tests['source']}).")
        lines.append("")
        per: dict[str, dict[str, int]] = {}
        for test, (outcome, _) in tests["tests"].items():
            per.setdefault(test.split("[")[0], {}).setdefault(outcome, 0)
            per[test.split("[")[0]][outcome] += 1
        lines += md_table(["test", "passed", "failed", "skipped"],
                          [[t, str(o.get("passed", 0)), str(o.get("failed", 0) + o.get("error", 0)),
                            str(o.get("skipped", 0))] for t, o in per.items()])  # fmt: skip
        failed = [(t, m) for t, (o, m) in tests["tests"].items() if o in ("failed", "error")]
        if failed:
            lines += ["", "Failures:", *(f"- `{t}`: {m or '(see pytest-gpu.log)'}" for t, m in failed)]
    for name in SECTIONS:
        lines += ["", f"## {TITLES[name]}", ""]
        lines += render_section(name, sections[name]) if name in sections else ["Not run."]
    lines += ["", "## Targets", ""]
    if not ISSUE_FIGURES:
        lines += ["The thresholds below are placeholders until issue #14's figures are copied into `TARGETS` and "
                  "`ANCHORS` in benchmarks/gpu/bench.py (`ISSUE_FIGURES = True`).", ""]  # fmt: skip
    lines += md_table(["target", "measured", "status"],
                      [[t.text, *evaluate_target(t, sections, tests)] for t in TARGETS])  # fmt: skip
    text = "\n".join(lines) + "\n"
    md = out_dir / f"gpu-{meta['date']}-{meta['slug']}.md"
    md.write_text(text)
    if copy_to is not None and results.get("meta") and not meta["dry_run"]:  # only what a benchmark run measured
        copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copy2(md, copy_to / md.name)
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for results.json and the results file")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, torch path only")
    p.add_argument("--budget-s", type=float, default=240.0, help="time for all sections (rows past it are skipped)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--render", type=Path, metavar="DIR", help="only (re)write DIR's results file")
    p.add_argument("--copy-to", type=Path, help="with --render: also copy the results file here (not with --dry-run)")
    args = p.parse_args()
    if args.render is not None:
        print(render(args.render, None if args.dry_run else args.copy_to, args.dry_run).read_text())
        return
    if args.out is None:
        p.error("--out DIR is required (or --render DIR)")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: use --dry-run for the CPU format check")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    bench = Bench(args.out, args.dry_run, args.budget_s, args.sections)
    bench.run()
    print(render(args.out).read_text())


if __name__ == "__main__":
    main()
