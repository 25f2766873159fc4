"""The soft-label cache on disk: manifest, shard layout, id packing, value encodings, checksums.

A cache is a directory (docs/cache_format.md has the full description)::

    manifest.json                     written last, atomically: the cache is complete when it exists
    manifest.rank-R-of-W.json         journals while labelling runs (one per rank), removed by the final merge
    train/shard-00000.safetensors     blocks [0, S) of the train split, S = shard_blocks
    train/shard-00001.safetensors     blocks [S, 2S) ...
    eval/shard-00000.safetensors      the held-out split, for held-out KL from the cache

Only *target positions* (labels != -100) are stored, in block order, one row per position. Every shard holds
``block_digest`` [n, 16] (a hash of each block's input ids, labels and mask, so the reader can prove a batch is the
one that was labelled) and ``row_offsets`` [n + 1] (rows of block i are ``row_offsets[i]:row_offsets[i+1]``), plus

- ``topk``: ``ids`` [R, K], ``logprobs`` [R, K] (descending), ``tail_logprob`` [R] when ``tail``;
- ``sampled``: ``n_ids`` [R] (distinct ids per row), ``ids`` / ``counts`` / ``logprobs`` [sum n_ids] (flat, rows in
  order, ids ascending within a row);
- ``topk_sampled`` (format version 2): the ``topk`` head ``ids`` / ``logprobs`` [R, K] and ``tail_logprob`` [R], plus
  ``tail_mean_logprob`` [R] and the ids of the n tail draws ``tail_ids`` [R, n] (ascending, repeats allowed).

Bytes are a pure function of the inputs: tensors are written in sorted order, the safetensors metadata is a single
key (``lmdistill``: sorted JSON with split, shard index and block range) and nothing holds a timestamp, so a resumed
or multi-process run produces byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmdistill.data import IGNORE
from lmdistill.errors import CacheError
from lmdistill.losses.divergences import LOGPROB_FLOOR

FORMAT = "lmdistill-soft-label-cache"
VERSION = 2  # the newest format this lmdistill writes; a cache records the lowest version its encoding needs
READABLE_VERSIONS = (1, 2)
ENCODINGS = ("topk", "sampled", "topk_sampled")
# the format version each encoding needs: caches of the version-1 encodings stay byte-identical to earlier releases'
_ENCODING_VERSION = {"topk": 1, "sampled": 1, "topk_sampled": 2}
MANIFEST = "manifest.json"
JOURNAL_GLOB = "manifest.rank-*-of-*.json"
DIGEST_BYTES = 16
VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# token ids in the fewest whole bytes the vocabulary allows


def id_bytes(vocab: int) -> int:
    """1, 2, 3 or 4: the fewest bytes that hold every id in [0, vocab) (3 bytes = 24-bit ids, packed by hand)."""
    for width in (1, 2, 3):
        if vocab <= 1 << (8 * width):
            return width
    return 4


def pack_ids(ids: Tensor, width: int) -> Tensor:
    """int64 ids [...] -> uint8 / uint16 / uint8 [..., 3] (little-endian 24-bit) / int32."""
    if width == 1:
        return ids.to(torch.uint8)
    if width == 2:
        return ids.to(torch.int32).to(torch.uint16)
    if width == 3:
        return torch.stack([(ids >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8)
    return ids.to(torch.int32)


def unpack_ids(packed: Tensor, width: int) -> Tensor:
    """Inverse of :func:`pack_ids`: int64 ids [...]."""
    if width == 3:
        b = packed.to(torch.int64)
        return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    return packed.to(torch.int64)


def format_version(encoding: str) -> int:
    """The cache format version a cache of this encoding kind is written as (1 for topk / sampled, 2 for
    topk_sampled), so readers that predate an encoding refuse its caches by version instead of misreading them."""
    return _ENCODING_VERSION[encoding]


def count_dtype(draws: int) -> torch.dtype:
    return torch.uint8 if draws <= 255 else torch.uint16


# ---------------------------------------------------------------------------------------------------------------------
# log-prob values


def encode_values(logprobs: Tensor, values: str, int8_range: float) -> Tensor:
    """fp32 log-probs (<= 0, may be -inf) -> stored tensor.

    ``int8`` is 8-bit uniform quantisation of the log-prob on ``[-int8_range, 0]``: code ``c = round(-lp / C * 255)``
    in a uint8, decoded as ``-c * C / 255`` (C = int8_range). The step is C/255 nats (0.078 for C = 20), i.e. each
    stored probability is within about +-4 % of the teacher's; anything below ``e^-C`` (2e-9) is clamped to it. The
    loss renormalises the stored buckets, so the rounding never leaves an improper distribution.
    """
    lp = logprobs.float()
    if values == "int8":
        codes = torch.round(lp.clamp(-int8_range, 0.0).neg() * (255.0 / int8_range))
        return codes.to(torch.uint8)
    # -inf (an empty tail) becomes the loss's floor, which fp16 can hold
    return lp.clamp(LOGPROB_FLOOR, 0.0).to(_FLOAT_DTYPES[values])


def decode_values(stored: Tensor, values: str, int8_range: float) -> Tensor:
    if values == "int8":
        return stored.to(torch.float32) * (-int8_range / 255.0)
    return stored.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# hashing, names


def block_digests(input_ids: Tensor, labels: Tensor, attention_mask: Tensor) -> Tensor:
    """[N, 16] uint8: a hash per block of its input ids, labels and mask (int64 bytes), to align cache and data."""
    out = torch.empty(input_ids.shape[0], DIGEST_BYTES, dtype=torch.uint8)
    for i in range(input_ids.shape[0]):
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for t in (input_ids[i], labels[i], attention_mask[i]):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        out[i] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
    return out


def row_offsets_of(labels: Tensor) -> Tensor:
    """[n + 1] int64: where each block's target rows start (one row per labelled position, blocks in order)."""
    return torch.cat([torch.zeros(1, dtype=torch.int64), (labels != IGNORE).sum(-1).cumsum(0)])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.safetensors"


def journal_name(rank: int, world_size: int) -> str:
    return f"manifest.rank-{rank}-of-{world_size}.json"


# ---------------------------------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class ShardEntry:
    """One complete shard as the manifest lists it."""

    split: str
    index: int
    file: str  # relative to the cache root
    blocks: tuple[int, int]  # global block range [lo, hi)
    rows: int  # target positions stored
    ids: int  # stored (id, value) entries
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "index": self.index, "file": self.file, "blocks": list(self.blocks),
                "rows": self.rows, "ids": self.ids, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardEntry:
        return cls(split=str(d["split"]), index=int(d["index"]), file=str(d["file"]),
                   blocks=(int(d["blocks"][0]), int(d["blocks"][1])), rows=int(d["rows"]), ids=int(d["ids"]),
                   bytes=int(d["bytes"]), sha256=str(d["sha256"]))


def contained_shard_path(root: Path, file: str) -> Path:
    """`root / file` for a manifest's shard path, or a CacheError when that path would leave the cache directory
    (an absolute path, a `..` component, or a symlink that resolves outside `root`): a crafted manifest must not make
    a reader open, hash or memory-map an arbitrary file."""
    rel = Path(file)
    escapes = not file or rel.is_absolute() or rel.drive != "" or ".." in rel.parts or "\\" in file
    if not escapes:
        try:
            (root / rel).resolve().relative_to(root.resolve())
        except (ValueError, OSError, RuntimeError):
            escapes = True
    if escapes:
        raise CacheError(
            f"cache `{root}` manifest lists shard path {file!r}, which leaves the cache directory (absolute, `..` or "
            "a symlink pointing outside); refusing to read it. Relabel the cache with `lmdistill label`, and do not "
            "use a cache from an untrusted source"
        )
    return root / rel


def n_shards(n_blocks: int, shard_blocks: int) -> int:
    return -(-n_blocks // shard_blocks)


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """The fields that decide shard contents: two runs with equal identities write identical shards."""
    return {k: header[k] for k in ("format", "version", "teacher", "tokenizer", "data", "encoding", "shard_blocks",
                                   "batch_size")}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing_fields(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted names of leaves that differ between two nested dicts, as `name: a != b`."""
    fa, fb = flatten(a), flatten(b)
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


@dataclass
class Manifest:
    """A complete cache's manifest.json."""

    header: dict[str, Any]
    shards: list[ShardEntry]
    root: Path

    @property
    def encoding(self) -> dict[str, Any]:
        return self.header["encoding"]

    @property
    def shard_blocks(self) -> int:
        return int(self.header["shard_blocks"])

    def split(self, name: str) -> dict[str, Any]:
        splits = self.header["data"]["splits"]
        if name not in splits:
            raise CacheError(
                f"cache `{self.root}` has no `{name}` split (it holds: {', '.join(splits)}); label it with "
                f"`lmdistill label ... --cache.splits [{', '.join([*splits, name])}]`"
            )
        return splits[name]

    def shards_of(self, split: str) -> list[ShardEntry]:
        return sorted((s for s in self.shards if s.split == split), key=lambda s: s.index)

    def to_json(self) -> dict[str, Any]:
        return {**self.header, "shards": [s.to_json() for s in sorted(self.shards, key=lambda s: (s.split, s.index))]}


def read_manifest(root: str | Path) -> Manifest:
    """manifest.json of a complete cache, or a CacheError that says what is wrong and what to run."""
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not root.is_dir():
        raise CacheError(f"soft-label cache `{root}` does not exist; write one with `lmdistill label --cache.output_dir "
                         f"{root}`")
    if not path.is_file():
        journals = sorted(p.name for p in root.glob(JOURNAL_GLOB))
        if journals:
            raise CacheError(
                f"soft-label cache `{root}` is incomplete (labelling stopped before its final merge; journals: "
                f"{', '.join(journals)}); rerun the same `lmdistill label` command: it resumes at the first missing shard"
            )
        raise CacheError(f"`{root}` is not a soft-label cache (no {MANIFEST}); write one with `lmdistill label`")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"`{path}` is not valid JSON ({e}); relabel the cache with `lmdistill label`") from None
    if raw.get("format") != FORMAT:
        raise CacheError(f"`{path}` is not a soft-label cache manifest (format {raw.get('format')!r})")
    if raw.get("version") not in READABLE_VERSIONS:
        raise CacheError(
            f"`{path}` has cache format version {raw.get('version')}; this lmdistill reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Relabel with this version's `lmdistill label`"
        )
    shards = [ShardEntry.from_json(s) for s in raw.pop("shards", [])]
    for shard in shards:
        contained_shard_path(root, shard.file)
    # an encoding this lmdistill does not know, or one newer than the version the manifest declares, is refused here
    # rather than misread (a version-1 reader would take a topk_sampled cache for a sampled one)
    encoding = raw.get("encoding")
    kind = encoding.get("kind") if isinstance(encoding, dict) else None
    if encoding is not None and (kind not in ENCODINGS or raw["version"] < _ENCODING_VERSION[kind]):
        raise CacheError(
            f"`{path}` declares encoding {kind!r} in format version {raw['version']}; this lmdistill reads "
            f"{', '.join(f'{e} (version >= {v})' for e, v in _ENCODING_VERSION.items())}. The manifest is damaged or "
            "from another lmdistill: relabel with `lmdistill label`"
        )
    return Manifest(header=raw, shards=shards, root=root)
