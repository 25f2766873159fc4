"""Distilling across tokenizers (issue #15): Gemma-3-270M (vocab 262,144) teaches a student pruned from SmolLM2-135M
(vocab 49,152) on the embedded Wikipedia text, every arm through `lmdistill soft` (the real recipe and loss).

Every arm starts from the same pruned student (6 of SmolLM2-135M's 30 layers), trains the same steps on the same
batches with the same seed, and is scored on the same held-out Wikipedia blocks:

    ce              cross-entropy on the ground truth only (alpha 0): the honest baseline
    hard_sequence   cross-entropy on text the Gemma teacher wrote (it continues the first 32 tokens of each training
                    document; greedy, as long as the document's block), i.e. sequence-level hard labels
    uld             ULD: sorted-probability L1 between the span distributions (no vocabulary correspondence)
    hybrid          forward KL on the tokens both vocabularies spell the same + ULD on the rest

alpha = 0.5 for uld and hybrid (the distillation term mixed with CE, as ULD's paper does). Reported: held-out bits per
byte (the tokenizer-independent metric; the teacher's own on the same documents in its own tokens as the reference),
perplexity, the held-out span divergence to the teacher (`span_kd`, the hybrid's forward-KL part), the share of target
tokens whose span is 1:1 / merged / not compared, and the wall-clock of each arm. With `--seeds 0,1,2` each arm runs
once per seed and bits per byte is reported as mean +- the 95 % t-interval; with one seed, the saved students are
re-scored block by block and bits per byte gets a 95 % bootstrap interval over the held-out blocks, with the paired
difference of every arm to CE and to ULD on the same resamples (what says whether a ranking is more than noise).

    python benchmarks/cross_tokenizer.py --steps 40        # ~50 min on a busy 2-core CPU (about 10 s per distillation
                                                           # step idle: the 262k-vocab teacher dominates)
    python benchmarks/cross_tokenizer.py                   # 150 steps: for a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmdistill.assets import EMBEDDED_GEMMA, EMBEDDED_TEACHER, EMBEDDED_TEXT  # noqa: E402
from lmdistill.config import DataConfig, HardConfig, ModelConfig, SoftConfig, load_config  # noqa: E402
from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher  # noqa: E402
from lmdistill.data import build_splits, load_raw_dataset, split_documents  # noqa: E402
from lmdistill.evaluate import byte_lengths_of, evaluate_blocks  # noqa: E402
from lmdistill.models import load_teacher, load_tokenizer  # noqa: E402
from lmdistill.recipes.common import build_setup, save_model  # noqa: E402
from lmdistill.recipes.hard import run_hard  # noqa: E402
from lmdistill.recipes.soft import run_soft  # noqa: E402

T_CRIT_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57}


def shared_args(args: argparse.Namespace, out: Path, seed: int) -> dict[str, str]:
    return {
        "teacher.name_or_path": EMBEDDED_GEMMA,
        "data.source": EMBEDDED_TEXT, "data.block_size": str(args.block_size),
        "data.max_documents": str(args.documents), "data.eval_documents": str(args.eval_documents),
        "train.max_steps": str(args.steps), "train.micro_batch_size": "4", "train.lr": "3e-4",
        "train.warmup_steps": "2", "train.seed": str(seed), "train.eval_every": "0", "train.save_every": "0",
        "train.progress": "false", "train.output_dir": str(out),
    }


def overrides(d: dict[str, str]) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", v)]


def build_student_init(out: Path) -> Path:
    """The 6-layer student pruned from SmolLM2-135M (the demo's layers), saved once: every arm loads these weights."""
    if (out / "config.json").is_file():
        return out
    cfg = load_config(SoftConfig, None, ["--teacher.name_or_path", EMBEDDED_TEACHER, "--train.output_dir", str(out)])
    setup = build_setup(cfg, teacher=False, data=False)
    return save_model(setup.student, setup.tokenizer, out)


def teacher_text(args: argparse.Namespace, student_tok: Any, out: Path) -> Path:
    """hard_sequence's data: the Gemma teacher continues the first 32 student-tokenizer tokens' text of each training
    document (greedy), written as a `text` JSONL with the documents' order."""
    path = out / "gemma_text.jsonl"
    if path.is_file():
        return path
    data = DataConfig(source=EMBEDDED_TEXT, block_size=args.block_size, max_documents=args.documents,
                      eval_documents=args.eval_documents)
    docs = [t for t in split_documents(load_raw_dataset(data.source), data)[0][data.text_column] if t.strip()]
    tok = load_tokenizer(EMBEDDED_GEMMA)
    model = load_teacher(ModelConfig(name_or_path=EMBEDDED_GEMMA))
    tok.padding_side = "left"
    needed = args.steps * args.teacher_docs_per_step  # a continuation fills about one block
    rows = []
    for start in range(0, min(needed, len(docs)), 16):
        prompts = [student_tok.decode(student_tok(d, add_special_tokens=False)["input_ids"][:32]) for d in
                   docs[start: start + 16]]
        enc = tok(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=args.block_size, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for p, g in zip(prompts, gen[:, enc["input_ids"].shape[1]:], strict=True):
            rows.append({"text": p + tok.decode(g, skip_special_tokens=True)})
        print(f"  teacher text: {len(rows)}/{min(needed, len(docs))} documents", file=sys.stderr)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--documents", type=int, default=1200)
    ap.add_argument("--eval-documents", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--teacher-docs-per-step", type=int, default=4,
                    help="hard_sequence: documents the teacher continues per training step (4: one epoch)")
    ap.add_argument("--arms", default="ce,hard_sequence,uld,hybrid")
    ap.add_argument("--out", default="runs/bench-cross-tokenizer")
    args = ap.parse_args()
    out = Path(args.out)
    init = build_student_init(out / "student-init")
    student_tok = load_tokenizer(str(init))
    # ce and hard_sequence are plain cross-entropy (`lmdistill hard` at alpha 0 computes no teacher label); the
    # SmolLM2 tokenizer stands in as `teacher` so the recipe accepts the student's tokenizer, and no teacher runs
    arms = {"ce": {"loss.alpha": "0"},
            "hard_sequence": {"loss.alpha": "0"},
            "uld": {"loss.cross_tokenizer": "uld", "loss.alpha": "0.5"},
            "hybrid": {"loss.cross_tokenizer": "hybrid", "loss.alpha": "0.5"}}
    chosen = [a for a in args.arms.split(",") if a]
    seeds = [int(s) for s in args.seeds.split(",")]

    # the held-out documents, read by each model in its own tokens
    data = DataConfig(source=EMBEDDED_TEXT, block_size=args.block_size, max_documents=args.documents,
                      eval_documents=args.eval_documents)
    held = build_splits(data, student_tok).eval
    gemma_tok = load_tokenizer(EMBEDDED_GEMMA)
    gemma = load_teacher(ModelConfig(name_or_path=EMBEDDED_GEMMA))
    teacher_eval = evaluate_blocks(gemma, build_splits(data, gemma_tok).eval, n_vocab=len(gemma_tok),
                                   max_batches=args.eval_batches, byte_lengths=byte_lengths_of(gemma_tok))
    judge = CrossTokenizerTeacher(gemma, gemma_tok, student_tok, mode="hybrid")
    from transformers import AutoModelForCausalLM

    init_model = AutoModelForCausalLM.from_pretrained(init)
    init_eval = {**evaluate_blocks(init_model, held, n_vocab=len(student_tok), max_batches=args.eval_batches,
                                   byte_lengths=byte_lengths_of(student_tok)),
                 **judge.evaluate(init_model, held, SoftConfig().loss, n_vocab=len(student_tok), batch_size=4,
                                  max_batches=args.eval_batches)}
    del init_model
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for arm in chosen:
            run_out = out / f"{arm}-seed{seed}"
            extra = {**shared_args(args, run_out, seed), "student.init": "pretrained",
                     "student.name_or_path": str(init), **arms[arm]}
            t0 = time.perf_counter()
            timing = run_out / "bench_wall_s.txt"
            if timing.is_file():  # a finished arm of an interrupted benchmark: score it again
                summary = json.loads((run_out / "summary.json").read_text())
                t0 -= float(timing.read_text())
            elif arm in ("ce", "hard_sequence"):
                extra["teacher.name_or_path"] = EMBEDDED_TEACHER
                if arm == "hard_sequence":  # the teacher's text is the data; held-out scoring stays on Wikipedia
                    extra.update({"data.source": str(teacher_text(args, student_tok, out)),
                                  "data.eval_documents": "0", "data.max_documents": "null"})
                summary = run_hard(load_config(HardConfig, None, overrides({**extra, "mode": "token"})))
            else:
                summary = run_soft(load_config(SoftConfig, None, overrides(extra)))
            wall = time.perf_counter() - t0
            timing.write_text(f"{wall:.1f}")
            student = AutoModelForCausalLM.from_pretrained(summary["student_dir"])
            row = {**evaluate_blocks(student, held, n_vocab=len(student_tok), max_batches=args.eval_batches,
                                     byte_lengths=byte_lengths_of(student_tok)),
                   **judge.evaluate(student, held, SoftConfig().loss, n_vocab=len(student_tok), batch_size=4,
                                    max_batches=args.eval_batches), "wall_s": wall,
                   "student_dir": summary["student_dir"]}
            results.setdefault(arm, []).append(row)
            print(f"  {arm} seed {seed}: bits/byte {row.get('bits_per_byte', float('nan')):.4f}, "
                  f"span_kd {row['span_kd']:.4f}, {wall:.0f} s", file=sys.stderr)
    boot = block_bootstrap(results, held, student_tok, args) if len(seeds) == 1 else {}
    report(args, teacher_eval, init_eval, results, boot)
    (out / "results.json").write_text(json.dumps({"teacher": teacher_eval, "init": init_eval, "arms": results,
                                                  "bootstrap": boot}, indent=2))


def block_bootstrap(results: dict[str, list[dict[str, Any]]], held: Any, student_tok: Any, args: argparse.Namespace,
                    resamples: int = 2000) -> dict[str, list[float]]:
    """One seed: 95 % percentile intervals over the held-out blocks (resampled with replacement, one resample for
    every arm) of each arm's bits per byte, and of each arm's difference to CE and to ULD on the same resample."""
    from transformers import AutoModelForCausalLM

    from lmdistill.evaluate import evaluate_models

    models = {arm: AutoModelForCausalLM.from_pretrained(rows[0]["student_dir"]) for arm, rows in results.items()}
    sums: dict[str, list[list[float]]] = {}
    evaluate_models(models, held, n_vocab=len(student_tok), batch_size=4, max_batches=args.eval_batches,
                    block_sums=sums, byte_lengths=byte_lengths_of(student_tok))
    n = len(next(iter(sums.values())))
    idx = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(0))
    bpb = {}
    for arm, rows in sums.items():
        s = torch.tensor(rows, dtype=torch.float64)[idx].sum(dim=1)
        bpb[arm] = s[:, 1] / (math.log(2) * s[:, 4])  # [target tokens, CE nats, KL, agreements, bytes] per block
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    out = {arm: torch.quantile(v, q).tolist() for arm, v in bpb.items()}
    for base in ("ce", "uld"):
        for arm in bpb:
            if base in bpb and arm != base:
                out[f"{arm} - {base}"] = torch.quantile(bpb[arm] - bpb[base], q).tolist()
    return out


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    half = T_CRIT_95.get(len(values) - 1, 2.0) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.4f} +- {half:.4f}"


def report(args: argparse.Namespace, teacher: dict[str, float], init: dict[str, float],
           results: dict[str, list[dict[str, Any]]], boot: dict[str, list[float]]) -> None:
    ce = statistics.fmean(r["bits_per_byte"] for r in results["ce"]) if "ce" in results else None
    print(f"\nGemma-3-270M -> SmolLM2 student (6 layers), {args.steps} steps of 4 x {args.block_size} tokens, "
          f"seeds {args.seeds}; held-out: {args.eval_batches} batches of 4 blocks")
    print(f"teacher (Gemma-3-270M, its own tokens): bits/byte {teacher['bits_per_byte']:.4f}, "
          f"ppl {teacher['perplexity']:.1f}")
    print(f"student before training: bits/byte {init['bits_per_byte']:.4f}, span_kd {init['span_kd']:.4f}; target "
          f"tokens in 1:1 spans {init['aligned_one_to_one']:.1%}, merged {init['aligned_merged']:.1%}, "
          f"not compared {init['aligned_skipped']:.1%}\n")
    print("| arm | bits/byte (95% CI) | vs CE | perplexity | span KL to teacher | wall s |")
    print("|---|---|---|---|---|---|")
    for arm, rows in results.items():
        bpb = [r["bits_per_byte"] for r in rows]
        ratio = f"{statistics.fmean(bpb) / ce:.3f}x" if ce else "-"
        ci = f" [{boot[arm][0]:.4f}, {boot[arm][1]:.4f}]" if arm in boot else ""
        print(f"| {arm} | {interval(bpb)}{ci} | {ratio} | {statistics.fmean(r['perplexity'] for r in rows):.1f} | "
              f"{statistics.fmean(r['span_kd'] for r in rows):.4f} | {statistics.fmean(r['wall_s'] for r in rows):.0f} |")

    if boot:
        print(f"\nOne seed: bits/byte intervals are 95 % percentile bootstraps over the {args.eval_batches * 4} "
              "held-out blocks (2,000 resamples, one resample for all arms); paired differences on the same resample:")
        for key, (lo, hi) in boot.items():
            if " - " in key:
                verdict = "lower" if hi < 0 else "higher" if lo > 0 else "tie"
                print(f"  {key}: [{lo:+.4f}, {hi:+.4f}] bits/byte ({verdict})")


if __name__ == "__main__":
    main()
