"""Cross-tokenizer alignment: the same text under two tokenizers, grouped into spans whose byte boundaries coincide.

A student block (token ids of the student's tokenizer) is spelled as bytes (lmdistill.token_bytes), re-tokenized by
the teacher's tokenizer, and both token sequences are walked along the bytes: a span closes wherever a student token
and a teacher token end at the same byte. A 1:1 span holds one token of each (the same bytes, so the same prediction
from the same context); a merged span holds several on either side (" unbelievable" = " un|believ|able" for one,
" unbel|ievable" for the other). Offsets are exact bytes, never decoded strings, so partial UTF-8 characters and
byte-fallback tokens align correctly.

Every span gives one prediction to compare: the student position before its first student token and the teacher
position before its first teacher token see the same bytes of context; the later tokens of the span enter the loss
through their conditional probabilities (lmdistill.losses.cross_tokenizer).

Special tokens spell no bytes. The student's EOS (a document boundary in packed text) is paired with the teacher's
EOS as a 1:1 span; other special tokens (chat-template markers) split the text into segments that the teacher
tokenizes separately, and the span right after one is not compared (the two models saw different context there).
Chat data are aligned otherwise: each model reads the conversation through its own chat template, and the spans are
taken on the message contents (lmdistill.chat_align, passed to `align_batch` as `chat`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from lmdistill.data import IGNORE
from lmdistill.errors import ConfigError
from lmdistill.io import write_bytes
from lmdistill.token_bytes import encode_bytes, token_bytes, tokenizer_name


class AlignmentError(ConfigError):
    """Teacher and student text cannot be aligned (no byte offsets, text that diverges, nothing to compare)."""


Span = tuple[range, range]  # (student token indices, teacher token indices) covering the same bytes


def byte_spans(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]) -> list[Span]:
    """Group two tokenizations of the same bytes into spans whose boundaries coincide.

    Args:
        student, teacher: (start, end) byte offsets of each token, in order, non-overlapping. Stretches covered by
            only one side (a partial character cut at a block edge) are skipped: a span starts only where a token of
            each side starts at the same byte.

    Returns:
        spans in order; together they cover every byte both sides cover from a common start to a common end.
    """
    spans: list[Span] = []
    i = j = 0
    ns, nt = len(student), len(teacher)
    while i < ns and j < nt:
        if student[i][0] != teacher[j][0]:
            if student[i][0] < teacher[j][0]:
                i += 1
            else:
                j += 1
            continue
        i2, j2 = i, j
        while student[i2][1] != teacher[j2][1]:
            if student[i2][1] < teacher[j2][1]:
                i2 += 1
            else:
                j2 += 1
            if i2 == ns or j2 == nt:
                return spans  # the text ends inside a span: it has no common end
        spans.append((range(i, i2 + 1), range(j, j2 + 1)))
        i, j = i2 + 1, j2 + 1
    return spans


def _utf8_trim(raw: bytes) -> tuple[int, int]:
    """(bytes to drop at the start, bytes to drop at the end) so `raw` is whole UTF-8 characters: a packed block
    can begin or end inside a character."""
    lead = 0
    while lead < min(3, len(raw)) and raw[lead] & 0xC0 == 0x80:
        lead += 1
    tail = 0
    for back in range(1, min(4, len(raw) - lead) + 1):
        b = raw[-back]
        if b & 0xC0 == 0x80:
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        tail = back if need > back else 0
        break
    return lead, tail


@dataclass
class BlockAlignment:
    """One student sequence aligned with the teacher's tokenization of its text."""

    teacher_ids: list[int]
    spans: list[Span]  # student indices into the sequence, teacher indices into teacher_ids
    n_student: int
    unaligned: int = 0  # student tokens in no span (cut characters, text after a template marker)
    checked_context: bool = False  # both sides read the same conversation (lmdistill.chat_align): a span may follow
    # a template marker; else the span right after a marker only the student saw is not compared


def teacher_prefix(tokenizer: Any) -> list[int]:
    """The ids the teacher's tokenizer puts before text (Gemma's and Llama's BOS): the teacher is run as it was
    trained, and the position of its first text token then has a prediction to compare."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if without and with_special[-len(without):] == without:
        return with_special[: len(with_special) - len(without)]
    return []


@dataclass
class Retokenized:
    """One side's token sequence spelled as bytes and read by the other side's tokenizer (`retokenize`).

    `known`/`known_index`: byte range and sequence index of each known token with bytes (and of each EOS); `other`/
    `other_index`: byte range of each token of the other side and its index in `other_ids`; `markers`: indices of the
    known side's special tokens other than EOS (a byte only that side has: no span crosses it)."""

    known: list[tuple[int, int]]
    known_index: list[int]
    other: list[tuple[int, int]]
    other_index: list[int]
    other_ids: list[int]
    markers: list[int]


def retokenize(ids: Sequence[int], table: Sequence[bytes | None], eos: int | None, other_tok: Any,
               other_eos: int | None, other_ids: list[int]) -> Retokenized:
    """Spell `ids` with `table` (`token_bytes` of their tokenizer) and tokenize the text between special tokens with
    `other_tok`, appending its ids to `other_ids` (which may start with a prefix, e.g. the other side's BOS). An EOS
    pairs with `other_eos` on one virtual byte both sides share; another special token is a marker byte of its own;
    partial UTF-8 at a segment's edges (a block cut inside a character) is dropped."""
    out = Retokenized([], [], [], [], other_ids, [])
    pos, seg_start = 0, 0
    segment = bytearray()

    def flush() -> None:
        nonlocal segment
        if segment:
            lead, tail = _utf8_trim(bytes(segment))
            text = bytes(segment[lead: len(segment) - tail]).decode("utf-8", errors="strict")
            if text:
                got, ends = encode_bytes(other_tok, text)
                prev = 0
                for oid, end in zip(got, ends, strict=True):
                    out.other.append((seg_start + lead + prev, seg_start + lead + end))
                    out.other_index.append(len(other_ids))
                    other_ids.append(int(oid))
                    prev = end
        segment = bytearray()

    for i, tid in enumerate(ids):
        piece = table[tid] if 0 <= tid < len(table) else None
        if piece is not None:
            out.known.append((pos, pos + len(piece)))
            out.known_index.append(i)
            segment += piece
            pos += len(piece)
            continue
        flush()
        if tid == eos and other_eos is not None:  # a document boundary: one virtual byte both sides share
            out.known.append((pos, pos + 1))
            out.known_index.append(i)
            out.other.append((pos, pos + 1))
            out.other_index.append(len(other_ids))
            other_ids.append(int(other_eos))
        else:
            out.markers.append(i)
        pos += 1
        seg_start = pos
    flush()
    return out


def align_sequence(student_ids: Sequence[int], student_tok: Any, teacher_tok: Any) -> BlockAlignment:
    """Spell `student_ids` as bytes, tokenize them with the teacher's tokenizer, and group both into spans."""
    teacher_ids = teacher_prefix(teacher_tok)
    r = retokenize(student_ids, token_bytes(student_tok), student_tok.eos_token_id, teacher_tok,
                   teacher_tok.eos_token_id, teacher_ids)
    s_tokens, s_index, t_tokens, t_index = r.known, r.known_index, r.other, r.other_index
    raw = byte_spans(s_tokens, t_tokens)
    spans = [(range(s_index[s.start], s_index[s.stop - 1] + 1), range(t_index[t.start], t_index[t.stop - 1] + 1))
             for s, t in raw]
    covered = sum(len(s) for s, _ in spans)
    return BlockAlignment(teacher_ids, spans, len(student_ids), len(student_ids) - covered)


@dataclass
class AlignedBatch:
    """A student batch's alignment as index tensors: what the cross-tokenizer loss gathers its rows with.

    S spans are compared. For span s: the student's hidden state at [span_batch[s], student_pos[s]] predicts its
    first student token student_first[s]; the teacher's at [span_batch[s], teacher_pos[s]] its first teacher token.
    The span's later tokens are labelled in `student_rest` [B, T] / `teacher_rest` [B, Tt] (IGNORE elsewhere),
    each with its span's index in `student_rest_span` / `teacher_rest_span` (-1 elsewhere).
    """

    teacher_input_ids: Tensor
    teacher_attention_mask: Tensor
    span_batch: Tensor
    student_pos: Tensor
    teacher_pos: Tensor
    student_first: Tensor
    teacher_first: Tensor
    student_rest: Tensor
    student_rest_span: Tensor
    teacher_rest: Tensor
    teacher_rest_span: Tensor
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_spans(self) -> int:
        return int(self.span_batch.numel())

    def to(self, device: torch.device | str) -> AlignedBatch:
        moved = {f: getattr(self, f).to(device) for f in self.__dataclass_fields__ if f != "counts"}
        return AlignedBatch(**moved, counts=self.counts)

    def as_fields(self) -> dict[str, Tensor]:
        """The alignment as batch entries (`align/<name>`), so it can be computed ahead and ride with its batch."""
        out = {f"align/{f}": getattr(self, f) for f in self.__dataclass_fields__ if f != "counts"}
        out.update({f"align/count/{k}": torch.tensor(v) for k, v in self.counts.items()})
        return out

    @staticmethod
    def from_fields(batch: dict[str, Tensor]) -> AlignedBatch | None:
        """The alignment a batch carries (`as_fields`), or None."""
        if "align/span_batch" not in batch:
            return None
        names = [f for f in AlignedBatch.__dataclass_fields__ if f != "counts"]
        counts = {k.removeprefix("align/count/"): int(v) for k, v in batch.items() if k.startswith("align/count/")}
        return AlignedBatch(**{f: batch[f"align/{f}"] for f in names}, counts=counts)


def student_sequence(input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None) -> list[int]:
    """The block's tokens: its inputs, then the last label (the token the last position predicts)."""
    n = int(attention_mask.sum()) if attention_mask is not None else int(input_ids.numel())
    seq = input_ids[:n].tolist()
    if n and int(labels[n - 1]) != IGNORE:
        seq.append(int(labels[n - 1]))
    return seq


class RowAligner(Protocol):
    """Aligns a row with the teacher's own reading of its conversation (lmdistill.chat_align.ChatAligner)."""

    def applies(self, batch: dict[str, Tensor]) -> bool:
        ...

    def align_row(self, seq: list[int], labels: Sequence[int], key: int, completion: bool) -> BlockAlignment | None:
        ...


def align_batch(batch: dict[str, Tensor], student_tok: Any, teacher_tok: Any,
                chat: RowAligner | None = None) -> AlignedBatch:
    """Align every block of a student batch (input_ids, labels [B, T], optional attention_mask) with the teacher.

    A span is compared when every student token in it is a labelled target, its first student token has a
    position before it, and that position does not follow a template marker only the student saw. With `chat`, rows
    of a chat batch (`conversation` keys; `completion` [B] bool marks rollouts) are aligned with the teacher's own
    chat template's rendering of their conversation instead (lmdistill.chat_align).
    """
    input_ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    mask = mask.cpu() if mask is not None else None
    B, T = labels.shape
    sequences = [student_sequence(input_ids[b], labels[b], None if mask is None else mask[b]) for b in range(B)]
    by_chat: list[BlockAlignment | None] = [None] * B
    if chat is not None and chat.applies(batch):
        keys = batch["conversation"].reshape(-1).tolist()
        done = batch.get("completion")
        done_rows = [False] * B if done is None else [bool(x) for x in done.reshape(-1).tolist()]
        by_chat = [chat.align_row(seq, labels[b].tolist(), keys[b], done_rows[b]) for b, seq in enumerate(sequences)]
    aligned = [r if r is not None else align_sequence(seq, student_tok, teacher_tok)
               for r, seq in zip(by_chat, sequences, strict=True)]
    t_len = max(1, max(len(a.teacher_ids) for a in aligned))
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else (teacher_tok.eos_token_id or 0)
    t_ids = torch.full((B, t_len), int(pad), dtype=torch.long)
    t_mask = torch.zeros((B, t_len), dtype=torch.long)
    s_rest = torch.full((B, T), IGNORE, dtype=torch.long)
    s_rest_span = torch.full((B, T), -1, dtype=torch.long)
    t_rest = torch.full((B, t_len), IGNORE, dtype=torch.long)
    t_rest_span = torch.full((B, t_len), -1, dtype=torch.long)
    rows: list[tuple[int, int, int, int, int]] = []
    counts = {"one_to_one": 0, "merged": 0, "skipped": 0}
    s_table = token_bytes(student_tok)
    for b, (seq, a) in enumerate(zip(sequences, aligned, strict=True)):
        t_ids[b, : len(a.teacher_ids)] = torch.tensor(a.teacher_ids, dtype=torch.long)
        t_mask[b, : len(a.teacher_ids)] = 1
        for s_span, t_span in a.spans:
            first_s, first_t = s_span.start, t_span.start
            ok = (first_s >= 1 and first_t >= 1 and s_span.stop - 1 <= T
                  and all(int(labels[b, i - 1]) != IGNORE for i in s_span)
                  and (a.checked_context or s_table[seq[first_s - 1]] is not None
                       or seq[first_s - 1] == student_tok.eos_token_id))
            if not ok:
                counts["skipped"] += len(s_span)
                continue
            span = len(rows)
            rows.append((b, first_s - 1, first_t - 1, seq[first_s], a.teacher_ids[first_t]))
            for i in list(s_span)[1:]:
                s_rest[b, i - 1], s_rest_span[b, i - 1] = seq[i], span
            for j in list(t_span)[1:]:
                t_rest[b, j - 1], t_rest_span[b, j - 1] = a.teacher_ids[j], span
            counts["one_to_one" if len(s_span) == 1 and len(t_span) == 1 else "merged"] += len(s_span)
        counts["skipped"] += a.unaligned
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
    span_b, s_pos, t_pos, s_first, t_first = (torch.tensor(c, dtype=torch.long) for c in cols)
    return AlignedBatch(t_ids, t_mask, span_b, s_pos, t_pos, s_first, t_first, s_rest, s_rest_span, t_rest,
                        t_rest_span, counts)


@dataclass(frozen=True)
class VocabMap:
    """The vocabulary entries two tokenizers share (the same byte string), as classes 0..n-1.

    teacher_class [Vt] / student_class [Vs]: the shared class of each id, -1 where the other tokenizer has no token
    with those bytes. EOS is shared whatever its spelling.
    """

    teacher_class: Tensor
    student_class: Tensor
    n_shared: int

    def to(self, device: torch.device | str) -> VocabMap:
        return VocabMap(self.teacher_class.to(device), self.student_class.to(device), self.n_shared)

    def teacher_to_student(self, n_student_vocab: int) -> Tensor:
        """[Vt]: the student id with each teacher id's bytes (-1: none, or one at or past `n_student_vocab`)."""
        student_of_class = torch.full((max(self.n_shared, 1),), -1, dtype=torch.long)
        shared = (self.student_class >= 0).nonzero().squeeze(-1)
        student_of_class[self.student_class[shared]] = shared
        t2s = torch.where(self.teacher_class >= 0, student_of_class[self.teacher_class.clamp_min(0)], -1)
        return torch.where(t2s < n_student_vocab, t2s, -1)


def _build_vocab_map(teacher_tok: Any, student_tok: Any) -> VocabMap:
    t_table, s_table = token_bytes(teacher_tok), token_bytes(student_tok)
    by_bytes: dict[bytes, int] = {}
    for i, piece in enumerate(s_table):
        if piece is not None:
            by_bytes.setdefault(piece, i)
    t_class = torch.full((len(t_table),), -1, dtype=torch.long)
    s_class = torch.full((len(s_table),), -1, dtype=torch.long)
    n = 0
    for i, piece in enumerate(t_table):
        j = by_bytes.get(piece) if piece is not None else None
        if j is not None and s_class[j] < 0:
            t_class[i], s_class[j] = n, n
            n += 1
    # special tokens spell no bytes: the same spelling (`<|im_end|>` in both) is the same token
    s_special = {tok: i for i, tok in enumerate(student_tok.convert_ids_to_tokens(list(range(len(s_table)))))
                 if s_table[i] is None}
    for i, tok in enumerate(teacher_tok.convert_ids_to_tokens(list(range(len(t_table))))):
        j = s_special.get(tok) if t_table[i] is None else None
        if j is not None and s_class[j] < 0:
            t_class[i], s_class[j] = n, n
            n += 1
    t_eos, s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
    if t_eos is not None and s_eos is not None and t_class[t_eos] < 0 and s_class[s_eos] < 0:
        t_class[t_eos], s_class[s_eos] = n, n
        n += 1
    return VocabMap(t_class, s_class, n)


@lru_cache(maxsize=8)
def vocab_map(teacher_tok: Any, student_tok: Any, cache_dir: str | None = None) -> VocabMap:
    """The shared-vocabulary map of a tokenizer pair, computed once and kept in `cache_dir` (keyed by both
    tokenizers' fingerprints) when one is given."""
    from lmdistill.models import tokenizer_fingerprint

    if cache_dir is None:
        return _build_vocab_map(teacher_tok, student_tok)
    key = hashlib.sha256((tokenizer_fingerprint(teacher_tok) + tokenizer_fingerprint(student_tok)).encode())
    path = Path(cache_dir) / f"vocab-map-{key.hexdigest()[:24]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            return VocabMap(saved["teacher_class"], saved["student_class"], int(saved["n_shared"]))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass
    built = _build_vocab_map(teacher_tok, student_tok)
    buf = io.BytesIO()
    torch.save({"teacher_class": built.teacher_class, "student_class": built.student_class,
                "n_shared": built.n_shared}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue(), "the shared-vocabulary map")
    return built


def check_alignable(teacher_tok: Any, student_tok: Any, batch: dict[str, Tensor],
                    chat: RowAligner | None = None) -> None:
    """Refuse a pair that cannot be aligned before training: a tokenizer without byte offsets (named by
    token_bytes), or a batch of the student's data on which no span can be compared."""
    for tok in (teacher_tok, student_tok):
        token_bytes(tok)
    aligned = align_batch(batch, student_tok, teacher_tok, chat)
    if aligned.n_spans == 0 and int((batch["labels"] != IGNORE).sum()) > 0:
        raise AlignmentError(
            f"no span of the first training blocks aligns between teacher tokenizer `{tokenizer_name(teacher_tok)}` "
            f"and student tokenizer `{tokenizer_name(student_tok)}` ({aligned.counts['skipped']} target tokens, none "
            "in a span both tokenizations close at the same byte with context both models saw); the two cannot be "
            "compared on this data. Check that both read the same text (chat data: each renders the same messages, "
            "aligned on their content), or use hard labels (`lmdistill generate` + `lmdistill hard --mode sequence`)"
        )
