"""`lmdistill estimate`: what a soft-label cache costs, dense vs sparse, on paper and measured on a real cache.

The often-quoted figure: the full distribution over a 100,000-token vocabulary for 5 trillion tokens in fp8 is
``1e5 values x 1 byte x 5e12 tokens = 5e17 bytes = 500 million GB``. A sparse cache stores per target token

- top-k with tail: ``k x (id bytes + value bytes) + value bytes`` (the tail log-mass),
- sampled (RS-KD, n draws): ``d x (id bytes + count bytes + value bytes) + count bytes`` for ``d <= n`` distinct
  ids (``d`` depends on the teacher's entropy; a real cache reports it),
- top-k head + n tail draws (``topk_sampled``): the top-k with tail bytes, one value (the tail's mean log-prob) and
  ``n x id bytes`` (the draws' ids, repeats included),

plus, with ``cache.cross_tokenizer`` (students of another tokenizer), ``id bytes + value bytes`` (each target's actual
token and its log-prob) and one id per block (its first token),

where ids take the fewest whole bytes the vocabulary allows (1, 2, 3 or 4). On disk a shard adds a 16-byte digest
and an 8-byte row offset per block and a small safetensors header; ``--cache`` reports them separately.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmdistill.cache.format import VALUE_BYTES, count_dtype, id_bytes, read_manifest
from lmdistill.config import EstimateConfig

DTYPE_BYTES = {**VALUE_BYTES, "fp8": 1}
_TARGET_TENSORS = ("ids", "logprobs", "tail_logprob", "counts", "n_ids", "tail_ids", "tail_mean_logprob", "token_ids",
                   "token_logprob")


def dense_bytes(vocab: int, value_bytes: int) -> int:
    return vocab * value_bytes


def topk_bytes(k: int, vocab: int, value_bytes: int, tail: bool = True) -> int:
    return k * (id_bytes(vocab) + value_bytes) + (value_bytes if tail else 0)


def sampled_bytes(distinct: float, draws: int, vocab: int, value_bytes: int) -> float:
    count = 1 if count_dtype(draws).itemsize == 1 else 2
    return distinct * (id_bytes(vocab) + count + value_bytes) + count


def cross_tokenizer_bytes(vocab: int, value_bytes: int) -> int:
    """Bytes per token that `cache.cross_tokenizer` adds: the actual token's id and log-prob (plus one id per block)."""
    return id_bytes(vocab) + value_bytes


def topk_sampled_bytes(k: int, draws: int, vocab: int, value_bytes: int) -> int:
    """Bytes per token of the top-k head (+ tail mass and the tail's mean log-prob) and ``draws`` tail ids."""
    return topk_bytes(k, vocab, value_bytes, tail=True) + value_bytes + draws * id_bytes(vocab)


@dataclass
class Row:
    encoding: str
    bytes_per_token: float
    total_bytes: float
    bound: bool = False  # True: an upper bound (sampled, every draw distinct)


def paper_rows(vocab: int, tokens: float, dtype: str, ks: list[int], draws: list[int],
               measured_distinct: dict[int, float] | None = None) -> list[Row]:
    """Dense, top-k (+ tail) and sampled bytes/token and totals for a corpus of `tokens` tokens."""
    vb = DTYPE_BYTES[dtype]
    rows = [Row("dense (full distribution)", dense_bytes(vocab, vb), dense_bytes(vocab, vb) * tokens)]
    for k in ks:
        if k > vocab:
            continue
        name = "top-1 (hard label, no tail)" if k == 1 else f"top-{k} + tail"
        b = topk_bytes(k, vocab, vb, tail=k != 1)
        rows.append(Row(name, b, b * tokens))
    for n in draws:
        d = (measured_distinct or {}).get(n)
        sb = sampled_bytes(d if d is not None else min(n, vocab), n, vocab, vb)
        label = f"sampled, n={n} draws" + (f" ({d:.1f} distinct, measured)" if d is not None else "")
        rows.append(Row(label, sb, sb * tokens, bound=d is None))
    return rows


def _human(n_bytes: float) -> str:
    gb = n_bytes / 1e9
    words = [(1e9, "billion"), (1e6, "million"), (1e3, "thousand")]
    for scale, word in words:
        if gb >= scale:
            return f"{gb / scale:,.3g} {word} GB"
    return f"{gb:.3g} GB"


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'encoding':<44} {'bytes/token':>13} {'total':>24}   ratio to dense"]
    dense = rows[0].bytes_per_token
    for r in rows:
        le = "<= " if r.bound else ""
        gb = r.total_bytes / 1e9
        total = f"{le}{gb:,.0f} GB" if gb >= 100 else f"{le}{gb:.3g} GB"
        bpt = f"{r.bytes_per_token:,.0f}" if float(r.bytes_per_token).is_integer() else f"{r.bytes_per_token:,.1f}"
        lines.append(f"{r.encoding:<44} {le + bpt:>13} {total:>24}   "
                     f"{r.bytes_per_token / dense:.2e}  ({_human(r.total_bytes)})")
    return "\n".join(lines)


def _tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of each tensor of a safetensors file, from its header (no data read)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def measure_cache(root: str | Path) -> dict[str, Any]:
    """Real bytes of a cache: per split and in total, per target token, with the per-tensor breakdown."""
    manifest = read_manifest(root)
    enc = manifest.encoding
    out: dict[str, Any] = {"root": str(manifest.root), "encoding": enc, "splits": {}}
    all_tensors: dict[str, int] = {}
    total_bytes = total_tokens = 0
    for split, info in manifest.header["data"]["splits"].items():
        shards = manifest.shards_of(split)
        tensors: dict[str, int] = {}
        for s in shards:
            for k, v in _tensor_bytes(manifest.root / s.file).items():
                tensors[k] = tensors.get(k, 0) + v
        b = sum(s.bytes for s in shards)
        t = info["target_tokens"]
        out["splits"][split] = {"shards": len(shards), "bytes": b, "target_tokens": t,
                                "bytes_per_token": b / max(t, 1), "ids_per_token": sum(s.ids for s in shards) / max(t, 1)}
        for k, v in tensors.items():
            all_tensors[k] = all_tensors.get(k, 0) + v
        total_bytes, total_tokens = total_bytes + b, total_tokens + t
    target = sum(v for k, v in all_tensors.items() if k in _TARGET_TENSORS)
    out.update(bytes=total_bytes, target_tokens=total_tokens, bytes_per_token=total_bytes / max(total_tokens, 1),
               target_bytes_per_token=target / max(total_tokens, 1),
               tensor_bytes_per_token={k: v / max(total_tokens, 1) for k, v in sorted(all_tensors.items())},
               ids_per_token=sum(s.ids for s in manifest.shards) / max(total_tokens, 1))
    return out


def describe_encoding(enc: dict[str, Any]) -> str:
    core = {"topk": lambda: f"top-{enc['k']}{' + tail' if enc['tail'] else ''}",
            "sampled": lambda: f"sampled n={enc['draws']}",
            "topk_sampled": lambda: f"top-{enc['k']} + tail mass + {enc['draws']} systematic tail draws"}[enc["kind"]]()
    cross = ", + each target's actual token and log-prob (cross-tokenizer)" if enc.get("cross_tokenizer") else ""
    return (f"{core}{cross}, {enc['values']} values, {enc['id_bytes']}-byte ids, vocab {enc['vocab']:,}, "
            f"T={enc['temperature']:g}")


def run_estimate(cfg: EstimateConfig) -> dict[str, Any]:
    """Print the paper table (and the measured cache, with --cache); returns both as a dict."""
    import click

    result: dict[str, Any] = {}
    distinct: dict[int, float] = {}
    vocab, tokens, dtype, ks, draws = cfg.vocab, cfg.tokens, cfg.dtype, list(cfg.k), list(cfg.draws)
    if cfg.cache is not None:
        m = measure_cache(cfg.cache)
        result["cache"] = m
        enc = m["encoding"]
        click.echo(f"cache {m['root']}: {describe_encoding(enc)}")
        click.echo(f"{'split':<8} {'shards':>7} {'bytes':>15} {'target tokens':>15} {'bytes/token':>12} {'ids/token':>10}")
        for split, s in m["splits"].items():
            click.echo(f"{split:<8} {s['shards']:>7} {s['bytes']:>15,} {s['target_tokens']:>15,} "
                       f"{s['bytes_per_token']:>12.2f} {s['ids_per_token']:>10.2f}")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in m["tensor_bytes_per_token"].items())
        click.echo(f"all: {m['bytes_per_token']:.2f} bytes/token on disk; targets {m['target_bytes_per_token']:.2f} "
                   f"bytes/token (per tensor: {parts}; the rest is safetensors headers)")
        vocab = vocab or int(enc["vocab"])
        tokens = tokens or float(m["target_tokens"])
        if "dtype" not in cfg.model_fields_set:
            dtype = enc["values"]
        # the cache's own encoding gets a row, with its measured distinct ids when sampled
        if enc["kind"] == "sampled":
            distinct[int(enc["draws"])] = m["ids_per_token"]
            draws = sorted({*draws, int(enc["draws"])})
        else:
            ks = sorted({*ks, int(enc["k"])})
        click.echo("")
    assert vocab is not None and tokens is not None
    rows = paper_rows(vocab, tokens, dtype, ks, draws, distinct)
    if cfg.cache is not None and enc["kind"] == "topk_sampled":
        k, n = int(enc["k"]), int(enc["draws"])
        b = topk_sampled_bytes(k, n, vocab, DTYPE_BYTES[dtype])
        rows.append(Row(f"top-{k} + tail + {n} tail draws", b, b * tokens))
    if cfg.cache is not None and enc.get("cross_tokenizer"):
        k, vb = int(enc["k"]), DTYPE_BYTES[dtype]
        b = (topk_sampled_bytes(k, int(enc["draws"]), vocab, vb) if enc["kind"] == "topk_sampled" else
             topk_bytes(k, vocab, vb, tail=bool(enc["tail"]))) + cross_tokenizer_bytes(vocab, vb)
        rows.append(Row(f"top-{k}{' + tail' if enc.get('tail') else ''} + actual token (cross-tokenizer)", b,
                        b * tokens))
    click.echo(f"soft-label storage for {tokens:.4g} tokens, vocabulary {vocab:,}, values {dtype} "
               f"({DTYPE_BYTES[dtype]} byte{'s' if DTYPE_BYTES[dtype] > 1 else ''}), ids {id_bytes(vocab)} "
               f"byte{'s' if id_bytes(vocab) > 1 else ''}:")
    click.echo(format_rows(rows))
    click.echo("(GB = 1e9 bytes; sampled rows are upper bounds unless measured: a cache stores distinct ids only)")
    result["rows"] = [r.__dict__ for r in rows]
    return result
