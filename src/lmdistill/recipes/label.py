"""`lmdistill label`: run the teacher once over the training data and write a soft-label cache.

The blocks are exactly the ones `lmdistill soft` trains on (the same DataConfig through the same tokenizer), so a
student trains from the cache with `lmdistill soft --teacher_cache DIR` and no teacher in memory. Under `torchrun` or
`accelerate launch` each rank labels the shards `j % world_size == rank` of every split; rank 0 merges at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from torch import Tensor

from lmdistill.cache.format import MANIFEST
from lmdistill.cache.writer import CacheWriter, build_header, save_tokenizer, teacher_fingerprint
from lmdistill.config import LabelConfig
from lmdistill.data import IGNORE, TokenBlocks, build_splits, check_block_size
from lmdistill.errors import Interrupted, NonFiniteError
from lmdistill.io import StopFlag, lock_dir, resume_command, stop_on_signals
from lmdistill.models import load_teacher, load_tokenizer, shared_vocab_size, tokenizer_fingerprint
from lmdistill.teachers import check_finite
from lmdistill.train.logging import make_progress


def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Label the configured splits into cfg.cache.output_dir; returns a summary (tokens, seconds, bytes).

    The cache directory is locked for the run (one writer per directory). A first SIGTERM/SIGINT finishes the shard
    in flight and raises `Interrupted` (exit 143/130); a second one stops at once. Rerunning the command resumes."""
    lock = lock_dir(cfg.cache.output_dir, "soft-label cache") if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        with stop_on_signals("cache shard") as stop:
            return _run_label(cfg, stop)
    finally:
        if lock is not None:
            lock.close()


def _run_label(cfg: LabelConfig, stop: StopFlag) -> dict[str, Any]:
    # Under plain `torchrun` without a GPU, accelerate sets up a (gloo) process group only when told to use the CPU.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    state = PartialState(cpu=world > 1 and not torch.cuda.is_available())
    set_seed(cfg.cache.seed)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
    teacher = load_teacher(cfg.teacher)
    n_vocab = shared_vocab_size(tokenizer, tokenizer, teacher)
    check_block_size(cfg.data.block_size, teacher.config)
    data = build_splits(cfg.data, tokenizer)
    splits: dict[str, TokenBlocks] = {name: getattr(data, name) for name in cfg.cache.splits}
    header = build_header(
        teacher=teacher_fingerprint(teacher, cfg.teacher.name_or_path),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab=n_vocab,
        data_params=cfg.data.model_dump(mode="json"), splits=splits, cfg=cfg.cache,
    )
    teacher.to(state.device)
    writer = CacheWriter(cfg.cache.output_dir, header, rank=state.process_index, world_size=state.num_processes)
    if cfg.cache.cross_tokenizer and state.is_main_process:  # readers of another tokenizer spell the ids with it
        save_tokenizer(cfg.cache.output_dir, tokenizer, header["tokenizer"]["fingerprint"])
    state.wait_for_everyone()  # every rank has checked the existing cache before any rank writes a shard

    def logits_fn(batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"].to(state.device)
        out = teacher(input_ids=batch["input_ids"].to(state.device), attention_mask=mask, use_cache=False)
        logits = out.logits[..., :n_vocab]
        check_finite(logits, "logits", mask)  # a NaN would be encoded into the cache and poison every student
        return logits

    S = cfg.cache.shard_blocks
    todo = sum(int((splits[s].labels[j * S : (j + 1) * S] != IGNORE).sum()) for s in splits for j in writer.pending(s))
    t0, tokens, done = time.perf_counter(), 0, 0
    with make_progress(cfg.progress and state.is_main_process) as progress:
        task = progress.add_task("label", total=max(todo, 1), stats="")

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress.update(task, advance=n, stats=f"{done / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")

        for name, blocks in splits.items():
            try:
                tokens += writer.write_split(name, blocks, logits_fn, on_batch=advance, stop=lambda: bool(stop))
            except NonFiniteError as e:
                raise NonFiniteError(f"labelling split `{name}`: {e}. Shards finished before this one are kept; no "
                                     "manifest was written, so the cache cannot be used as it is") from None
            if stop:
                raise Interrupted(
                    f"stopped by {stop.name}: every finished shard is in `{cfg.cache.output_dir}` (no manifest yet). "
                    f"Resume with the same command:\n  {resume_command()}", stop.signum or 15)
    seconds = time.perf_counter() - t0
    state.wait_for_everyone()  # all shards are on disk before the merge
    summary: dict[str, Any] = {"cache_dir": str(Path(cfg.cache.output_dir)), "rank": state.process_index,
                               "world_size": state.num_processes, "labelled_tokens": tokens, "seconds": seconds,
                               "tokens_per_s": tokens / max(seconds, 1e-9)}
    if state.is_main_process:
        manifest = writer.merge()
        summary["bytes"] = sum(s.bytes for s in manifest.shards)
        summary["target_tokens"] = sum(manifest.split(s)["target_tokens"] for s in splits)
        summary["bytes_per_token"] = summary["bytes"] / max(summary["target_tokens"], 1)
        summary["manifest"] = str(Path(cfg.cache.output_dir) / MANIFEST)
    state.wait_for_everyone()
    return summary
