"""How fast a soft-label cache is read by a student of another tokenizer: aligning its shards in worker processes.

    OMP_NUM_THREADS=1 python benchmarks/cache_align.py                      # label 400 documents once, then time
    OMP_NUM_THREADS=1 python benchmarks/cache_align.py --workers 1,2,4,8    # on a machine with more cores

`soft --teacher_cache DIR --loss.cross_tokenizer hybrid` with a student of another tokenizer spells every cached
block as bytes, re-tokenizes it for the student and aligns the two by byte spans before the first step
(lmdistill.cache.spans). This script labels a cross-tokenizer cache on the embedded default once (SmolLM2-135M-Instruct
on the Wikipedia summaries, `--cache.cross_tokenizer true`, small shards so there are enough to share), then aligns
its train split for Gemma-3-270M's tokenizer (vocab 262,144) with 1 worker (the baseline, in this process) and with
each other count in `--workers` (forked processes, one shard at a time), in the same run:

- `align s`: the median over `--reps` of aligning the split (the shards' tensors read, the blocks rebuilt and checked
  against their digests, re-tokenized, aligned and packed), the part that grows with the cache;
- `setup s`: once per run and independent of the cache's size: the teacher tokenizer's copy read from the cache
  and fingerprinted, both tokenizers' byte tables and the vocabulary map (read from its on-disk cache after the
  first run);
- every count's targets are checked equal to the baseline's, tensor by tensor.

It also prints the memory the aligned targets hold per teacher token, and the start of a run end to end
(`load_cache_span_splits`: the tokenizer setup included) without the store, on the run that aligns and stores, and on
a later run that memory-maps the stored targets (lmdistill.cache.span_store).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _measure import fmt_table  # noqa: E402


def label(out: Path, documents: int, shard_blocks: int, block_size: int) -> None:
    from lmdistill.config import LabelConfig, load_config
    from lmdistill.recipes.label import run_label

    args = {"teacher.name_or_path": "embedded:smollm2-135m-instruct", "data.source": "embedded:wikipedia",
            "data.block_size": str(block_size), "data.max_documents": str(documents), "data.eval_documents": "0",
            "cache.output_dir": str(out), "cache.cross_tokenizer": "true", "cache.encoding": "topk", "cache.k": "16",
            "cache.values": "int8", "cache.shard_blocks": str(shard_blocks), "cache.splits": "[train]",
            "progress": "false"}
    run_label(load_config(LabelConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)]))


def held_bytes(blocks: object) -> int:
    return sum(t.numel() * t.element_size() for t in vars(blocks).values() if isinstance(t, torch.Tensor))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path("runs/bench-cache-align/cache"),
                   help="a cache labelled with cache.cross_tokenizer=true; labelled here first when it is missing")
    p.add_argument("--documents", type=int, default=400, help="documents to label when the cache is missing")
    p.add_argument("--shard-blocks", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--student", default="embedded:gemma3-270m", help="the student's tokenizer (model id or dir)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts; 1 (in-process) is the baseline")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from lmdistill.api_spans import SpanReport
    from lmdistill.cache.format import read_manifest
    from lmdistill.cache.reader import CachedTeacher
    from lmdistill.cache.spans import _BlockAligner, _split_blocks, teacher_tokenizer
    from lmdistill.models import load_tokenizer

    if not (args.cache / "manifest.json").is_file():
        start = time.perf_counter()
        label(args.cache, args.documents, args.shard_blocks, args.block_size)
        print(f"labelled {args.cache} in {time.perf_counter() - start:.0f} s")
    manifest = read_manifest(args.cache)
    split = manifest.split("train")
    n_teacher = int(split["target_tokens"])
    n_shards = len(manifest.shards_of("train"))

    student_tok = load_tokenizer(args.student)
    start = time.perf_counter()
    aligner = _BlockAligner(teacher_tokenizer(manifest), student_tok, len(student_tok), args.block_size, SpanReport())
    setup = time.perf_counter() - start

    counts = sorted({1, *(int(w) for w in args.workers.split(","))})
    seconds: dict[int, float] = {}
    baseline = None
    equal: dict[int, bool] = {}
    for w in counts:
        times = []
        for _ in range(args.reps):
            aligner.report = SpanReport()
            start = time.perf_counter()
            blocks = _split_blocks(CachedTeacher(args.cache, "train"), aligner, w)
            times.append(time.perf_counter() - start)
        seconds[w] = statistics.median(times)
        if baseline is None:
            baseline, report = blocks, aligner.report
        equal[w] = all(torch.equal(getattr(blocks, f.name), getattr(baseline, f.name))
                       for f in dataclasses.fields(baseline))
    assert baseline is not None
    rows = [[str(w), f"{seconds[w]:.2f}", f"{n_teacher / seconds[w]:,.0f}", f"{seconds[1] / seconds[w]:.2f}x",
             "yes" if equal[w] else "NO"] for w in counts]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\ncache {args.cache}: {n_teacher:,} teacher tokens in {n_shards} train shards; student tokenizer "
          f"{args.student} ({len(student_tok):,} tokens); {cores} CPU cores; median of {args.reps}")
    print(f"alignment: {report.line()}\n")
    print(fmt_table(["workers", "align s", "teacher tokens/s", "speed vs 1 worker", "targets equal to 1 worker"],
                    rows))
    print(f"\nsetup (once per run, any cache size): {setup:.2f} s; the aligned targets hold "
          f"{held_bytes(baseline) / n_teacher:.0f} bytes of memory per teacher token")

    # a run's start, end to end (load_cache_span_splits): aligning every time, vs the stored targets (the first run
    # aligns and writes them, later runs map them)
    import tempfile

    from lmdistill.cache.spans import load_cache_span_splits

    w = max(counts)
    store = Path(tempfile.mkdtemp(prefix="bench-span-targets-"))
    os.environ["LMDISTILL_SPAN_TARGETS"] = str(store)
    starts: dict[str, float] = {}
    for name, kw in ((f"align, no store ({w} workers)", {"store": False}),
                     (f"first run: align + store ({w} workers)", {}), ("later runs: map the stored targets", {})):
        start = time.perf_counter()
        load_cache_span_splits(args.cache, student_tok, len(student_tok), args.block_size, workers=w, **kw)
        starts[name] = time.perf_counter() - start
    base = next(iter(starts.values()))
    on_disk = sum(f.stat().st_size for f in store.rglob("*.pt"))
    print()
    print(fmt_table(["start of a run", "s", "speed vs no store"],
                    [[k, f"{v:.2f}", f"{base / v:.2f}x"] for k, v in starts.items()]))
    print(f"\nstored: {on_disk / n_teacher:.0f} bytes per teacher token on disk ({on_disk / 1e6:.1f} MB), in {store}")


if __name__ == "__main__":
    main()
