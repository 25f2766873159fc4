"""A local teacher of another tokenizer: it reads each student batch's text in its own tokens and gives targets
aligned to the student's by byte spans (lmdistill.align, lmdistill.losses.cross_tokenizer). Chat rows are read
through the teacher's own chat template and aligned on their content (lmdistill.chat_align)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmdistill.align import AlignedBatch, VocabMap, align_batch, check_alignable, vocab_map
from lmdistill.assets import cache_root
from lmdistill.chat_align import ChatAligner
from lmdistill.config import LossConfig, OnPolicyConfig, SoftConfig
from lmdistill.data import IGNORE, ChatBlocks, TokenBlocks
from lmdistill.errors import ConfigError
from lmdistill.evaluate import held_out_batches
from lmdistill.losses.chunked_ce import chunked_token_logprobs
from lmdistill.losses.cross_tokenizer import (
    AlignedTargets,
    CrossTokenizerMode,
    SparseSpanTargets,
    span_sums,
    teacher_spans,
)
from lmdistill.losses.head import Hidden
from lmdistill.teachers import HFTeacher, model_outputs
from lmdistill.token_bytes import tokenizer_name

log = logging.getLogger(__name__)


class CrossTokenizerTeacher:
    """A frozen HF causal LM with its own tokenizer, run online on the student's text."""

    def __init__(self, model: nn.Module, teacher_tokenizer: Any, student_tokenizer: Any, *,
                 mode: CrossTokenizerMode, temperature: float = 1.0, matched_weight: float = 1.0,
                 unmatched_weight: float = 1.0, cache_dir: str | None = None,
                 chat: Sequence[TokenBlocks] = ()) -> None:
        self.teacher = HFTeacher(model, len(teacher_tokenizer))
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.n_vocab = len(teacher_tokenizer)
        self.mode = mode
        self.temperature = temperature
        self.matched_weight = matched_weight
        self.unmatched_weight = unmatched_weight
        self.vmap: VocabMap = vocab_map(teacher_tokenizer, student_tokenizer, cache_dir)
        # chat data: the teacher renders each conversation with its own template (lmdistill.chat_align)
        self.chat = ChatAligner(student_tokenizer, teacher_tokenizer, chat) if chat else None

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A data batch with its alignment (`AlignedBatch.as_fields`): the CPU half of `scores`, which the loop runs
        ahead of the step in worker processes (lmdistill.train.prefetch)."""
        return {**batch, **align_batch(batch, self.student_tokenizer, self.teacher_tokenizer, self.chat).as_fields()}

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> AlignedTargets:
        _, targets, _ = self.scores(batch)
        assert targets is not None
        return targets

    @torch.no_grad()
    def scores(self, batch: dict[str, Tensor],
               dense: bool = True) -> tuple[AlignedBatch, AlignedTargets | None, Tensor]:
        """The alignment, the aligned targets (`dense`; else None) and the teacher's log-prob of each compared span's
        bytes [S] (the sum of its tokens' log-probs, temperature 1), from one teacher forward."""
        device = batch["input_ids"].device
        ab = AlignedBatch.from_fields(batch) or align_batch(batch, self.student_tokenizer, self.teacher_tokenizer,
                                                             self.chat)
        ab = ab.to(device)
        out = self.teacher.targets({"input_ids": ab.teacher_input_ids, "attention_mask": ab.teacher_attention_mask})
        rest = span_sums(chunked_token_logprobs(out.hidden, out.head, ab.teacher_rest), ab.teacher_rest_span,
                         ab.n_spans)
        first = torch.full_like(ab.teacher_input_ids, IGNORE)
        first[ab.span_batch, ab.teacher_pos] = ab.teacher_first
        span_logprob = chunked_token_logprobs(out.hidden, out.head, first)[ab.span_batch, ab.teacher_pos] + rest
        if not dense:
            return ab, None, span_logprob
        vmap = self.vmap.to(device)
        reduced = teacher_spans(out.hidden[ab.span_batch, ab.teacher_pos], out.head, ab.teacher_first, rest, vmap,
                                self.mode, self.temperature)
        return ab, AlignedTargets(reduced, ab, vmap, self.mode, self.temperature, self.matched_weight,
                                  self.unmatched_weight), span_logprob

    def evaluate(self, student: nn.Module, held: TokenBlocks, loss: LossConfig, **kw: Any) -> dict[str, float]:
        return evaluate_spans(self, student, held, loss, **kw)


class SpanTeacher(Protocol):
    """A teacher of another tokenizer: targets whose loss is summed over aligned spans (`AlignedTargets`, the API's
    `SparseSpanTargets`)."""

    def targets(self, batch: dict[str, Tensor]) -> AlignedTargets | SparseSpanTargets:
        ...


@torch.no_grad()
def evaluate_spans(teacher: SpanTeacher, student: nn.Module, held: TokenBlocks, loss: LossConfig, *, n_vocab: int,
                   batch_size: int, max_batches: int | None = None, **_: Any) -> dict[str, float]:
    """Held-out span loss per compared span (`span_kd`, the training divergence) and the share of target tokens in
    1:1, merged and no span."""
    was_training = student.training
    student.eval()
    kd, spans = 0.0, 0
    counts: dict[str, int] = {}
    for batch in held_out_batches(held, batch_size, max_batches, next(student.parameters()).device):
        targets = teacher.targets(batch)
        out = model_outputs(student, batch, n_vocab, fused=True)
        assert isinstance(out, Hidden)
        kd += float(targets.kd_sum(out, loss.kind, loss.beta, loss.temperature))
        spans += targets.n_spans
        for k, v in targets.counts.items():
            counts[k] = counts.get(k, 0) + v
    student.train(was_training)
    total = max(sum(counts.values()), 1)
    return {"span_kd": kd / max(spans, 1), **{f"aligned_{k}": v / total for k, v in counts.items()}}


def cross_tokenizer_teacher(model: nn.Module, teacher_tokenizer: Any, student_tokenizer: Any,
                            cfg: SoftConfig | OnPolicyConfig,
                            sample: TokenBlocks, *others: TokenBlocks) -> CrossTokenizerTeacher:
    """`soft`'s (and `onpolicy`'s) teacher when its tokenizer differs from the student's; refuses what cannot cross
    tokenizers: a tokenizer without byte offsets, layer-wise distillation, text on which no span aligns (checked on
    the first training blocks `sample`, before any step). Chat blocks (`sample` and `others`: every split the run
    reads) are read through the teacher's own chat template when its tokenizer has one."""
    if cfg.loss.hidden.weight > 0:
        raise ConfigError("layer-wise distillation (loss.hidden) compares positions, which a teacher of another "
                          "tokenizer does not share with the student; set --loss.hidden.weight 0")
    assert cfg.loss.cross_tokenizer != "refuse"
    chat = [b for b in (sample, *others) if isinstance(b, ChatBlocks)]
    if chat and getattr(teacher_tokenizer, "chat_template", None) is None:
        log.warning("the teacher's tokenizer `%s` has no chat template: it reads the student's rendering of each "
                    "conversation without the student's template markers", tokenizer_name(teacher_tokenizer))
    teacher = CrossTokenizerTeacher(model, teacher_tokenizer, student_tokenizer, mode=cfg.loss.cross_tokenizer,
                                    temperature=cfg.loss.temperature, matched_weight=cfg.loss.matched_weight,
                                    unmatched_weight=cfg.loss.unmatched_weight,
                                    cache_dir=str(cache_root() / "vocab-maps"), chat=chat)
    check_alignable(teacher_tokenizer, student_tokenizer, sample.batch(list(range(min(4, len(sample))))),
                    teacher.chat)
    return teacher
