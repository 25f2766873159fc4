"""One optimizer step of online soft KD (naive vs fused loss) against a plain SFT step of the same student.

    python benchmarks/kd_step.py          # CUDA: Qwen2.5-0.5B-shaped student, Qwen2.5-1.5B-shaped teacher, bf16, 4 x 2048
    python benchmarks/kd_step.py --cpu    # tiny shapes on CPU (runs anywhere, minutes on 2 cores)

Models are randomly initialised from configs (nothing is downloaded). A step is: forward, loss, backward, AdamW
step, zero_grad. Variants:

- ``sft``: the student's own causal-LM loss (``model(ids, labels=ids)``), the baseline of the table.
- ``kd_naive``: teacher logits under no_grad, student logits, :func:`lmdistill.losses.divergence` (forward KL).
- ``kd_fused``: the decoders' last hidden states only, then :func:`lmdistill.losses.fused_loss` (forward KL) on
  the models' heads: no ``[B, T, V]`` logits anywhere.

Reported: median step time over ``--reps`` timed steps (variants interleaved step by step, after a warm-up step
each), tokens/s (``B * T`` per step), and the peak memory of a step. On CUDA that is ``max_memory_allocated``:
weights, gradients, optimizer state and activations, the whole footprint. On CPU it is the resident-set
high-water mark of a fresh process running that variant alone, minus its RSS between steps: activations, logits,
gradients and the optimizer's temporaries, without the weights and optimizer state held between steps (method in
``benchmarks/_measure.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import _status_kib, fmt_table, in_fresh_process, median_seconds  # noqa: E402

from lmdistill.losses import Head, divergence, fused_loss  # noqa: E402

VARIANTS = ("sft", "kd_naive", "kd_fused")

# Qwen2.5-0.5B and -1.5B (config.json of the released models), tiny stand-ins for --cpu
SHAPES = {
    "gpu": {
        "student": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                        intermediate_size=4864),
        "teacher": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960),
        "vocab": 151936, "batch": 4, "seq": 2048, "dtype": "bfloat16",
    },
    "cpu": {
        "student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128),
        "teacher": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=256),
        "vocab": 32768, "batch": 2, "seq": 256, "dtype": "float32",
    },
}  # fmt: skip


def build(shape: dict, which: str, dtype: torch.dtype, device: str, seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=shape["vocab"], tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1_000_000.0, attn_implementation="sdpa", **shape[which])  # fmt: skip
    with torch.device(device):  # initialised where it runs: seconds on a GPU for the 1.5B shape, not minutes on CPU
        model = Qwen2ForCausalLM(config)
    return model.to(dtype=dtype)


def last_hidden(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's ``[B, T, H]`` output, without the lm_head's ``[B, T, V]`` logits."""
    return model.get_decoder()(input_ids=ids).last_hidden_state


def head(model: torch.nn.Module, n_vocab: int) -> Head:
    """The (tied) lm_head rows of the real vocab; Qwen2 heads have no bias, scale or softcap."""
    return Head(model.get_output_embeddings().weight[:n_vocab])


def make_steps(shape: dict, device: str, dtype: torch.dtype, names: tuple[str, ...], compile_models: bool) -> dict:
    """name -> a function that runs one full optimizer step."""
    teacher = build(shape, "teacher", dtype, device, seed=1).eval().requires_grad_(False)
    base = build(shape, "student", dtype, device, seed=0).train()
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]), generator=g).to(device)
    n_vocab = shape["vocab"]
    if compile_models:
        teacher = torch.compile(teacher)

    steps: dict[str, Callable[[], None]] = {}
    for name in names:
        student = copy.deepcopy(base) if len(names) > 1 else base
        if compile_models:
            student = torch.compile(student)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device == "cuda")

        def loss_fn(student: torch.nn.Module = student, name: str = name) -> torch.Tensor:
            if name == "sft":
                return student(input_ids=ids, labels=ids).loss
            if name == "kd_naive":
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits[:, :-1, :n_vocab]
                s_logits = student(input_ids=ids).logits[:, :-1, :n_vocab]
                return divergence(s_logits, t_logits, "forward_kl")
            h_s = last_hidden(student, ids)[:, :-1]
            with torch.no_grad():
                h_t = last_hidden(teacher, ids)[:, :-1]
            sums = fused_loss(h_s, head(student, n_vocab), teacher_hidden=h_t, teacher_head=head(teacher, n_vocab))
            return sums.total / sums.tokens

        def step(loss_fn: Callable[[], torch.Tensor] = loss_fn, opt: torch.optim.Optimizer = opt) -> None:
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    return steps


def child(argv: list[str]) -> None:
    """Fresh-process CPU memory of one variant: what a step adds on top of what is held between steps."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    step = make_steps(SHAPES["cpu"], "cpu", torch.float32, (spec["variant"],), False)[spec["variant"]]
    step()  # warm-up: optimizer state exists and library code is paged in, so neither counts below
    held = _status_kib("VmRSS") or 0
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    step()
    print(json.dumps({"peak": ((_status_kib("VmHWM") or 0) - held) * 1024, "held": held * 1024}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--reps", type=int, help="timed steps per variant (default: CUDA 10, CPU 3)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--compile", action="store_true", help="torch.compile both models (CUDA)")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the tiny CPU version")
    device = "cpu" if args.cpu else "cuda"
    shape = SHAPES[device if device == "cpu" else "gpu"]
    dtype = getattr(torch, shape["dtype"])
    reps = args.reps or (3 if args.cpu else 10)
    names = tuple(args.variants)

    steps = make_steps(shape, device, dtype, names, args.compile)
    peaks: dict[str, int | str] = {}
    if device == "cuda":
        for name, step in steps.items():
            step()  # warm-up, optimizer state
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                step()
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            except torch.cuda.OutOfMemoryError:
                peaks[name] = "OOM"
    else:
        for name in names:
            res = in_fresh_process(__file__, ["--_child", json.dumps({"variant": name,
                                                                     "threads": torch.get_num_threads()})])  # fmt: skip
            peaks[name] = res.get("peak", res.get("error", "?"))
    runnable = {k: v for k, v in steps.items() if peaks[k] != "OOM"}
    times = median_seconds(runnable, reps=reps, warmup=1, cuda=device == "cuda")

    tokens = shape["batch"] * shape["seq"]
    where = f"CPU, {torch.get_num_threads()} threads" if args.cpu else torch.cuda.get_device_name()
    print(f"# kd_step on {where}, torch {torch.__version__}, {shape['dtype']}, {shape['batch']} x {shape['seq']} "
          f"tokens, V={shape['vocab']}, student {shape['student']['hidden_size']}x{shape['student']['num_hidden_layers']}"
          f", teacher {shape['teacher']['hidden_size']}x{shape['teacher']['num_hidden_layers']}, median of {reps}"
          + (", compiled" if args.compile else ""))  # fmt: skip
    base_t, base_m = times.get("sft"), peaks.get("sft")
    rows = []
    for name in names:
        t, m = times.get(name), peaks[name]
        rows.append([
            name,
            "OOM" if t is None else f"{t * 1e3:.0f}",
            "-" if t is None else f"{tokens / t:,.0f}",
            f"{m / 2**20:.0f}" if isinstance(m, int) else str(m),
            f"{base_t / t:.2f}" if t and base_t else "-",
            f"{m / base_m:.2f}" if isinstance(m, int) and isinstance(base_m, int) and base_m else "-",
        ])  # fmt: skip
    print(fmt_table(["variant", "step ms", "tokens/s", "peak MiB", "speed vs sft", "mem vs sft"], rows))


if __name__ == "__main__":
    main()
