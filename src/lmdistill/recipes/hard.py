"""Hard-label distillation: the student learns the tokens the teacher chose, never its probabilities.

- `mode=token` (word-level hard KD): the teacher reads the corpus and its argmax at every target position becomes
  the label,

      loss = alpha * CE(student, teacher argmax) + (1 - alpha) * CE(student, ground truth).

  The teacher runs online in the step, its argmax taken chunk by chunk from hidden states (never [B, T, V] logits),
  or its top-1 ids are read from a top-k soft-label cache (`teacher_cache`; k = 1 is all it needs).
- `mode=sequence` (how DeepSeek-R1 was distilled into Qwen and Llama students): `lmdistill generate` writes teacher
  completions, and the student is fine-tuned on them with the chat template, loss on completion tokens only. No
  teacher model is needed: the teacher may be a closed model behind an API with a tokenizer of its own.

Losses are sums over target tokens, divided once by the global target-token count (lmdistill.train.loop).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.cache.format import read_manifest
from lmdistill.cache.reader import CachedTeacher, evaluate_with_cache
from lmdistill.config import HardConfig, ModelConfig, StudentConfig
from lmdistill.data import IGNORE, build_splits, check_block_size
from lmdistill.errors import ConfigError
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses import ce_sum_and_count
from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count, chunked_ce_sums
from lmdistill.losses.fused import SparseTargets
from lmdistill.models import (
    build_student,
    decoder_hidden,
    lm_head_of,
    load_teacher,
    load_tokenizer,
    shared_vocab_size,
)
from lmdistill.recipes.common import Setup, _config_of, build_setup, describe, finish_run, seed_everything
from lmdistill.teachers import HFTeacher, HiddenTargets, project_logits
from lmdistill.train.distributed import check_supported, prepare_frozen
from lmdistill.train.loop import StepLoss, Trainer, make_accelerator


@torch.no_grad()
def teacher_argmax(targets: HiddenTargets, mask: Tensor, chunk_size: int = 1024) -> Tensor:
    """The teacher's top-1 token at every position of `mask`, computed `chunk_size` rows of logits at a time.

    Args:
        targets: the teacher's hidden states [B, T, H] and output layer (`HFTeacher.hidden`).
        mask: [B, T] bool, the positions that get a label (`labels != IGNORE`).

    Returns:
        [B, T] int64: the argmax over the shared vocab where `mask`, IGNORE elsewhere.
    """
    labels = torch.full(mask.shape, IGNORE, dtype=torch.long, device=mask.device)
    rows = targets.hidden[mask]  # [N, H]: masked positions are never projected
    if rows.shape[0]:
        top1 = [project_logits(dataclasses.replace(targets, hidden=rows[s : s + chunk_size])).argmax(-1)
                for s in range(0, rows.shape[0], chunk_size)]
        labels[mask] = torch.cat(top1)
    return labels


def hard_step_loss(student: nn.Module, batch: dict[str, Tensor], teacher_labels: Tensor | None, alpha: float,
                   n_vocab: int, chunk_size: int = 1024, fused: bool = True) -> StepLoss:
    """alpha * CE_sum(teacher tokens) + (1 - alpha) * CE_sum(ground truth) over this micro-batch's target tokens.

    Args:
        batch: input_ids, attention_mask, labels [B, T] (shifted; IGNORE = not learned).
        teacher_labels: [B, T] the teacher's tokens, IGNORE exactly where `batch["labels"]` is; None for plain
            fine-tuning on `batch["labels"]` (mode=sequence, where the ground truth is the teacher's text).
        alpha: weight of the teacher-token term.
        n_vocab: the shared real vocab; the student's padded output rows are never scored.
        fused: CE from hidden states, `chunk_size` tokens of logits at a time (recomputed in backward); False takes
            the [B, T, V] logits from the model's forward (what FSDP / ZeRO-3 need).
    """
    if fused:
        h = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])
        weight, bias, scale, softcap = lm_head_of(student)
        weight, bias = weight[:n_vocab], None if bias is None else bias[:n_vocab]

        def ce(labels: Tensor) -> Tensor:
            return chunked_ce_sum_and_count(h, weight, labels, bias=bias, logit_scale=scale, softcap=softcap,
                                            chunk_size=chunk_size)[0]

        if teacher_labels is not None and 0 < alpha < 1:  # both terms from one projection of the student
            kd, gt = chunked_ce_sums(h, weight, [teacher_labels, batch["labels"]], bias=bias, logit_scale=scale,
                                     softcap=softcap, chunk_size=chunk_size)
            return StepLoss(alpha * kd + (1 - alpha) * gt, {"ce_teacher": kd, "ce": gt})
    else:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]

        def ce(labels: Tensor) -> Tensor:
            return ce_sum_and_count(logits, labels)[0]

    if teacher_labels is None:
        gt = ce(batch["labels"])
        return StepLoss(gt, {"ce": gt})
    zero = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
    kd = ce(teacher_labels) if alpha > 0 else zero
    gt = ce(batch["labels"]) if alpha < 1 else zero
    return StepLoss(alpha * kd + (1 - alpha) * gt, {"ce_teacher": kd, "ce": gt})


def cached_top1(targets: SparseTargets, labels: Tensor) -> Tensor:
    """The teacher's top-1 token per position from cached top-k targets: its most probable stored id.

    Args:
        targets: ids / logprobs [B, T, K] from `CachedTeacher.targets` (-1 = absent).
        labels: [B, T], IGNORE where nothing is learned.

    Returns:
        [B, T] int64, IGNORE where `labels` is.
    """
    best = targets.logprobs.masked_fill(targets.ids < 0, float("-inf")).argmax(-1, keepdim=True)
    top1 = targets.ids.gather(-1, best).squeeze(-1)
    return torch.where(labels != IGNORE, top1, torch.full_like(top1, IGNORE))


def _open_cache(cfg: HardConfig, setup: Setup) -> tuple[CachedTeacher, CachedTeacher | None]:
    """The cache's train split (and eval split, when labelled), checked against this run's tokenizer and data."""
    root = cfg.teacher_cache
    assert root is not None

    def split(name: str) -> CachedTeacher:
        # no temperature check: the argmax is the same at every temperature
        return CachedTeacher(root, name, tokenizer=setup.tokenizer, blocks=getattr(setup.splits, name),
                             data_params=cfg.data.model_dump(mode="json"))

    train = split("train")
    if train.kind != "topk":
        raise ConfigError(
            f"teacher_cache `{cfg.teacher_cache}` holds sampled draws, whose most frequent id need not be the teacher's "
            "argmax; label a top-k cache for hard labels (`lmdistill label --cache.encoding topk --cache.k 1`)"
        )
    has_eval = "eval" in train.manifest.header["data"]["splits"] and len(setup.splits.eval) > 0
    return train, split("eval") if has_eval else None


def student_only(student_cfg: StudentConfig, seed: int,
                 teacher_cfg: ModelConfig | None = None) -> tuple[Any, nn.Module, int]:
    """(tokenizer, student, vocab size) for a run with no teacher in the training step.

    init=pretrained touches no teacher: the student's own tokenizer reads the data, as it must when the teacher is only
    text or log-probs in a file. init=prune / init=config build the student from `teacher_cfg` (its weights / its
    config, and its tokenizer); the teacher model is not kept.
    """
    seed_everything(seed)
    if student_cfg.init == "pretrained":
        tokenizer = load_tokenizer(student_cfg.name_or_path or "", trust_remote_code=student_cfg.trust_remote_code)
        student = build_student(student_cfg, None, None, len(tokenizer), seed=seed)
    elif teacher_cfg is None:
        raise ConfigError(f"student.init={student_cfg.init} builds the student from the teacher; use "
                          "student.init=pretrained with student.name_or_path, or name the teacher")
    else:
        tokenizer = load_tokenizer(teacher_cfg.name_or_path, revision=teacher_cfg.revision,
                                   trust_remote_code=teacher_cfg.trust_remote_code)
        teacher = load_teacher(teacher_cfg) if student_cfg.init == "prune" else None
        config = teacher.config if teacher is not None else _config_of(teacher_cfg)
        student = build_student(student_cfg, teacher, config, len(tokenizer), seed=seed)
    return tokenizer, student, shared_vocab_size(tokenizer, tokenizer, None, student)


def _setup(cfg: HardConfig, load_teacher: bool) -> Setup:
    if load_teacher:
        return build_setup(cfg.teacher, cfg.student, cfg.data, cfg.train)
    tokenizer, student, n_vocab = student_only(cfg.student, cfg.train.seed, cfg.teacher)
    check_block_size(cfg.data.block_size, student.config)
    return Setup(tokenizer=tokenizer, teacher=None, student=student, n_vocab=n_vocab,
                 splits=build_splits(cfg.data, tokenizer))


def run_hard(cfg: HardConfig) -> dict[str, Any]:
    """Train a student on hard labels; returns the run summary (also written to output_dir/summary.json)."""
    if cfg.teacher_cache:
        read_manifest(cfg.teacher_cache)  # a missing or unfinished cache fails before any model is loaded
    accelerator = make_accelerator(cfg.train)
    check_supported(accelerator, fused_loss=cfg.loss.fused, lora=cfg.student.lora.enabled)
    online = cfg.mode == "token" and cfg.teacher_cache is None
    setup = _setup(cfg, load_teacher=online or cfg.eval_teacher)
    # placed for the engine (device, FSDP shards, ZeRO-3 engine) once the student is prepared
    teacher = HFTeacher(setup.teacher, setup.n_vocab) if setup.teacher is not None else None
    cache, eval_cache = _open_cache(cfg, setup) if cfg.teacher_cache else (None, None)

    def teacher_labels(batch: dict[str, Tensor]) -> Tensor | None:
        if cfg.mode == "sequence":
            return None  # the labels already are the teacher's text
        if cache is not None:
            return cached_top1(cache.targets(batch), batch["labels"])
        assert teacher is not None
        mask = batch["labels"] != IGNORE
        if not cfg.loss.fused:
            return torch.where(mask, teacher.logits(batch).argmax(-1), IGNORE)
        return teacher_argmax(teacher.hidden(batch), mask, cfg.loss.chunk_size)

    def evaluate(model: nn.Module) -> dict[str, float]:
        kw: dict[str, Any] = {"n_vocab": setup.n_vocab, "batch_size": cfg.train.micro_batch_size,
                              "max_batches": cfg.train.eval_batches}
        if teacher is None and eval_cache is not None:  # KL and agreement against the cached targets
            return evaluate_with_cache(model, eval_cache, setup.splits.eval, **kw)
        return evaluate_blocks(model, setup.splits.eval, teacher_logits_fn=teacher.logits if teacher else None, **kw)

    info = describe(setup)
    source = {"token": f"teacher cache {cfg.teacher_cache}" if cache else "online teacher", "sequence": "teacher text"}
    accelerator.print(
        f"hard distillation ({cfg.mode}, {source[cfg.mode]}): student {info['student_parameters'] / 1e6:.1f}M params "
        f"({info['student_trainable'] / 1e6:.1f}M trainable), {info['train_blocks']} train blocks x "
        f"{cfg.data.block_size} tokens ({info['train_target_tokens']} target tokens), {cfg.train.max_steps} steps"
    )

    trainer: Trainer | None = None

    def loss_fn(batch: dict[str, Tensor]) -> StepLoss:
        assert trainer is not None
        return hard_step_loss(trainer.model, batch, teacher_labels(batch), cfg.loss.alpha, setup.n_vocab,
                              cfg.loss.chunk_size, cfg.loss.fused)

    def eval_fn(step: int) -> dict[str, float]:
        assert trainer is not None
        return evaluate(trainer.unwrapped)

    trainer = Trainer(cfg.train, model=setup.student, data=setup.splits.train, loss_fn=loss_fn,
                      eval_fn=eval_fn if len(setup.splits.eval) else None, accelerator=accelerator,
                      run_info={"recipe": f"hard-{cfg.mode}"})
    if teacher is not None:
        teacher.model = prepare_frozen(accelerator, teacher.model)
    result = trainer.fit()
    summary: dict[str, Any] = {"recipe": f"hard-{cfg.mode}", **info, "steps": result.step,
                               "final_train_loss": result.last_loss, "train_tokens_per_s": result.tokens_per_s}
    if cfg.teacher_cache:
        summary["teacher_cache"] = cfg.teacher_cache
    return finish_run(trainer, setup.tokenizer, cfg, summary)
