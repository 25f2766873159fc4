"""Hard-label distillation: the student learns the tokens the teacher chose, never its probabilities.

- `mode=token` (word-level hard KD): the teacher reads the corpus and its argmax at every target position becomes
  the label,

      loss = alpha * CE(student, teacher argmax) + (1 - alpha) * CE(student, ground truth).

  The teacher runs online in the step, its argmax taken chunk by chunk from hidden states (never [B, T, V] logits),
  or its top-1 ids are read from a top-k soft-label cache (`teacher_cache`; k = 1 is all it needs). At alpha = 0 no
  teacher label is computed: that is the CE baseline `compare` measures every method against (the teacher then only
  scores the held-out blocks).
- `mode=sequence` (how DeepSeek-R1 was distilled into Qwen and Llama students): `lmdistill generate` writes teacher
  completions, and the student is fine-tuned on them with the chat template, loss on completion tokens only. No
  teacher model is needed: the teacher may be a closed model behind an API with a tokenizer of its own.

Losses are sums over target tokens, divided once by the global target-token count (lmdistill.train.loop).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.cache.format import read_manifest
from lmdistill.cache.reader import evaluate_with_cache
from lmdistill.config import HardConfig
from lmdistill.data import IGNORE
from lmdistill.errors import ConfigError
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses import SparseTargets, ce_sum_and_count, mix
from lmdistill.losses.chunked_ce import chunked_ce_sums
from lmdistill.models import decoder_hidden, lm_head
from lmdistill.recipes.common import Recipe, build_setup, describe, open_cache, print_main, run_recipe
from lmdistill.teachers import HFTeacher, Hidden
from lmdistill.train.loop import StepInfo, StepLoss, Trained


@torch.no_grad()
def teacher_argmax(targets: Hidden, mask: Tensor, chunk_size: int = 1024) -> Tensor:
    """The teacher's top-1 token at every position of `mask`, computed `chunk_size` rows of logits at a time.

    Args:
        targets: the teacher's hidden states [B, T, H] and head (`HFTeacher.targets`).
        mask: [B, T] bool, the positions that get a label (`labels != IGNORE`).

    Returns:
        [B, T] int64: the argmax over the shared vocab where `mask`, IGNORE elsewhere.
    """
    labels = torch.full(mask.shape, IGNORE, dtype=torch.long, device=mask.device)
    rows = targets.hidden[mask]  # [N, H]: masked positions are never projected
    if rows.shape[0]:
        labels[mask] = torch.cat([targets.head.logits(rows[s : s + chunk_size]).argmax(-1)
                                  for s in range(0, rows.shape[0], chunk_size)])
    return labels


def cached_top1(targets: SparseTargets, labels: Tensor) -> Tensor:
    """The teacher's top-1 token per position from cached top-k targets [B, T, K]: its most probable stored id,
    IGNORE where `labels` is."""
    best = targets.logprobs.masked_fill(targets.ids < 0, float("-inf")).argmax(-1, keepdim=True)
    top1 = targets.ids.gather(-1, best).squeeze(-1)
    return torch.where(labels != IGNORE, top1, torch.full_like(top1, IGNORE))


def hard_step_loss(student: nn.Module, batch: dict[str, Tensor], teacher_labels: Tensor | None, alpha: float,
                   n_vocab: int, chunk_size: int = 1024, fused: bool = True) -> StepLoss:
    """alpha * CE_sum(teacher tokens) + (1 - alpha) * CE_sum(ground truth) over this micro-batch's target tokens.

    Args:
        batch: input_ids, attention_mask, labels [B, T] (shifted; IGNORE = not learned).
        teacher_labels: [B, T] the teacher's tokens, IGNORE exactly where `batch["labels"]` is; None for plain
            cross-entropy on `batch["labels"]` (mode=sequence, where the ground truth is the teacher's text; alpha=0).
        n_vocab: the shared real vocab; the student's padded output rows are never scored.
        fused: both CEs from one chunked projection of the hidden states, `chunk_size` tokens of logits at a time
            (recomputed in backward); False takes the [B, T, V] logits from the model's forward (FSDP / ZeRO-3).
    """
    label_sets = [batch["labels"]] if teacher_labels is None else [teacher_labels, batch["labels"]]
    if fused:
        h = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])
        sums = chunked_ce_sums(h, lm_head(student, n_vocab), label_sets, chunk_size=chunk_size)
    else:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
        sums = torch.stack([ce_sum_and_count(logits, labels)[0] for labels in label_sets])
    if teacher_labels is None:
        return StepLoss(sums[0], {"ce": sums[0]})
    return StepLoss(mix(sums[0], sums[1], 1, alpha), {"ce_teacher": sums[0], "ce": sums[1]})


def run_hard(cfg: HardConfig) -> dict[str, Any]:
    """Train a student on hard labels; returns the run summary (also written to output_dir/summary.json)."""
    if cfg.teacher_cache:
        read_manifest(cfg.teacher_cache)  # a missing or unfinished cache fails before any model is loaded
    online = cfg.mode == "token" and cfg.teacher_cache is None
    labelled = cfg.mode == "token" and cfg.loss.alpha > 0  # alpha = 0 is plain CE: no teacher label is used
    setup = build_setup(cfg, teacher=online or cfg.eval_teacher)
    assert setup.splits is not None
    train, held = setup.splits.train, setup.splits.eval
    teacher = HFTeacher(setup.teacher, setup.n_vocab) if setup.teacher is not None else None
    cache = eval_cache = None
    if cfg.teacher_cache:  # no temperature check: the argmax is the same at every temperature
        cache, eval_cache = open_cache(cfg.teacher_cache, setup, cfg.data.model_dump(mode="json"))
        if cache.kind != "topk":
            raise ConfigError(
                f"teacher_cache `{cfg.teacher_cache}` holds sampled draws, whose most frequent id need not be the "
                "teacher's argmax; label a top-k cache for hard labels (`lmdistill label --cache.encoding topk "
                "--cache.k 1`)"
            )

    def teacher_labels(batch: dict[str, Tensor]) -> Tensor | None:
        if not labelled:
            return None  # the labels already are the teacher's text (sequence), or CE alone (alpha = 0)
        if cache is not None:
            return cached_top1(cache.targets(batch), batch["labels"])
        assert teacher is not None
        mask = batch["labels"] != IGNORE
        if not cfg.loss.fused:
            return torch.where(mask, teacher.logits(batch).argmax(-1), IGNORE)
        return teacher_argmax(teacher.targets(batch), mask, cfg.loss.chunk_size)

    def loss(models: dict[str, nn.Module], batch: dict[str, Tensor], step: StepInfo) -> dict[str, StepLoss]:
        return {"student": hard_step_loss(models["student"], batch, teacher_labels(batch), cfg.loss.alpha,
                                          setup.n_vocab, cfg.loss.chunk_size, cfg.loss.fused)}

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        kw: dict[str, Any] = {"n_vocab": setup.n_vocab, "batch_size": cfg.train.micro_batch_size,
                              "max_batches": cfg.train.eval_batches, "byte_lengths": setup.byte_lengths}
        if teacher is None and eval_cache is not None:  # KL and agreement against the cached targets
            return evaluate_with_cache(models["student"], eval_cache, held, **kw)
        return evaluate_blocks(models["student"], held, teacher_logits_fn=teacher.logits if teacher else None, **kw)

    info = describe(setup, train, held)
    if cfg.teacher_cache:
        info["teacher_cache"] = cfg.teacher_cache
    name = f"hard-{cfg.mode}" if cfg.mode == "sequence" or labelled else "ce"
    source = "teacher text" if cfg.mode == "sequence" else f"teacher cache {cfg.teacher_cache}" if cache else \
        "online teacher" if labelled else "ground truth only"
    print_main(f"hard distillation ({cfg.mode}, {source}): student {info['student_parameters'] / 1e6:.1f}M params "
               f"({info['student_trainable'] / 1e6:.1f}M trainable), {len(train)} train blocks x "
               f"{cfg.data.block_size} tokens ({info['train_target_tokens']} target tokens), {cfg.train.max_steps} steps")
    return run_recipe(Recipe(name, cfg, setup.tokenizer, train, {"student": Trained(setup.student)}, loss,
                             evaluate if len(held) else None, teachers=[teacher] if teacher else [], info=info,
                             fused=cfg.loss.fused, lora=cfg.student.lora.enabled))
