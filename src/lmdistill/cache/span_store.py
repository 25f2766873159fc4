"""Aligned span targets of a cross-tokenizer cache, kept on disk: aligned once per (cache, student tokenizer, block
size) and memory-mapped by every later run.

Aligning a cache for a student of another tokenizer is Python work proportional to the cache (lmdistill.cache.spans),
and its result is what every run with that student reads: the arms and seeds of a comparison, a resumed run, each
rank of a node. So the first run writes it under `$LMDISTILL_CACHE/span-targets/<key>/` (or
`$LMDISTILL_SPAN_TARGETS/<key>/`; `train.pt`, `eval.pt`,
`report.json`; written to a temporary directory and renamed, under a lock, so concurrent first runs align once and
no reader sees half of it), and every run loads it with `torch.load(mmap=True)`: the tensors stay in the page cache,
shared by the processes of a node, instead of each process's memory.

The key is a sha256 over everything the aligned targets depend on: the cache's manifest.json (its shards' sha256s
included), the student tokenizer's fingerprint and chat template, the teacher tokenizer copy's chat template, the
student's vocabulary size and block size, and FORMAT below (raised when the alignment code changes its output).
A stored copy that cannot be read is aligned again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from lmdistill.api_spans import SpanReport, SpanTargetBlocks
from lmdistill.assets import cache_root
from lmdistill.cache.format import MANIFEST, Manifest
from lmdistill.errors import LmdistillError
from lmdistill.io import atomic_dir, write_json

log = logging.getLogger(__name__)

FORMAT = 1
Splits = tuple[SpanTargetBlocks, SpanTargetBlocks, SpanReport]


def store_key(manifest: Manifest, student_tok: Any, teacher_tok: Any, n_vocab: int, block_size: int) -> str:
    from lmdistill.models import tokenizer_fingerprint

    h = hashlib.sha256()
    h.update((manifest.root / MANIFEST).read_bytes())
    parts = {"format": FORMAT, "student": tokenizer_fingerprint(student_tok), "n_vocab": n_vocab,
             "block_size": block_size, "student_template": getattr(student_tok, "chat_template", None),
             "teacher_template": getattr(teacher_tok, "chat_template", None)}
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def store_dir(key: str) -> Path:
    """`$LMDISTILL_SPAN_TARGETS/<key>`, else `$LMDISTILL_CACHE/span-targets/<key>` (lmdistill.assets.cache_root)."""
    root = os.environ.get("LMDISTILL_SPAN_TARGETS")
    return (Path(root) if root else cache_root() / "span-targets") / key


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("train.pt", "eval.pt", "report.json"))


def _load(path: Path) -> Splits:
    def blocks(name: str) -> SpanTargetBlocks:
        tensors = torch.load(path / name, mmap=True, weights_only=True)
        return SpanTargetBlocks(**{f.name: tensors[f.name] for f in fields(SpanTargetBlocks)})

    raw = json.loads((path / "report.json").read_text())
    report = SpanReport(**{f.name: raw[f.name] for f in fields(SpanReport)})
    return blocks("train.pt"), blocks("eval.pt"), report


def _save(path: Path, splits: Splits) -> None:
    train, held, report = splits
    with atomic_dir(path, "aligned span targets") as tmp:
        for name, b in (("train.pt", train), ("eval.pt", held)):
            torch.save({f.name: getattr(b, f.name).contiguous() for f in fields(SpanTargetBlocks)}, tmp / name)
        write_json(tmp / "report.json", report.as_dict(), "alignment report")


def stored_or_aligned(key: str, align: Callable[[], Splits]) -> tuple[Splits, Path | None]:
    """The splits stored under `key`, else `align()`'s, stored first; both memory-mapped from the stored files (the
    path is returned). Where nothing can be stored (a read-only or full disk) the aligned splits stay in memory (None).

    Concurrent callers (the ranks of a node, runs started together) wait on one lock: the first aligns, the others
    then load its files.
    """
    path = store_dir(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{key}.lock", "ab")  # noqa: SIM115  (closed below, which releases the flock)
    except OSError as e:
        log.warning("cannot store aligned targets in `%s` (%s); this run keeps them in memory", path.parent, e)
        return align(), None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or with the process
        if _complete(path):
            try:
                return _load(path), path
            except Exception as e:  # noqa: BLE001  (a damaged copy: aligned again below)
                log.warning("the stored aligned targets in `%s` cannot be read (%s); aligning the cache again", path, e)
                shutil.rmtree(path, ignore_errors=True)
        splits = align()
        try:
            _save(path, splits)
        except LmdistillError as e:  # atomic_dir removed what it wrote
            log.warning("%s; this run keeps the aligned targets in memory", e)
            return splits, None
        return _load(path), path


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
