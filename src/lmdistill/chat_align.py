"""Chat across tokenizers: each model reads the same conversation through its OWN chat template, and the two token
sequences are aligned on the content (the message texts), never on the template markers.

A row of a chat batch carries the key of its conversation (`lmdistill.data.ChatBlocks`). The student's tokens are the
row itself; the teacher's are its own template's rendering of the same messages:

- a data row (the conversation as `data.stage=chat` renders it for the student): the teacher reads
  `apply_chat_template(messages)` with its tokenizer. For every assistant message, its content (without surrounding
  whitespace, which a template may trim) is found in both renderings, after each side's rendering of the messages
  before it with the generation prompt, and both sides' tokens that lie wholly inside it are grouped into byte spans
  (lmdistill.align.byte_spans);
- a completion row (`completion` set: a rollout, the student's own answer to the conversation's prompt, the messages
  before its first assistant turn): the teacher reads its template's rendering of that prompt with the generation
  prompt, then the completion's exact bytes re-tokenized by its tokenizer, then its end-of-turn token when the student
  stopped. The completion's bytes are the content (whitespace included: both sides read the same bytes).

The token that ends an assistant turn (the student's `<|im_end|>`, the teacher's `<end_of_turn>`) is paired as a 1:1
span when it follows the content directly on both sides: both predict "the turn ends here" after the same text. A
completion's stop token is mapped to the teacher token of the same spelling when the teacher has one (identical
tokenizers: itself), else to the teacher template's end-of-turn token, else to its EOS.

Tokens that straddle a content boundary (a template space merged with the first word) start no span. A completion's
bytes that are no UTF-8 character (a sampled byte token) are read by the teacher as its token of that byte (byte-level
BPE and byte fallback have one); the text around them is tokenized piece by piece. A teacher tokenizer without a chat
template reads the student's rendering without its markers instead (`lmdistill.align.align_sequence`), as do a
batch without conversation keys (packed text) and a conversation a template refuses (a warning says so once).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from lmdistill.align import BlockAlignment, Span, byte_spans
from lmdistill.data import IGNORE, ChatBlocks, TokenBlocks, conversation_key
from lmdistill.token_bytes import encode_bytes, token_bytes, tokenizer_name

log = logging.getLogger(__name__)


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """`messages` rendered by the tokenizer's own chat template, as token ids ([] for no messages)."""
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def end_of_turn(tokenizer: Any) -> int | None:
    """The special token the tokenizer's template puts right after an assistant message's content, or None."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]
    try:
        before = render(tokenizer, probe[:1], True)
        whole = render(tokenizer, probe, False)
    except Exception:  # noqa: BLE001  (a template that refuses the probe: no end-of-turn known)
        return None
    table = token_bytes(tokenizer)
    for tid in whole[len(before):]:
        if 0 <= tid < len(table) and table[tid] is None:
            return tid
    return None


def _pieces(ids: Sequence[int], table: Sequence[bytes | None]) -> list[bytes | None]:
    return [table[i] if 0 <= i < len(table) else None for i in ids]


def _run(pieces: Sequence[bytes | None], start: int) -> tuple[bytes, list[tuple[int, int]]]:
    """The bytes the tokens from `start` spell up to the first special token, and each token's (start, end)."""
    raw, ranges = bytearray(), []
    for piece in pieces[start:]:
        if piece is None:
            break
        ranges.append((len(raw), len(raw) + len(piece)))
        raw += piece
    return bytes(raw), ranges


def _inside(ranges: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, tuple[int, int]]]:
    """(token offset in the run, range relative to lo) of the tokens lying wholly inside [lo, hi)."""
    return [(k, (a - lo, b - lo)) for k, (a, b) in enumerate(ranges) if a >= lo and b <= hi]


def _content_spans(s_start: int, s_tokens: list[tuple[int, tuple[int, int]]], t_start: int,
                   t_tokens: list[tuple[int, tuple[int, int]]]) -> list[Span]:
    raw = byte_spans([r for _, r in s_tokens], [r for _, r in t_tokens])
    return [(range(s_start + s_tokens[s.start][0], s_start + s_tokens[s.stop - 1][0] + 1),
             range(t_start + t_tokens[t.start][0], t_start + t_tokens[t.stop - 1][0] + 1)) for s, t in raw]


def _closes_at(spans: list[Span], s_last: int, t_last: int) -> bool:
    return bool(spans) and spans[-1][0].stop - 1 == s_last and spans[-1][1].stop - 1 == t_last


def _utf8_pieces(raw: bytes) -> list[bytes]:
    """`raw` cut into runs of valid UTF-8 and single bytes that are not (a sampled byte token can be half a
    character, or no character at all)."""
    out, at = [], 0
    while at < len(raw):
        try:
            raw[at:].decode("utf-8")
            out.append(raw[at:])
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append(raw[at: at + e.start])
            out.append(raw[at + e.start: at + e.start + 1])
            at += e.start + 1
    return out


class Unrenderable(Exception):
    """A chat template refused a conversation."""


class ChatAligner:
    """Aligns the rows of chat batches (with `conversation` keys) with the teacher's own rendering of them."""

    def __init__(self, student_tok: Any, teacher_tok: Any, blocks: Iterable[TokenBlocks]) -> None:
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.s_table, self.t_table = token_bytes(student_tok), token_bytes(teacher_tok)
        self.conversations: dict[int, list[dict[str, str]]] = {}
        self.add(blocks)
        self.enabled = getattr(teacher_tok, "chat_template", None) is not None
        self.t_end = end_of_turn(teacher_tok) if self.enabled else None
        vocab = teacher_tok.get_vocab()
        names = student_tok.convert_ids_to_tokens(list(range(len(self.s_table))))
        # special tokens spelled the same on both sides are the same token (identical tokenizers: every one)
        self._same_spelling = {i: vocab[t] for i, t in enumerate(names)
                               if self.s_table[i] is None and t in vocab and self.t_table[vocab[t]] is None}
        self._cache: dict[tuple[str, int, int], list[int]] = {}
        self._refused: set[int] = set()  # conversations a template cannot render
        self._t_byte = {b: i for i, b in reversed(list(enumerate(self.t_table))) if b is not None and len(b) == 1}

    def add(self, blocks: Iterable[TokenBlocks]) -> None:
        """Remember the conversations of these blocks (the ones without any are packed text: nothing to add)."""
        for b in blocks:
            if isinstance(b, ChatBlocks):
                self.conversations.update((conversation_key(m), m) for m in b.conversations)

    def applies(self, batch: dict[str, Tensor]) -> bool:
        return self.enabled and "conversation" in batch

    def _render(self, side: str, key: int, upto: int, generation_prompt: bool) -> list[int]:
        """A side's rendering of the first `upto` messages of conversation `key` (cached: the data do not change)."""
        k = (side, key, upto * 2 + generation_prompt)
        if k not in self._cache:
            tok = self.student_tok if side == "s" else self.teacher_tok
            try:
                self._cache[k] = render(tok, self.conversations[key][:upto], generation_prompt)
            except Exception as e:  # noqa: BLE001  (jinja's TemplateError, or a template's raise_exception)
                raise Unrenderable(f"the {'student' if side == 's' else 'teacher'} tokenizer "
                                   f"`{tokenizer_name(tok)}`'s chat template cannot render a conversation: {e}") from e
        return self._cache[k]

    def stop_token(self, student_id: int) -> int | None:
        """The teacher token a completion's stop token `student_id` becomes (see the module docstring)."""
        if student_id in self._same_spelling:
            return self._same_spelling[student_id]
        return self.t_end if self.t_end is not None else self.teacher_tok.eos_token_id

    def align_row(self, seq: list[int], labels: Sequence[int], key: int, completion: bool) -> BlockAlignment | None:
        """One row (`seq`: its tokens, `labels[t]` the label of position t) aligned with the teacher's rendering of
        its conversation; None when the key is unknown."""
        if key not in self.conversations or key in self._refused:
            return None
        try:
            a = self._completion(seq, labels, key) if completion else self._conversation(seq, key)
        except Unrenderable as e:  # e.g. a template without a system role: this conversation is read as before
            if not self._refused:
                log.warning("%s; such conversations are read by the teacher as the student's rendering without its "
                            "markers (warned once)", e)
            self._refused.add(key)
            return None
        covered = {i for s, _ in a.spans for i in s}
        a.unaligned = sum(1 for i in range(1, len(seq)) if labels[i - 1] != IGNORE and i not in covered)
        return a

    def _completion(self, seq: list[int], labels: Sequence[int], key: int) -> BlockAlignment:
        messages = self.conversations[key]
        first_reply = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
        prompt = self._render("t", key, first_reply, True)
        first = next((t for t, y in enumerate(labels) if y != IGNORE), None)
        if first is None:
            return BlockAlignment(list(prompt), [], len(seq), checked_context=True)
        start = first + 1
        pieces = _pieces(seq, self.s_table)
        raw, s_ranges = _run(pieces, start)
        teacher_ids = list(prompt)
        t_ranges: list[tuple[int, int]] = []
        text = b""  # the completion's bytes the teacher reads: all of them, unless one has no teacher token
        for piece in _utf8_pieces(raw):
            try:
                ids, ends = encode_bytes(self.teacher_tok, piece.decode("utf-8"))
            except UnicodeDecodeError:  # a byte that is no character: the teacher's token of that byte
                if piece not in self._t_byte:
                    break
                ids, ends = [self._t_byte[piece]], [1]
            prev = 0
            for tid, end in zip(ids, ends, strict=True):
                t_ranges.append((len(text) + prev, len(text) + end))
                teacher_ids.append(int(tid))
                prev = end
            text += piece
        s_in = _inside(s_ranges, 0, len(text))
        t_in = [(k, r) for k, r in enumerate(t_ranges)]
        spans = _content_spans(start, s_in, len(prompt), t_in)
        stop_at = start + len(s_ranges)
        if (text == raw and stop_at == len(seq) - 1 and (stop := self.stop_token(seq[stop_at])) is not None
                and (not text or _closes_at(spans, stop_at - 1, len(teacher_ids) - 1))):
            spans.append((range(stop_at, stop_at + 1), range(len(teacher_ids), len(teacher_ids) + 1)))
            teacher_ids.append(int(stop))
        return BlockAlignment(teacher_ids, spans, len(seq), checked_context=True)

    def _conversation(self, seq: list[int], key: int) -> BlockAlignment:
        messages = self.conversations[key]
        t_ids = self._render("t", key, len(messages), False)
        s_pieces, t_pieces = _pieces(seq, self.s_table), _pieces(t_ids, self.t_table)
        spans: list[Span] = []
        for i, m in enumerate(messages):
            core = m["content"].strip().encode("utf-8")
            if m["role"] != "assistant" or not core:
                continue
            s_start = len(self._render("s", key, i, True))
            t_start = len(self._render("t", key, i, True))
            if s_start >= len(seq):
                break
            s_raw, s_ranges = _run(s_pieces, s_start)
            t_raw, t_ranges = _run(t_pieces, t_start)
            t_at = t_raw.find(core)
            s_at = s_raw.find(core)
            cut = s_start + len(s_ranges) == len(seq)  # the block ends inside this message
            if s_at < 0 and cut:
                lead = len(s_raw) - len(s_raw.lstrip())
                s_at = lead if s_raw[lead:] and core.startswith(s_raw[lead:]) else -1
            if s_at < 0 or t_at < 0:
                continue  # a template that changes the text: this message is not compared
            s_in = _inside(s_ranges, s_at, s_at + len(core))
            t_in = _inside(t_ranges, t_at, t_at + len(core))
            if not s_in or not t_in:
                continue
            turn = _content_spans(s_start, s_in, t_start, t_in)
            s_next, t_next = s_start + s_in[-1][0] + 1, t_start + t_in[-1][0] + 1
            if (s_in[-1][1][1] == len(core) and t_in[-1][1][1] == len(core) and s_next < len(seq)
                    and t_next < len(t_ids) and s_pieces[s_next] is None and t_pieces[t_next] is None
                    and _closes_at(turn, s_next - 1, t_next - 1)):
                turn.append((range(s_next, s_next + 1), range(t_next, t_next + 1)))  # the turn ends: 1:1
            spans.extend(turn)
        used = max((t.stop for _, t in spans), default=0)  # the teacher reads no further than it is compared
        return BlockAlignment(list(t_ids[: max(used, 1)]), spans, len(seq), checked_context=True)
