"""Soft labels across tokenizers: a divergence per aligned span (lmdistill.align), `uld` or `hybrid`.

Each side turns its prediction at the start of a span into a distribution over "what comes next", that sums to 1:

    a[v]   = p(v) for every token v except the span's own first token x1
    span   = p(x1) * prod_k p(x_k | ...)    the span's exact text, by this side's own tokenization
    other  = p(x1) * (1 - prod_k ...)       x1 followed by anything else

(for a 1:1 span the product is empty: span = p(x1), other = 0). The `span` entry means the same thing on both sides
(the probability of the same bytes); the entries of `a` are compared through the shared vocabulary (tokens with the
same bytes, lmdistill.align.VocabMap).

- `hybrid`: matched_weight * D(coarse_T || coarse_S) + unmatched_weight * ULD(unmatched_T, unmatched_S), where coarse
  = [mass on each shared token, span, everything else] (both sum to 1, so any `loss.kind` applies) and unmatched =
  the probabilities of the tokens the other side lacks, plus `other`. With identical tokenizers every span is 1:1,
  nothing is unmatched, and the hybrid is exactly the same-tokenizer divergence (a test says so).
- `uld` (Boizard et al., 2024): the L1 distance between the two span distributions sorted in decreasing order,
  zero-padded to one length: a Wasserstein-1 distance that needs no vocabulary correspondence at all.

Temperature softens each side's first-token distribution; the continuation probabilities are the models' own.
Rows are processed in chunks whose logits are recomputed in backward, so no [tokens, vocab] logits of either model
(a 262k-vocab teacher) are held.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lmdistill.align import AlignedBatch, VocabMap
from lmdistill.losses.chunked_ce import chunked_token_logprobs
from lmdistill.losses.divergences import LOGPROB_FLOOR, divergence_from_logprobs
from lmdistill.losses.head import Head, Hidden

CrossTokenizerMode = Literal["uld", "hybrid"]


def span_parts(logprobs: Tensor, first: Tensor, rest_logprob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(a [S, V], span [S], other [S]) from a side's first-position log-probs [S, V], its first token ids [S] and
    the summed log-probs of the span's later tokens [S]."""
    p = logprobs.exp()
    p_first = p.gather(1, first[:, None]).squeeze(1)
    a = p.scatter(1, first[:, None], 0.0)
    cont = rest_logprob.exp().clamp(max=1.0)
    return a, p_first * cont, p_first * (1.0 - cont)


def coarse(a: Tensor, span: Tensor, other: Tensor, classes: Tensor, n_shared: int) -> Tensor:
    """[S, n_shared + 2]: the mass on each shared token, the span, and all the rest."""
    shared_ids = (classes >= 0).nonzero().squeeze(-1)
    buckets = a.new_zeros(a.shape[0], n_shared).index_add(1, classes[shared_ids], a.index_select(1, shared_ids))
    rest = a.sum(-1) - buckets.sum(-1) + other
    return torch.cat([buckets, span[:, None], rest.clamp_min(0.0)[:, None]], dim=1)


def sorted_l1(x: Tensor, y: Tensor) -> Tensor:
    """Per row, sum |sort(x) - sort(y)| with both sorted in decreasing order and the shorter zero-padded: ULD's
    closed-form distance between distributions over unrelated supports."""
    width = max(x.shape[1], y.shape[1])
    xs = torch.nn.functional.pad(x.sort(dim=1, descending=True).values, (0, width - x.shape[1]))
    ys = torch.nn.functional.pad(y.sort(dim=1, descending=True).values, (0, width - y.shape[1]))
    return (xs - ys).abs().sum(1)


def _log(p: Tensor) -> Tensor:
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)).clamp_min(LOGPROB_FLOOR)


def span_divergence(ls: Tensor, lt: Tensor, s_first: Tensor, t_first: Tensor, s_rest: Tensor, t_rest: Tensor,
                    vmap: VocabMap, mode: CrossTokenizerMode, kind: str = "forward_kl", beta: float = 0.5,
                    matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> Tensor:
    """Per-span loss [S] from both sides' first-position log-probs (student [S, Vs], teacher [S, Vt]), first ids and
    continuation log-prob sums: the reference the chunked path below is built from (and tested against)."""
    a_s, span_s, other_s = span_parts(ls, s_first, s_rest)
    a_t, span_t, other_t = span_parts(lt, t_first, t_rest)
    if mode == "uld":
        return sorted_l1(torch.cat([a_t, span_t[:, None], other_t[:, None]], 1),
                         torch.cat([a_s, span_s[:, None], other_s[:, None]], 1))
    c_s = coarse(a_s, span_s, other_s, vmap.student_class, vmap.n_shared)
    c_t = coarse(a_t, span_t, other_t, vmap.teacher_class, vmap.n_shared)
    matched = divergence_from_logprobs(_log(c_s), _log(c_t), kind, beta)
    if unmatched_weight == 0.0:
        return matched_weight * matched
    u_s = torch.cat([a_s[:, vmap.student_class < 0], other_s[:, None]], 1)
    u_t = torch.cat([a_t[:, vmap.teacher_class < 0], other_t[:, None]], 1)
    return matched_weight * matched + unmatched_weight * sorted_l1(u_t, u_s)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


ULD_TOP = 1024  # sorted entries ULD compares per row; the mass beyond them is compared as one entry


def top_sorted(p: Tensor, m: int = ULD_TOP) -> tuple[Tensor, Tensor]:
    """([S, m] the m largest entries of each row, descending, zero-padded; [S] the row's mass beyond them)."""
    k = min(m, p.shape[1])
    top = p.topk(k, dim=1).values if k < p.shape[1] else p.sort(dim=1, descending=True).values
    return torch.nn.functional.pad(top, (0, m - k)), (p.sum(1) - top.sum(1)).clamp_min(0.0)


@dataclass
class TeacherSpans:
    """The teacher's side of every span, reduced once without gradients: its coarse distribution (hybrid: the mass
    on each shared token, the span, the rest) and the top of its sorted ULD entries with the mass beyond them."""

    coarse: Tensor | None
    top: Tensor
    beyond: Tensor


@torch.no_grad()
def teacher_spans(rows: Tensor, head: Head, first: Tensor, rest: Tensor, vmap: VocabMap, mode: CrossTokenizerMode,
                  temperature: float, chunk_size: int = 256, uld_top: int = ULD_TOP) -> TeacherSpans:
    """Reduce the teacher's span distributions chunk by chunk: no [spans, vocab] teacher logits are kept."""
    coarse_parts, tops, beyond = [], [], []
    unshared = (vmap.teacher_class < 0).nonzero().squeeze(-1)
    for start in range(0, rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        lt = torch.log_softmax(_at_least_fp32(head.logits(rows[sl])) / temperature, dim=-1)
        a, span, other = span_parts(lt, first[sl], rest[sl])
        if mode == "hybrid":
            coarse_parts.append(coarse(a, span, other, vmap.teacher_class, vmap.n_shared))
            u = torch.cat([a.index_select(1, unshared), other[:, None]], 1)
        else:
            u = torch.cat([a, span[:, None], other[:, None]], 1)
        top, rest_mass = top_sorted(u, uld_top)
        tops.append(top)
        beyond.append(rest_mass)
    return TeacherSpans(torch.cat(coarse_parts) if coarse_parts else None, torch.cat(tops), torch.cat(beyond))


def _student_chunk(h_s: Tensor, s_head: Head, s_first: Tensor, s_rest: Tensor, t_coarse: Tensor | None,
                   t_top: Tensor, t_beyond: Tensor, vmap: VocabMap, mode: CrossTokenizerMode, kind: str, beta: float,
                   temperature: float, matched_weight: float, unmatched_weight: float) -> Tensor:
    ls = torch.log_softmax(_at_least_fp32(s_head.logits(h_s)) / temperature, dim=-1)
    a, span, other = span_parts(ls, s_first, s_rest)
    per = a.new_zeros(a.shape[0])
    if mode == "hybrid":
        assert t_coarse is not None
        c = coarse(a, span, other, vmap.student_class, vmap.n_shared)
        per = matched_weight * divergence_from_logprobs(_log(c), _log(t_coarse), kind, beta)
        if unmatched_weight == 0.0:
            return per.sum() * temperature**2
        u = torch.cat([a[:, vmap.student_class < 0], other[:, None]], 1)
        weight = unmatched_weight
    else:
        u = torch.cat([a, span[:, None], other[:, None]], 1)
        weight = 1.0
    top, beyond = top_sorted(u, t_top.shape[1])
    per = per + weight * ((top - t_top).abs().sum(1) + (beyond - t_beyond).abs())
    return per.sum() * temperature**2


def cross_tokenizer_kd(student_rows: Tensor, student_head: Head, teacher: TeacherSpans, s_first: Tensor,
                       s_rest: Tensor, vmap: VocabMap, *, mode: CrossTokenizerMode, kind: str = "forward_kl",
                       beta: float = 0.5, temperature: float = 1.0, matched_weight: float = 1.0,
                       unmatched_weight: float = 1.0, chunk_size: int = 256) -> Tensor:
    """Summed span loss over S spans from the student's hidden states before each span [S, H] against the teacher's
    reduced spans (`teacher_spans`), T^2-scaled like the same-tokenizer divergences; `chunk_size` spans of student
    logits exist at once, recomputed in backward. ULD compares the `ULD_TOP` largest entries of each side and the
    mass beyond them as one more entry (exact where a side has no more entries than that)."""
    return chunked_span_sum(_student_chunk, student_rows, student_head,
                            (s_first, s_rest, teacher.coarse, teacher.top, teacher.beyond),
                            (vmap, mode, kind, beta, temperature, matched_weight, unmatched_weight), chunk_size)


def chunked_span_sum(fn: Callable[..., Tensor], student_rows: Tensor, student_head: Head,
                     per_span: tuple[Tensor | None, ...], settings: tuple[Any, ...], chunk_size: int) -> Tensor:
    """sum over chunks of `fn(rows, head, *per_span[chunk], *settings)`, each chunk's logits recomputed in backward
    (activation checkpointing) when the student needs gradients."""
    total = student_rows.new_zeros((), dtype=torch.float32 if student_rows.dtype != torch.float64 else torch.float64)
    grad = torch.is_grad_enabled() and (student_rows.requires_grad or student_head.weight.requires_grad)
    for start in range(0, student_rows.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (student_rows[sl], student_head, *(None if t is None else t[sl] for t in per_span), *settings)
        total = total + (checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    return total


@dataclass
class AlignedTargets:
    """A teacher of another tokenizer's targets for one student batch: its span distributions reduced at
    `temperature` (`teacher_spans`) and the alignment."""

    teacher: TeacherSpans
    batch: AlignedBatch
    vmap: VocabMap
    mode: CrossTokenizerMode
    temperature: float
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0

    @property
    def n_spans(self) -> int:
        return self.batch.n_spans

    @property
    def counts(self) -> dict[str, int]:
        return self.batch.counts

    def kd_sum(self, out: Hidden, kind: str, beta: float, temperature: float) -> Tensor:
        """The summed span loss of the student `out` (hidden states [B, T, H] + head) against these targets."""
        ab = self.batch
        if ab.n_spans == 0:
            return out.hidden.sum() * 0.0
        s_rest = span_sums(chunked_token_logprobs(out.hidden, out.head, ab.student_rest), ab.student_rest_span,
                           ab.n_spans)
        if temperature != self.temperature:
            raise ValueError(f"these targets were reduced at temperature {self.temperature}, not {temperature}")
        return cross_tokenizer_kd(
            out.hidden[ab.span_batch, ab.student_pos], out.head, self.teacher, ab.student_first, s_rest, self.vmap,
            mode=self.mode, kind=kind, beta=beta, temperature=temperature, matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight)


def span_sums(per_position: Tensor, span_index: Tensor, n_spans: int) -> Tensor:
    """[S]: the sum of `per_position` [B, T] over the positions of each span (span_index -1: none)."""
    flat, idx = per_position.reshape(-1), span_index.reshape(-1).to(per_position.device)
    keep = idx >= 0
    return per_position.new_zeros(n_spans).index_add(0, idx[keep], flat[keep])


# ----------------------------------------------------------------------------------------------------------------
# a black-box teacher of another tokenizer: only its top-k alternatives per token are known (lmdistill.api_spans)


def truncated_sorted_l1(t: Tensor, valid: Tensor, s: Tensor, tail: bool) -> Tensor:
    """[S]: ULD between a teacher whose entries are only partly known and a student whose distribution is whole.

    Args:
        t: [S, m] the teacher's known probabilities; valid [S, m] which of them exist (the rest is padding).
        s: [S, C] the student's probabilities over all its entries.
        tail: add |mass outside the compared entries| of both sides, as one more sorted entry.

    Both are sorted in decreasing order and the student is cut to as many entries as the teacher row knows.
    """
    n = valid.sum(1, keepdim=True)
    t_sorted = torch.where(valid, t, torch.zeros_like(t)).sort(dim=1, descending=True).values
    m = t.shape[1]
    s_top = s.topk(min(m, s.shape[1]), dim=1).values
    if s_top.shape[1] < m:
        s_top = torch.nn.functional.pad(s_top, (0, m - s_top.shape[1]))
    keep = torch.arange(m, device=t.device)[None, :] < n
    s_top = torch.where(keep, s_top, torch.zeros_like(s_top))
    out = (s_top - t_sorted).abs().sum(1)
    if tail:
        out = out + (t_sorted.sum(1) - s_top.sum(1)).abs()
    return out


def sparse_span_divergence(ls: Tensor, s_first: Tensor, s_rest: Tensor, ids: Tensor, probs: Tensor, span_t: Tensor,
                           other_t: Tensor, mode: CrossTokenizerMode, kind: str = "forward_kl", beta: float = 0.5,
                           matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> Tensor:
    """Per-span loss [S] against a teacher known only through its top-k alternatives at each span's first token.

    Args:
        ls: [S, Vs] the student's log-probs at the position before each span.
        s_first: [S] the span's first student token; s_rest: [S] the summed log-probs of its later student tokens.
        ids: [S, K] the student id with the same bytes as each teacher alternative (-1: none, or the span's own
            first token, or padding); probs: [S, K] the alternatives' teacher probabilities (0 = padding). The
            teacher's sampled token is not among them: it is in span_t [S] = p(x1) * p(rest of the span) and
            other_t [S] = p(x1) * (1 - p(rest of the span)).
        mode: `hybrid`: `kind` over [each matched alternative, span, everything else] on both sides (everything the
            teacher did not list is one bucket), times matched_weight, + unmatched_weight * truncated ULD between
            the teacher's unmatched alternatives and `other` and the student's largest tokens outside the matched
            ones. `uld`: truncated ULD between all the teacher's known entries (alternatives, span, other) and the
            student's largest entries, plus the mass outside them.
    """
    a_s, span_s, other_s = span_parts(ls, s_first, s_rest)
    matched = ids >= 0
    at = torch.where(matched, ids, s_first[:, None])  # unmatched entries point at the first token, zero in a_s
    if mode == "uld":
        t = torch.cat([probs, span_t[:, None], other_t[:, None]], 1)
        s_all = torch.cat([a_s, span_s[:, None], other_s[:, None]], 1)
        return truncated_sorted_l1(t, t > 0, s_all, tail=True)
    listed_s = a_s.gather(1, at)
    listed_t = torch.where(matched, probs, torch.zeros_like(probs))
    rest_s = (a_s.sum(1) - listed_s.sum(1) + other_s).clamp_min(0.0)
    rest_t = (1.0 - listed_t.sum(1) - span_t).clamp_min(0.0)
    c_s = torch.cat([listed_s, span_s[:, None], rest_s[:, None]], 1)
    c_t = torch.cat([listed_t, span_t[:, None], rest_t[:, None]], 1)
    loss = matched_weight * divergence_from_logprobs(_log(c_s), _log(c_t), kind, beta)
    if unmatched_weight == 0.0:
        return loss
    u_t = torch.cat([torch.where(matched, torch.zeros_like(probs), probs), other_t[:, None]], 1)
    u_s = torch.cat([a_s.scatter(1, at, 0.0), other_s[:, None]], 1)
    return loss + unmatched_weight * truncated_sorted_l1(u_t, u_t > 0, u_s, tail=False)


def _sparse_chunk(h_s: Tensor, head: Head, s_first: Tensor, s_rest: Tensor, ids: Tensor, probs: Tensor,
                  span_t: Tensor, other_t: Tensor, mode: CrossTokenizerMode, kind: str, beta: float,
                  temperature: float, matched_weight: float, unmatched_weight: float) -> Tensor:
    ls = torch.log_softmax(_at_least_fp32(head.logits(h_s)) / temperature, dim=-1)
    per = sparse_span_divergence(ls, s_first, s_rest, ids, probs.to(ls.dtype), span_t.to(ls.dtype),
                                 other_t.to(ls.dtype), mode, kind, beta, matched_weight, unmatched_weight)
    return per.sum() * temperature**2


def sparse_span_kd(student_rows: Tensor, student_head: Head, s_first: Tensor, s_rest: Tensor, ids: Tensor,
                   probs: Tensor, span_t: Tensor, other_t: Tensor, *, mode: CrossTokenizerMode,
                   kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, matched_weight: float = 1.0,
                   unmatched_weight: float = 1.0, chunk_size: int = 256) -> Tensor:
    """Summed `sparse_span_divergence` over S spans from the student's hidden states before each span [S, H],
    T^2-scaled (temperature applies to the student only: an API's log-probs are at temperature 1). `chunk_size`
    spans of logits exist at once; they are recomputed in backward."""
    return chunked_span_sum(_sparse_chunk, student_rows, student_head, (s_first, s_rest, ids, probs, span_t, other_t),
                            (mode, kind, beta, temperature, matched_weight, unmatched_weight), chunk_size)


@dataclass
class SparseSpanTargets:
    """A black-box teacher of another tokenizer's targets for one student batch (lmdistill.api_spans): S spans.

    span_batch / span_pos [S]: the student position before each span; first [S]: its first student token;
    ids / probs [S, K]: the teacher's alternatives mapped to student ids (-1: unmatched or padding; probs 0 =
    padding); span_t / other_t [S]; rest_labels [B, T]: the span's later student tokens at the positions that
    predict them (IGNORE elsewhere), rest_span [B, T] their span index (-1 elsewhere); counts: student target
    tokens in 1:1, merged and no span, for the log.
    """

    span_batch: Tensor
    span_pos: Tensor
    first: Tensor
    ids: Tensor
    probs: Tensor
    span_t: Tensor
    other_t: Tensor
    rest_labels: Tensor
    rest_span: Tensor
    mode: CrossTokenizerMode
    matched_weight: float = 1.0
    unmatched_weight: float = 1.0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_spans(self) -> int:
        return int(self.span_batch.numel())

    def kd_sum(self, out: Hidden, kind: str, beta: float, temperature: float) -> Tensor:
        """The summed span loss of the student `out` (hidden states [B, T, H] + head) against these targets."""
        if self.n_spans == 0:
            return out.hidden.sum() * 0.0
        s_rest = span_sums(chunked_token_logprobs(out.hidden, out.head, self.rest_labels), self.rest_span,
                           self.n_spans)
        return sparse_span_kd(out.hidden[self.span_batch, self.span_pos], out.head, self.first, s_rest, self.ids,
                              self.probs, self.span_t, self.other_t, mode=self.mode, kind=kind, beta=beta,
                              temperature=temperature, matched_weight=self.matched_weight,
                              unmatched_weight=self.unmatched_weight)
