"""A soft-label cache read by a student of ANOTHER tokenizer: span targets aligned at read time.

`lmdistill label --cache.cross_tokenizer true` stores, besides the teacher's top-k per target position, the actual
teacher token each position predicts and its log-prob (`token_ids`, `token_logprob` [R]), each block's first input
token (`block_first_id` [n_blocks]) and the teacher's tokenizer (DIR/tokenizer). With them every cached block can be
spelled as bytes from the cache alone (no teacher model, no dataset). For each block this module

1. rebuilds the teacher's tokens (the first input + the targets' tokens: pretrain packing, every position is a
   target) and proves them against the block digest stored at labelling time;
2. spells them as bytes (lmdistill.token_bytes), tokenizes the text with the student's tokenizer (the teacher's EOS, a
   document boundary, becomes the student's EOS; another special token splits the text and the span right after it is
   not compared; a block cut inside a UTF-8 character drops the partial character): one student block per cached
   block, cut at the student's data.block_size;
3. groups both tokenizations into spans whose byte boundaries coincide (lmdistill.align.byte_spans) and builds the
   sparse span targets the API path trains on (lmdistill.api_spans.add_spans): the teacher's top-k at the span's
   first teacher token, mapped to the student tokens of the same bytes (lmdistill.align.vocab_map: same bytes, same
   special-token spelling, EOS with EOS), and span_t = p(x1) * p(later teacher tokens), other_t = p(x1) * (1 - that).

A chat cache (data.stage=chat) also stores each block's messages (`conversations`, UTF-8 JSON, and
`conversation_offsets` [n_blocks + 1]). Its blocks are not spelled from the targets (the prompt is no target): the
teacher's chat template renders the messages again, which must give the labelled block (its digest), and the student
renders them with its own template; the two are aligned on the assistant messages' content as a local teacher's chat
rows are (lmdistill.chat_align), and each span whose teacher tokens are all cached targets gets the targets above.

The loss is lmdistill.losses.cross_tokenizer.sparse_span_divergence (`InBatchSpanTeacher`); the student's blocks and
their targets are built once, when the run starts, one shard at a time by forked worker processes (`align_workers`;
each shard is aligned alone, so the result is the same for any number of them).
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any

import torch

from lmdistill.align import byte_spans, retokenize, student_sequence, vocab_map
from lmdistill.api_spans import (
    SpanReport,
    SpanTargetBlocks,
    _RecordSpans,
    add_spans,
    concat_span_blocks,
    pack_spans,
)
from lmdistill.assets import cache_root
from lmdistill.cache.format import (
    Manifest,
    block_digests,
    decode_values,
    read_manifest,
    row_offsets_of,
    unpack_ids,
)
from lmdistill.cache.reader import CachedTeacher
from lmdistill.cache.span_store import store_key, stored_bytes, stored_or_aligned
from lmdistill.cache.writer import TOKENIZER_DIR
from lmdistill.chat_align import ChatAligner
from lmdistill.data import IGNORE, TokenBlocks, conversation_blocks, conversation_key
from lmdistill.errors import CacheError
from lmdistill.io import worker_signals
from lmdistill.token_bytes import token_bytes
from lmdistill.train.distributed import local_cpu_cores
from lmdistill.train.logging import make_progress

log = logging.getLogger(__name__)

_TENSORS = ("block_digest", "row_offsets", "ids", "logprobs", "token_ids", "token_logprob", "block_first_id")
_CHAT_TENSORS = ("block_digest", "row_offsets", "ids", "logprobs", "token_logprob", "conversations",
                 "conversation_offsets")


def same_tokenizer(manifest: Manifest, tokenizer: Any) -> bool:
    """Whether `tokenizer` is the one the cache was labelled with (then the cached ids are the student's own)."""
    from lmdistill.models import tokenizer_fingerprint

    return tokenizer_fingerprint(tokenizer) == manifest.header["tokenizer"]["fingerprint"]


def teacher_tokenizer(manifest: Manifest) -> Any:
    """The teacher's tokenizer saved in a cross-tokenizer cache, checked against the manifest's fingerprint.

    Raises:
        CacheError: the cache was labelled without `cache.cross_tokenizer`, or its tokenizer copy is missing/altered.
    """
    from lmdistill.models import load_tokenizer, tokenizer_fingerprint

    if not manifest.encoding.get("cross_tokenizer"):
        raise CacheError(
            f"cache `{manifest.root}` holds the teacher's top-k over its own token ids only (labelled without "
            "cache.cross_tokenizer), so a student of another tokenizer cannot be aligned with it; relabel with "
            "`lmdistill label ... --cache.cross_tokenizer true` (it adds each target's actual token, its log-prob "
            "and the teacher's tokenizer files), or train with the teacher's tokenizer"
        )
    path = manifest.root / TOKENIZER_DIR
    want = manifest.header["tokenizer"]["fingerprint"]
    try:
        tok = load_tokenizer(str(path))
        ok = tokenizer_fingerprint(tok) == want
    except Exception:  # noqa: BLE001  (a missing or damaged copy: one message below)
        ok = False
    if not ok:
        raise CacheError(f"cache `{manifest.root}` has no readable teacher tokenizer with fingerprint {want[:12]} in "
                         f"`{path}`; relabel with the same `lmdistill label` command (it rewrites the copy)")
    return tok


def _without(actual: int, raw: list[int], ids: list[int], probs: list[float]) -> tuple[list[int], list[float]]:
    """A top-k row (teacher ids `raw`, student ids, probabilities) without the teacher's actual token: the alternatives
    of a span (the actual token's mass is the span's and the other's)."""
    n = raw.count(actual)
    if n == 0:
        return ids, probs
    if n == 1:  # the usual case: a top-k lists each token once
        a = raw.index(actual)
        return ids[:a] + ids[a + 1:], probs[:a] + probs[a + 1:]
    keep = [m for m, i in enumerate(raw) if i != actual]
    return [ids[m] for m in keep], [probs[m] for m in keep]


class _BlockAligner:
    """Turns one cached block (the teacher's tokens, their log-probs and top-k) into a student block + its spans."""

    def __init__(self, teacher_tok: Any, student_tok: Any, n_vocab: int, block_size: int, report: SpanReport) -> None:
        self.student_tok, self.block_size, self.report = student_tok, block_size, report
        self.t_table = token_bytes(teacher_tok)
        token_bytes(student_tok)  # a tokenizer without byte offsets is refused by name before any block
        self.t2s = vocab_map(teacher_tok, student_tok, str(cache_root() / "vocab-maps")).teacher_to_student(n_vocab)
        self.t_eos, self.s_eos = teacher_tok.eos_token_id, student_tok.eos_token_id
        pad = student_tok.pad_token_id
        self.pad = int(pad if pad is not None else self.s_eos or 0)
        self.teacher_tok = teacher_tok
        self.chat: ChatAligner | None = None  # set for a chat cache: each side renders the messages itself

    def align_chat(self, messages: list[dict[str, str]], seq: list[int], labels: list[int], t_labels: list[int],
                   first_row: int, top_ids: list[list[int]], top_student: list[list[int]],
                   top_probs: list[list[float]], t_lp: list[float]) -> _RecordSpans:
        """The spans of one chat block: the student's rendering of `messages` (its tokens `seq`, its block's labels
        `labels`) aligned on the content with the teacher's own rendering, whose labelled block has labels `t_labels`
        and whose targets are the cache's rows from `first_row` on (top_*[r], t_lp[r]: row r)."""
        assert self.chat is not None
        spans = _RecordSpans()
        a = self.chat.align_row(seq, labels, conversation_key(messages), completion=False)
        learned_n = sum(1 for y in labels if y != IGNORE)
        if a is None:  # a template refused the conversation (warned once): cross-entropy only
            self.report.tokens_uncovered += learned_n
            return spans
        row_of: dict[int, int] = {}  # teacher block position -> its cache row (the labelled positions, in order)
        for p, y in enumerate(t_labels):
            if y != IGNORE:
                row_of[p] = first_row + len(row_of)
        t_ids = a.teacher_ids

        def cached(k: int) -> bool:  # teacher token k is a target of the cached block (its prediction is stored)
            return k - 1 in row_of and t_labels[k - 1] == t_ids[k]

        T = self.block_size

        def learned(f: int) -> bool:
            return 1 <= f <= T and labels[f - 1] != IGNORE

        def alternatives(k: int) -> tuple[list[int], list[float]]:
            r = row_of[k - 1]
            return _without(t_ids[k], top_ids[r], top_student[r], top_probs[r])

        usable = [(s_rng, t_rng) for s_rng, t_rng in a.spans if all(cached(k) for k in t_rng)]
        t_lps = [t_lp[row_of[k - 1]] if cached(k) else 0.0 for k in range(len(t_ids))]
        add_spans(spans, self.report, usable, seq, range(len(seq)), learned, t_lps, alternatives)
        self.report.tokens_uncovered += learned_n - sum(spans.n_tokens)
        return spans

    def align(self, t_seq: list[int], t_lp: list[float], top_ids: list[list[int]], top_student: list[list[int]],
              top_probs: list[list[float]]) -> tuple[list[int], list[int], list[int], _RecordSpans]:
        """(student input ids, labels, attention mask, spans) of the block whose teacher tokens are `t_seq` [T + 1];
        t_lp[j]: the teacher's log-prob of token j + 1; top_ids[j] / top_student[j] / top_probs[j]: its top-k at
        position j as teacher ids, as the student ids of the same bytes (-1: none) and as probabilities."""
        s_seq: list[int] = []
        r = retokenize(t_seq, self.t_table, self.t_eos, self.student_tok, self.s_eos, s_seq)
        t_tokens, t_index, s_tokens, s_full = r.known, r.known_index, r.other, r.other_index
        marked = set(r.markers)  # teacher-only special tokens: the next span's contexts differ

        T = self.block_size
        if len(s_seq) - 1 > T:
            self.report.truncated_records += 1

        def learned(f: int) -> bool:  # student token f is the label of block position f - 1 (pretrain: all are)
            return 1 <= f <= T

        def usable(k: int) -> bool:  # teacher token t_index[k] has a prediction, made after a context both saw
            j = t_index[k]
            return j >= 1 and j - 1 not in marked

        def alternatives(k: int) -> tuple[list[int], list[float]]:
            j = t_index[k]
            return _without(t_seq[j], top_ids[j - 1], top_student[j - 1], top_probs[j - 1])

        spans = _RecordSpans()
        t_lps = [t_lp[j - 1] if j >= 1 else 0.0 for j in t_index]
        add_spans(spans, self.report, byte_spans(s_tokens, t_tokens), s_seq, s_full, learned, t_lps, alternatives,
                  usable)
        inputs, labels = s_seq[:-1][:T], s_seq[1:][:T]
        n = len(inputs)
        self.report.tokens_uncovered += n - sum(spans.n_tokens)
        return (inputs + [self.pad] * (T - n), labels + [IGNORE] * (T - n), [1] * n + [0] * (T - n), spans)


def _shard_blocks(cache: CachedTeacher, aligner: _BlockAligner, j: int) -> tuple[SpanTargetBlocks, SpanReport]:
    """Shard `j`'s cached blocks as student blocks with their span targets, and the counts of that shard alone."""
    aligner = copy.copy(aligner)
    aligner.report = report = SpanReport()
    blocks = _chat_shard_blocks(cache, aligner, j) if aligner.chat is not None else _text_shard_blocks(cache, aligner, j)
    report.records += len(blocks)
    report.kept += int((blocks.offsets[1:] > blocks.offsets[:-1]).sum())  # blocks with at least one span
    report.soft_positions += int(blocks.n_tokens.sum())
    return blocks, report


def _top_rows(t: dict[str, torch.Tensor], enc: dict[str, Any], aligner: _BlockAligner, n_rows: int,
              ) -> tuple[list[list[int]], list[list[int]], list[list[float]], list[float]]:
    """A shard's top-k rows as (teacher ids, student ids of the same bytes, probabilities), and each row's actual
    token log-prob."""
    width, values, c = enc["id_bytes"], enc["values"], enc.get("int8_range", 0.0)
    top = unpack_ids(t["ids"], width).view(n_rows, -1)
    # mapped and exponentiated for the whole shard at once (per entry in Python, this was half of the alignment time)
    top_student = aligner.t2s[top].tolist()
    top_probs = decode_values(t["logprobs"], values, c).view(n_rows, -1).double().exp().tolist()
    t_lp = decode_values(t["token_logprob"], values, c).view(n_rows).tolist()
    return top.tolist(), top_student, top_probs, t_lp


def _chat_shard_blocks(cache: CachedTeacher, aligner: _BlockAligner, j: int) -> SpanTargetBlocks:
    """A chat shard: each block's messages rendered by the teacher's template (checked against the labelled block's
    digest) and by the student's, aligned on the content."""
    assert aligner.chat is not None
    report = aligner.report
    t = cache.shard_tensors(j, _CHAT_TENSORS)
    path = cache.root / cache.entries[j].file
    offsets = t["conversation_offsets"].tolist()
    raw = bytes(t["conversations"].numpy())
    n = len(offsets) - 1
    try:
        conversations = [json.loads(raw[offsets[b]: offsets[b + 1]].decode("utf-8")) for b in range(n)]
    except (ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"shard `{path}` holds unreadable conversations ({e}); relabel with `lmdistill label "
                         "--cache.cross_tokenizer true`") from None
    T = int(cache.info["block_size"])
    t_blocks, _ = conversation_blocks(conversations, aligner.teacher_tok, T)
    if len(t_blocks) != t["block_digest"].shape[0] or not torch.equal(
            block_digests(t_blocks.input_ids, t_blocks.labels, t_blocks.attention_mask), t["block_digest"]):
        raise CacheError(f"shard `{path}`: the teacher's chat template does not render the stored conversations as "
                         "the labelled blocks (digest mismatch; an edited tokenizer copy in the cache?); relabel with "
                         "`lmdistill label --cache.cross_tokenizer true`")
    row_offsets = row_offsets_of(t_blocks.labels)
    if not torch.equal(t["row_offsets"], row_offsets):
        raise CacheError(f"shard `{path}` does not hold one target row per labelled position; relabel with "
                         "`lmdistill label --cache.cross_tokenizer true`")
    top_ids, top_student, top_probs, t_lp = _top_rows(t, cache.enc, aligner, int(row_offsets[-1]))
    s_blocks, truncated = conversation_blocks(conversations, aligner.student_tok, aligner.block_size)
    report.truncated_records += truncated
    aligner.chat.add([s_blocks])
    s_labels, t_labels = s_blocks.labels.tolist(), t_blocks.labels.tolist()
    spans: list[_RecordSpans] = []
    for b in range(n):
        seq = student_sequence(s_blocks.input_ids[b], s_blocks.labels[b], s_blocks.attention_mask[b])
        spans.append(aligner.align_chat(conversations[b], seq, s_labels[b], t_labels[b], int(row_offsets[b]),
                                        top_ids, top_student, top_probs, t_lp))
    return pack_spans(TokenBlocks(s_blocks.input_ids, s_blocks.labels, s_blocks.attention_mask), spans)


def _text_shard_blocks(cache: CachedTeacher, aligner: _BlockAligner, j: int) -> SpanTargetBlocks:
    """A packed-text shard: the blocks spelled from the stored tokens, re-tokenized for the student."""
    enc = cache.enc
    width = enc["id_bytes"]
    T = int(cache.info["block_size"])
    t = cache.shard_tensors(j, _TENSORS)
    path = cache.root / cache.entries[j].file
    first = unpack_ids(t["block_first_id"], width)
    n = int(first.shape[0])
    tokens = unpack_ids(t["token_ids"], width)
    if not torch.equal(t["row_offsets"], torch.arange(n + 1, dtype=torch.int64) * T) or tokens.numel() != n * T:
        raise CacheError(f"shard `{path}` does not hold {T} target rows per block, as a pretrain cache does; "
                         "relabel with `lmdistill label --cache.cross_tokenizer true`")
    labels = tokens.view(n, T)
    inputs = torch.cat([first[:, None], labels[:, :-1]], dim=1)
    # the rebuilt blocks are the labelled ones, byte for byte: their digests are the ones stored at labelling
    if not torch.equal(block_digests(inputs, labels, torch.ones_like(inputs)), t["block_digest"]):
        raise CacheError(f"shard `{path}`: the stored tokens do not rebuild the labelled blocks (digest mismatch);"
                         " relabel with `lmdistill label --cache.cross_tokenizer true`")
    top_ids, top_student, top_probs, t_lp = _top_rows(t, enc, aligner, n * T)
    seqs = torch.cat([inputs, labels[:, -1:]], dim=1).tolist()
    rows: tuple[list[list[int]], list[list[int]], list[list[int]]] = ([], [], [])
    spans: list[_RecordSpans] = []
    for b in range(n):
        at = slice(b * T, (b + 1) * T)  # the block's T target rows
        *row, sp = aligner.align(seqs[b], t_lp[at], top_ids[at], top_student[at], top_probs[at])
        for out, r in zip(rows, row, strict=True):
            out.append(r)
        spans.append(sp)
    size = aligner.block_size
    blocks = TokenBlocks(*(torch.tensor(r, dtype=torch.long).view(-1, size) for r in rows))
    return pack_spans(blocks, spans)


# The aligner and the split's cache, set in the parent before it forks its workers (they inherit both, so a worker
# starts without re-reading the two tokenizers or rebuilding the vocab map).
_FORKED: tuple[CachedTeacher, _BlockAligner] | None = None


def _shard_in_worker(j: int) -> tuple[SpanTargetBlocks, SpanReport]:
    assert _FORKED is not None
    torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would only contend for the cores
    return _shard_blocks(*_FORKED, j)


def align_workers(requested: int, n_shards: int, alone: bool = False) -> int:
    """Processes that align a split: `requested`, or (0) this process's CPU cores, shared among the node's ranks
    unless this rank aligns `alone` (the others wait for the stored result); never more than the shards, and 1 where
    processes cannot be forked."""
    if requested <= 0:
        requested = local_cpu_cores(shared_with_ranks=not alone)
    if "fork" not in mp.get_all_start_methods():
        return 1
    return max(1, min(requested, n_shards))


def _split_blocks(cache: CachedTeacher, aligner: _BlockAligner, workers: int, progress: bool = False,
                  alone: bool = False) -> SpanTargetBlocks:
    """Every cached block of one split as a student block with its span targets, in block order; the shards are
    aligned by `workers` forked processes (the result is the same for any number: each shard is aligned alone)."""
    global _FORKED
    shards = sorted(cache.entries)
    n = align_workers(workers, len(shards), alone)
    parts: list[tuple[SpanTargetBlocks, SpanReport]] = []
    with make_progress(progress) as bar:
        task = bar.add_task(f"align {cache.split_name}", total=len(shards), stats=f"{n} worker{'s' * (n > 1)}")
        if n == 1:
            for j in shards:
                parts.append(_shard_blocks(cache, aligner, j))
                bar.advance(task)
        else:
            _FORKED = (cache, aligner)
            try:
                with mp.get_context("fork").Pool(n, initializer=worker_signals) as pool:
                    for part in pool.imap(_shard_in_worker, shards, chunksize=1):
                        parts.append(part)
                        bar.advance(task)
            finally:
                _FORKED = None
    for _, report in parts:
        aligner.report.merge(report)
    return concat_span_blocks([blocks for blocks, _ in parts], aligner.block_size)


def load_cache_span_splits(root: str | Path, student_tok: Any, n_vocab: int, block_size: int, *,
                           temperature: float = 1.0, workers: int = 0, progress: bool = False,
                           store: bool = True) -> tuple[SpanTargetBlocks, SpanTargetBlocks, SpanReport]:
    """(train, held-out, report): a cross-tokenizer cache's train and eval splits as the student's blocks with span
    targets (held-out: empty when the cache has no eval split).

    Args:
        root: a cache labelled with `cache.cross_tokenizer true`.
        student_tok: the student's tokenizer (fast, with byte offsets); n_vocab: the student's real vocab.
        block_size: the student's block length (data.block_size); a block's text that needs more student tokens
            is cut there (counted in the report's truncated_records).
        temperature: the loss temperature; the cache's log-probs are at 1.
        workers: processes that align the shards (0: this process's CPU cores shared among the node's ranks, see
            `align_workers`); the result does not depend on it. progress: a bar per split (shards done).
        store: keep the aligned targets on disk and memory-map them (lmdistill.cache.span_store): aligned by the
            first run only, shared by every run and process with the same cache, student tokenizer and block size.

    Raises:
        CacheError: no cross-tokenizer fields, a temperature other than 1, a damaged shard or tokenizer copy.
    """
    manifest = read_manifest(root)
    t_tok = teacher_tokenizer(manifest)
    if abs(temperature - float(manifest.encoding["temperature"])) > 1e-6:
        raise CacheError(
            f"cache `{manifest.root}` holds teacher log-probs at temperature {manifest.encoding['temperature']:g}, "
            f"and across tokenizers the span probabilities cannot be re-tempered; set --loss.temperature "
            f"{manifest.encoding['temperature']:g}"
        )
    chat = manifest.header["data"]["params"].get("stage") == "chat"
    if chat and getattr(student_tok, "chat_template", None) is None:
        raise CacheError(f"cache `{manifest.root}` holds chat data, which the student reads through its own chat "
                         "template, and the student's tokenizer has none; set its tokenizer's chat_template")

    def align() -> tuple[SpanTargetBlocks, SpanTargetBlocks, SpanReport]:
        report = SpanReport()
        aligner = _BlockAligner(t_tok, student_tok, n_vocab, block_size, report)
        if chat:
            aligner.chat = ChatAligner(student_tok, t_tok, [])
        # with the store, one process aligns while the node's others wait on its lock: it may take every core
        train = _split_blocks(CachedTeacher(root, "train"), aligner, workers, progress, alone=store)
        if "eval" in manifest.header["data"]["splits"]:
            held = _split_blocks(CachedTeacher(root, "eval"), aligner, workers, progress, alone=store)
        else:
            held = concat_span_blocks([], block_size)
        if int(train.offsets[-1]) == 0:
            raise CacheError(f"no span of cache `{manifest.root}` aligns with the student's tokens ({report.line()});"
                             " the two tokenizations never close at the same byte on this text")
        return train, held, report

    if not store:
        return align()
    (train, held, report), path = stored_or_aligned(
        store_key(manifest, student_tok, t_tok, n_vocab, block_size), align)
    if path is not None:
        log.info("aligned targets of cache `%s`: `%s` (%.1f MB, memory-mapped)", manifest.root, path,
                 stored_bytes(path) / 1e6)
    return train, held, report

