"""Soft labels from a black-box teacher: the top-k log-probs an API returns with each completion token, as sparse
targets aligned with the student's token blocks.

A `lmdistill generate` record written with `sampling.logprobs=true` holds the conversation (`messages`, whose last
turn is the completion) and, per completion token, `{"token", "id", "logprob", "top_logprobs": [{"token", "id",
"logprob"}, ...]}` (`id` is null where the endpoint sends token strings only). For each record:

1. the conversation is rendered with the chat template exactly as `data.stage=chat` training renders it; the
   completion's tokens start at `start`, the length of the prompt rendered with the generation prompt;
2. the API's tokens must be the first tokens of that turn, compared by id where the endpoint gave ids (`lmdistill
   serve`, the local backend), else by decoded string, and must spell the whole completion text. A record that does
   not line up (another tokenizer, a completion edited after generation, a tokenisation the tokenizer would not
   reproduce) is skipped and counted;
3. the token at full position `start + j` is predicted at input position `start + j - 1`. That position gets the
   API's top-k ids and log-probs, the sampled token's own log-prob when it is not among them, and (optionally) the
   tail `log(1 - sum p)`, the teacher mass outside those ids;
4. learned positions the API did not score (the end-of-turn tokens the template adds after the completion) get a
   one-hot target on the token that is there, so every learned token has a target and the loss stays a per-token
   mean over the same tokens as every other recipe. The report counts both kinds of position.

Top-k alternatives given only as strings are mapped back to ids through the tokenizer; a string that decodes from
several ids names none of them and is dropped (counted), its mass then falls into the tail.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmdistill.config import DataConfig
from lmdistill.data import IGNORE, TokenBlocks, chat_blocks, conversation, render_chat
from lmdistill.errors import DataError
from lmdistill.losses import LOGPROB_FLOOR
from lmdistill.losses.sparse import SparseTargets

log = logging.getLogger(__name__)


@dataclass
class AlignmentReport:
    """What happened to the records of an API-logprobs file."""

    records: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    soft_positions: int = 0  # positions with the API's top-k
    hard_positions: int = 0  # learned positions the API did not score: one-hot on the token there
    alternatives_dropped: int = 0  # top-k entries whose token string names no single id (or an id outside the vocab)
    truncated_records: int = 0  # completions cut at block_size (their tail positions are not learned)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "kept": self.kept, "skipped": dict(self.skipped),
                "soft_positions": self.soft_positions, "hard_positions": self.hard_positions,
                "alternatives_dropped": self.alternatives_dropped, "truncated_records": self.truncated_records}

    def line(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (f"{self.kept}/{self.records} records aligned (skipped: {skipped}); {self.soft_positions} positions "
                f"with API top-k, {self.hard_positions} one-hot; {self.alternatives_dropped} top-k entries dropped")


@dataclass
class _Entries:
    """One record's targets: input positions [P] and, per position, K' ids, log-probs, tail, whether API-scored."""

    positions: list[int]
    ids: list[list[int]]
    logprobs: list[list[float]]
    tail: list[float]
    soft: list[bool]


@dataclass
class SparseTargetBlocks(TokenBlocks):
    """Token blocks whose batches also carry sparse teacher targets (so they travel to the device with the batch).

    Storage is flat over the entries of all blocks (only learned positions have one): block i owns rows
    `offsets[i]:offsets[i + 1]` of `positions` [P] (input position in the block), `ids` [P, K] (-1 = absent),
    `logprobs` [P, K], `tail` [P] (log teacher mass outside `ids`) and `soft` [P] (True = the API scored it).
    `batch()` adds `target_ids` [B, T, K], `target_logprobs` [B, T, K], `target_tail` [B, T] (when `use_tail`) and
    `target_soft` [B, T] bool.
    """

    offsets: Tensor
    positions: Tensor
    ids: Tensor
    logprobs: Tensor
    tail: Tensor
    soft: Tensor
    use_tail: bool = True

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def batch(self, indices: Tensor | list[int]) -> dict[str, Tensor]:
        out = super().batch(indices)
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        b, t = out["input_ids"].shape
        ids = torch.full((b, t, self.k), -1, dtype=torch.long)
        lps = torch.zeros(b, t, self.k, dtype=torch.float32)
        tail = torch.full((b, t), LOGPROB_FLOOR, dtype=torch.float32)
        soft = torch.zeros(b, t, dtype=torch.bool)
        for row, block in enumerate(idx.tolist()):
            lo, hi = int(self.offsets[block]), int(self.offsets[block + 1])
            pos = self.positions[lo:hi]
            ids[row, pos], lps[row, pos], tail[row, pos], soft[row, pos] = (
                self.ids[lo:hi], self.logprobs[lo:hi], self.tail[lo:hi], self.soft[lo:hi])
        out.update(target_ids=ids, target_logprobs=lps, target_soft=soft)
        if self.use_tail:
            out["target_tail"] = tail
        return out


class InBatchTeacher:
    """The teacher of an API-logprobs run, a `SparseTeacher` whose targets ride in the batch."""

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """SparseTargets (ids/logprobs [B, T, K], tail [B, T] or None) of a `SparseTargetBlocks` batch."""
        return SparseTargets(ids=batch["target_ids"], logprobs=batch["target_logprobs"],
                             tail_logprob=batch.get("target_tail"))


def decoded_token_ids(tokenizer: Any) -> dict[str, int]:
    """Decoded string -> id for every token whose decoded string no other token shares (API token strings are
    decoded text, not vocab entries: `" the"`, not `"Ġthe"`)."""
    strings = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    seen: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i, s in enumerate(strings):
        if s in seen:
            ambiguous.add(s)
        seen.setdefault(s, i)
    return {s: i for s, i in seen.items() if s not in ambiguous}


def _template_ids(tokenizer: Any, messages: list[dict[str, str]], gen_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class _Aligner:
    def __init__(self, tokenizer: Any, data: DataConfig, n_vocab: int, report: AlignmentReport) -> None:
        self.tokenizer, self.data, self.n_vocab, self.report = tokenizer, data, n_vocab, report
        self._strings: dict[str, int] | None = None
        self._decode_cache: dict[int, str] = {}

    def string_ids(self) -> dict[str, int]:
        if self._strings is None:  # only endpoints without token ids need it (a pass over the vocab)
            self._strings = decoded_token_ids(self.tokenizer)
        return self._strings

    def decode(self, token_id: int) -> str:
        if token_id not in self._decode_cache:
            self._decode_cache[token_id] = self.tokenizer.decode([token_id])
        return self._decode_cache[token_id]

    def align(self, record: dict[str, Any]) -> _Entries | str:
        """The record's targets, or why it is skipped."""
        entries = record.get("logprobs")
        if not entries:
            return "without logprobs"
        try:
            messages = conversation(record, self.data)
        except (KeyError, TypeError):
            return "without chat messages"
        if not messages or messages[-1]["role"] != "assistant":
            return "without chat messages"
        T = self.data.block_size
        full, mask = render_chat(messages, self.tokenizer, T)  # what chat_blocks trains on (cut at T + 1)
        prompt = _template_ids(self.tokenizer, messages[:-1], True)
        whole = _template_ids(self.tokenizer, messages, False)
        start = len(prompt)
        if whole[:start] != prompt or start >= len(whole):
            return "whose template does not render the prompt as a prefix"
        api_ids = []
        for j, e in enumerate(entries):
            if start + j >= len(whole):
                return "whose tokens differ from the tokenizer's"
            ours = whole[start + j]
            if e.get("id") is not None:
                if int(e["id"]) != ours:
                    return "whose tokens differ from the tokenizer's"
            elif self.decode(ours) != e.get("token"):
                return "whose tokens differ from the tokenizer's"
            api_ids.append(ours)
        # the tokens must spell the whole completion: text edited after generation (think stripping, a cut) is not
        # what the log-probs describe, even where a prefix of the tokens still matches
        if self.tokenizer.decode(api_ids, skip_special_tokens=True).strip() != messages[-1]["content"].strip():
            return "whose completion text differs from its tokens"
        if len(whole) > T + 1:
            self.report.truncated_records += 1

        soft_at: dict[int, tuple[list[int], list[float], float]] = {}
        for j, (e, chosen) in enumerate(zip(entries, api_ids, strict=True)):
            pos = start + j - 1
            if pos >= T:
                break
            ids, lps = [], []
            for alt in [*(e.get("top_logprobs") or []), {"id": chosen, "logprob": e.get("logprob")}]:
                tid = alt.get("id")
                if tid is None:
                    tid = self.string_ids().get(alt.get("token", ""))
                lp = alt.get("logprob")
                if tid is None or not 0 <= int(tid) < self.n_vocab:
                    self.report.alternatives_dropped += 1
                    continue
                if tid in ids or lp is None or not math.isfinite(lp):
                    continue  # the sampled token repeats a top-k entry; a -inf entry has no mass
                ids.append(int(tid))
                lps.append(min(float(lp), 0.0))
            mass = sum(math.exp(v) for v in lps)
            tail = math.log(1.0 - mass) if mass < 1.0 else LOGPROB_FLOOR
            soft_at[pos] = (ids, lps, max(tail, LOGPROB_FLOOR))

        out = _Entries([], [], [], [], [])
        labels = full[1:][:T]
        for pos, (label, learned) in enumerate(zip(labels, mask[1:][:T], strict=True)):
            if not learned:
                continue
            ids, lps, tail = soft_at.get(pos, ([label], [0.0], LOGPROB_FLOOR))
            out.positions.append(pos)
            out.ids.append(ids)
            out.logprobs.append(lps)
            out.tail.append(tail)
            out.soft.append(pos in soft_at)
        if not any(out.soft):
            return "without a scored completion token"
        return out


def _pack(records: list[dict[str, Any]], entries: list[_Entries], data: DataConfig, tokenizer: Any,
          tail: bool) -> SparseTargetBlocks:
    blocks = chat_blocks(records, data, tokenizer)
    k = max((len(ids) for e in entries for ids in e.ids), default=1)
    counts = [len(e.positions) for e in entries]
    offsets = torch.zeros(len(entries) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    p = int(offsets[-1])
    ids = torch.full((p, k), -1, dtype=torch.long)
    lps = torch.zeros(p, k, dtype=torch.float32)
    row = 0
    for e in entries:
        for row_ids, row_lps in zip(e.ids, e.logprobs, strict=True):
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            lps[row, : len(row_lps)] = torch.tensor(row_lps, dtype=torch.float32)
            row += 1
    out = SparseTargetBlocks(
        blocks.input_ids, blocks.labels, blocks.attention_mask, offsets=offsets,
        positions=torch.tensor([q for e in entries for q in e.positions], dtype=torch.long),
        ids=ids, logprobs=lps, tail=torch.tensor([v for e in entries for v in e.tail], dtype=torch.float32),
        soft=torch.tensor([s for e in entries for s in e.soft], dtype=torch.bool), use_tail=tail,
    )
    # the blocks and the targets come from two renderings of one record: they must name the same learned tokens
    for b in range(len(out)):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        learned = (out.labels[b] != IGNORE).nonzero().squeeze(-1)
        if not torch.equal(learned, out.positions[lo:hi]):
            raise RuntimeError(f"API targets of block {b} do not cover its learned positions")
        hard = ~out.soft[lo:hi]
        if not torch.equal(out.ids[lo:hi][hard, 0], out.labels[b, out.positions[lo:hi][hard]]):
            raise RuntimeError(f"one-hot targets of block {b} are not its labels")
    return out


def _align_all(records: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig,
               n_vocab: int) -> tuple[list[int], list[_Entries], AlignmentReport]:
    """Indices of the records that align, their targets, and the report."""
    report = AlignmentReport(records=len(records))
    aligner = _Aligner(tokenizer, data, n_vocab, report)
    kept, entries = [], []
    for i, record in enumerate(records):
        out = aligner.align(record)
        if isinstance(out, str):
            report.skip(out)
            continue
        kept.append(i)
        entries.append(out)
        report.soft_positions += sum(out.soft)
        report.hard_positions += len(out.soft) - sum(out.soft)
    report.kept = len(kept)
    return kept, entries, report


def build_api_targets(records: Sequence[dict[str, Any]], tokenizer: Any, data: DataConfig, n_vocab: int, *,
                      tail: bool = True) -> tuple[SparseTargetBlocks, AlignmentReport]:
    """Token blocks (one per aligned record, in order, as `stage=chat` builds them) with the API's sparse targets.

    Args:
        records: `lmdistill generate` records with `messages` and per-token `logprobs`.
        tokenizer: the student's tokenizer, which must be the teacher's (ids are checked record by record).
        data: block_size and messages_column (or prompt/completion columns) apply.
        n_vocab: the student's real vocab; ids outside it are dropped.
        tail: batches carry `target_tail` (log of the teacher mass outside the stored ids).
    """
    kept, entries, report = _align_all(records, tokenizer, data, n_vocab)
    return _pack([records[i] for i in kept], entries, data, tokenizer, tail), report


def split_by_prompt(records: Sequence[dict[str, Any]], kept: Sequence[int],
                    data: DataConfig) -> tuple[list[int], list[int]]:
    """(train, held-out) indices into `kept` (the aligned records' indices into `records`), whole prompts apart.

    The records are grouped by prompt `id` (all samples of a prompt on one side, so the student is never scored on
    a question it trained on), the groups shuffled with `data.seed`, and groups go to the held-out split until it has
    `data.eval_documents` records. At most `data.max_documents` records are trained on.
    """
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(kept):
        groups.setdefault(str(records[i].get("id", f"#{i}")), []).append(j)
    order = list(groups.values())
    random.Random(data.seed).shuffle(order)
    held: list[int] = []
    train: list[int] = []
    for group in order:
        # never hold out everything: the last group always trains
        (held if len(held) < data.eval_documents and group is not order[-1] else train).extend(group)
    if data.max_documents is not None:
        train = train[: data.max_documents]
    return train, held


def load_api_splits(path: str | Path, data: DataConfig, tokenizer: Any, n_vocab: int, *,
                    tail: bool = True) -> tuple[SparseTargetBlocks, SparseTargetBlocks, AlignmentReport]:
    """(train, held-out, report) from a `lmdistill generate` JSONL with top-k log-probs.

    Whole prompts are held out: the aligned records are grouped by prompt `id` (all samples of a prompt on one side,
    so the student is never scored on a question it trained on), the groups shuffled with `data.seed`, and groups
    go to the held-out split until it has `data.eval_documents` records. At most `data.max_documents` records are
    trained on.

    Raises:
        DataError: the file is missing or malformed, or no record lines up with the tokenizer.
    """
    from lmdistill.generate.store import read_records  # noqa: PLC0415  (generate pulls in its backends)

    path = Path(path)
    if not path.is_file():
        raise DataError(f"api_logprobs file `{path}` not found; write it with `lmdistill generate "
                        "--sampling.logprobs true --sampling.top_logprobs 20`")
    records, _ = read_records(path)
    kept, entries, report = _align_all(records, tokenizer, data, n_vocab)
    if report.kept == 0:
        raise DataError(
            f"none of the {report.records} records in `{path}` can be trained on ({report.line()}). Records need "
            "`messages` and per-token `logprobs` (generate with --sampling.logprobs true --sampling.top_logprobs k), "
            "and the student must use the teacher's tokenizer; for a teacher of another tokenizer add "
            "`--loss.cross_tokenizer hybrid` (or `uld`: its top-k aligned with the student's tokens by bytes), or "
            "use `lmdistill hard --mode sequence` for its text alone"
        )
    if report.kept < report.records:
        log.warning("api_logprobs `%s`: %s", path, report.line())
    train, held = split_by_prompt(records, kept, data)

    def pack(rows: list[int]) -> SparseTargetBlocks:
        return _pack([records[kept[j]] for j in rows], [entries[j] for j in rows], data, tokenizer, tail)

    return pack(train), pack(held), report
