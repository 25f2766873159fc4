"""Soft labels from a black-box teacher of another tokenizer: an API's top-k log-probs over its own, unknown tokens,
aligned with the student's tokens by bytes (`soft --api_logprobs FILE --loss.cross_tokenizer hybrid|uld`).

Nothing of the teacher's tokenizer is needed: each API token (and each top-k alternative) carries its bytes (OpenAI's
`bytes`, a list of ints; else the token string's UTF-8). For each `lmdistill generate` record:

1. the conversation is rendered with the student's chat template as `data.stage=chat` trains on it; the completion's
   student tokens start at `start` and must spell the completion's bytes (else the template changed the text: the
   record is skipped and counted), and the API tokens' bytes must spell the same completion (else "whose tokens do
   not spell the completion": an edited completion, or byte-fallback pieces sent as "\\ufffd" without `bytes`);
2. both tokenizations are grouped into spans whose byte boundaries coincide (lmdistill.align.byte_spans). A span is
   compared when all its student tokens are learned positions inside the block;
3. per span: the student position before its first student token, that token, the positions of its later student
   tokens; from the teacher, the first API token's alternatives except the sampled token (each mapped to the student
   token with exactly its bytes, -1 where the student has none or it is the span's own first token), and
   span_t = p(x1) * p(later API tokens), other_t = p(x1) * (1 - p(later API tokens)).

The loss is lmdistill.losses.cross_tokenizer.sparse_span_divergence. Learned tokens in no compared span (the
end-of-turn tokens the template adds, spans cut by block_size) get the cross-entropy part only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.align import byte_spans
from lmdistill.api_targets import AlignmentReport, _template_ids, split_by_prompt
from lmdistill.config import DataConfig, LossConfig
from lmdistill.cross_tokenizer_teacher import evaluate_spans
from lmdistill.data import IGNORE, TokenBlocks, chat_blocks, conversation, render_chat
from lmdistill.errors import DataError
from lmdistill.losses.cross_tokenizer import CrossTokenizerMode, SparseSpanTargets
from lmdistill.token_bytes import token_bytes

log = logging.getLogger(__name__)


@dataclass
class SpanReport(AlignmentReport):
    """AlignmentReport across tokenizers: `soft_positions` counts the student tokens in compared spans."""

    spans_one_to_one: int = 0
    spans_merged: int = 0
    tokens_one_to_one: int = 0
    tokens_merged: int = 0
    tokens_uncovered: int = 0  # learned student tokens in no compared span (end of turn, spans cut at block_size)
    alternatives_matched: int = 0  # top-k entries with a student token of the same bytes
    alternatives_unmatched: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "spans_one_to_one": self.spans_one_to_one, "spans_merged": self.spans_merged,
                "tokens_one_to_one": self.tokens_one_to_one, "tokens_merged": self.tokens_merged,
                "tokens_uncovered": self.tokens_uncovered, "alternatives_matched": self.alternatives_matched,
                "alternatives_unmatched": self.alternatives_unmatched}

    def merge(self, other: SpanReport) -> None:
        """Add `other`'s counts to these (the reports of parts aligned apart, e.g. one per cache shard)."""
        for f in fields(self):
            if f.name == "skipped":
                for why, n in other.skipped.items():
                    self.skipped[why] = self.skipped.get(why, 0) + n
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def line(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        alts = max(self.alternatives_matched + self.alternatives_unmatched, 1)
        return (f"{self.kept}/{self.records} records aligned (skipped: {skipped}); {self.spans_one_to_one} 1:1 and "
                f"{self.spans_merged} merged spans over {self.tokens_one_to_one + self.tokens_merged} student tokens "
                f"({self.tokens_uncovered} learned tokens in no span); {self.alternatives_matched / alts:.0%} of top-k "
                "entries have a student token of the same bytes")


def entry_bytes(entry: dict[str, Any]) -> bytes:
    """An API token's bytes: its `bytes` list where the endpoint sent one, else its string as UTF-8."""
    raw = entry.get("bytes")
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    return str(entry.get("token") or "").encode("utf-8")


@dataclass
class _RecordSpans:
    """One record's compared spans (positions are input positions in its block)."""

    pos: list[int] = field(default_factory=list)
    first: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    probs: list[list[float]] = field(default_factory=list)
    span_t: list[float] = field(default_factory=list)
    other_t: list[float] = field(default_factory=list)
    one: list[bool] = field(default_factory=list)
    n_tokens: list[int] = field(default_factory=list)
    rest_pos: list[int] = field(default_factory=list)
    rest_span: list[int] = field(default_factory=list)


def span_alternative_ids(first: int, ids: Sequence[int]) -> list[int]:
    """A span target's alternatives as student ids: -1 for one that is the span's own first student token `first` or
    repeats an earlier one (two teacher tokens of the same bytes), since each student token is listed once and the
    first one's mass is the span's."""
    out = list(ids)
    matched = [sid for sid in out if sid >= 0]
    if first in out or len(set(matched)) != len(matched):  # rare: only then the per-entry pass
        seen = {first}
        for n, sid in enumerate(out):
            if sid in seen:
                out[n] = -1
            elif sid >= 0:
                seen.add(sid)
    return out


def add_spans(out: _RecordSpans, report: SpanReport, spans: Sequence[tuple[range, range]], seq: Sequence[int],
              s_full: Sequence[int], learned: Callable[[int], bool], t_logprobs: Sequence[float],
              alternatives: Callable[[int], tuple[list[int], list[float]]],
              t_usable: Callable[[int], bool] | None = None) -> None:
    """Append the compared spans of one aligned sequence to `out` (the API's and the cache's one path).

    Args:
        spans: (student token indices, teacher token indices) from lmdistill.align.byte_spans.
        seq: the student's token ids; s_full [i]: the index in `seq` of aligned student token i.
        learned: whether `seq[f]` is the label of a block position (a span is compared when all its tokens are).
        t_logprobs [j]: the teacher's log-prob of its token j; alternatives(j): the teacher's other top-k entries at
            token j as (student ids with the same bytes or -1, probabilities), the token j itself left out; an id
            that is the span's first student token or repeats an earlier entry's becomes -1 here.
        t_usable: whether teacher token j has a prediction made from the same context as the student's (default:
            all).
    """
    for s_rng, t_rng in spans:
        fulls = [s_full[i] for i in s_rng]
        if not (learned(fulls[0]) if len(fulls) == 1 else all(map(learned, fulls))) or (
                t_usable is not None and not t_usable(t_rng.start)):
            continue
        first = seq[fulls[0]]
        lp1 = t_logprobs[t_rng.start]
        rest = sum(t_logprobs[j] for j in t_rng[1:]) if len(t_rng) > 1 else 0.0
        alt_ids, probs = alternatives(t_rng.start)
        ids = span_alternative_ids(first, alt_ids)
        matched = sum(1 for sid in ids if sid >= 0)
        report.alternatives_matched += matched
        report.alternatives_unmatched += len(ids) - matched
        span = len(out.pos)
        out.pos.append(fulls[0] - 1)
        out.first.append(first)
        out.ids.append(ids)
        out.probs.append(probs)
        out.span_t.append(math.exp(lp1 + rest))
        out.other_t.append(math.exp(lp1) * -math.expm1(rest))
        one = len(s_rng) == 1 and len(t_rng) == 1
        out.one.append(one)
        out.n_tokens.append(len(fulls))
        for f in fulls[1:]:
            out.rest_pos.append(f - 1)
            out.rest_span.append(span)
        if one:
            report.spans_one_to_one += 1
            report.tokens_one_to_one += 1
        else:
            report.spans_merged += 1
            report.tokens_merged += len(fulls)


def _logprob(entry: dict[str, Any]) -> float | None:
    lp = entry.get("logprob")
    if lp is None or not math.isfinite(float(lp)):
        return None
    return min(float(lp), 0.0)


class _SpanAligner:
    def __init__(self, tokenizer: Any, data: DataConfig, n_vocab: int, report: SpanReport) -> None:
        self.tokenizer, self.data, self.report = tokenizer, data, report
        self.table = token_bytes(tokenizer)
        self.by_bytes: dict[bytes, int] = {}  # a teacher alternative's bytes -> the student token spelling them
        for i, piece in enumerate(self.table[:n_vocab]):
            if piece:
                self.by_bytes.setdefault(piece, i)

    def _student_tokens(self, whole: list[int], start: int, core: bytes) -> list[tuple[int, int]] | None:
        """(start, end) bytes, relative to where `core` (the completion without surrounding whitespace) begins, of
        the student tokens from `start` up to its end; None when they do not spell it. The template may put
        whitespace before it (Llama 2's `[/INST] {content}`: the student's first token then also holds that
        space, lies partly before 0 and starts no span)."""
        ranges, pos, spelled, lead = [], 0, bytearray(), 0
        for tid in whole[start:]:
            piece = self.table[tid] if 0 <= tid < len(self.table) else None
            if piece is None:
                break
            ranges.append((pos, pos + len(piece)))
            spelled += piece
            pos += len(piece)
            lead = len(spelled) - len(spelled.lstrip())
            if len(spelled) - lead >= len(core):
                break
        if bytes(spelled[lead: lead + len(core)]) != core:
            return None
        return [(a - lead, b - lead) for a, b in ranges if b - lead <= len(core)]

    def align(self, record: dict[str, Any]) -> _RecordSpans | str:
        """The record's compared spans, or why it is skipped."""
        entries = record.get("logprobs")
        if not entries:
            return "without logprobs"
        try:
            messages = conversation(record, self.data)
        except (KeyError, TypeError):
            return "without chat messages"
        if not messages or messages[-1]["role"] != "assistant":
            return "without chat messages"
        content = messages[-1]["content"].encode("utf-8")
        t_bytes = [entry_bytes(e) for e in entries]
        if b"".join(t_bytes) != content:
            return "whose tokens do not spell the completion"
        core = content.strip()
        if not core:
            return "with an empty completion"
        given = [_logprob(e) for e in entries]
        if any(lp is None for lp in given):
            return "with a token without a log-prob"
        lps = [lp for lp in given if lp is not None]
        T = self.data.block_size
        _, mask = render_chat(messages, self.tokenizer, T)  # what chat_blocks trains on (cut at T + 1)
        prompt = _template_ids(self.tokenizer, messages[:-1], True)
        whole = _template_ids(self.tokenizer, messages, False)
        start = len(prompt)
        if whole[:start] != prompt or start >= len(whole) or start == 0:
            return "whose template does not render the prompt as a prefix"
        s_ranges = self._student_tokens(whole, start, core)
        if s_ranges is None:
            return "whose chat template changes the completion text"
        t_ranges, pos = [], -content.index(core)  # both sides' offsets count from the first non-space byte
        for b in t_bytes:
            t_ranges.append((pos, pos + len(b)))
            pos += len(b)
        if len(whole) > T + 1:
            self.report.truncated_records += 1

        def learned(f: int) -> bool:  # the token at full index f is a label of a block position (f - 1 < T)
            return f - 1 < T and f < len(mask) and mask[f] == 1

        def alternatives(j: int) -> tuple[list[int], list[float]]:
            head, ids, probs = entries[j], [], []
            for alt in head.get("top_logprobs") or []:
                lp = _logprob(alt)
                if lp is None:
                    continue  # no mass
                alt_bytes = entry_bytes(alt)
                same = (alt.get("id") == head.get("id") if alt.get("id") is not None and head.get("id") is not None
                        else alt_bytes == t_bytes[j])
                if not same:  # the sampled token's mass is span_t + other_t
                    ids.append(self.by_bytes.get(alt_bytes, -1))
                    probs.append(math.exp(lp))
            return ids, probs

        out = _RecordSpans()
        add_spans(out, self.report, byte_spans(s_ranges, t_ranges), whole, [start + i for i in range(len(s_ranges))],
                  learned, lps, alternatives)
        if not out.pos:
            return "without an aligned span"
        self.report.tokens_uncovered += sum(mask[1: T + 1]) - sum(out.n_tokens)
        return out


@dataclass
class SpanTargetBlocks(TokenBlocks):
    """Token blocks whose batches also carry the API teacher's span targets (they travel to the device with it).

    Storage is flat over the spans of all blocks: block i owns spans `offsets[i]:offsets[i + 1]` of `pos` [S] (input
    position before the span), `first` [S], `ids` [S, K] int32 (-1: unmatched or padding), `probs` [S, K] (0: padding),
    `span_t`, `other_t` [S], `one` [S] (1:1 span), `n_tokens` [S] (student tokens in the span), and later-token
    entries `rest_offsets[i]:rest_offsets[i + 1]` of `rest_pos` [R] (input position) and `rest_span` [R] (the span's
    index within its block). `batch()` adds, padded to the batch's most spans P: `span_pos` [B, P] (-1 = padding),
    `span_first`, `span_tokens` [B, P], `span_one` [B, P] bool, `span_ids` / `span_probs` [B, P, K], `span_t`,
    `span_other` [B, P], and `span_rest` [B, T] (the span slot whose later token each position predicts, -1 else).
    """

    offsets: Tensor
    pos: Tensor
    first: Tensor
    ids: Tensor
    probs: Tensor
    span_t: Tensor
    other_t: Tensor
    one: Tensor
    n_tokens: Tensor
    rest_offsets: Tensor
    rest_pos: Tensor
    rest_span: Tensor

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        out = super().batch(indices)
        blocks = torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()
        b, t = out["input_ids"].shape
        p = max([1] + [int(self.offsets[i + 1] - self.offsets[i]) for i in blocks])
        pos = torch.full((b, p), -1, dtype=torch.long)
        first = torch.zeros(b, p, dtype=torch.long)
        tokens = torch.zeros(b, p, dtype=torch.long)
        one = torch.zeros(b, p, dtype=torch.bool)
        ids = torch.full((b, p, self.k), -1, dtype=torch.long)
        probs = torch.zeros(b, p, self.k, dtype=torch.float32)
        span_t = torch.zeros(b, p, dtype=torch.float32)
        other_t = torch.zeros(b, p, dtype=torch.float32)
        rest = torch.full((b, t), -1, dtype=torch.long)
        for row, block in enumerate(blocks):
            lo, hi = int(self.offsets[block]), int(self.offsets[block + 1])
            n = hi - lo
            pos[row, :n], first[row, :n], tokens[row, :n], one[row, :n] = (
                self.pos[lo:hi], self.first[lo:hi], self.n_tokens[lo:hi], self.one[lo:hi])
            ids[row, :n], probs[row, :n], span_t[row, :n], other_t[row, :n] = (
                self.ids[lo:hi], self.probs[lo:hi], self.span_t[lo:hi], self.other_t[lo:hi])
            rlo, rhi = int(self.rest_offsets[block]), int(self.rest_offsets[block + 1])
            rest[row, self.rest_pos[rlo:rhi]] = self.rest_span[rlo:rhi]
        out.update(span_pos=pos, span_first=first, span_tokens=tokens, span_one=one, span_ids=ids,
                   span_probs=probs, span_t=span_t, span_other=other_t, span_rest=rest)
        return out


class InBatchSpanTeacher:
    """The teacher of an API-logprobs run across tokenizers: its span targets ride in the batch."""

    def __init__(self, mode: CrossTokenizerMode, matched_weight: float = 1.0, unmatched_weight: float = 1.0) -> None:
        self.mode, self.matched_weight, self.unmatched_weight = mode, matched_weight, unmatched_weight

    def targets(self, batch: dict[str, Tensor]) -> SparseSpanTargets:
        """SparseSpanTargets of a `SpanTargetBlocks` batch: its padded span slots flattened to S spans."""
        pos = batch["span_pos"]
        valid = pos >= 0
        span_batch, _ = valid.nonzero(as_tuple=True)
        index = torch.full_like(pos, -1)
        index[valid] = torch.arange(int(valid.sum()), device=pos.device)
        rest = batch["span_rest"]
        has = rest >= 0
        rest_span = torch.full_like(rest, -1)
        rest_span[has] = index[has.nonzero(as_tuple=True)[0], rest[has]]
        labels = batch["labels"]
        rest_labels = torch.where(has, labels, torch.full_like(labels, IGNORE))
        tokens, one = batch["span_tokens"][valid], batch["span_one"][valid]
        n_one, n_merged = int(tokens[one].sum()), int(tokens[~one].sum())
        counts = {"one_to_one": n_one, "merged": n_merged,
                  "skipped": int((labels != IGNORE).sum()) - n_one - n_merged}
        return SparseSpanTargets(span_batch, pos[valid], batch["span_first"][valid], batch["span_ids"][valid],
                                 batch["span_probs"][valid], batch["span_t"][valid], batch["span_other"][valid],
                                 rest_labels, rest_span, self.mode, self.matched_weight, self.unmatched_weight,
                                 counts)

    def evaluate(self, student: nn.Module, held: TokenBlocks, loss: LossConfig, **kw: Any) -> dict[str, float]:
        """Held-out `span_kd` and the share of learned tokens in 1:1, merged and no span."""
        return evaluate_spans(self, student, held, loss, **kw)


def _align_all(records: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig,
               n_vocab: int) -> tuple[list[int], list[_RecordSpans], SpanReport]:
    report = SpanReport(records=len(records))
    aligner = _SpanAligner(tokenizer, data, n_vocab, report)
    kept, spans = [], []
    for i, record in enumerate(records):
        out = aligner.align(record)
        if isinstance(out, str):
            report.skip(out)
            continue
        kept.append(i)
        spans.append(out)
        report.soft_positions += sum(out.n_tokens)
    report.kept = len(kept)
    return kept, spans, report


def _pack(records: list[dict[str, Any]], spans: list[_RecordSpans], data: DataConfig,
          tokenizer: Any) -> SpanTargetBlocks:
    return pack_spans(chat_blocks(records, data, tokenizer), spans)


def pack_spans(blocks: TokenBlocks, spans: list[_RecordSpans]) -> SpanTargetBlocks:
    """`blocks` with one `_RecordSpans` per block as SpanTargetBlocks (checked: every span starts at its label)."""
    k = max((len(ids) for r in spans for ids in r.ids), default=1) or 1
    offsets = torch.zeros(len(spans) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor([len(r.pos) for r in spans], dtype=torch.long).cumsum(0)
    rest_offsets = torch.zeros(len(spans) + 1, dtype=torch.long)
    rest_offsets[1:] = torch.tensor([len(r.rest_pos) for r in spans], dtype=torch.long).cumsum(0)
    # one tensor from padded rows, not one small tensor per span: this packing runs over every span of a cache
    # int32: the top-k ids are most of what a cache's aligned targets hold in memory, and no vocabulary needs 64 bits
    ids = torch.tensor([row + [-1] * (k - len(row)) for r in spans for row in r.ids], dtype=torch.int32).view(-1, k)
    probs = torch.tensor([row + [0.0] * (k - len(row)) for r in spans for row in r.probs],
                         dtype=torch.float32).view(-1, k)
    if ids.shape[0] != int(offsets[-1]) or probs.shape[0] != ids.shape[0]:
        raise RuntimeError("API span targets: one top-k row per span is needed")

    def flat(name: str, dtype: torch.dtype) -> Tensor:
        return torch.tensor([v for r in spans for v in getattr(r, name)], dtype=dtype)

    out = SpanTargetBlocks(
        blocks.input_ids, blocks.labels, blocks.attention_mask, offsets=offsets, pos=flat("pos", torch.long),
        first=flat("first", torch.long), ids=ids, probs=probs, span_t=flat("span_t", torch.float32),
        other_t=flat("other_t", torch.float32), one=flat("one", torch.bool), n_tokens=flat("n_tokens", torch.long),
        rest_offsets=rest_offsets, rest_pos=flat("rest_pos", torch.long), rest_span=flat("rest_span", torch.long))
    # the blocks and the spans come from two renderings of one record: every span token must be the block's label
    for b in range(len(out)):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        if not torch.equal(out.labels[b, out.pos[lo:hi]], out.first[lo:hi]):
            raise RuntimeError(f"API span targets of block {b} do not start at its labels")
        rlo, rhi = int(rest_offsets[b]), int(rest_offsets[b + 1])
        if bool((out.labels[b, out.rest_pos[rlo:rhi]] == IGNORE).any()):
            raise RuntimeError(f"API span targets of block {b} cover an unlearned position")
    return out


def concat_span_blocks(parts: Sequence[SpanTargetBlocks], block_size: int) -> SpanTargetBlocks:
    """The blocks of `parts`, in order, as one SpanTargetBlocks (top-k rows padded to the widest part's k)."""
    if not parts:
        empty = TokenBlocks(*(torch.zeros(0, block_size, dtype=torch.long) for _ in range(3)))
        return pack_spans(empty, [])
    if len(parts) == 1:
        return parts[0]
    k = max(p.k for p in parts)

    def widen(t: Tensor, fill: float) -> Tensor:
        return torch.nn.functional.pad(t, (0, k - int(t.shape[1])), value=fill)

    def chain(offsets: list[Tensor]) -> Tensor:  # per-part offsets [n_i + 1] -> one offsets [sum n_i + 1]
        out, base = [offsets[0][:1]], 0
        for o in offsets:
            out.append(o[1:] + base)
            base += int(o[-1])
        return torch.cat(out)

    def cat(name: str) -> Tensor:
        return torch.cat([getattr(p, name) for p in parts])

    return SpanTargetBlocks(
        cat("input_ids"), cat("labels"), cat("attention_mask"), offsets=chain([p.offsets for p in parts]),
        pos=cat("pos"), first=cat("first"), ids=torch.cat([widen(p.ids, -1) for p in parts]),
        probs=torch.cat([widen(p.probs, 0.0) for p in parts]), span_t=cat("span_t"), other_t=cat("other_t"),
        one=cat("one"), n_tokens=cat("n_tokens"), rest_offsets=chain([p.rest_offsets for p in parts]),
        rest_pos=cat("rest_pos"), rest_span=cat("rest_span"))


def build_api_span_targets(records: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig,
                           n_vocab: int) -> tuple[SpanTargetBlocks, SpanReport]:
    """Token blocks (one per aligned record, in order, as `stage=chat` builds them) with the API's span targets.

    Args:
        records: `lmdistill generate` records with `messages` and per-token `logprobs` (+ `top_logprobs`), written
            by a teacher of any tokenizer.
        tokenizer: the student's tokenizer (fast, with byte offsets: lmdistill.token_bytes).
        data: block_size and messages_column (or prompt/completion columns) apply.
        n_vocab: the student's real vocab; alternatives map only to ids below it.
    """
    kept, spans, report = _align_all(records, tokenizer, data, n_vocab)
    return _pack([records[i] for i in kept], spans, data, tokenizer), report


def load_api_span_splits(path: str | Path, data: DataConfig, tokenizer: Any,
                         n_vocab: int) -> tuple[SpanTargetBlocks, SpanTargetBlocks, SpanReport]:
    """(train, held-out, report) from a `lmdistill generate` JSONL with top-k log-probs of a teacher of another
    tokenizer; whole prompts are held out as `lmdistill.api_targets.load_api_splits` does.

    Raises:
        DataError: the file is missing or malformed, or no record aligns with the student's tokens.
    """
    from lmdistill.generate.store import read_records  # noqa: PLC0415  (generate pulls in its backends)

    path = Path(path)
    if not path.is_file():
        raise DataError(f"api_logprobs file `{path}` not found; write it with `lmdistill generate "
                        "--sampling.logprobs true --sampling.top_logprobs 20`")
    records, _ = read_records(path)
    kept, spans, report = _align_all(records, tokenizer, data, n_vocab)
    if report.kept == 0:
        raise DataError(
            f"none of the {report.records} records in `{path}` can be aligned with the student's tokens "
            f"({report.line()}). Records need `messages` and per-token `logprobs` (generate with --sampling.logprobs "
            "true --sampling.top_logprobs k) whose tokens' `bytes` (or strings) spell the completion, and the "
            "student's chat template must render the completion unchanged"
        )
    if report.kept < report.records:
        log.warning("api_logprobs `%s`: %s", path, report.line())
    train, held = split_by_prompt(records, kept, data)

    def pack(rows: list[int]) -> SpanTargetBlocks:
        return _pack([records[kept[j]] for j in rows], [spans[j] for j in rows], data, tokenizer)

    return pack(train), pack(held), report
