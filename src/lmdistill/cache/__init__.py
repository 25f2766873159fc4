"""The soft-label cache: run the teacher once, store a sparse picture of each distribution, train many times.

- :mod:`~lmdistill.cache.format`: the directory layout, manifest, id packing and value encodings.
- :class:`CacheWriter` (writer.py): top-k, sampled and top-k + sampled-tail encodings, shards by global block range, resume, rank merge.
- :class:`CachedTeacher` (reader.py): verified, memory-mapped sparse targets for training batches.
- :mod:`~lmdistill.cache.spans`: a cache labelled with ``cache.cross_tokenizer`` read by a student of another
  tokenizer: its text re-tokenized, span targets aligned at read time (imported from there, not re-exported).
- :mod:`~lmdistill.cache.estimate`: bytes per token, on paper and measured.
"""

from lmdistill.cache.format import Manifest, ShardEntry, read_manifest
from lmdistill.cache.reader import CachedTeacher, evaluate_with_cache
from lmdistill.cache.writer import (
    CacheWriter,
    build_header,
    sampled_rows,
    teacher_fingerprint,
    topk_rows,
    topk_sampled_rows,
)

__all__ = [
    "CacheWriter",
    "CachedTeacher",
    "Manifest",
    "ShardEntry",
    "build_header",
    "evaluate_with_cache",
    "read_manifest",
    "sampled_rows",
    "teacher_fingerprint",
    "topk_rows",
    "topk_sampled_rows",
]
