"""What does each soft-label cache encoding cost in bytes, and what does it keep of online distillation's gain?

    python benchmarks/cache_quality.py                  # ~13 min on an idle 2-core CPU (11 arms, ~1 min each)
    python benchmarks/cache_quality.py --steps 8        # quick look
    python benchmarks/cache_quality.py --steps 48 --topk "" --sampled 32 --seeds 0,1,2 \\
        --extra topk16-int8,topk4+s24-int8,topk8+s18-int8   # docs/cache_format.md's table, ~12 min per seed

The embedded default: SmolLM2-135M-Instruct teaches a 6-layer student pruned from it (layers 0, 6, 12, 18, 24, 29)
on the offline Wikipedia summaries. Every arm starts from the same pruned weights and trains the same steps on the
same batches (one pass over `steps x micro_batch` blocks, seed fixed), alpha = 1 (pure distillation, so the arms
differ only in their targets):

  ce          cross-entropy on the ground-truth next token (no teacher)
  online      forward KL to the teacher's full distribution (the teacher's hidden states are computed once and
              replayed: the same numbers an online teacher gives, without paying its forward once per arm)
  top-k       forward KL against a cache of the k most probable ids (+ tail mass for k > 1; k = 1 is the hard label)
  sampled n   RS-KD: forward KL estimated from n teacher draws per position (distinct ids + counts)
  top-k +n tail draws   cache.encoding topk_sampled: the exact top-k head and tail mass plus n systematic draws of
              the teacher's tail outside it (the RS-KD estimator with zero variance on the head)

Each cache is written by the real writer (lmdistill.cache.CacheWriter) and read by the real reader (CachedTeacher),
and the student's loss is recipes.soft.soft_step_loss, the function `lmdistill soft --teacher_cache` runs.

Reported per arm: bytes per target token on disk, labelling throughput (the teacher forward, measured once, plus
that arm's encoding and writing), and on a fixed held-out set (blocks of held-out documents) the student's KL to the
*real* teacher (full distribution) and perplexity. "kept" = (KL_ce - KL_arm) / (KL_ce - KL_online): the share of
online KD's improvement over CE that the arm keeps. Target: <= 64 bytes/token keeping >= 95 %.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lmdistill.assets import EMBEDDED_TEACHER, EMBEDDED_TEXT  # noqa: E402
from lmdistill.cache import CachedTeacher, CacheWriter, build_header  # noqa: E402
from lmdistill.cache.estimate import measure_cache  # noqa: E402
from lmdistill.config import CacheConfig, DataConfig, LossConfig, ModelConfig, TrainConfig  # noqa: E402
from lmdistill.data import TokenBlocks, build_splits  # noqa: E402
from lmdistill.evaluate import evaluate_blocks  # noqa: E402
from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count  # noqa: E402
from lmdistill.models import decoder_hidden, lm_head, load_teacher, load_tokenizer, prune_layers  # noqa: E402
from lmdistill.recipes.soft import soft_step_loss  # noqa: E402
from lmdistill.teachers import Hidden  # noqa: E402
from lmdistill.train.loop import StepLoss, Trained, Trainer  # noqa: E402

KEEP_LAYERS = [0, 6, 12, 18, 24, 29]


class ReplayTeacher:
    """The teacher's final hidden states for a fixed set of blocks, computed once; serves `targets` and `logits`
    exactly as lmdistill.teachers.HFTeacher would for those blocks."""

    def __init__(self, model: nn.Module, blocks: TokenBlocks, n_vocab: int, batch_size: int) -> None:
        self.head = lm_head(model, n_vocab).detached()
        parts = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(blocks), batch_size):
                b = blocks.batch(list(range(i, min(i + batch_size, len(blocks)))))
                parts.append(decoder_hidden(model, b["input_ids"], b["attention_mask"]))
        self.seconds = time.perf_counter() - t0
        self.hidden_states = torch.cat(parts)
        self.tokens = int(blocks.attention_mask.sum())

    def targets(self, batch: dict[str, Tensor]) -> Hidden:
        return Hidden(self.hidden_states[batch["index"]], self.head)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return self.targets(batch).logits()


def subset(blocks: TokenBlocks, n: int) -> TokenBlocks:
    if len(blocks) < n:
        raise SystemExit(f"only {len(blocks)} blocks available, {n} needed: raise --documents")
    return TokenBlocks(blocks.input_ids[:n], blocks.labels[:n], blocks.attention_mask[:n])


def ce_step_loss(model: nn.Module, batch: dict[str, Tensor], n_vocab: int) -> StepLoss:
    h = decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
    ce = chunked_ce_sum_and_count(h, lm_head(model, n_vocab), batch["labels"])[0]
    return StepLoss(ce, {"ce": ce})


def train_and_eval(name: str, student0: nn.Module, train: TokenBlocks, held: TokenBlocks, teacher: ReplayTeacher,
                   loss_fn: Callable[[nn.Module, dict[str, Tensor]], StepLoss], args: argparse.Namespace,
                   workdir: Path, n_vocab: int) -> dict[str, float]:
    model = copy.deepcopy(student0)
    model.train()
    cfg = TrainConfig(output_dir=str(workdir / name), max_steps=args.steps, micro_batch_size=args.micro_batch,
                      lr=args.lr, warmup_steps=max(1, args.steps // 10), eval_every=0, save_every=0, progress=False,
                      seed=args.seed)
    def fn(models: dict[str, nn.Module], batch: dict[str, Tensor], step: Any) -> dict[str, StepLoss]:
        return {"student": loss_fn(models["student"], batch)}

    t0 = time.perf_counter()
    trainer = Trainer(cfg, models={"student": Trained(model)}, data=train, loss_fn=fn)
    trainer.fit()
    seconds = time.perf_counter() - t0
    metrics = evaluate_blocks(trainer.unwrapped["student"], held, n_vocab=n_vocab, batch_size=8,
                              teacher_logits_fn=teacher.logits)
    metrics["train_seconds"] = seconds
    print(f"  {name:<22} KL {metrics['kl_to_teacher']:.4f}  ppl {metrics['perplexity']:8.2f}  "
          f"({seconds:.0f} s)", flush=True)
    return metrics


def write_cache(root: Path, blocks: TokenBlocks, teacher: ReplayTeacher, n_vocab: int, **cache: Any) -> dict[str, Any]:
    cfg = CacheConfig(output_dir=str(root), splits=["train"], shard_blocks=64, batch_size=8, **cache)
    header = build_header(teacher={"name_or_path": EMBEDDED_TEACHER}, tokenizer_fingerprint="embedded",
                          vocab=n_vocab, data_params={}, splits={"train": blocks}, cfg=cfg)
    t0 = time.perf_counter()
    writer = CacheWriter(root, header)
    writer.write_split("train", blocks, teacher.logits)
    writer.merge()
    encode = time.perf_counter() - t0
    m = measure_cache(root)
    tokens = m["target_tokens"]
    # labelling = the teacher's forward over these tokens (measured once) + this encoding's projection/encode/write
    teacher_s = teacher.seconds * tokens / teacher.tokens
    return {"bytes_per_token": m["bytes_per_token"], "target_bytes_per_token": m["target_bytes_per_token"],
            "ids_per_token": m["ids_per_token"], "label_tokens_per_s": tokens / (teacher_s + encode),
            "encode_tokens_per_s": tokens / encode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--documents", type=int, default=400, help="Wikipedia summaries to tokenise (train side).")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--topk", default="1,8,32,128")
    p.add_argument("--sampled", default="8,32,64")
    p.add_argument("--extra", default="topk16-int8,topk8+s18-int8",
                   help="extra arms: topkK-VALUES, sampledN-VALUES or topkK+sN-VALUES (the exact top-K head plus N "
                   "systematic draws of the tail, cache.encoding topk_sampled); VALUES in fp32/fp16/bf16/int8")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (batch order, sampled draws); with several, "
                   "every arm runs once per seed and the table shows mean +- a 95 %% t-interval")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    teacher_cfg = ModelConfig(name_or_path=EMBEDDED_TEACHER)
    tok = load_tokenizer(EMBEDDED_TEACHER)
    n_vocab = len(tok)
    data = DataConfig(source=EMBEDDED_TEXT, block_size=args.block_size, max_documents=args.documents,
                      eval_documents=100, seed=0)
    splits = build_splits(data, tok)
    train = subset(splits.train, args.steps * args.micro_batch)
    held = subset(splits.eval, args.eval_blocks)
    model = load_teacher(teacher_cfg)
    student0 = prune_layers(model, KEEP_LAYERS)
    teacher = ReplayTeacher(model, TokenBlocks(*(torch.cat([a, b]) for a, b in zip(
        (train.input_ids, train.labels, train.attention_mask), (held.input_ids, held.labels, held.attention_mask),
        strict=True))), n_vocab, batch_size=8)
    # held-out blocks follow the train blocks in the replay table
    held_ix = TokenBlocks(held.input_ids, held.labels, held.attention_mask)
    offset = len(train)

    def held_logits(batch: dict[str, Tensor]) -> Tensor:
        return teacher.logits({**batch, "index": batch["index"] + offset})

    eval_teacher = type("EvalTeacher", (), {"logits": staticmethod(held_logits)})()
    print(f"teacher forward: {teacher.tokens:,} tokens in {teacher.seconds:.1f} s "
          f"({teacher.tokens / teacher.seconds:,.0f} tokens/s); {len(train)} train blocks x {args.block_size}, "
          f"{len(held)} held-out blocks; vocab {n_vocab:,}", flush=True)

    kd = LossConfig(kind="forward_kl", alpha=1.0, fused=True)
    dense_bytes = n_vocab * 2  # fp16 full distribution
    arms: list[tuple[str, dict[str, Any]]] = []
    for k in [int(x) for x in args.topk.split(",") if x]:
        arms.append((f"top-{k}" + (" +tail" if k > 1 else " (hard)"), {"encoding": "topk", "k": k,
                                                                      "tail": k > 1, "values": "fp16"}))
    for n in [int(x) for x in args.sampled.split(",") if x]:
        arms.append((f"sampled n={n} int8", {"encoding": "sampled", "draws": n, "values": "int8"}))
    for spec in [x for x in args.extra.split(",") if x]:
        kind, values = spec.split("-")
        if kind.startswith("topk") and "+s" in kind:
            k_, n_ = kind[4:].split("+s")
            arms.append((f"top-{k_} +{n_} tail draws {values}", {"encoding": "topk_sampled", "k": int(k_),
                                                                  "draws": int(n_), "values": values}))
        elif kind.startswith("topk"):
            arms.append((f"top-{kind[4:]} +tail {values}", {"encoding": "topk", "k": int(kind[4:]), "tail": True,
                                                           "values": values}))
        else:
            arms.append((f"sampled n={kind[7:]} {values}", {"encoding": "sampled", "draws": int(kind[7:]),
                                                           "values": values}))
    seeds = [int(x) for x in args.seeds.split(",") if x]

    work = Path(tempfile.mkdtemp(prefix="cache_quality_"))
    runs: list[dict[str, dict[str, Any]]] = []  # one {arm: metrics} per seed
    try:
        init = evaluate_blocks(student0, held_ix, n_vocab=n_vocab, batch_size=8, teacher_logits_fn=held_logits)
        print(f"  {'initial student':<22} KL {init['kl_to_teacher']:.4f}  ppl {init['perplexity']:8.2f}")
        for seed in seeds:
            args.seed = seed
            print(f"seed {seed}", flush=True)
            results: dict[str, dict[str, Any]] = {}
            results["ce"] = {**train_and_eval("ce", student0, train, held_ix, eval_teacher,
                                              lambda m, b: ce_step_loss(m, b, n_vocab), args, work, n_vocab),
                             "bytes_per_token": 0.0}
            results["online"] = {**train_and_eval("online", student0, train, held_ix, eval_teacher,
                                                  lambda m, b: soft_step_loss(m, b, teacher.targets(b), kd, n_vocab),
                                                  args, work, n_vocab),
                                 "bytes_per_token": float(dense_bytes),
                                 "label_tokens_per_s": teacher.tokens / teacher.seconds}
            for name, cache in arms:
                root = work / f"s{seed}" / "".join(c for c in name.replace(" ", "_") if c.isalnum() or c in "_-")
                info = write_cache(root, train, teacher, n_vocab, seed=seed, **cache)
                cached = CachedTeacher(root, "train", blocks=train, temperature=1.0, kind="forward_kl")
                metrics = train_and_eval(name, student0, train, held_ix, eval_teacher,
                                         lambda m, b, c=cached: soft_step_loss(m, b, c.targets(b), kd, n_vocab), args,
                                         work, n_vocab)
                results[name] = {**metrics, **info}
            for r in results.values():  # the share of this seed's online-KD gain over CE that each arm keeps
                gain = results["ce"]["kl_to_teacher"] - results["online"]["kl_to_teacher"]
                r["kept_percent"] = ((results["ce"]["kl_to_teacher"] - r["kl_to_teacher"]) / gain * 100
                                     if gain > 0 else float("nan"))
            runs.append(results)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def stat(name: str, key: str) -> tuple[float, float]:
        """Mean over seeds and the half-width of its 95 % t-interval (0 for one seed)."""
        xs = torch.tensor([float(r[name][key]) for r in runs], dtype=torch.float64)
        if len(xs) < 2:
            return float(xs[0]), 0.0
        t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(xs), 2.0)
        return float(xs.mean()), t * float(xs.std()) / len(xs) ** 0.5

    def cell(name: str, key: str, width: int, fmt: str) -> str:
        m, hw = stat(name, key)
        return f"{m:{fmt}}" + (f" +-{hw:{fmt}}" if len(runs) > 1 else "")

    print()
    print(f"held-out: {int(init['tokens']):,} tokens; initial student KL {init['kl_to_teacher']:.4f}, "
          f"ppl {init['perplexity']:.2f}; teacher ppl {init['teacher_perplexity']:.2f}; {args.steps} steps x "
          f"{args.micro_batch} x {args.block_size} tokens per arm; alpha=1; seeds {seeds}"
          + (" (mean +- 95 % t-interval over seeds)" if len(runs) > 1 else ""))
    wide = len(runs) > 1
    kw, pw, aw = (20, 18, 16) if wide else (11, 8, 7)
    header = (f"{'arm':<28} {'bytes/token':>11} {'vs dense':>9} {'label tok/s':>11} {'held-out KL':>{kw}} "
              f"{'ppl':>{pw}} {'agree':>6} {'kept':>{aw}}")
    print(header)
    print("-" * len(header))
    summary: dict[str, dict[str, Any]] = {}
    for name, r in runs[0].items():
        b = r["bytes_per_token"]
        lab = f"{r['label_tokens_per_s']:,.0f}" if "label_tokens_per_s" in r else "-"
        summary[name] = {key: stat(name, key) for key in ("kl_to_teacher", "perplexity", "agreement", "kept_percent")}
        summary[name]["bytes_per_token"] = b
        print(f"{name:<28} {b:>11.1f} {b / dense_bytes:>9.4f} {lab:>11} {cell(name, 'kl_to_teacher', kw, '.4f'):>{kw}} "
              f"{cell(name, 'perplexity', pw, '.2f'):>{pw}} {stat(name, 'agreement')[0]:>6.3f} "
              f"{cell(name, 'kept_percent', aw, '.1f'):>{aw - 1}}%")
    winners = [n for n, s_ in summary.items() if 0 < s_["bytes_per_token"] <= 64 and s_["kept_percent"][0] >= 95]
    print(f"\ndense fp16 = {dense_bytes:,} bytes/token. <= 64 bytes/token keeping >= 95 % of the online-KD gain "
          f"(mean over seeds): {', '.join(winners) if winners else 'none'}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"init": init, "runs": runs, "summary": summary,
                                         "args": vars(args) | {"json": None}}, indent=2, default=str))

if __name__ == "__main__":
    main()
