"""On-policy distillation from a local teacher of another tokenizer (`onpolicy --loss.cross_tokenizer hybrid|uld`).

The student samples completions of prompts rendered with its own chat template (lmdistill.rollout). The teacher
reads the same prompt through ITS chat template, then the completion's exact bytes re-tokenized by its tokenizer,
then its end-of-turn token where the student stopped (lmdistill.chat_align); both token sequences are grouped into
spans of the same bytes (lmdistill.align). Only the student's sampled tokens are compared (the prompt is masked).

- `dense`: the span divergence (lmdistill.losses.cross_tokenizer: `hybrid` or `uld`, any `loss.kind`; reverse KL is
  the usual choice) of every compared span, through the chunked cross-tokenizer loss: no [tokens, vocab] logits of
  either model are held.
- `sampled_token`: each span s gets the reward r_s = log p_T(span bytes) - log p_S(span bytes), each side's product
  of its own tokens' probabilities over the span. EVERY student token of the span gets the span's advantage
  A_s = r_s (+ `discount` times the next spans' advantages of the same completion): the score-function estimate of
  the span-level reverse KL's gradient is r_s * grad log p_S(span) = r_s * sum over the span's tokens of
  grad log p_S(y_t), so this is that estimate, unbiased; a 1:1 span is exactly the same-tokenizer per-token reward.
  (Dividing r_s among the tokens would keep the sum but shrink the gradient of merged spans.) The advantages go
  into the same importance-weighted, clipped policy-gradient loss as with one tokenizer
  (lmdistill.losses.reverse_kl_policy_gradient); the logged `reverse_kl` sums each span's -r_s once. Sampled tokens
  in no compared span (a stop token the teacher cannot pair, text after a cut character) get no gradient.
- A teacher server (`teacher_server.url`, signal `sampled_token` or `topk`): the alignment is the same, read here
  with the teacher's tokenizer and chat template (`teacher.name_or_path`, no weights), and the server scores the
  teacher's token sequences (`ServedSpanTeacher`: one echo call per batch, as with one tokenizer); it must tokenize as
  that tokenizer does (checked at start). `topk`: each span's target is the server's top-k at its first teacher token
  mapped to student ids, with the span's own probability (`span_topk_targets`: the black-box teacher's sparse span
  targets, lmdistill.api_spans), trained with the sparse span divergence. `dense` needs the teacher's distributions,
  which a server does not send; `topk` with a local teacher is refused (its `dense` is the whole distribution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.align import AlignedBatch, align_batch, vocab_map
from lmdistill.api_spans import span_alternative_ids
from lmdistill.assets import cache_root
from lmdistill.chat_align import ChatAligner
from lmdistill.config import OnPolicyConfig, RolloutConfig, SoftLossConfig
from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.errors import ConfigError
from lmdistill.losses import Hidden, StepLoss, distill_loss, reverse_kl_policy_gradient, token_logprobs
from lmdistill.losses.cross_tokenizer import SparseSpanTargets, span_sums
from lmdistill.rollout import as_batch, prompt_ids, sample_completions, tag_completions
from lmdistill.served_teacher import ServedTeacher
from lmdistill.teachers import model_outputs


def student_span_index(ab: AlignedBatch) -> Tensor:
    """[B, T]: the compared span each student label belongs to (its first token and its later ones), -1 else."""
    index = ab.student_rest_span.clone()
    index[ab.span_batch, ab.student_pos] = torch.arange(ab.n_spans, device=index.device)
    return index


def span_advantages(rewards: Tensor, span_row: Tensor, discount: float) -> Tensor:
    """[S]: A_s = r_s + discount * A_(next span of the same row); spans are in row order, then text order."""
    if discount == 0.0 or rewards.numel() == 0:
        return rewards
    out = rewards.clone()
    for s in range(rewards.numel() - 2, -1, -1):
        if int(span_row[s]) == int(span_row[s + 1]):
            out[s] = rewards[s] + discount * out[s + 1]
    return out


def span_policy_gradient(logprobs: Tensor, labels: Tensor, span_index: Tensor, span_row: Tensor,
                         teacher_span_logprob: Tensor, discount: float = 0.0, sample_logprobs: Tensor | None = None,
                         clip: float = 0.2) -> StepLoss:
    """The policy-gradient loss with per-span rewards (module docstring).

    Args:
        logprobs: [B, T] the student's log p(y_t) of its sampled tokens, with graph.
        labels: [B, T] the sampled tokens (IGNORE elsewhere).
        span_index: [B, T] each label's span (-1: in none); span_row [S] each span's row.
        teacher_span_logprob: [S] log p_T of each span's bytes, by the teacher's tokens.
        sample_logprobs: [B, T] the sampling policy's log-probs (rollout reuse), None: the current policy's.

    Returns:
        StepLoss with parts `reverse_kl` (sum over spans of log p_sample - log p_T) and `teacher_nll`.
    """
    behaviour = logprobs.detach() if sample_logprobs is None else sample_logprobs.detach().to(logprobs.dtype)
    in_span = (span_index >= 0) & (labels != IGNORE)
    n = teacher_span_logprob.numel()
    rewards = teacher_span_logprob.to(behaviour.dtype) - span_sums(behaviour * in_span, span_index, n)
    advantage = span_advantages(rewards, span_row, discount)
    per_token = torch.where(in_span, advantage[span_index.clamp_min(0)], torch.zeros_like(behaviour)) \
        if n else torch.zeros_like(behaviour)
    # reverse_kl_policy_gradient's reward is teacher - behaviour: hand it behaviour + A so its advantage is A
    out = reverse_kl_policy_gradient(logprobs, behaviour + per_token, torch.where(in_span, labels, IGNORE), 0.0,
                                     sample_logprobs, clip)
    out.parts.update(reverse_kl=-rewards.sum(), teacher_nll=-teacher_span_logprob.sum())
    return out


def _span_logprob_parts(ab: AlignedBatch, lp: Tensor) -> tuple[Tensor, Tensor]:
    """[S] each span's first teacher token's log-prob and [S] the sum over its later teacher tokens, from the
    teacher's log-probs of its own tokens `lp` [B, Tt] (position t: token t + 1)."""
    rest = span_sums(torch.where(ab.teacher_rest != IGNORE, lp, 0.0), ab.teacher_rest_span, ab.n_spans)
    return lp[ab.span_batch, ab.teacher_pos], rest


def span_topk_targets(ab: AlignedBatch, lp: Tensor, tops: list[list[dict[int, float]]], t2s: Tensor,
                      loss: SoftLossConfig) -> SparseSpanTargets:
    """Sparse span targets (the black-box teacher's kind, lmdistill.api_spans) from a teacher's log-probs of its own
    tokens `lp` [B, Tt] and its top-k at each position, `tops[b][t]` {teacher id: log p} (predicting token t + 1).

    Per span: the first teacher token's alternatives (its top-k without that token), mapped to the student ids of the
    same bytes (`t2s`; -1 where there is none, for the span's own first student token and for a repeat), span_t =
    p(first) * p(later teacher tokens), other_t = p(first) * (1 - p(later teacher tokens)).
    """
    assert loss.cross_tokenizer != "refuse"
    mode = loss.cross_tokenizer
    first_lp, rest = _span_logprob_parts(ab, lp)
    to_student = t2s.tolist()
    rows_ids: list[list[int]] = []
    rows_p: list[list[float]] = []
    for b, pos, t_first, s_first in zip(ab.span_batch.tolist(), ab.teacher_pos.tolist(), ab.teacher_first.tolist(),
                                        ab.student_first.tolist(), strict=True):
        entries = [(tid, v) for tid, v in tops[b][pos].items() if tid != t_first]  # its mass is span_t + other_t
        rows_ids.append(span_alternative_ids(s_first, [to_student[tid] if 0 <= tid < len(to_student) else -1
                                                       for tid, _ in entries]))
        rows_p.append([math.exp(v) for _, v in entries])
    k = max([1] + [len(r) for r in rows_ids])
    device = lp.device
    ids_t = torch.tensor([r + [-1] * (k - len(r)) for r in rows_ids], dtype=torch.long).view(-1, k).to(device)
    probs_t = torch.tensor([r + [0.0] * (k - len(r)) for r in rows_p], dtype=torch.float32).view(-1, k).to(device)
    return SparseSpanTargets(ab.span_batch, ab.student_pos, ab.student_first, ids_t, probs_t, (first_lp + rest).exp(),
                             first_lp.exp() * -torch.expm1(rest), ab.student_rest, ab.student_rest_span,
                             mode, loss.matched_weight, loss.unmatched_weight, dict(ab.counts))


class ServedSpanTeacher:
    """A teacher server of another tokenizer, scored by byte spans (signals `sampled_token` and `topk`): the student's
    rows are aligned with the teacher's own reading of them here, and the server gives the teacher's log-probs of its
    tokens (and its top-k at each position)."""

    def __init__(self, server: ServedTeacher, teacher_tokenizer: Any, student_tokenizer: Any,
                 chat: Sequence[TokenBlocks], n_vocab: int) -> None:
        self.server, self.teacher_tokenizer, self.student_tokenizer = server, teacher_tokenizer, student_tokenizer
        self.chat = ChatAligner(student_tokenizer, teacher_tokenizer, chat)
        self.t2s = vocab_map(teacher_tokenizer, student_tokenizer, str(cache_root() / "vocab-maps")).teacher_to_student(
            n_vocab)

    def topk(self, batch: dict[str, Tensor], k: int, loss: SoftLossConfig) -> SparseSpanTargets:
        """Sparse span targets from the server's top-k at each span's first teacher token (`span_topk_targets`)."""
        device = batch["input_ids"].device
        ab = align_batch(batch, self.student_tokenizer, self.teacher_tokenizer, self.chat).to(device)
        lp, tops = self.server.sequence_scores(ab.teacher_input_ids, ab.teacher_attention_mask, k)
        return span_topk_targets(ab, lp, tops, self.t2s, loss)

    def scores(self, batch: dict[str, Tensor], dense: bool = False) -> tuple[AlignedBatch, None, Tensor]:
        """The alignment, no dense targets, and the teacher's log-prob of each compared span's bytes [S] (the sum of
        its tokens' log-probs), from one scoring call."""
        if dense:
            raise ConfigError("a teacher server sends the log-probs of given tokens, not whole distributions: across "
                              "tokenizers use --signal sampled_token with a server, or a local teacher for dense")
        device = batch["input_ids"].device
        ab = align_batch(batch, self.student_tokenizer, self.teacher_tokenizer, self.chat).to(device)
        first, rest = _span_logprob_parts(ab, self.server.sequence_logprobs(ab.teacher_input_ids,
                                                                           ab.teacher_attention_mask))
        return ab, None, first + rest


class CrossTokenizerOnPolicy:
    """`onpolicy`'s scoring, loss and held-out metrics with a teacher of another tokenizer (local or served)."""

    def __init__(self, teacher: CrossTokenizerTeacher | ServedSpanTeacher, cfg: OnPolicyConfig, n_vocab: int) -> None:
        self.teacher, self.cfg, self.n_vocab = teacher, cfg, n_vocab
        self.dense = isinstance(teacher, CrossTokenizerTeacher)  # a server gives no distributions

    def score(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """What rides in the batch to the update (and through rollout reuse): the aligned targets (dense), or the
        spans and the teacher's span log-probs (sampled_token)."""
        if self.cfg.signal == "topk":  # a teacher server (the config allows topk across tokenizers with one only)
            assert isinstance(self.teacher, ServedSpanTeacher)
            return {"span_targets": self.teacher.topk(batch, self.cfg.k, self.cfg.loss)}
        ab, targets, span_logprob = self.teacher.scores(batch, dense=self.cfg.signal == "dense")
        if targets is not None:
            return {"span_targets": targets}
        counts = {k: torch.tensor(v) for k, v in ab.counts.items()}
        return {"span_index": student_span_index(ab), "span_row": ab.span_batch,
                "span_teacher_logprob": span_logprob, **{f"aligned_{k}": v for k, v in counts.items()}}

    def loss(self, student: nn.Module, batch: dict[str, Any], alpha: float) -> StepLoss:
        out = model_outputs(student, batch, self.n_vocab, True)  # hidden states + head: the chunked span loss
        if "span_targets" in batch:
            return distill_loss(out, batch["span_targets"], batch["labels"], alpha, self.cfg.loss)
        step = span_policy_gradient(token_logprobs(out, batch["labels"]), batch["labels"], batch["span_index"],
                                    batch["span_row"], batch["span_teacher_logprob"], self.cfg.discount,
                                    batch.get("sample_logprob"), self.cfg.rollout.clip)
        step.parts.update({k: v.float() for k, v in batch.items() if k.startswith("aligned_")})
        return step

    @torch.no_grad()
    def metrics(self, student: nn.Module, blocks: TokenBlocks, *, cfg: RolloutConfig, seed: int, pad_id: int,
                eos_ids: set[int], max_prompts: int = 16, batch_size: int = 8) -> dict[str, float]:
        """On held-out prompts the student answers itself (as `lmdistill.rollout.onpolicy_metrics`):

        onpolicy_span_kd (a local teacher): the training span divergence per compared span; onpolicy_reverse_kl: the mean over the
        sampled tokens in compared spans of log p_S(span) - log p_T(span) summed per span (with one tokenizer: the
        same-tokenizer estimate); onpolicy_aligned: the share of sampled tokens in a compared span;
        teacher_nll_greedy: the teacher's mean NLL of its own tokens of the compared spans of the student's greedy
        answers; answer_length: their mean length in student tokens.
        """
        n = min(len(blocks), max_prompts)
        if n == 0:
            return {}
        device = next(student.parameters()).device
        block_size = int(blocks.input_ids.shape[1])
        kd = rkl = spans = tokens = sampled = nll = nll_tokens = answers = answer_tokens = 0.0
        was = student.training
        student.eval()
        loss = self.cfg.loss
        for lo in range(0, n, batch_size):
            batch = blocks.batch(list(range(lo, min(lo + batch_size, n))))
            g = sample_completions(student, prompt_ids(batch), batch["index"].tolist(), step=-1, seed=seed, cfg=cfg,
                                   block_size=block_size, pad_id=pad_id, eos_ids=eos_ids, greedy=True)
            if g.completions:
                rows = as_batch(g, block_size, pad_id)
                tag_completions(rows, g, batch)
                ab, _, t_span = self.teacher.scores({k: v.to(device) for k, v in rows.items()}, dense=False)
                nll -= float(t_span.sum())
                nll_tokens += ab.n_spans + float((ab.teacher_rest != IGNORE).sum())
                answers += len(g.completions)
                answer_tokens += float((rows["labels"] != IGNORE).sum())
            r = sample_completions(student, prompt_ids(batch), batch["index"].tolist(), step=-1, seed=seed, cfg=cfg,
                                   block_size=block_size, pad_id=pad_id, eos_ids=eos_ids)
            if not r.completions:
                continue
            rows = as_batch(r, block_size, pad_id)
            tag_completions(rows, r, batch)
            rows = {k: v.to(device) for k, v in rows.items()}
            ab, targets, t_span = self.teacher.scores(rows, dense=self.dense)
            out = model_outputs(student, rows, self.n_vocab, True)
            assert isinstance(out, Hidden)
            if targets is not None:
                kd += float(targets.kd_sum(out, loss.kind, loss.beta, loss.temperature))
            index = student_span_index(ab)
            s_span = span_sums(token_logprobs(out, rows["labels"]), index, ab.n_spans)
            rkl += float((s_span - t_span).sum())
            spans += ab.n_spans
            tokens += float((index >= 0).sum())
            sampled += float((rows["labels"] != IGNORE).sum())
        student.train(was)
        out_metrics = {"onpolicy_reverse_kl": rkl / max(tokens, 1.0), "onpolicy_aligned": tokens / max(sampled, 1.0),
                       "teacher_nll_greedy": nll / max(nll_tokens, 1.0),
                       "answer_length": answer_tokens / max(answers, 1.0)}
        if self.dense:
            out_metrics["onpolicy_span_kd"] = kd / max(spans, 1.0)
        return out_metrics
