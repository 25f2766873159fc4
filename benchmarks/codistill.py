"""Does co-distillation help? Student alone vs co-distilled students with three a(t) weightings, on the embedded text.

    python benchmarks/codistill.py                 # ~10 min on a 2-core CPU
    python benchmarks/codistill.py --steps 60      # quick look
    python benchmarks/codistill.py --steps 400 --threads 2   # longer, on an idle machine

Arms, all on the same data, batches, steps and seed, from the same initial weights:

  (a) student alone on CE                     (T) teacher alone on CE
  (b) co-distilled, constant a = 0.5          (c) co-distilled, cosine ramp 0 -> 0.8 over the first half
  (d) co-distilled, dynamic a (ceiling 0.8, relative CE gap saturating at 10 %)

Reported: held-out perplexity of each student (all held-out blocks), the teacher's held-out perplexity (without the
mutual term the co-trained teacher learns exactly as (T) does, which the script checks), and the wall-clock and CPU
time of each co-distilled run against running (a) and (T) one after the other.

Tokenizer: a 4,096-token byte-level BPE trained here on the training documents (seconds). The embedded SmolLM2
tokenizer has 49,152 tokens, which at these model sizes would put most parameters and most CPU time into the
embeddings and output layer and leave ~100 steps in ten minutes; a small vocabulary buys 3-4x more steps and a
teacher/student ratio that comes from depth and width, as in real co-distillation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from lmdistill.config import CodistillConfig, CodistillWeightConfig, DataConfig, load_config  # noqa: E402
from lmdistill.data import TokenBlocks, load_raw_dataset, split_documents  # noqa: E402
from lmdistill.evaluate import evaluate_blocks  # noqa: E402
from lmdistill.losses import ce_sum_and_count  # noqa: E402
from lmdistill.models import count_parameters  # noqa: E402
from lmdistill.recipes.codistill import codistill_recipe  # noqa: E402
from lmdistill.recipes.common import build_co_setup  # noqa: E402
from lmdistill.train.logging import read_log  # noqa: E402
from lmdistill.train.loop import StepLoss, Trained, Trainer  # noqa: E402

ARMS = {
    "b": ("constant a=0.5", {"schedule": "constant", "value": 0.5}),
    "c": ("cosine ramp 0->0.8", {"schedule": "cosine", "start_value": 0.0, "value": 0.8}),
    "d": ("dynamic (ceiling 0.8)", {"schedule": "dynamic", "value": 0.8, "ema": 0.9, "gap_scale": 0.1}),
}


def train_tokenizer(out: Path, data: DataConfig, vocab: int) -> Path:
    """Byte-level BPE on the training documents only (the held-out ones are split off first, as build_splits does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (out / "tokenizer.json").is_file():
        return out
    train_docs, _ = split_documents(load_raw_dataset(data.source), data)
    texts = [t for t in train_docs[data.text_column] if isinstance(t, str) and t.strip()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<pad>").save_pretrained(out)
    return out


def base_config(args: argparse.Namespace, tokenizer_dir: Path) -> CodistillConfig:
    t, s = args.teacher_hidden, args.student_hidden
    arch = "{{model_type: llama, hidden_size: {h}, intermediate_size: {i}, num_hidden_layers: {n}, " \
           "num_attention_heads: 4, num_key_value_heads: 4, tie_word_embeddings: true}}"
    return load_config(CodistillConfig, None, {
        "tokenizer": str(tokenizer_dir),
        "teacher": {"arch": _yaml(arch.format(h=t, i=4 * t, n=args.teacher_layers))},
        "student": {"arch": _yaml(arch.format(h=s, i=4 * s, n=args.student_layers))},
        "data": {"source": "embedded:wikipedia", "block_size": args.block_size, "eval_documents": args.eval_documents},
        "loss": {"kind": "forward_kl", "fused": False},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "lr": args.lr, "warmup_steps": 20,
                  "seed": args.seed, "eval_every": 0, "save_every": 0, "progress": False,
                  "output_dir": str(args.out / "unused")},
    })


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_solo(cfg: CodistillConfig, which: str, data: TokenBlocks, out: Path) -> tuple[torch.nn.Module, float, float]:
    """One model alone on CE with the core loop (same init, batches, optimizer and schedule as in co-distillation)."""
    setup = build_co_setup(cfg)
    model = setup.teacher if which == "teacher" else setup.student
    lr = (cfg.teacher.lr if which == "teacher" else cfg.student.lr) or cfg.train.lr
    train_cfg = cfg.train.model_copy(update={"output_dir": str(out), "lr": lr})
    def ce(models: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], step: Any) -> dict[str, StepLoss]:
        logits = models[which](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {which: StepLoss(ce_sum_and_count(logits[..., : setup.n_vocab], batch["labels"])[0])}

    trainer = Trainer(train_cfg, models={which: Trained(model)}, data=data, loss_fn=ce)
    _, wall, cpu = _timed(trainer.fit)
    return trainer.unwrapped[which], wall, cpu


def run_co(cfg: CodistillConfig, weight: dict[str, Any], data: TokenBlocks, out: Path, ramp_end: int,
           ) -> tuple[torch.nn.Module, torch.nn.Module, float, float, list[float]]:
    if weight["schedule"] in ("linear", "cosine"):
        weight = {**weight, "end_step": ramp_end}
    loss = cfg.loss.model_copy(update={"weight": CodistillWeightConfig.model_validate(weight)})
    cfg = cfg.model_copy(update={"loss": loss, "train": cfg.train.model_copy(update={"output_dir": str(out)})})
    r = codistill_recipe(cfg)
    trainer = Trainer(cfg.train, models=r.models, data=data, loss_fn=r.loss, state=r.state, on_step=r.on_step)
    _, wall, cpu = _timed(trainer.fit)
    a = [r["a"] for r in read_log(out / "log.jsonl") if "a" in r]
    return trainer.unwrapped["teacher"], trainer.unwrapped["student"], wall, cpu, a


def held_out(model: torch.nn.Module, blocks: TokenBlocks, n_vocab: int) -> float:
    return evaluate_blocks(model, blocks, n_vocab=n_vocab, batch_size=16)["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--eval-documents", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    # One thread: on a 2-core machine that other jobs share, two torch threads spin against each other (measured
    # 13x slower per step at load average 12); on an idle machine --threads 2 is faster.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--arms", default="bcd", help="which co-distilled arms to run (subset of bcd)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-codistill"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    data_cfg = DataConfig(source="embedded:wikipedia", block_size=args.block_size, eval_documents=args.eval_documents)
    tok_dir = train_tokenizer(args.out / f"tokenizer-{args.vocab}", data_cfg, args.vocab)
    cfg = base_config(args, tok_dir)
    setup = build_co_setup(cfg)
    splits = setup.splits
    assert splits is not None
    n_vocab = setup.n_vocab
    n_t, n_s = count_parameters(setup.teacher), count_parameters(setup.student)
    tokens = args.steps * args.batch * args.block_size
    print(f"teacher {n_t / 1e6:.2f}M params ({args.teacher_layers}x h{args.teacher_hidden}), student {n_s / 1e6:.2f}M "
          f"({args.student_layers}x h{args.student_hidden}), ratio {n_t / n_s:.1f}x; vocab {n_vocab}; "
          f"{len(splits.train)} train blocks, {len(splits.eval)} held-out blocks x {args.block_size} tokens; "
          f"{args.steps} steps x {args.batch} blocks = {tokens:,} tokens ({tokens / splits.train.n_target_tokens:.2f} "
          f"epochs); {torch.get_num_threads()} threads", flush=True)

    results: dict[str, dict[str, Any]] = {}
    student, wall, cpu = run_solo(cfg, "student", splits.train, args.out / "a-student")
    results["a"] = {"arm": "student alone (CE)", "student_ppl": held_out(student, splits.eval, n_vocab), "wall_s": wall,
                    "cpu_s": cpu}
    print(f"(a) done in {wall:.0f}s: student ppl {results['a']['student_ppl']:.2f}", flush=True)
    teacher, wall, cpu = run_solo(cfg, "teacher", splits.train, args.out / "T-teacher")
    solo_teacher = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    results["T"] = {"arm": "teacher alone (CE)", "teacher_ppl": held_out(teacher, splits.eval, n_vocab),
                    "wall_s": wall, "cpu_s": cpu}
    print(f"(T) done in {wall:.0f}s: teacher ppl {results['T']['teacher_ppl']:.2f}", flush=True)
    separate_wall = results["a"]["wall_s"] + results["T"]["wall_s"]
    separate_cpu = results["a"]["cpu_s"] + results["T"]["cpu_s"]
    for key in args.arms:
        name, weight = ARMS[key]
        teacher, student, wall, cpu, a = run_co(cfg, weight, splits.train, args.out / f"{key}-codistill",
                                                ramp_end=max(args.steps // 2, 1))
        same = all(torch.equal(v, solo_teacher[k]) for k, v in teacher.state_dict().items())
        results[key] = {
            "arm": f"co-distilled, {name}", "student_ppl": held_out(student, splits.eval, n_vocab),
            "teacher_ppl": held_out(teacher, splits.eval, n_vocab), "teacher_equals_solo": same, "wall_s": wall,
            "cpu_s": cpu, "a_mean": sum(a) / len(a), "a_last": a[-1],
            "a_trace": [round(x, 4) for x in a[:: max(len(a) // 10, 1)]],
            "overhead_wall": wall / separate_wall - 1.0, "overhead_cpu": cpu / separate_cpu - 1.0,
        }
        print(f"({key}) done in {wall:.0f}s: student ppl {results[key]['student_ppl']:.2f}, mean a "
              f"{results[key]['a_mean']:.2f}", flush=True)

    base = results["a"]["student_ppl"]
    print()
    print("| arm | student held-out ppl | vs (a) | teacher held-out ppl | mean a(t) | wall s | CPU s | wall vs (a)+(T) "
          "| CPU vs (a)+(T) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, r in results.items():
        s_ppl = f"{r['student_ppl']:.2f}" if "student_ppl" in r else "-"
        rel = f"{(r['student_ppl'] / base - 1) * 100:+.1f}%" if "student_ppl" in r and key != "a" else "-"
        t_ppl = f"{r['teacher_ppl']:.2f}" if "teacher_ppl" in r else "-"
        a_mean = f"{r['a_mean']:.2f}" if "a_mean" in r else "-"
        ow = f"{r['overhead_wall'] * 100:+.0f}%" if "overhead_wall" in r else "-"
        oc = f"{r['overhead_cpu'] * 100:+.0f}%" if "overhead_cpu" in r else "-"
        print(f"| ({key}) {r['arm']} | {s_ppl} | {rel} | {t_ppl} | {a_mean} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} "
              f"| {ow} | {oc} |")
    print()
    print(f"(a)+(T) run separately: {separate_wall:.0f} s wall, {separate_cpu:.0f} s CPU. Co-trained teachers equal "
          f"the solo teacher bitwise: {all(r.get('teacher_equals_solo', True) for r in results.values())}.")
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "teacher_parameters": n_t, "student_parameters": n_s,
            "vocab": n_vocab, "tokens": tokens, "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(), "results": results}
    (args.out / "results.json").write_text(json.dumps(meta, indent=1))
    print(f"results: {args.out / 'results.json'}")
    if any(math.isnan(r.get("student_ppl", 0.0)) for r in results.values()):
        raise SystemExit("a run diverged (NaN perplexity)")


if __name__ == "__main__":
    main()
