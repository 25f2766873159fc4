"""Soft-label distillation: the student learns the teacher's distribution at every target position.

    loss = alpha * divergence(student, teacher) + (1 - alpha) * CE(student, ground truth)

summed over target tokens and divided once by the global target-token count (lmdistill.train.loop). The teacher is
one of three, the rest of the recipe is the same:

- online (default): a frozen model runs in the step; the fused loss projects both models' hidden states chunk by
  chunk, so no [tokens, vocab] logits are held;
- `teacher_cache DIR` (written by `lmdistill label`): sparse targets (top-k + tail, or sampled ids with weights) read
  per batch, no teacher in memory; a student of another tokenizer (`loss.cross_tokenizer`, a cache labelled with
  `cache.cross_tokenizer`) trains on the cache's text re-tokenized, with span targets (lmdistill.cache.spans);
- `api_logprobs FILE` (`lmdistill generate` with logprobs): a black-box teacher's top-k log-probs stored with its
  completions, which are also the data; `lmdistill.api_targets` aligns them with the student's tokens.

With an online teacher, `loss.hidden` adds layer-wise distillation (lmdistill.losses.hidden): weight * the MSE or
1 - cosine between paired layers' hidden states, summed over the target tokens like the rest.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lmdistill.api_spans import InBatchSpanTeacher, load_api_span_splits
from lmdistill.api_targets import InBatchTeacher, load_api_splits
from lmdistill.cache.format import read_manifest
from lmdistill.cache.reader import evaluate_with_cache
from lmdistill.cache.spans import load_cache_span_splits, same_tokenizer, teacher_tokenizer
from lmdistill.config import LossConfig, SoftConfig, SoftLossConfig
from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher, cross_tokenizer_teacher
from lmdistill.data import TokenBlocks
from lmdistill.errors import ConfigError
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses.cross_tokenizer import AlignedTargets, SparseSpanTargets
from lmdistill.losses.hidden import LayerMatch, layer_match
from lmdistill.losses.objective import Targets, distill_loss
from lmdistill.models import load_tokenizer
from lmdistill.recipes.common import (
    Recipe,
    build_setup,
    describe,
    on_main_rank,
    open_cache,
    print_main,
    run_recipe,
)
from lmdistill.teachers import HFTeacher, SparseTeacher, model_layers, model_outputs
from lmdistill.train.loop import StepInfo, StepLoss, Trained


def soft_step_loss(student: nn.Module, batch: dict[str, Tensor], targets: Targets, loss: LossConfig,
                   n_vocab: int) -> StepLoss:
    """alpha * KD_sum + (1 - alpha) * CE_sum of the student over this micro-batch's target tokens."""
    out = model_outputs(student, batch, n_vocab, loss.fused or isinstance(targets, AlignedTargets | SparseSpanTargets))
    return distill_loss(out, targets, batch["labels"], loss.alpha, loss)


def hidden_step_loss(student: nn.Module, batch: dict[str, Tensor], teacher: HFTeacher, loss: SoftLossConfig,
                     match: LayerMatch) -> StepLoss:
    """`soft_step_loss` + loss.hidden.weight * the summed hidden losses of the pairs (each logged as hidden_<s>_<t>),
    with the teacher's and the student's hidden states from one forward each."""
    targets, teacher_states = teacher.layers(batch, loss.fused)
    out, student_states = model_layers(student, batch, teacher.n_vocab, loss.fused)
    return match.add(distill_loss(out, targets, batch["labels"], loss.alpha, loss), student_states, teacher_states,
                     batch["labels"])


def run_soft(cfg: SoftConfig) -> dict[str, Any]:
    """Train a student from an online teacher, a soft-label cache or API log-probs; returns the run summary."""
    online = cfg.teacher_cache is None and cfg.api_logprobs is None
    if cfg.loss.hidden.weight > 0 and not online:
        raise ConfigError(
            "layer-wise distillation (loss.hidden.weight > 0) needs the teacher's hidden states, which only an online "
            f"teacher has; {'teacher_cache' if cfg.teacher_cache is not None else 'api_logprobs'} stores log-probs "
            "only. Drop it to run the teacher online, or set --loss.hidden.weight 0"
        )
    cache_across = False  # a cache of another tokenizer than the student's: span targets aligned at read time
    if cfg.teacher_cache is not None:
        manifest = read_manifest(cfg.teacher_cache)  # a missing or unfinished cache fails before any model is loaded
        if cfg.loss.cross_tokenizer != "refuse" and cfg.student.init == "pretrained":
            student_tok = load_tokenizer(cfg.student.name_or_path or "",
                                         trust_remote_code=cfg.student.trust_remote_code)
            cache_across = not same_tokenizer(manifest, student_tok)
            if cache_across:
                teacher_tokenizer(manifest)  # a cache without the cross-tokenizer fields: relabel, before any model
    setup = build_setup(cfg, teacher=online, data=cfg.api_logprobs is None and not cache_across,
                        cross_tokenizer=cfg.loss.cross_tokenizer != "refuse")
    n_vocab = setup.n_vocab
    eval_kw: dict[str, Any] = {"n_vocab": n_vocab, "batch_size": cfg.train.micro_batch_size,
                               "max_batches": cfg.train.eval_batches, "byte_lengths": setup.byte_lengths}
    extra: dict[str, Any] = {}
    train: TokenBlocks
    held: TokenBlocks
    teacher: HFTeacher | SparseTeacher | CrossTokenizerTeacher | InBatchSpanTeacher
    eval_teacher: HFTeacher | SparseTeacher | CrossTokenizerTeacher | InBatchSpanTeacher | None
    if cache_across:  # the cache's teacher tokens spelled as bytes, re-tokenized for the student, aligned by spans
        assert cfg.teacher_cache is not None and cfg.loss.cross_tokenizer != "refuse"
        train, held, span_report = load_cache_span_splits(cfg.teacher_cache, setup.tokenizer, n_vocab,
                                                          cfg.data.block_size, temperature=cfg.loss.temperature,
                                                          workers=cfg.cache_align_workers,
                                                          progress=cfg.train.progress and on_main_rank(),
                                                          store=cfg.cache_align_store)
        teacher = eval_teacher = InBatchSpanTeacher(cfg.loss.cross_tokenizer, cfg.loss.matched_weight,
                                                    cfg.loss.unmatched_weight)
        source = (f"cache {cfg.teacher_cache} across tokenizers ({cfg.loss.cross_tokenizer}, top-{train.k} per span):"
                  f" {span_report.line()}")
        extra = {"teacher_cache": cfg.teacher_cache, "alignment": span_report.as_dict()}
    elif cfg.api_logprobs is not None and cfg.loss.cross_tokenizer != "refuse":  # its top-k over its own tokens
        train, held, span_report = load_api_span_splits(cfg.api_logprobs, cfg.data, setup.tokenizer, n_vocab)
        teacher = eval_teacher = InBatchSpanTeacher(cfg.loss.cross_tokenizer, cfg.loss.matched_weight,
                                                    cfg.loss.unmatched_weight)
        source = (f"API log-probs `{cfg.api_logprobs}` across tokenizers ({cfg.loss.cross_tokenizer}, top-{train.k}"
                  f" per span): {span_report.line()}")
        extra = {"api_logprobs": cfg.api_logprobs, "alignment": span_report.as_dict()}
    elif cfg.api_logprobs is not None:  # a black-box teacher: its log-probs were stored with its completions
        train, held, report = load_api_splits(cfg.api_logprobs, cfg.data, setup.tokenizer, n_vocab,
                                              tail=cfg.api_logprobs_tail)
        teacher = eval_teacher = InBatchTeacher()
        source = (f"API log-probs `{cfg.api_logprobs}` (top-{train.k - 1} + the sampled token"
                  f"{', tail bucket' if cfg.api_logprobs_tail else ''}): {report.line()}")
        extra = {"api_logprobs": cfg.api_logprobs, "alignment": report.as_dict()}
    else:
        assert setup.splits is not None
        train, held = setup.splits.train, setup.splits.eval
        if cfg.teacher_cache is not None:  # offline: sparse targets from `lmdistill label`, no teacher in memory
            teacher, eval_teacher = open_cache(cfg.teacher_cache, setup, cfg.data.model_dump(mode="json"),
                                               temperature=cfg.loss.temperature, kind=cfg.loss.kind)
            source = f"cache {cfg.teacher_cache}"
            extra = {"teacher_cache": cfg.teacher_cache}
        else:
            assert setup.teacher is not None
            teacher = eval_teacher = HFTeacher(setup.teacher, n_vocab) if setup.teacher_tokenizer is None else \
                cross_tokenizer_teacher(setup.teacher, setup.teacher_tokenizer, setup.tokenizer, cfg, train, held)
            source = f"teacher {sum(p.numel() for p in setup.teacher.parameters()) / 1e6:.1f}M params"
    info = {**describe(setup, train, held), **extra}
    hidden = layer_match(cfg.loss.hidden, setup.student, setup.teacher, seed=cfg.train.seed, info=info)

    def targets(batch: dict[str, Tensor]) -> Targets:
        if isinstance(teacher, HFTeacher):
            return teacher.targets(batch) if cfg.loss.fused else teacher.logits(batch)
        return teacher.targets(batch)

    def loss(models: dict[str, nn.Module], batch: dict[str, Tensor], step: StepInfo) -> dict[str, StepLoss]:
        if hidden is not None:
            assert isinstance(teacher, HFTeacher)
            return {"student": hidden_step_loss(models["student"], batch, teacher, cfg.loss, hidden)}
        return {"student": soft_step_loss(models["student"], batch, targets(batch), cfg.loss, n_vocab)}

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        if isinstance(eval_teacher, HFTeacher):
            return evaluate_blocks(models["student"], held, teacher_logits_fn=eval_teacher.logits, **eval_kw)
        if eval_teacher is None:  # a cache without an eval split: ground-truth metrics only
            return evaluate_blocks(models["student"], held, **eval_kw)
        if isinstance(eval_teacher, CrossTokenizerTeacher | InBatchSpanTeacher):
            return {**evaluate_blocks(models["student"], held, **eval_kw),
                    **eval_teacher.evaluate(models["student"], held, cfg.loss, **eval_kw)}
        return evaluate_with_cache(models["student"], eval_teacher, held, **eval_kw)

    print_main(f"soft distillation: {source} -> student {info['student_parameters'] / 1e6:.1f}M "
                f"({info['student_trainable'] / 1e6:.1f}M trainable), {len(train)} train blocks, "
                f"{cfg.train.max_steps} steps")
    return run_recipe(Recipe(
        "soft" if cfg.api_logprobs is None else "soft-api", cfg, setup.tokenizer, train,
        {"student": Trained(setup.student)}, loss, evaluate if len(held) else None,
        teachers=[teacher] if isinstance(teacher, HFTeacher) else
        [teacher.teacher] if isinstance(teacher, CrossTokenizerTeacher) else [], info=info, fused=cfg.loss.fused,
        lora=cfg.student.lora.enabled,
        prepare=teacher.prepare if isinstance(teacher, CrossTokenizerTeacher) else None,
    ))

