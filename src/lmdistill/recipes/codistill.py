"""Co-distillation: a teacher and a student learn in the same loop, on the same batches, usually both from scratch.

Per optimizer step, on each micro-batch (one forward per model):

    teacher loss = (1 - mutual) * CE_T + mutual * D(teacher, student.detach())          mutual = 0 unless asked
    student loss = a(t) * D(student, teacher.detach()) + (1 - a(t)) * CE_S

then both optimizers step (the teacher only every `teacher.update_every` steps). The student's target is the
teacher's logits from the teacher's own training forward, taken before the teacher's update on that batch, so there
is no extra teacher forward. Losses are sums over target tokens divided once by the global token count, as in the core
loop. a(t) comes from lmdistill.codistill_weights (constant, ramp, or driven by the teacher's measured quality).

`loss.hidden.weight` > 0 adds to the student's loss its hidden-state loss to the teacher's detached states at paired
layers (lmdistill.losses.hidden; the teacher still learns from CE alone). Both models start untrained, so there is no
pruning map: the pairs default to evenly spaced layers (`even_pairs`). A width projection rides on the student:
checkpointed with it, not exported.

Both models are checkpointed together (weights, optimizers, schedulers, RNG, a(t) state) and saved at the end with
save_pretrained under `<output_dir>/teacher` and `<output_dir>/student`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.codistill_weights import Weighting, build_weighting
from lmdistill.config import CodistillConfig, CodistillLossConfig
from lmdistill.errors import CheckpointError
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses import distill_loss
from lmdistill.losses.hidden import LayerMatch, layer_match
from lmdistill.recipes.common import Recipe, build_co_setup, describe, print_main, run_recipe
from lmdistill.teachers import Hidden, model_layers, model_outputs
from lmdistill.train.loop import StepInfo, StepLoss, Trained

# ---------------------------------------------------------------------------------------------------------------------
# the per-micro-batch losses


def codistill_losses(teacher: nn.Module, student: nn.Module, batch: dict[str, Tensor], loss: CodistillLossConfig,
                     n_vocab: int, *, a: float, teacher_grad: bool = True,
                     hidden: LayerMatch | None = None) -> tuple[StepLoss, StepLoss]:
    """Both models' loss sums over this micro-batch's target tokens, from one forward pass each.

    Args:
        batch: input_ids / labels / attention_mask, each [B, T]; labels already shifted, -100 = not learned.
        a: weight of the divergence in the student's loss, in [0, 1].
        teacher_grad: whether the teacher learns on this step; False runs its forward under no_grad (its targets are
            still needed) and drops the mutual term.
        hidden: layer-wise distillation: the student's loss adds its pairs' losses to the teacher's detached states.

    Returns:
        (teacher, student) StepLoss; teacher parts: ce (and kd with mutual > 0); student parts: ce, kd. Each side sees
        the other only through detached tensors, so the student's divergence never reaches the teacher's gradients
        and the teacher's mutual term never reaches the student's.
    """
    mutual = loss.mutual if teacher_grad else 0.0
    grad_ctx = contextlib.nullcontext() if teacher_grad else torch.no_grad()
    with grad_ctx:
        t, t_states = _forward(teacher, batch, n_vocab, loss.fused, layers=hidden is not None)
    s, s_states = _forward(student, batch, n_vocab, loss.fused, layers=hidden is not None)
    student_loss = distill_loss(s, _detached(t), batch["labels"], a, loss)
    if hidden is not None:
        student_loss = hidden.add(student_loss, s_states, t_states, batch["labels"])
    with grad_ctx:
        teacher_loss = distill_loss(t, _detached(s) if mutual > 0 else None, batch["labels"], mutual, loss)
    return teacher_loss, student_loss


def _forward(model: nn.Module, batch: dict[str, Tensor], n_vocab: int, fused: bool,
             layers: bool) -> tuple[Hidden | Tensor, tuple[Tensor, ...]]:
    return model_layers(model, batch, n_vocab, fused) if layers else (model_outputs(model, batch, n_vocab, fused), ())


def _detached(out: Hidden | Tensor) -> Hidden | Tensor:
    return out.detached() if isinstance(out, Hidden) else out.detach()


# ---------------------------------------------------------------------------------------------------------------------
# the recipe


class WeightingState:
    """a(t)'s state in a checkpoint; resuming under another schedule is refused (the state would mean something else)."""

    def __init__(self, weighting: Weighting, schedule: str) -> None:
        self.weighting, self.schedule = weighting, schedule

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "state": self.weighting.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved.get("schedule") != self.schedule:
            raise CheckpointError(
                f"the checkpoint was written with loss.weight.schedule={saved.get('schedule')!r}, this run asks for "
                f"{self.schedule!r}; resume with the same schedule or start a fresh output_dir"
            )
        self.weighting.load_state_dict(saved["state"])


def codistill_recipe(cfg: CodistillConfig) -> Recipe:
    """Both models, their step loss (the teacher's targets come from its own training forward), a(t) and its state."""
    setup = build_co_setup(cfg)
    splits, teacher = setup.splits, setup.teacher
    assert splits is not None and teacher is not None
    weighting = build_weighting(cfg.loss.weight, cfg.train.max_steps)
    info = describe(setup, splits.train, splits.eval)
    hidden = layer_match(cfg.loss.hidden, setup.student, teacher, seed=cfg.train.seed + 1, info=info, default="even")

    def loss(models: dict[str, nn.Module], batch: dict[str, Tensor], step: StepInfo) -> dict[str, StepLoss]:
        lt, ls = codistill_losses(models["teacher"], models["student"], batch, cfg.loss, setup.n_vocab,
                                  a=weighting.value(step.step), teacher_grad="teacher" in step.updating,
                                  hidden=hidden)
        return {"teacher": lt, "student": ls}

    def on_step(step: int, means: dict[str, float]) -> dict[str, float]:
        a = weighting.value(step)  # the weight this step used; observing moves it for the next one
        # fed the global per-token CE, so a(t+1) is the same on every rank
        weighting.observe(means["ce_teacher"], means["ce_student"])
        return {"a": a}

    @torch.no_grad()
    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        """Held-out student metrics plus the teacher's perplexity, KL(teacher || student) and top-1 agreement."""
        live = models["teacher"]

        def teacher_logits(batch: dict[str, Tensor]) -> Tensor:
            was = live.training
            live.eval()
            out = live(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            live.train(was)
            return out.logits[..., : setup.n_vocab]

        return evaluate_blocks(models["student"], splits.eval, n_vocab=setup.n_vocab,
                               batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches,
                               teacher_logits_fn=teacher_logits, byte_lengths=setup.byte_lengths)

    models = {"teacher": Trained(teacher, cfg.teacher.lr, cfg.teacher.update_every),
              "student": Trained(setup.student, cfg.student.lr)}
    return Recipe("codistill", cfg, setup.tokenizer, splits.train, models, loss,
                  evaluate if len(splits.eval) else None, info=info,
                  state={"weighting": WeightingState(weighting, cfg.loss.weight.schedule)}, on_step=on_step,
                  fused=cfg.loss.fused)


def run_codistill(cfg: CodistillConfig) -> dict[str, Any]:
    """Co-train teacher and student; returns the run summary (also written to output_dir/summary.json)."""
    recipe = codistill_recipe(cfg)
    w, info = cfg.loss.weight, recipe.info
    print_main(
        f"co-distillation: teacher {info['teacher_parameters'] / 1e6:.2f}M params, student "
        f"{info['student_parameters'] / 1e6:.2f}M, {info['train_blocks']} train blocks x {cfg.data.block_size} "
        f"tokens, {cfg.train.max_steps} steps, a(t) {w.schedule}{', mutual ' + str(cfg.loss.mutual) if cfg.loss.mutual else ''}"
    )
    return run_recipe(recipe)
