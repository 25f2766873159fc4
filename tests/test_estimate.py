"""`lmdistill estimate`: the storage arithmetic on paper, and measured on a real cache."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from lmdistill.cache import CacheWriter, build_header
from lmdistill.cache.estimate import (
    dense_bytes,
    measure_cache,
    paper_rows,
    sampled_bytes,
    topk_bytes,
    topk_sampled_bytes,
)
from lmdistill.cli import main
from lmdistill.config import CacheConfig
from lmdistill.data import TokenBlocks


def test_the_quoted_500_million_gb_and_sparse_rows_side_by_side():
    proc = subprocess.run([sys.executable, "-m", "lmdistill", "estimate", "--vocab", "100000", "--tokens", "5e12",
                           "--dtype", "fp8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("  ")[0]: line for line in proc.stdout.splitlines()}
    dense = lines["dense (full distribution)"]
    assert "100,000" in dense and "500,000,000 GB" in dense and "500 million GB" in dense
    # 100k ids need 3 bytes; fp8 values 1 byte: top-8 + tail = 8 * 4 + 1
    assert " 33 " in lines["top-8 + tail"] and "165,000 GB" in lines["top-8 + tail"]
    assert " 129 " in lines["top-32 + tail"]
    assert "<= 41" in lines["sampled, n=8 draws"]  # 8 distinct at most, x (3 + 1 + 1) + 1


def test_byte_arithmetic():
    assert dense_bytes(100_000, 1) * 5e12 == 5e17
    assert topk_bytes(16, 49152, 1) == 16 * 3 + 1  # uint16 ids + int8 values + tail
    assert topk_bytes(1, 200, 2, tail=False) == 3
    assert sampled_bytes(5.5, 32, 49152, 1) == 5.5 * (2 + 1 + 1) + 1
    assert sampled_bytes(3, 1000, 49152, 2) == 3 * (2 + 2 + 2) + 2  # counts need uint16 past 255 draws
    rows = paper_rows(49152, 1e6, "fp16", [1, 8, 100_000], [4], measured_distinct={4: 2.5})
    names = [r.encoding for r in rows]
    assert names[0].startswith("dense") and "top-100000 + tail" not in names  # k > vocab is skipped
    assert rows[-1].bytes_per_token == 2.5 * 5 + 1 and not rows[-1].bound


@pytest.mark.parametrize(("encoding", "values"), [("topk", "int8"), ("sampled", "fp16"), ("topk_sampled", "int8")])
def test_measured_cache_matches_its_files(tmp_path, encoding, values):
    g = torch.Generator().manual_seed(0)
    vocab, n, T = 500, 9, 10
    ids = torch.randint(0, vocab, (n, T), generator=g)
    blocks = TokenBlocks(ids, torch.randint(0, vocab, (n, T), generator=g), torch.ones_like(ids))
    logits = 2 * torch.randn(n, T, vocab, generator=g)
    cfg = CacheConfig(output_dir=str(tmp_path), encoding=encoding, values=values, k=6, draws=20, shard_blocks=4,
                      splits=["train"])
    header = build_header(teacher={"name_or_path": "t"}, tokenizer_fingerprint="x", vocab=vocab, data_params={},
                          splits={"train": blocks}, cfg=cfg)
    w = CacheWriter(tmp_path, header)
    w.write_split("train", blocks, lambda b: logits[b["index"]])
    w.merge()
    m = measure_cache(tmp_path)
    on_disk = sum(p.stat().st_size for p in (tmp_path / "train").glob("*.safetensors"))
    assert m["bytes"] == on_disk and m["target_tokens"] == n * T
    assert m["bytes_per_token"] == pytest.approx(on_disk / (n * T))
    if encoding == "topk":
        assert m["target_bytes_per_token"] == topk_bytes(6, vocab, 1)
    elif encoding == "topk_sampled":
        # 6 x (2-byte id + 1-byte value) + tail mass + the tail's mean log-prob + 20 x 2-byte draw ids
        assert m["target_bytes_per_token"] == 6 * 3 + 1 + 1 + 20 * 2 == topk_sampled_bytes(6, 20, vocab, 1)
        assert m["ids_per_token"] == 26
    else:
        d = m["ids_per_token"]
        assert 1 <= d <= 20
        assert m["target_bytes_per_token"] == pytest.approx(sampled_bytes(d, 20, vocab, 2))
    out = CliRunner().invoke(main, ["estimate", "--cache", str(tmp_path), "--tokens", "1e9"])
    assert out.exit_code == 0, out.output
    assert f"{m['bytes_per_token']:.2f} bytes/token on disk" in out.output
    if encoding == "sampled":
        assert "distinct, measured" in out.output
    if encoding == "topk_sampled":
        assert "top-6 + tail mass + 20 systematic tail draws" in out.output
        assert "top-6 + tail + 20 tail draws" in out.output


def test_estimate_needs_a_corpus_or_a_cache():
    from lmdistill.errors import ConfigError

    out = CliRunner().invoke(main, ["estimate", "--vocab", "1000"])
    assert isinstance(out.exception, ConfigError) and "give --vocab and --tokens" in str(out.exception)
