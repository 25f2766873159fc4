"""Soft-label distillation with a frozen teacher running online in the same step.

    loss = alpha * divergence(student, teacher) + (1 - alpha) * CE(student, ground truth)

summed over target tokens and divided once by the global target-token count (lmdistill.train.loop).

With `teacher_cache` (a directory written by `lmdistill label`) no teacher model is in memory: the divergence is
computed against the cache's sparse targets (top-k + tail, or sampled ids with weights), read per batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lmdistill.cache.format import read_manifest
from lmdistill.cache.reader import CachedTeacher, evaluate_with_cache
from lmdistill.config import LossConfig, SoftConfig
from lmdistill.data import IGNORE
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses import ce_sum_and_count, divergence_sum_and_count, sparse_divergence_sum_and_count
from lmdistill.losses.fused import SparseTargets, fused_distill_loss_sums
from lmdistill.models import decoder_hidden, lm_head_of
from lmdistill.recipes.common import Setup, build_setup, describe, finish_run
from lmdistill.teachers import HFTeacher, SparseTeacher
from lmdistill.train.distributed import check_supported, prepare_frozen
from lmdistill.train.loop import StepLoss, Trainer, make_accelerator


def soft_step_loss(student: torch.nn.Module, teacher: HFTeacher, batch: dict[str, Tensor], loss: LossConfig,
                   n_vocab: int) -> StepLoss:
    """alpha * KD_sum + (1 - alpha) * CE_sum over this micro-batch's target tokens."""
    labels = batch["labels"]
    mask = labels != IGNORE
    if loss.fused:
        # Never materialise [B, T, V] logits of either model: project chunk by chunk inside the loss.
        h = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])
        weight, bias, scale, softcap = lm_head_of(student)
        weight = weight[:n_vocab]
        bias = None if bias is None else bias[:n_vocab]
        t = teacher.hidden(batch)
        # the ground-truth CE rides in the same pass: the student's lm_head runs once for both terms
        sums = fused_distill_loss_sums(
            h, weight, teacher_hidden=t.hidden, teacher_weight=t.weight, student_bias=bias, teacher_bias=t.bias,
            student_logit_scale=scale, teacher_logit_scale=t.logit_scale, student_softcap=softcap,
            teacher_softcap=t.softcap, kind=loss.kind, beta=loss.beta, temperature=loss.temperature, mask=mask,
            labels=labels, alpha=loss.alpha,
        )
        return StepLoss(sums.total, {"kd": sums.kd, "ce": sums.ce})
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
    t_logits = teacher.logits(batch)
    kd, _ = divergence_sum_and_count(logits, t_logits, loss.kind, beta=loss.beta, temperature=loss.temperature,
                                     mask=mask)
    ce = ce_sum_and_count(logits, labels)[0]
    total = loss.alpha * kd + (1 - loss.alpha) * ce
    return StepLoss(total, {"kd": kd, "ce": ce})


def cached_step_loss(student: torch.nn.Module, cache: SparseTeacher, batch: dict[str, Tensor], loss: LossConfig,
                     n_vocab: int) -> StepLoss:
    """alpha * KD_sum + (1 - alpha) * CE_sum against sparse targets [B, T, K] read from a soft-label cache."""
    labels = batch["labels"]
    mask = labels != IGNORE
    targets: SparseTargets = cache.targets(batch)
    if loss.fused:
        h = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])
        weight, bias, scale, softcap = lm_head_of(student)
        weight = weight[:n_vocab]
        bias = None if bias is None else bias[:n_vocab]
        sums = fused_distill_loss_sums(
            h, weight, sparse_targets=targets, student_bias=bias, student_logit_scale=scale, student_softcap=softcap,
            kind=loss.kind, beta=loss.beta, temperature=loss.temperature, mask=mask, labels=labels,
            alpha=loss.alpha,
        )
        return StepLoss(sums.total, {"kd": sums.kd, "ce": sums.ce})
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
    kd, _ = sparse_divergence_sum_and_count(
        logits, targets.ids, targets.logprobs, loss.kind, tail_logprob=targets.tail_logprob,
        target_weights=targets.weights, estimator=targets.estimator, beta=loss.beta, temperature=loss.temperature,
        mask=mask,
    )
    ce = ce_sum_and_count(logits, labels)[0]
    total = loss.alpha * kd + (1 - loss.alpha) * ce
    return StepLoss(total, {"kd": kd, "ce": ce})


def open_teacher_cache(cfg: SoftConfig, setup: Setup) -> tuple[CachedTeacher, CachedTeacher | None]:
    """The cache's train split (and eval split, when labelled), verified against this run's tokenizer, data, loss."""
    def split(name: str) -> CachedTeacher:
        assert cfg.teacher_cache is not None
        return CachedTeacher(cfg.teacher_cache, name, tokenizer=setup.tokenizer, blocks=getattr(setup.splits, name),
                             data_params=cfg.data.model_dump(mode="json"), temperature=cfg.loss.temperature,
                             kind=cfg.loss.kind)

    train = split("train")
    has_eval = "eval" in train.manifest.header["data"]["splits"] and len(setup.splits.eval) > 0
    return train, split("eval") if has_eval else None


def run_soft(cfg: SoftConfig) -> dict[str, Any]:
    """Train from an online teacher or a soft-label cache; returns the summary (also in output_dir/summary.json)."""
    if cfg.api_logprobs:  # a black-box teacher: its log-probs were stored with its completions
        from lmdistill.recipes.soft_api import run_soft_api

        return run_soft_api(cfg)
    if cfg.teacher_cache is not None:
        read_manifest(cfg.teacher_cache)  # a missing or unfinished cache fails before any model is loaded
    accelerator = make_accelerator(cfg.train)
    check_supported(accelerator, fused_loss=cfg.loss.fused, lora=cfg.student.lora.enabled)
    setup = build_setup(cfg.teacher, cfg.student, cfg.data, cfg.train, load_teacher_model=cfg.teacher_cache is None)
    info = describe(setup)
    if cfg.teacher_cache is not None:  # offline: sparse targets from `lmdistill label`, no teacher in memory
        cache, eval_cache = open_teacher_cache(cfg, setup)
        source = f"cache {cfg.teacher_cache}"

        def step_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> StepLoss:
            return cached_step_loss(model, cache, batch, cfg.loss, setup.n_vocab)

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            if eval_cache is None:
                return evaluate_blocks(model, setup.splits.eval, n_vocab=setup.n_vocab,
                                       batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches)
            return evaluate_with_cache(model, eval_cache, setup.splits.eval, n_vocab=setup.n_vocab,
                                       batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches)
    else:
        assert setup.teacher is not None
        # Placed for the engine (device, FSDP shards, ZeRO-3 engine) right after the student is prepared.
        teacher = HFTeacher(setup.teacher, setup.n_vocab)
        source = f"teacher {info['teacher_parameters'] / 1e6:.1f}M params"

        def step_loss(model: torch.nn.Module, batch: dict[str, Tensor]) -> StepLoss:
            return soft_step_loss(model, teacher, batch, cfg.loss, setup.n_vocab)

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            return evaluate_blocks(model, setup.splits.eval, n_vocab=setup.n_vocab,
                                   batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches,
                                   teacher_logits_fn=teacher.logits)
    if accelerator.is_main_process:
        accelerator.print(
            f"soft distillation: {source} -> student "
            f"{info['student_parameters'] / 1e6:.1f}M ({info['student_trainable'] / 1e6:.1f}M trainable), "
            f"{info['train_blocks']} train blocks x {cfg.data.block_size} tokens, {cfg.train.max_steps} steps"
        )

    trainer: Trainer | None = None

    def loss_fn(batch: dict[str, Tensor]) -> StepLoss:
        assert trainer is not None
        return step_loss(trainer.model, batch)

    def eval_fn(step: int) -> dict[str, float]:
        assert trainer is not None
        return evaluate(trainer.unwrapped)

    trainer = Trainer(cfg.train, model=setup.student, data=setup.splits.train, loss_fn=loss_fn,
                      eval_fn=eval_fn if len(setup.splits.eval) else None, accelerator=accelerator,
                      run_info={"recipe": "soft"})
    if cfg.teacher_cache is None:
        assert setup.teacher is not None
        teacher.model = prepare_frozen(accelerator, setup.teacher)
    result = trainer.fit()
    summary: dict[str, Any] = {"recipe": "soft", **info, "steps": result.step, "final_train_loss": result.last_loss,
                               "train_tokens_per_s": result.tokens_per_s}
    if cfg.teacher_cache is not None:
        summary["teacher_cache"] = cfg.teacher_cache
    return finish_run(trainer, setup.tokenizer, cfg, summary)
