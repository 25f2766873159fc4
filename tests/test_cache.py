"""The soft-label cache: encodings, format round trip, the reader's checks, and loss equality through the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmdistill.cache import (
    CachedTeacher,
    CacheWriter,
    build_header,
    read_manifest,
    sampled_rows,
    topk_rows,
    topk_sampled_rows,
)
from lmdistill.cache.format import (
    JOURNAL_GLOB,
    MANIFEST,
    decode_values,
    encode_values,
    id_bytes,
    pack_ids,
    unpack_ids,
)
from lmdistill.cache.writer import shard_seed
from lmdistill.config import CacheConfig, DataConfig, LossConfig
from lmdistill.data import IGNORE, TokenBlocks, build_splits
from lmdistill.errors import CacheError

VOCAB = 300


def _blocks(n: int, T: int = 12, seed: int = 0, masked: bool = True) -> TokenBlocks:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    labels = torch.randint(0, VOCAB, (n, T), generator=g)
    if masked:  # chat-like: some positions are not learned, so rows != positions
        labels[torch.rand(n, T, generator=g) < 0.3] = IGNORE
    return TokenBlocks(ids, labels, torch.ones_like(ids))


def _write(root: Path, splits: dict[str, TokenBlocks], table: dict[str, torch.Tensor], **cache: object) -> None:
    cfg = CacheConfig(output_dir=str(root), **{"shard_blocks": 4, "batch_size": 3, **cache})
    header = build_header(teacher={"name_or_path": "synthetic", "fingerprint": "t"}, tokenizer_fingerprint="tok",
                          vocab=VOCAB, data_params={"source": "synthetic"}, splits=splits, cfg=cfg)
    writer = CacheWriter(root, header)
    for name, blocks in splits.items():
        writer.write_split(name, blocks, lambda b, name=name: table[name][b["index"]])
    writer.merge()


@pytest.fixture(scope="module")
def synthetic():
    splits = {"train": _blocks(10, seed=1), "eval": _blocks(3, seed=2)}
    g = torch.Generator().manual_seed(3)
    table = {k: 3 * torch.randn(len(b), 12, VOCAB, generator=g) for k, b in splits.items()}
    return splits, table


def test_id_packing_uses_the_fewest_bytes_and_round_trips():
    assert [id_bytes(v) for v in (256, 257, 65536, 65537, 1 << 24, (1 << 24) + 1)] == [1, 2, 2, 3, 3, 4]
    for vocab in (200, 49152, 100_000, 20_000_000):
        w = id_bytes(vocab)
        ids = torch.tensor([[0, 1, vocab - 1], [vocab // 2, 7, vocab - 2]])
        packed = pack_ids(ids, w)
        assert packed.element_size() * (packed.shape[-1] if w == 3 else 1) == w
        assert torch.equal(unpack_ids(packed, w), ids)


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "int8"])
def test_value_encodings_round_trip_within_their_precision(values):
    lp = torch.log_softmax(4 * torch.randn(50, 40, generator=torch.Generator().manual_seed(0)), -1)
    lp[0, 0] = float("-inf")  # an empty tail
    back = decode_values(encode_values(lp, values, 20.0), values, 20.0)
    ok = lp > -20
    tol = {"fp32": 0.0, "fp16": 1e-2, "bf16": 8e-2, "int8": 20 / 255 / 2 + 1e-5}[values]  # + fp32 rounding
    assert (back[ok] - lp[ok]).abs().max() <= tol + 1e-3 * lp[ok].abs().max() * (values != "int8")
    assert torch.isfinite(back).all() and (back <= 0).all()


@pytest.mark.parametrize(("encoding", "values"), [("topk", "fp32"), ("topk", "bf16"), ("topk", "int8"),
                                                  ("sampled", "fp16"), ("sampled", "int8")])
def test_round_trip_aligns_rows_to_blocks_and_positions(synthetic, tmp_path, encoding, values):
    splits, table = synthetic
    _write(tmp_path, splits, table, encoding=encoding, values=values, k=5, draws=16)
    manifest = read_manifest(tmp_path)
    assert [s.index for s in manifest.shards_of("train")] == [0, 1, 2]  # 10 blocks, 4 per shard
    assert not list(tmp_path.glob(JOURNAL_GLOB)) and not list(tmp_path.glob("**/.*.tmp"))
    cached = CachedTeacher(tmp_path, "train", blocks=splits["train"], data_params={"source": "synthetic"})
    blocks = splits["train"]
    order = [9, 0, 5, 4]  # crosses all three shards, out of order
    t = cached.targets(blocks.batch(order))
    mask = blocks.labels[order] != IGNORE
    lp = torch.log_softmax(table["train"][order].float(), -1)
    assert (t.ids[~mask] == -1).all()
    tol = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 5e-2, "int8": 20 / 255}[values]
    if encoding == "topk":
        want = topk_rows(lp[mask], 5, tail=True)
        assert torch.equal(t.ids[mask], want["ids"])
        torch.testing.assert_close(t.logprobs[mask], want["logprobs"], atol=tol, rtol=1e-2)
        torch.testing.assert_close(t.tail_logprob[mask], want["tail_logprob"], atol=tol, rtol=1e-2)
        assert t.weights is None and t.estimator == "topk"
    else:
        valid = t.ids[mask] >= 0
        assert torch.allclose(t.weights[mask].sum(-1), torch.ones(int(mask.sum())))
        assert ((t.weights[mask] * 16).round() == t.weights[mask] * 16).all()  # counts / draws
        assert (t.weights[mask][~valid] == 0).all()
        true_lp = lp[mask].gather(-1, t.ids[mask].clamp_min(0))
        assert ((t.logprobs[mask] - true_lp).abs()[valid] <= tol + 1e-3).all()
        assert t.tail_logprob is None and t.estimator == "sampled"
    t_eval = CachedTeacher(tmp_path, "eval").targets(splits["eval"].batch([2, 1]))
    assert t_eval.ids.shape[:2] == (2, 12)


def test_sampled_rows_give_proper_weights_and_frequencies():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    lp = probs.log()
    n = 20_000
    out = sampled_rows(lp, n, torch.Generator().manual_seed(0))
    assert out["n_ids"].tolist() == [4, 1]  # a zero-probability id is never drawn
    assert out["counts"][:4].sum() == n and out["counts"][4] == n
    assert out["ids"][:4].tolist() == [0, 1, 2, 3] and out["ids"][4] == 2  # distinct, ascending
    freq = out["counts"][:4].double() / n
    p = probs[0, :4].double()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    torch.testing.assert_close(out["logprobs"], lp[[0, 0, 0, 0, 1], out["ids"]])
    again = sampled_rows(lp, n, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert len({shard_seed(0, "train", j) for j in range(50)} | {shard_seed(0, "eval", 0), shard_seed(1, "train", 0)}) == 52


# ---------------------------------------------------------------------------------------------------------------------
# topk_sampled: the exact top-k head plus systematic draws of the tail


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_topk_sampled_round_trip_exact_head_and_tail_draws_outside_it(synthetic, tmp_path, values):
    splits, table = synthetic
    _write(tmp_path, splits, table, encoding="topk_sampled", values=values, k=5, draws=16)
    manifest = read_manifest(tmp_path)
    assert manifest.header["version"] == 2 and manifest.encoding["kind"] == "topk_sampled"
    assert manifest.encoding["draws"] == 16 and manifest.encoding["k"] == 5
    blocks = splits["train"]
    cached = CachedTeacher(tmp_path, "train", blocks=blocks, temperature=1.0, kind="forward_kl")
    order = [9, 0, 5, 4]  # crosses all three shards, out of order
    t = cached.targets(blocks.batch(order))
    mask = blocks.labels[order] != IGNORE
    lp = torch.log_softmax(table["train"][order].float(), -1)[mask]
    want = topk_rows(lp, 5, tail=True)
    ids, w, tlp = t.ids[mask], t.weights[mask], t.logprobs[mask]
    assert t.estimator == "sampled" and t.tail_logprob is None and (t.ids[~mask] == -1).all()
    assert torch.equal(ids[:, :5], want["ids"])  # the head first, exactly the teacher's top-5
    tol = {"fp32": 1e-5, "int8": 20 / 255}[values]
    # head weights are the teacher's probabilities; tail weights add up to its tail mass
    torch.testing.assert_close(w[:, :5], want["logprobs"].exp(), atol=0.0, rtol=2 * tol)
    torch.testing.assert_close(w.sum(-1), torch.ones(len(w)))
    torch.testing.assert_close(w[:, 5:].sum(-1), want["tail_logprob"].exp(), atol=1e-7, rtol=2 * tol)
    drawn = ids[:, 5:] >= 0
    for r in range(len(ids)):
        tail = ids[r, 5:][drawn[r]]
        assert len(set(tail.tolist())) == len(tail) and not set(tail.tolist()) & set(ids[r, :5].tolist())
    counts = w[:, 5:] / w[:, 5:].sum(-1, keepdim=True) * 16  # c_v: whole draws out of 16
    torch.testing.assert_close(counts, counts.round(), atol=1e-4, rtol=0)
    # head log-probs are the teacher's; every tail draw carries the tail's mean log-prob sum_v r(v) log p_T(v); both
    # shifted by the same renormalisation as the weights
    true = lp.gather(-1, ids[:, :5])
    torch.testing.assert_close(tlp[:, :5], true, atol=2 * tol, rtol=0)
    rest = lp.scatter(-1, want["ids"], float("-inf"))
    r = (rest - want["tail_logprob"].unsqueeze(-1)).exp()
    mean = torch.where(r > 0, r * rest, torch.zeros_like(r)).sum(-1, keepdim=True).expand(-1, tlp.shape[1] - 5)
    torch.testing.assert_close(tlp[:, 5:][drawn], mean[drawn], atol=2 * tol, rtol=0)
    # a top-k cache is still written as format version 1, byte for byte what earlier releases wrote
    _write(tmp_path / "topk", splits, table, k=5)
    assert read_manifest(tmp_path / "topk").header["version"] == 1


def test_topk_sampled_rows_draw_the_tail_systematically_and_without_bias():
    probs = torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.0]])  # k = 2: tail {2, 3, 4, 5}, mass 0.35
    n, reps = 10, 4000
    out = topk_sampled_rows(probs.log().expand(reps, -1), 2, n, torch.Generator().manual_seed(0))
    assert (out["ids"] == torch.tensor([0, 1])).all()
    torch.testing.assert_close(out["tail_logprob"], torch.full((reps,), 0.35).log())
    assert out["tail_ids"].shape == (reps, n) and (out["tail_ids"].diff(dim=-1) >= 0).all()  # n ids, ascending
    assert set(out["tail_ids"].unique().tolist()) <= {2, 3, 4, 5}  # never a head id or a zero-probability one
    counts = torch.zeros(reps, 7, dtype=torch.int64).scatter_add_(1, out["tail_ids"], torch.ones_like(out["tail_ids"]))
    expected = n * probs[0] / 0.35
    expected[:2] = 0
    # systematic sampling: every count is floor or ceil of its expectation, and the mean is the expectation
    assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()
    mean = counts.double().mean(0)
    assert ((mean - expected.double()).abs() <= 4 * 0.5 / reps**0.5).all()
    # the value the draws carry: the tail's mean log-prob
    r = probs[0, 2:6] / 0.35
    torch.testing.assert_close(out["tail_mean_logprob"], (r * probs[0, 2:6].log()).sum().expand(reps))
    # k = V: no tail; the draws are the top-1 id, which the reader reads as "no draw"
    full = topk_sampled_rows(probs[:, :6].log(), 6, n, torch.Generator().manual_seed(0))
    assert (full["tail_ids"] == full["ids"][:, :1]).all() and full["tail_mean_logprob"].tolist() == [0.0]
    again = topk_sampled_rows(probs.log().expand(reps, -1), 2, n, torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_topk_sampled_loss_equals_a_float64_reference_from_the_shard(synthetic, tmp_path):
    from safetensors.torch import load_file

    from lmdistill.losses import sparse_divergence

    splits, table = synthetic
    _write(tmp_path, splits, table, encoding="topk_sampled", values="int8", k=4, draws=8)
    blocks = splits["train"]
    batch = blocks.batch([0, 1, 2, 3])  # exactly shard 0
    mask = batch["labels"] != IGNORE
    t = CachedTeacher(tmp_path, "train").targets(batch)
    student = (2 * torch.randn(4, 12, VOCAB, generator=torch.Generator().manual_seed(5))).requires_grad_(True)
    got = sparse_divergence(student, t.ids, t.logprobs, "forward_kl", target_weights=t.weights, estimator="sampled",
                            mask=mask, reduction="sum")
    got.backward()
    # the reference straight from the definition, on the shard's raw tensors, in float64:
    # sum over head ids of q_v (log q_v - log p_S(v)) + m * sum over the n tail draws of 1 / n (log q_v - log p_S(v)),
    # with q and m the stored values renormalised to total 1 and log q_v of a tail draw the tail's mean log-prob
    raw = load_file(str(tmp_path / "train" / "shard-00000.safetensors"))
    dec = lambda x: decode_values(x, "int8", 20.0).double()  # noqa: E731
    head_ids, head_lp, tail_lp = raw["ids"].long(), dec(raw["logprobs"]), dec(raw["tail_logprob"])
    ls = torch.log_softmax(student.detach().double()[mask], -1)
    ref, grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(ls)
    for r in range(len(ls)):
        lz = torch.logsumexp(torch.cat([head_lp[r], tail_lp[r : r + 1]]), 0)
        ids = torch.cat([head_ids[r], raw["tail_ids"][r].long()])  # 4 head ids, then 8 draws (repeats allowed)
        lq = torch.cat([head_lp[r], dec(raw["tail_mean_logprob"][r]).expand(8)]) - lz
        w = torch.cat([head_lp[r].exp(), tail_lp[r].exp().expand(8) / 8]) / lz.exp()
        ref += (w * (lq - ls[r, ids])).sum()
        grad[r] = ls[r].exp() * w.sum()
        grad[r].index_add_(0, ids, -w)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.grad[mask].double(), grad, rtol=1e-4, atol=1e-6)
    assert (student.grad[~mask] == 0).all()


def test_topk_sampled_mismatched_or_damaged_caches_are_refused(synthetic, tmp_path):
    from safetensors.torch import load_file, save_file

    from lmdistill.cache.format import sha256_file

    splits, table = synthetic
    _write(tmp_path, splits, table, encoding="topk_sampled", k=5, draws=8, temperature=2.0)
    with pytest.raises(CacheError, match="topk_sampled targets.*loss.kind=jsd"):
        CachedTeacher(tmp_path, "train", kind="jsd")
    with pytest.raises(CacheError, match="temperature mismatch.*tail mass and its draws"):
        CachedTeacher(tmp_path, "train", temperature=1.0)
    # a manifest claiming format version 1 (whose readers cannot know this encoding) or a future version is refused
    path = tmp_path / MANIFEST
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "version": 1}))
    with pytest.raises(CacheError, match="encoding 'topk_sampled' in format version 1"):
        CachedTeacher(tmp_path, "train")
    path.write_text(json.dumps({**raw, "version": 3}))
    with pytest.raises(CacheError, match="format version 3; this lmdistill reads versions 1, 2"):
        CachedTeacher(tmp_path, "train")
    path.write_text(json.dumps(raw))
    # a shard without its tail draws (re-checksummed, so only the content check can catch it) is named
    shard = tmp_path / "train" / "shard-00001.safetensors"
    tensors = load_file(str(shard))
    del tensors["tail_ids"]
    save_file(tensors, str(shard))
    for s in raw["shards"]:
        if s["file"] == "train/shard-00001.safetensors":
            s.update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    path.write_text(json.dumps(raw))
    cached = CachedTeacher(tmp_path, "train", temperature=2.0)
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors` has no readable `tail_ids`"):
        cached.targets(splits["train"].batch([5]))


def test_resume_with_other_settings_names_the_field(synthetic, tmp_path):
    splits, table = synthetic
    _write(tmp_path, splits, table, k=5)
    with pytest.raises(CacheError, match=r"encoding\.k: 5 != 7"):
        _write(tmp_path, splits, table, k=7)


def test_corrupt_and_truncated_shards_are_named(synthetic, tmp_path):
    splits, table = synthetic
    _write(tmp_path, splits, table, k=5)
    shard = tmp_path / "train" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40:-30] = bytes(b ^ 0xFF for b in data[-40:-30])  # same size, flipped payload bytes
    shard.write_bytes(bytes(data))
    cached = CachedTeacher(tmp_path, "train")
    cached.targets(splits["train"].batch([0, 1]))  # shard 0 is intact: nothing is refused early
    with pytest.raises(CacheError, match=r"shard `.*train/shard-00001\.safetensors` is corrupt"):
        cached.targets(splits["train"].batch([0, 5]))
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CacheError, match=r"shard `.*train/shard-00001\.safetensors` is truncated"):
        CachedTeacher(tmp_path, "train")
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors` is missing"):
        CachedTeacher(tmp_path, "train")


def test_incomplete_cache_and_wrong_blocks_are_refused(synthetic, tmp_path):
    splits, table = synthetic
    _write(tmp_path, splits, table, k=5)
    cached = CachedTeacher(tmp_path, "train")
    other = _blocks(10, seed=9)
    with pytest.raises(CacheError, match="block 3 of this batch differs"):
        cached.targets(other.batch([3]))
    with pytest.raises(CacheError, match="data mismatch"):
        CachedTeacher(tmp_path, "train", blocks=other, data_params={"source": "synthetic"})
    (tmp_path / MANIFEST).rename(tmp_path / "manifest.rank-0-of-1.json")
    with pytest.raises(CacheError, match="incomplete .*rerun the same `lmdistill label`"):
        CachedTeacher(tmp_path, "train")
    with pytest.raises(CacheError, match="not a soft-label cache"):
        CachedTeacher(tmp_path / "train", "train")


def test_temperature_and_kind_checks(synthetic, tmp_path):
    splits, table = synthetic
    _write(tmp_path / "tail", splits, table, k=5, temperature=2.0)
    with pytest.raises(CacheError, match="temperature mismatch.*temperature 2 .*loss.temperature=1"):
        CachedTeacher(tmp_path / "tail", "train", temperature=1.0)
    CachedTeacher(tmp_path / "tail", "train", temperature=2.0)
    # without a tail the renormalised top-k is re-tempered exactly: log-probs scale by T_cache / T_loss
    _write(tmp_path / "notail", splits, table, k=5, tail=False, temperature=2.0)
    batch = splits["train"].batch([1])
    base = CachedTeacher(tmp_path / "notail", "train", temperature=2.0).targets(batch)
    hot = CachedTeacher(tmp_path / "notail", "train", temperature=4.0).targets(batch)
    torch.testing.assert_close(hot.logprobs, base.logprobs * 0.5)
    _write(tmp_path / "sampled", splits, table, encoding="sampled", draws=8)
    with pytest.raises(CacheError, match="sampled targets.*loss.kind=jsd"):
        CachedTeacher(tmp_path / "sampled", "train", kind="jsd")
    with pytest.raises(CacheError, match="temperature mismatch.*sampled draws"):
        CachedTeacher(tmp_path / "sampled", "train", temperature=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# with real (tiny) models


@pytest.fixture(scope="module")
def tiny(teacher_dir, student_dir, text_file, tokenizer):
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_causal_lm, load_teacher

    data = DataConfig(source=str(text_file), block_size=16, max_documents=8, eval_documents=4)
    splits = build_splits(data, tokenizer)
    teacher = load_teacher(ModelConfig(name_or_path=str(teacher_dir)))
    student = load_causal_lm(str(student_dir))
    return data, splits, teacher, student


def test_wrong_tokenizer_is_refused(tiny, tokenizer, tmp_path):
    from conftest import train_tokenizer
    from lmdistill.models import tokenizer_fingerprint

    data, splits, teacher, _ = tiny
    cfg = CacheConfig(output_dir=str(tmp_path), k=4, splits=["train"])
    n = len(tokenizer)
    header = build_header(teacher={"name_or_path": "t"}, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                          vocab=n, data_params=data.model_dump(mode="json"), splits={"train": splits.train}, cfg=cfg)
    w = CacheWriter(tmp_path, header)
    w.write_split("train", splits.train, lambda b: teacher(input_ids=b["input_ids"]).logits[..., :n])
    w.merge()
    CachedTeacher(tmp_path, "train", tokenizer=tokenizer)
    other = train_tokenizer(tmp_path / "tok2", vocab_size=300, extra_text="zebra quantum " * 20)
    with pytest.raises(CacheError, match="tokenizer mismatch"):
        CachedTeacher(tmp_path, "train", tokenizer=other)
    bigger = data.model_copy(update={"block_size": 24})
    with pytest.raises(CacheError, match=r"data mismatch.*block_size: 16 != 24"):
        CachedTeacher(tmp_path, "train", blocks=build_splits(bigger, tokenizer).train,
                      data_params=bigger.model_dump(mode="json"))


@pytest.fixture(scope="module")
def full_cache(tiny, tokenizer, tmp_path_factory):
    """A top-k cache with k = V, fp32 values and a tail: the whole teacher distribution, stored sparsely."""
    from lmdistill.teachers import HFTeacher

    _, splits, teacher, _ = tiny
    n = len(tokenizer)
    root = tmp_path_factory.mktemp("full")
    cfg = CacheConfig(output_dir=str(root), k=n, values="fp32", splits=["train"], shard_blocks=8)
    header = build_header(teacher={"name_or_path": "t"}, tokenizer_fingerprint="x", vocab=n,
                          data_params={}, splits={"train": splits.train}, cfg=cfg)
    w = CacheWriter(root, header)
    w.write_split("train", splits.train, HFTeacher(teacher, n).logits)
    w.merge()
    return root


@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "tvd"])
def test_topk_with_tail_at_k_equals_v_is_the_dense_loss_through_the_cache(tiny, tokenizer, full_cache, kind):
    """Same value and same student gradient as the online dense loss, fused and reference paths."""
    from lmdistill.recipes.soft import soft_step_loss
    from lmdistill.teachers import HFTeacher

    _, splits, teacher, student = tiny
    n = len(tokenizer)
    online = HFTeacher(teacher, n)
    cached = CachedTeacher(full_cache, "train", blocks=splits.train)
    batch = splits.train.batch([0, 9, 3])
    for fused in (True, False):
        loss = LossConfig(kind=kind, alpha=0.7, fused=fused)
        student.zero_grad()
        ref = soft_step_loss(student, batch, online.targets(batch) if fused else online.logits(batch), loss, n)
        ref.loss_sum.backward()
        g_ref = student.lm_head.weight.grad.clone()
        student.zero_grad()
        got = soft_step_loss(student, batch, cached.targets(batch), loss, n)
        got.loss_sum.backward()
        torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(student.lm_head.weight.grad, g_ref, rtol=1e-3, atol=1e-6)


def test_manifest_records_fingerprints_and_counts(tiny, tmp_path):
    from lmdistill.cache.writer import teacher_fingerprint

    _, splits, teacher, _ = tiny
    fp = teacher_fingerprint(teacher, "t")
    assert fp == teacher_fingerprint(teacher, "t")
    with torch.no_grad():
        teacher.lm_head.weight[0, 0] += 1.0
    try:
        assert teacher_fingerprint(teacher, "t")["weights_sha256"] != fp["weights_sha256"]
    finally:
        with torch.no_grad():
            teacher.lm_head.weight[0, 0] -= 1.0
    raw = json.dumps(fp)
    assert "config_sha256" in raw and len(fp["weights_sha256"]) == 64
