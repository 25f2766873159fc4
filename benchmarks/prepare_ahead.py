"""Online soft KD from a teacher of another tokenizer: the byte-span alignment in the step, or prepared ahead of it.

    OMP_NUM_THREADS=1 python benchmarks/prepare_ahead.py                  # 2 cores: 1 worker against none
    python benchmarks/prepare_ahead.py --workers 0,1,2,4 --threads 4      # a bigger machine

Every step of `soft --loss.cross_tokenizer hybrid` aligns the student's batch with the teacher's tokens (Python,
lmdistill.align.align_batch) before the teacher runs. On a GPU that is CPU time the device waits for: this script
first measures it per micro-batch on the embedded pair's tokenizers (SmolLM2's for the student, Gemma-3's for the
teacher) on the Wikipedia summaries, at `--align-batch` x `--align-block` (a GPU micro-batch). Then it runs the real
`soft` recipe end to end with `train.prepare_workers` = each count of `--workers` (0, the baseline, aligns in the step;
N > 0 forked processes align the next steps' batches while the current one runs, lmdistill.train.prefetch), in the
same run, on randomly initialised 2-layer Llamas of width 64 with the two real tokenizers, and prints each run's
training tokens/s (from the log's timestamps, after the first step) with its ratio to the baseline, and whether
every run logged the same losses. On a CPU the step's arithmetic (the teacher's 262,144-token head above all) dwarfs
the alignment, so there the speed column shows only the workers' contention for the cores; the first line, set
against a GPU step's time, is what prefetching saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _measure import fmt_table  # noqa: E402


def tiny_model(out: Path, tokenizer: object, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,  # type: ignore[arg-type]
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=2048, tie_word_embeddings=True,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # type: ignore[attr-defined]
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", default="0,1", help="comma-separated train.prepare_workers; 0 is the baseline")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--align-batch", type=int, default=8)
    p.add_argument("--align-block", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from lmdistill.align import align_batch
    from lmdistill.config import DataConfig, SoftConfig, load_config
    from lmdistill.data import build_splits
    from lmdistill.models import load_tokenizer
    from lmdistill.recipes.soft import run_soft
    from lmdistill.train.logging import read_log

    s_tok, t_tok = load_tokenizer("embedded:smollm2-135m-instruct"), load_tokenizer("embedded:gemma3-270m")
    data = DataConfig(source="embedded:wikipedia", block_size=args.align_block, max_documents=2000,
                      eval_documents=0)
    blocks = build_splits(data, s_tok).train
    batch = blocks.batch(list(range(args.align_batch)))
    align_batch(batch, s_tok, t_tok)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        align_batch(batch, s_tok, t_tok)
        times.append(time.perf_counter() - start)
    align_ms = statistics.median(times) * 1000
    n = int(batch["attention_mask"].sum())
    print(f"align_batch, {args.align_batch} x {args.align_block} student tokens: {align_ms:.0f} ms "
          f"({n / align_ms * 1000:,.0f} student tokens/s on one core)")

    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    teacher, student = tiny_model(root / "teacher", t_tok, 1), tiny_model(root / "student", s_tok, 2)
    rows: list[tuple[int, float]] = []
    losses: dict[int, list[float]] = {}
    counts = [int(w) for w in args.workers.split(",")]
    for w in counts:
        overrides = {"teacher.name_or_path": str(teacher), "student.init": "pretrained",
                     "student.name_or_path": str(student), "data.source": "embedded:wikipedia",
                     "data.block_size": str(args.block), "data.max_documents": "400", "data.eval_documents": "0",
                     "loss.cross_tokenizer": "hybrid", "train.max_steps": str(args.steps),
                     "train.micro_batch_size": str(args.batch), "train.eval_every": "0", "train.save_every": "0",
                     "train.progress": "false", "train.prepare_workers": str(w),
                     "train.output_dir": str(root / f"run-{w}")}
        summary = run_soft(load_config(SoftConfig, None, [x for k, v in overrides.items() for x in (f"--{k}", v)]))
        log = [r for r in read_log(Path(summary["log"])) if "loss" in r]
        losses[w] = [r["loss"] for r in log]
        # steps 2.. from the log's timestamps (the first step pays the warm-up and the workers' start)
        first, last = log[0], log[-1]
        rows.append((w, (len(log) - 1) * args.batch * args.block / (last["time"] - first["time"])))
    base = rows[0][1]
    print()
    print(fmt_table(["prepare_workers", "train tokens/s", "speed vs in-step", "same losses as in-step"],
                    [[str(w), f"{r:,.0f}", f"{r / base:.2f}x", "yes" if losses[w] == losses[counts[0]] else "NO"]
                     for w, r in rows]))
    print(f"\n{os.cpu_count()} CPU cores, torch threads {args.threads}; {args.steps} steps of {args.batch} x "
          f"{args.block} tokens; tokens/s over steps 2..{args.steps} from the log's timestamps")


if __name__ == "__main__":
    main()
