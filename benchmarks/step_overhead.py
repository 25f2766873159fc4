"""Time per optimizer step of online soft KD against a plain CE (SFT) step of the same student, same batches.

    python benchmarks/step_overhead.py                 # embedded default: SmolLM2-135M teacher, pruned student
    python benchmarks/step_overhead.py --steps 10 --block 256 --batch 8

The ideal ratio is 1 + N_teacher / (3 * N_student): a teacher forward costs 2 FLOPs per parameter per token, a
student forward + backward 6. A measured ratio at or below it means the teacher adds no overhead beyond its
arithmetic. All paths are measured in the same run, alternating, after a warm-up step each.

Paths: SFT; soft KD on materialised logits (reference); the fused loss with the CE in the same pass (what `soft`
runs); and the fused divergence followed by a separate chunked CE, which projects the student twice (what `soft`
ran before the CE was folded in), to show what the fold buys.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmdistill.config import DataConfig, LossConfig, ModelConfig, SoftConfig, StudentConfig, TrainConfig
from lmdistill.losses import ce_sum_and_count, fused_loss
from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count
from lmdistill.models import decoder_hidden, lm_head
from lmdistill.recipes.common import build_setup
from lmdistill.recipes.soft import soft_step_loss
from lmdistill.teachers import HFTeacher
from lmdistill.train.loop import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--keep-layers", default="0,6,12,18,24,29")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = build_setup(SoftConfig(
        teacher=ModelConfig(name_or_path=args.teacher),
        student=StudentConfig(init="prune", keep_layers=[int(i) for i in args.keep_layers.split(",")]),
        data=DataConfig(block_size=args.block, max_documents=400, eval_documents=0),
    ), teacher=True)
    assert setup.splits is not None
    assert setup.teacher is not None
    teacher = HFTeacher(setup.teacher.to(device), setup.n_vocab)
    student = setup.student.to(device)
    opt = build_optimizer(student, TrainConfig(lr=1e-5))
    n_t = sum(p.numel() for p in setup.teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    ideal = 1 + n_t / (3 * n_s)

    def batch(i: int) -> dict[str, torch.Tensor]:
        idx = [(i * args.batch + j) % len(setup.splits.train) for j in range(args.batch)]
        return {k: v.to(device) for k, v in setup.splits.train.batch(idx).items()}

    def sft_step(b: dict[str, torch.Tensor]) -> None:
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., : setup.n_vocab]
        ce, n = ce_sum_and_count(logits, b["labels"])
        (ce / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def kd_step(b: dict[str, torch.Tensor], fused: bool) -> None:
        targets = teacher.targets(b) if fused else teacher.logits(b)
        out = soft_step_loss(student, b, targets, LossConfig(alpha=0.9, fused=fused), setup.n_vocab)
        (out.loss_sum / (b["labels"] != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def kd_step_two_projections(b: dict[str, torch.Tensor]) -> None:
        h = decoder_hidden(student, b["input_ids"], b["attention_mask"])
        head = lm_head(student, setup.n_vocab)
        t = teacher.targets(b)
        kd, _, _, n = fused_loss(h, head, teacher_hidden=t.hidden, teacher_head=t.head, mask=b["labels"] != -100)
        ce, _ = chunked_ce_sum_and_count(h, head, b["labels"])
        ((0.9 * kd + 0.1 * ce) / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    paths = {"sft (CE only)": lambda b: sft_step(b), "soft KD, reference loss": lambda b: kd_step(b, False),
             "soft KD, fused (KD+CE)": lambda b: kd_step(b, True),
             "fused KD, separate CE": kd_step_two_projections}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for fn in paths.values():
        fn(batch(0))  # warm-up
    for i in range(args.steps):
        for name, fn in paths.items():  # alternate so drift in machine load hits every path alike
            b = batch(i + 1)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(b)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch * args.block
    base = statistics.median(times["sft (CE only)"])
    print(f"device {device}, threads {torch.get_num_threads()}, teacher {n_t / 1e6:.1f}M params, student "
          f"{n_s / 1e6:.1f}M, {args.batch}x{args.block} tokens per step, {args.steps} timed steps (median)")
    print(f"{'path':<26}{'s/step':>9}{'tokens/s':>11}{'ratio vs SFT':>14}{'ideal':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        ideal_s = "1.00" if name.startswith("sft") else f"{ideal:.2f}"
        print(f"{name:<26}{med:>9.3f}{tokens / med:>11,.0f}{med / base:>14.2f}{ideal_s:>8}")


if __name__ == "__main__":
    main()
