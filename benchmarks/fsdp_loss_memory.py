"""Memory of the distillation loss under FSDP2: the fused loss (head kept unsharded, or resharded and gathered for the
loss) against the unfused path (logits from the models' own forwards), on the same 2-process run.

    python benchmarks/fsdp_loss_memory.py                 # V = 151,936 (Qwen2.5), Hs 896, Ht 1536, 512 tokens/rank
    python benchmarks/fsdp_loss_memory.py --tokens 1024   # more tokens per rank

Each variant runs in its own `accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` on
CPU (gloo; lmdistill turns accelerate's FSDP plugin on there, see `lmdistill.train.distributed.enable_sharding_on_cpu`).
Both models have the vocabulary and widths of Qwen2.5-0.5B (student) and Qwen2.5-1.5B (teacher) but one decoder
layer each, fp32, so the output layers and the logits dominate as they do at scale. A step is the training loop's:
teacher targets, student forward, soft loss (forward KL, alpha 0.5, with CE), backward, zero_grad.

- ``unfused``: ``--loss.fused false``: [N, V] logits from both models' forwards, divergence on them.
- ``fused``: the fused chunked loss, as lmdistill runs it: the student's lm_head is read after its forward, where
  accelerate's FSDP2 wrapping keeps [final norm, lm_head] unsharded until backward (`reshard_after_forward=False`
  on that unit); the frozen teacher is resharded after every forward (`prepare_frozen`), so `lm_head` gathers its
  output layer for the loss (`lmdistill.train.distributed.gathered`) and frees it afterwards.
- ``*_teacher_kept``: the same with the teacher in accelerate's own layout, its [final norm, lm_head] unit left
  unsharded after forward: with no backward to reshard it, the teacher's whole head stays resident all run.

(The student's head cannot be measured resharded-and-gathered on CPU: torch 2.13's FSDP2 crashes (SIGSEGV) in the
backward of a [norm, lm_head] unit resharded after forward on CPU/gloo; accelerate keeps that unit unsharded anyway.)

Columns (per rank, the larger of the two ranks): ``peak``: peak resident memory during the second step above the
resident memory of the freshly sharded models before the first step (VmHWM reset through /proc/self/clear_refs,
every large block mmapped; benchmarks/_measure.py), i.e. the loss's activations and gradients plus what a variant
holds between steps (no optimizer step is taken, so no optimizer state); ``resting``: what is resident after the
second step above the freshly sharded models; ``s/step``: wall time of the second step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("unfused", "fused", "unfused_teacher_kept", "fused_teacher_kept")


def worker(args: argparse.Namespace) -> None:
    import torch
    from _measure import _status_kib, cpu_peak_bytes
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmdistill.config import DivergenceConfig, TrainConfig
    from lmdistill.losses.objective import distill_loss
    from lmdistill.teachers import HFTeacher, model_outputs
    from lmdistill.train.distributed import engine, prepare_frozen
    from lmdistill.train.loop import build_optimizer, make_accelerator

    def model(hidden: int, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        cfg = AutoConfig.for_model("llama", vocab_size=args.vocab, hidden_size=hidden, intermediate_size=hidden,
                                   num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2,
                                   tie_word_embeddings=False, max_position_embeddings=4096)
        return AutoModelForCausalLM.from_config(cfg)

    acc = make_accelerator(TrainConfig(precision="fp32"))
    assert engine(acc) == "fsdp", engine(acc)
    cfg = TrainConfig()
    student = model(args.hs, 1)
    student, optimizer = acc.prepare(student, build_optimizer(student, cfg))
    teacher = HFTeacher(prepare_frozen(acc, model(args.ht, 2)), args.vocab)
    if args.variant.endswith("_teacher_kept"):  # accelerate's own layout: [norm, lm_head] unsharded after forward
        teacher.model.lm_head.set_reshard_after_forward(False, recurse=False)
    fused = args.variant.startswith("fused")
    loss_cfg = DivergenceConfig(kind="forward_kl")
    g = torch.Generator().manual_seed(acc.process_index)
    ids = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "attention_mask": torch.ones(1, args.tokens, dtype=torch.long)}

    def step() -> None:
        targets = teacher.targets(batch) if fused else teacher.logits(batch)
        out = model_outputs(student, batch, args.vocab, fused)
        loss = distill_loss(out, targets, batch["labels"], 0.5, loss_cfg).loss_sum / args.tokens
        del out, targets
        acc.backward(loss)
        optimizer.zero_grad(set_to_none=True)

    base = _status_kib("VmRSS") or 0  # the sharded models, nothing else yet
    step()  # warm-up: thread pools, process-group buffers, and what a variant keeps between steps
    before = _status_kib("VmRSS") or 0
    t0 = time.perf_counter()
    peak = cpu_peak_bytes(step) + (before - base) * 1024
    seconds = time.perf_counter() - t0
    resting = ((_status_kib("VmRSS") or 0) - base) * 1024
    result = torch.tensor([peak, resting, seconds], dtype=torch.float64)
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    if acc.is_main_process:
        print(json.dumps({"variant": args.variant, "peak": result[0].item(), "resting": result[1].item(),
                          "seconds": result[2].item()}), flush=True)


def launch(variant: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(ROOT / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", __file__, "--worker",
           "--variant", variant, "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hs", str(args.hs),
           "--ht", str(args.ht)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"variant": variant, "error": (out.stderr or out.stdout).strip().splitlines()[-3:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default="fused")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank per micro-batch")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hs", type=int, default=896, help="student hidden size")
    ap.add_argument("--ht", type=int, default=1536, help="teacher hidden size")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which to run")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from _measure import fmt_table

    rows = [launch(v, args) for v in args.variants]
    mib = 2.0**20
    base = next((r["peak"] for r in rows if r["variant"] == "unfused" and "error" not in r), None)
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["variant"], "error: " + " | ".join(r["error"])[-80:], "", "", ""])
            continue
        ratio = f"{r['peak'] / base:.2f}" if base else "-"
        table.append([r["variant"], f"{r['peak'] / mib:,.0f} MiB", ratio, f"{r['resting'] / mib:,.0f} MiB",
                      f"{r['seconds']:.2f}"])
    print(f"FSDP2, 2 CPU processes (gloo), V={args.vocab:,}, Hs={args.hs}, Ht={args.ht}, {args.tokens} tokens/rank, fp32")
    print(fmt_table(["variant", "peak", "x unfused", "resting", "s/step"], table))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
