"""Datasets -> fixed-length token blocks with labels and masks, for both training stages.

- pre-training: raw text is tokenised, joined with EOS between documents and cut into blocks of `block_size`
  (no padding waste). Block i holds tokens [i*T, (i+1)*T) as inputs and [i*T+1, (i+1)*T+1) as labels.
- post-training (chat): each conversation is rendered with the tokenizer's chat template; only assistant tokens
  have labels, the prompt is masked (-100). Sequences are padded to `block_size`.

`labels[b, t]` is the token that position t predicts (already shifted), -100 where nothing is learned, so the CE,
the divergences and the cache all use one mask: `labels != -100`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmdistill.assets import EMBEDDED_QUESTIONS, EMBEDDED_TEXT, wikipedia_dataset, wikipedia_questions
from lmdistill.config import DataConfig
from lmdistill.errors import DataError

log = logging.getLogger(__name__)
IGNORE = -100
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


@dataclass
class TokenBlocks:
    """Fixed-length examples: input_ids, labels, attention_mask, each [N, T] int64."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Rows `indices` as a batch; `index` carries the block indices so cached targets can be aligned to them."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"input_ids": self.input_ids[idx], "labels": self.labels[idx], "attention_mask": self.attention_mask[idx],
                "index": idx}

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def fingerprint(self) -> str:
        """sha256 of the token ids and masks: two runs on equal fingerprints saw exactly the same data."""
        h = hashlib.sha256()
        for t in (self.input_ids, self.labels, self.attention_mask):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()


@dataclass
class ChatBlocks(TokenBlocks):
    """Chat blocks that remember their conversations: row i is the student's rendering of `conversations[i]`.

    `batch()` adds `conversation` [B] int64, a key of each row's conversation (`conversation_key`), so that a teacher
    of another tokenizer can render the same messages with its own chat template (lmdistill.chat_align).
    """

    conversations: list[list[dict[str, str]]]

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        out = super().batch(indices)
        rows = out["index"].reshape(-1).tolist()
        out["conversation"] = torch.tensor([conversation_key(self.conversations[i]) for i in rows], dtype=torch.long)
        return out


def conversation_key(messages: list[dict[str, str]]) -> int:
    """A stable int64 key of a conversation (the first 8 bytes of the sha256 of its JSON)."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


@dataclass
class DataSplits:
    train: TokenBlocks
    eval: TokenBlocks


def load_raw_dataset(source: str, *, split: str = "train", hub_config: str | None = None):
    """A `datasets.Dataset` from a local file, a directory of files, a hub name, or the embedded Wikipedia text."""
    from datasets import Dataset, load_dataset

    if source == EMBEDDED_TEXT:
        return wikipedia_dataset()
    if source == EMBEDDED_QUESTIONS:  # chat data: prompt_column=prompt, completion_column=reference (the extract)
        return Dataset.from_list(wikipedia_questions())
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _EXTENSIONS)
        if not files:
            raise DataError(f"dataset directory `{source}` holds no {'/'.join(_EXTENSIONS)} files")
        kinds = {_EXTENSIONS.get(f.suffix) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(
                f"dataset `{source}`: files must all be one of {', '.join(_EXTENSIONS)}, found "
                f"{sorted({f.suffix for f in files})}"
            )
        builder = kinds.pop()
        # datasets fails on an empty file with an empty message; say what is wrong instead.
        if (builder == "json" and _check_jsonl(files) == 0) or all(f.stat().st_size == 0 for f in files):
            raise DataError(f"dataset `{source}` is empty (no records); give it at least one record")
        try:
            ds = load_dataset(builder, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # noqa: BLE001
            raise DataError(f"could not read dataset `{source}`: {e}") from None
    elif source.startswith((".", "/", "~")) or source.endswith(tuple(_EXTENSIONS)):
        raise DataError(f"dataset `{source}` not found; give an existing file or directory, or a hub dataset name")
    else:
        try:
            ds = load_dataset(source, hub_config, split=split)
        except Exception as e:  # noqa: BLE001
            raise DataError(
                f"could not load hub dataset `{source}` (split `{split}`): {e}. Check the name and your network, "
                "or download it and pass a local path"
            ) from None
    if len(ds) == 0:
        raise DataError(f"dataset `{source}` is empty; give it at least one record")
    return ds


def _check_jsonl(files: list[Path]) -> int | None:
    """Name the file and line of the first malformed record (datasets' own error does not) and reject non-UTF-8.

    Returns the number of records in the .jsonl files, or None when some file is .json (not counted here).
    """
    records: int | None = 0
    for f in files:
        if f.suffix != ".jsonl":
            records = None
            continue
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"`{f}` line {lineno} is not valid UTF-8 ({e.reason}); re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"`{f}` line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
                if records is not None:
                    records += 1
    return records


def _require_column(ds: Any, column: str, what: str, source: str) -> None:
    if column not in ds.column_names:
        raise DataError(
            f"dataset `{source}` has no column `{column}` ({what}); its columns are: {', '.join(ds.column_names)}. "
            f"Set data.{what} to one of them"
        )


def split_documents(ds: Any, cfg: DataConfig) -> tuple[Any, Any]:
    """Shuffle documents with the seed; hold out the first `eval_documents` (before packing, so no block straddles).

    With a group column (`data.split_by`), whole groups are held out, in shuffled order, until the held-out side has
    at least `eval_documents` records; no group is on both sides, and at least one is left for training.
    """
    ds = ds.shuffle(seed=cfg.seed)
    key = split_column(ds, cfg)
    if key is None:
        if cfg.max_documents is not None:
            ds = ds.select(range(min(cfg.max_documents + cfg.eval_documents, len(ds))))
        n_eval = min(cfg.eval_documents, max(len(ds) - 1, 0))
        return ds.select(range(n_eval, len(ds))), ds.select(range(n_eval))
    members: dict[str, list[int]] = {}
    for i, value in enumerate(ds[key]):
        members.setdefault(json.dumps(value, sort_keys=True, default=str), []).append(i)
    held: list[int] = []
    groups = list(members.values())
    for group in groups[:-1]:  # the last group always trains
        if len(held) >= cfg.eval_documents:
            break
        held.extend(group)
    held_set = set(held)
    train = [i for i in range(len(ds)) if i not in held_set]
    if cfg.max_documents is not None:
        train = train[: cfg.max_documents]
    return ds.select(train), ds.select(sorted(held))


def split_column(ds: Any, cfg: DataConfig) -> str | None:
    """The column that groups records for the held-out split, or None (see DataConfig.split_by)."""
    if cfg.split_by is None:
        return None
    if cfg.split_by == "auto":
        return "id" if {"id", "sample"} <= set(ds.column_names) else None
    _require_column(ds, cfg.split_by, "split_by", cfg.source)
    return cfg.split_by


def pack_text(texts: list[str], tokenizer: Any, block_size: int) -> TokenBlocks:
    """Tokenise, join documents with EOS, cut into [N, block_size] blocks (the remainder shorter than a block is dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token, needed to separate packed documents; set tokenizer.eos_token")
    if not texts:
        return _empty(block_size)
    stream: list[int] = []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for ids in encoded:
        if ids:
            stream.extend(ids)
            stream.append(eos)
    n_blocks = (len(stream) - 1) // block_size
    if n_blocks == 0:
        return _empty(block_size)
    flat = torch.tensor(stream[: n_blocks * block_size + 1], dtype=torch.long)
    inputs = flat[:-1].view(n_blocks, block_size)
    labels = flat[1:].view(n_blocks, block_size)
    return TokenBlocks(inputs.clone(), labels.clone(), torch.ones_like(inputs))


def _empty(block_size: int) -> TokenBlocks:
    z = torch.zeros(0, block_size, dtype=torch.long)
    return TokenBlocks(z, z.clone(), z.clone())


def conversation(record: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    if cfg.prompt_column and cfg.completion_column:
        return [
            {"role": "user", "content": str(record[cfg.prompt_column])},
            {"role": "assistant", "content": str(record[cfg.completion_column])},
        ]
    return [{"role": m["role"], "content": m["content"]} for m in record[cfg.messages_column]]


def render_chat(messages: list[dict[str, str]], tokenizer: Any, block_size: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask of assistant tokens (the ones the student learns).

    Each assistant turn's span is found by rendering the conversation up to it (with the generation prompt) and up to
    its end, which works for any chat template that renders prefixes consistently (ChatML, Llama 3, Qwen, ...).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("stage=chat needs a tokenizer with a chat template; set tokenizer.chat_template or use "
                        "stage=pretrain")
    if not messages or not any(m["role"] == "assistant" for m in messages):
        raise DataError("a chat record has no assistant turn, so there is nothing to learn from it")

    def ids_of(msgs: list[dict[str, str]], gen_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    full = ids_of(messages, False)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not m["content"].strip():
            continue
        start = len(ids_of(messages[:i], True))
        end = len(ids_of(messages[: i + 1], False))
        for j in range(start, min(end, len(full))):
            mask[j] = 1
    return full[: block_size + 1], mask[: block_size + 1]


def chat_blocks(records: Any, cfg: DataConfig, tokenizer: Any) -> TokenBlocks:
    """One padded block per conversation; labels only where the next token is an assistant token."""
    blocks, truncated = conversation_blocks([conversation(rec, cfg) for rec in records], tokenizer, cfg.block_size)
    if truncated:
        log.warning("%d conversations were longer than block_size=%d tokens and were truncated", truncated,
                    cfg.block_size)
    return blocks


def conversation_blocks(conversations: list[list[dict[str, str]]], tokenizer: Any,
                        block_size: int) -> tuple[TokenBlocks, int]:
    """(blocks, how many conversations were cut at block_size): `chat_blocks` for conversations already read."""
    T = block_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows_in, rows_lab, rows_att = [], [], []
    truncated = 0
    for messages in conversations:
        ids, mask = render_chat(messages, tokenizer, T)
        if len(ids) > T:
            truncated += 1
        inp, tgt, tgt_mask = ids[:-1][:T], ids[1:][:T], mask[1:][:T]
        labels = [t if m else IGNORE for t, m in zip(tgt, tgt_mask, strict=True)]
        n = len(inp)
        rows_in.append(inp + [pad] * (T - n))
        rows_lab.append(labels + [IGNORE] * (T - n))
        rows_att.append([1] * n + [0] * (T - n))
    if not rows_in:
        return _empty(T), truncated
    return ChatBlocks(torch.tensor(rows_in), torch.tensor(rows_lab), torch.tensor(rows_att), conversations), truncated


def check_block_size(block_size: int, model_config: Any) -> None:
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and block_size > int(limit):
        raise DataError(
            f"data.block_size={block_size} is longer than the model's context ({limit} positions); "
            f"set data.block_size <= {limit}"
        )


def build_splits(cfg: DataConfig, tokenizer: Any) -> DataSplits:
    """Load, split documents, and turn both splits into token blocks as `cfg.stage` asks."""
    ds = load_raw_dataset(cfg.source, split=cfg.split, hub_config=cfg.hub_config)
    if cfg.stage == "pretrain":
        _require_column(ds, cfg.text_column, "text_column", cfg.source)
    elif cfg.prompt_column or cfg.completion_column:
        for col, what in ((cfg.prompt_column, "prompt_column"), (cfg.completion_column, "completion_column")):
            if not col:
                raise DataError("stage=chat with columns needs both data.prompt_column and data.completion_column")
            _require_column(ds, col, what, cfg.source)
    else:
        _require_column(ds, cfg.messages_column, "messages_column", cfg.source)
    train_docs, eval_docs = split_documents(ds, cfg)
    if cfg.stage == "pretrain":
        def texts(d: Any) -> list[str]:
            return [t for t in d[cfg.text_column] if isinstance(t, str) and t.strip()]

        train = pack_text(texts(train_docs), tokenizer, cfg.block_size)
        held = pack_text(texts(eval_docs), tokenizer, cfg.block_size)
    else:
        train = chat_blocks(train_docs, cfg, tokenizer)
        held = chat_blocks(eval_docs, cfg, tokenizer)
    if len(train) == 0:
        raise DataError(
            f"dataset `{cfg.source}` yields no training block of {cfg.block_size} tokens; add text or lower "
            "data.block_size"
        )
    if cfg.eval_documents and len(held) == 0:
        log.warning("the held-out split yields no full block; evaluation will be skipped (raise data.eval_documents)")
    return DataSplits(train=train, eval=held)


class BatchSchedule:
    """Which examples each micro-batch holds, as a pure function of (seed, step): resume needs no saved iterator.

    The global stream is the concatenation of seeded permutations (one per epoch). Optimizer step s consumes
    `micro_batch_size * grad_accum * world_size` consecutive entries; rank r's micro-batch a is a contiguous slice of
    that, so one process and N processes see the same global batch at every step.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, grad_accum: int, seed: int, world_size: int = 1,
                 rank: int = 0) -> None:
        if n_examples == 0:
            raise DataError("no training examples")
        self.n, self.mbs, self.accum, self.seed = n_examples, micro_batch_size, grad_accum, seed
        self.world, self.rank = world_size, rank
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.mbs * self.accum * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def _slice(self, start: int, length: int) -> list[int]:
        out = []
        for pos in range(start, start + length):
            epoch, offset = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        """Example indices of this rank's micro-batches at optimizer step `step` (0-based)."""
        base = step * self.global_batch
        return [self._slice(base + (a * self.world + self.rank) * self.mbs, self.mbs) for a in range(self.accum)]

    def global_indices(self, step: int) -> list[int]:
        return self._slice(step * self.global_batch, self.global_batch)
