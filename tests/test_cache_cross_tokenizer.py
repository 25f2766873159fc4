"""One soft-label cache, students of any tokenizer: `label --cache.cross_tokenizer true` with a byte-level BPE teacher,
then `soft --teacher_cache DIR --loss.cross_tokenizer hybrid` with a SentencePiece-style student (span targets aligned
at read time, lmdistill.cache.spans), and the same cache read by a student of the teacher's own tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import make_model, soft_overrides
from lmdistill.api_spans import InBatchSpanTeacher
from lmdistill.cache import read_manifest
from lmdistill.cache.estimate import measure_cache
from lmdistill.cache.spans import load_cache_span_splits
from lmdistill.config import LabelConfig, SoftConfig, load_config
from lmdistill.errors import CacheError
from lmdistill.recipes.label import run_label
from lmdistill.recipes.soft import run_soft
from test_cross_tokenizer import train_spiece_tokenizer

DATA = {"data.block_size": "32", "data.max_documents": "80", "data.eval_documents": "16"}
STUDENT_BLOCK = "48"  # the student's blocks: the cached blocks' text in the student's (coarser or finer) tokens


def _label(teacher_dir: Path, text_file: Path, out: Path, **extra: str) -> dict:
    args = {"teacher.name_or_path": str(teacher_dir), "data.source": str(text_file), "cache.output_dir": str(out),
            "cache.encoding": "topk", "cache.k": "16", "cache.shard_blocks": "16", "progress": "false", **DATA,
            **extra}
    return run_label(load_config(LabelConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)]))


@pytest.fixture(scope="module")
def spiece_student(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("xcache-student")
    make_model(d, train_spiece_tokenizer(None), hidden=32, layers=2, seed=3)
    return d


@pytest.fixture(scope="module")
def xcache(teacher_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xcache") / "cache"
    summary = _label(teacher_dir, text_file, out, **{"cache.cross_tokenizer": "true"})
    # top-16 (1-byte ids, fp16) + tail + the actual token (id + fp16 log-prob), plus headers of tiny shards
    assert summary["bytes_per_token"] < 16 * 3 + 2 + 3 + 24
    return out


@pytest.fixture(scope="module")
def plain_cache(teacher_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "cache"
    _label(teacher_dir, text_file, out)
    return out


def _soft(teacher_dir: Path, student: Path, text_file: Path, out: Path, cache: Path, **extra: str) -> dict:
    args = soft_overrides(teacher_dir, student, text_file, out, **{
        "teacher_cache": str(cache), **DATA, "data.block_size": STUDENT_BLOCK, "loss.cross_tokenizer": "hybrid",
        "train.max_steps": "30", "train.eval_every": "30", "train.eval_batches": "4", **extra})
    return run_soft(load_config(SoftConfig, None, args))


def test_the_cross_tokenizer_fields_are_extra_tensors_and_the_tokenizer(xcache, plain_cache):
    from safetensors import safe_open

    m, plain = read_manifest(xcache), read_manifest(plain_cache)
    assert m.encoding["cross_tokenizer"] is True and "cross_tokenizer" not in plain.encoding
    assert m.header["version"] == plain.header["version"] == 1  # additive: old readers still read it
    assert (xcache / "tokenizer" / "tokenizer.json").is_file() and not (plain_cache / "tokenizer").exists()
    with safe_open(str(xcache / m.shards_of("train")[0].file), "pt") as f, \
            safe_open(str(plain_cache / plain.shards_of("train")[0].file), "pt") as g:
        assert set(f.keys()) - set(g.keys()) == {"block_first_id", "token_ids", "token_logprob"}
        for name in g.keys():  # the shared tensors are the same bytes: the option only adds
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name
    bpt = {name: sum(s.bytes for s in c.shards) / sum(c.split(x)["target_tokens"] for x in ("train", "eval"))
           for name, c in (("cross", m), ("plain", plain))}
    per_tensor = measure_cache(xcache)["tensor_bytes_per_token"]
    print(f"bytes/token on disk: {bpt}; added tensors: "
          f"{ {k: per_tensor[k] for k in ('token_ids', 'token_logprob', 'block_first_id')} }")
    # an id (2 bytes: the byte-level vocabulary has > 256 tokens) and an fp16 log-prob per target, one id per
    # 32-token block; the rest is safetensors headers
    width = m.encoding["id_bytes"]
    assert width == 2 and per_tensor["token_ids"] == width and per_tensor["token_logprob"] == 2.0
    assert per_tensor["block_first_id"] == pytest.approx(width / 32)
    assert 4.0 < bpt["cross"] - bpt["plain"] < 5.0
    from lmdistill.cache.estimate import run_estimate
    from lmdistill.config import EstimateConfig

    rows = {r["encoding"]: r["bytes_per_token"] for r in run_estimate(EstimateConfig(cache=str(xcache)))["rows"]}
    assert rows["top-16 + tail + actual token (cross-tokenizer)"] == rows["top-16 + tail"] + width + 2


def test_cache_span_targets_equal_the_online_teachers(xcache, teacher_dir, spiece_student):
    """The span targets the cache gives equal those the online cross-tokenizer teacher computes on the same student
    block (its own forward on the block's text): the span's probability and every listed alternative."""
    from lmdistill.align import align_batch
    from lmdistill.config import DataConfig
    from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher
    from lmdistill.data import build_splits
    from lmdistill.models import load_causal_lm, load_tokenizer

    s_tok, t_tok = load_tokenizer(str(spiece_student)), load_tokenizer(str(teacher_dir))
    train, held, report = load_cache_span_splits(xcache, s_tok, len(s_tok), int(STUDENT_BLOCK))
    assert len(train) == read_manifest(xcache).split("train")["blocks"] and len(held) > 0
    assert report.truncated_records == 0 and report.spans_merged > 0 and report.spans_one_to_one > 0
    online = CrossTokenizerTeacher(load_causal_lm(str(teacher_dir)), t_tok, s_tok, mode="hybrid")
    # the labelled blocks, rebuilt independently of the cache reader (the data through the teacher's tokenizer)
    params = DataConfig.model_validate(read_manifest(xcache).header["data"]["params"])
    cached_blocks = build_splits(params, t_tok).train
    compared = alternatives = 0
    for lo in range(0, 24, 8):
        idx = list(range(lo, lo + 8))
        batch = train.batch(idx)
        cache_t = InBatchSpanTeacher("hybrid").targets(batch)
        on = online.targets(batch)
        ab = align_batch(batch, s_tok, t_tok)
        # blocks whose text the teacher re-tokenizes as it was labelled: the same context, so the same numbers
        same = [b for b, i in enumerate(idx)
                if ab.teacher_input_ids[b, : int(ab.teacher_attention_mask[b].sum())].tolist()
                == cached_blocks.input_ids[i].tolist() + [int(cached_blocks.labels[i, -1])]]
        firsts, alts = _assert_spans_equal(cache_t, on, lambda b, _, same=same: b in same)
        compared, alternatives = compared + len(firsts), alternatives + alts
    assert compared >= 50 and alternatives >= 200, (compared, alternatives)


def _assert_spans_equal(cache_t, on, compare=None) -> tuple[list[int], int]:
    """Each cached span at (row b, position p) that `compare(b, p)` picks (default: every one, and the online teacher
    must compare it too) has the online teacher's first token, span probability and alternatives' probabilities.
    Returns the first student token of each span compared and the number of alternatives compared."""
    online_at = {(int(b), int(p)): k for k, (b, p) in enumerate(zip(on.batch.span_batch, on.batch.student_pos,
                                                                      strict=True))}
    vm, coarse = on.vmap, on.teacher.coarse
    firsts, alternatives = [], 0
    for s in range(cache_t.n_spans):
        b, p = int(cache_t.span_batch[s]), int(cache_t.span_pos[s])
        if compare is not None and (not compare(b, p) or (b, p) not in online_at):
            continue
        k = online_at[(b, p)]
        assert int(on.batch.student_first[k]) == int(cache_t.first[s])
        torch.testing.assert_close(cache_t.span_t[s], coarse[k, vm.n_shared], rtol=2e-2, atol=1e-4)
        for sid, prob in zip(cache_t.ids[s].tolist(), cache_t.probs[s].tolist(), strict=True):
            if sid >= 0:
                want = float(coarse[k, int(vm.student_class[sid])])
                assert prob == pytest.approx(want, rel=2e-2, abs=1e-4), (s, sid)
                alternatives += 1
        firsts.append(int(cache_t.first[s]))
    return firsts, alternatives


def test_a_student_of_another_tokenizer_beats_its_ce_twin_from_the_cache(xcache, teacher_dir, spiece_student,
                                                                         text_file, tmp_path, monkeypatch):
    """No teacher model is loaded; the held-out span divergence (on the cache's eval split) ends below the CE twin's
    (same init, cache-derived data, steps, seed; alpha 0), and bits per byte is reported."""
    from lmdistill.recipes import common

    def no_teacher(*_: object, **__: object) -> None:
        raise AssertionError("soft --teacher_cache must not load the teacher model")

    monkeypatch.setattr(common, "load_teacher", no_teacher)
    kd = _soft(teacher_dir, spiece_student, text_file, tmp_path / "kd", xcache)
    ce = _soft(teacher_dir, spiece_student, text_file, tmp_path / "ce", xcache, **{"loss.alpha": "0"})
    for r in (kd, ce):
        last = r["eval_last"]
        assert last["aligned_one_to_one"] > 0.05 and last["aligned_merged"] > 0.3, last
        assert "bits_per_byte" in last and torch.isfinite(torch.tensor(last["span_kd"]))
    print(f"held-out span_kd from the cache: hybrid {kd['eval_last']['span_kd']:.4f}, CE twin "
          f"{ce['eval_last']['span_kd']:.4f}")
    assert kd["eval_last"]["span_kd"] < 0.9 * ce["eval_last"]["span_kd"], (kd["eval_last"], ce["eval_last"])
    assert kd["alignment"]["spans_merged"] > 0


def test_the_same_cache_serves_a_student_of_the_teachers_tokenizer(xcache, teacher_dir, student_dir, text_file,
                                                                     tmp_path):
    """The same-tokenizer reader ignores the extra tensors; loss.cross_tokenizer set changes nothing there."""
    for name, extra in (("plain", {"loss.cross_tokenizer": "refuse"}), ("xt", {})):
        out = _soft(teacher_dir, student_dir, text_file, tmp_path / name, xcache, **{
            "data.block_size": "32", "train.max_steps": "6", "train.eval_every": "6", **extra})
        assert out["eval_last"]["kl_to_teacher"] < out["eval_first"]["kl_to_teacher"], out


def test_refusals(xcache, plain_cache, teacher_dir, spiece_student, text_file, tmp_path):
    with pytest.raises(CacheError, match=r"tokenizer mismatch.*--loss.cross_tokenizer hybrid"):
        _soft(teacher_dir, spiece_student, text_file, tmp_path / "a", xcache, **{"loss.cross_tokenizer": "refuse"})
    with pytest.raises(CacheError, match=r"labelled without cache.cross_tokenizer.*--cache.cross_tokenizer true"):
        _soft(teacher_dir, spiece_student, text_file, tmp_path / "b", plain_cache)
    with pytest.raises(CacheError, match=r"temperature 1.*--loss.temperature 1"):
        _soft(teacher_dir, spiece_student, text_file, tmp_path / "c", xcache, **{"loss.temperature": "2"})


def test_a_topk_sampled_int8_cache_serves_its_head_across_tokenizers(teacher_dir, text_file, spiece_student,
                                                                       tmp_path):
    from lmdistill.models import load_tokenizer

    out = tmp_path / "cache"
    _label(teacher_dir, text_file, out, **{"cache.cross_tokenizer": "true", "cache.encoding": "topk_sampled",
                                           "cache.k": "4", "cache.draws": "8", "cache.values": "int8",
                                           "data.max_documents": "20", "data.eval_documents": "0",
                                           "cache.splits": "[train]"})
    tok = load_tokenizer(str(spiece_student))
    train, held, report = load_cache_span_splits(out, tok, len(tok), int(STUDENT_BLOCK))
    assert len(held) == 0 and train.k <= 4 and report.spans_merged > 0
    t = InBatchSpanTeacher("uld").targets(train.batch(list(range(min(4, len(train))))))
    assert t.n_spans > 0 and bool((t.span_t + t.other_t <= 1.0 + 1e-6).all()) and bool((t.span_t > 0).all())


@pytest.mark.parametrize(("extra", "needle"), [
    ({"cache.encoding": "sampled"}, "not sampled"),
    ({"cache.temperature": "2"}, "--cache.temperature 1"),
])
def test_label_refuses_what_a_cross_tokenizer_reader_cannot_use(teacher_dir, text_file, tmp_path, extra, needle):
    from lmdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        _label(teacher_dir, text_file, tmp_path / "cache", **{"cache.cross_tokenizer": "true", **extra})
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_worker_processes_align_the_shards_to_the_same_targets(xcache, spiece_student, tmp_path, capsys,
                                                              monkeypatch):
    """Shards aligned by two forked workers give exactly the blocks, span targets and counts of one process; a shard
    damaged on disk is named from inside a worker, as it is without one."""
    import dataclasses
    import shutil

    from lmdistill.cache.spans import align_workers
    from lmdistill.models import load_tokenizer

    tok = load_tokenizer(str(spiece_student))
    assert len(read_manifest(xcache).shards_of("train")) >= 3  # several shards, so the two workers share them
    assert align_workers(2, 3) == 2 and align_workers(8, 3) == 3 and align_workers(0, 100) >= 1
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more ranks than cores: one each, unless aligning alone
    assert align_workers(0, 100) == 1 and align_workers(0, 100, alone=True) == min(100, cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    one = load_cache_span_splits(xcache, tok, len(tok), int(STUDENT_BLOCK), workers=1, store=False)
    two = load_cache_span_splits(xcache, tok, len(tok), int(STUDENT_BLOCK), workers=2, progress=True, store=False)
    for a, b in zip(one[:2], two[:2], strict=True):
        for f in dataclasses.fields(a):
            assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    assert one[2].as_dict() == two[2].as_dict() and one[2].records == len(one[0]) + len(one[1])
    assert "align train" in capsys.readouterr().err  # the bar, shards done of the split's

    damaged = tmp_path / "cache"
    shutil.copytree(xcache, damaged)
    shard = damaged / read_manifest(damaged).shards_of("train")[1].file
    data = bytearray(shard.read_bytes())
    data[-40:-30] = bytes(b ^ 0xFF for b in data[-40:-30])
    shard.write_bytes(bytes(data))
    for workers in (1, 2):
        with pytest.raises(CacheError, match=rf"shard `.*{shard.name}` is corrupt"):
            load_cache_span_splits(damaged, tok, len(tok), int(STUDENT_BLOCK), workers=workers, store=False)


def test_the_aligned_targets_are_stored_once_and_memory_mapped(xcache, spiece_student, tmp_path, monkeypatch,
                                                               caplog):
    """The first read aligns and stores; a later one (same cache, student tokenizer and block size) maps the stored
    files without aligning; another block size is another key; a damaged stored copy is aligned again."""
    import dataclasses

    from lmdistill.cache import spans
    from lmdistill.models import load_tokenizer

    monkeypatch.setenv("LMDISTILL_SPAN_TARGETS", str(tmp_path / "store"))
    tok = load_tokenizer(str(spiece_student))
    T = int(STUDENT_BLOCK)
    fresh = load_cache_span_splits(xcache, tok, len(tok), T, store=False)
    assert not (tmp_path / "store").exists()
    first = load_cache_span_splits(xcache, tok, len(tok), T)
    (stored,) = [p for p in (tmp_path / "store").iterdir() if p.is_dir()]
    assert {p.name for p in stored.iterdir()} == {"train.pt", "eval.pt", "report.json"}
    assert str(stored / "train.pt") in Path("/proc/self/maps").read_text()  # mapped, not read into memory
    aligning = spans._split_blocks

    def no_alignment(*_: object, **__: object) -> None:
        raise AssertionError("a stored alignment must not be computed again")

    monkeypatch.setattr(spans, "_split_blocks", no_alignment)
    again = load_cache_span_splits(xcache, tok, len(tok), T)
    for got in (first, again):
        for a, b in zip(fresh[:2], got[:2], strict=True):
            for f in dataclasses.fields(a):
                assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
        assert got[2].as_dict() == fresh[2].as_dict()
    with pytest.raises(AssertionError, match="must not be computed again"):
        load_cache_span_splits(xcache, tok, len(tok), T + 8)
    monkeypatch.setattr(spans, "_split_blocks", aligning)
    (stored / "train.pt").write_bytes(b"not a tensor file")
    healed = load_cache_span_splits(xcache, tok, len(tok), T)
    assert "cannot be read" in caplog.text and torch.equal(healed[0].ids, fresh[0].ids)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LMDISTILL_SPAN_TARGETS", str(tmp_path / "a-file" / "store"))  # nothing can be stored there
    in_memory = load_cache_span_splits(xcache, tok, len(tok), T)
    assert "keeps them in memory" in caplog.text and torch.equal(in_memory[0].ids, fresh[0].ids)


CHAT = {"data.stage": "chat", "data.block_size": "128", "data.max_documents": "60", "data.eval_documents": "12"}
CHAT_STUDENT_BLOCK = "192"


@pytest.fixture(scope="module")
def gemma_chat_student(tmp_path_factory) -> Path:
    """A SentencePiece-style student whose chat template is Gemma-like (`<start_of_turn>`), unlike the teacher's
    ChatML."""
    from test_onpolicy_cross_tokenizer import gemma_like_tokenizer

    d = tmp_path_factory.mktemp("xcache-chat-student")
    make_model(d, gemma_like_tokenizer(None), hidden=32, layers=2, seed=4)
    return d


@pytest.fixture(scope="module")
def xchat(teacher_dir, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("xchat") / "cache"
    _label(teacher_dir, chat_file, out, **{"cache.cross_tokenizer": "true", "data.source": str(chat_file), **CHAT})
    return out


def test_a_chat_cache_gives_the_online_teachers_span_targets(xchat, teacher_dir, gemma_chat_student):
    """Each model renders the stored messages with its own template; the cache's span targets equal those a local
    teacher computes on the same student rows (its own forward on its own rendering, lmdistill.chat_align)."""
    from lmdistill.config import DataConfig
    from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher
    from lmdistill.data import ChatBlocks, build_splits, conversation_blocks
    from lmdistill.models import load_causal_lm, load_tokenizer

    s_tok, t_tok = load_tokenizer(str(gemma_chat_student)), load_tokenizer(str(teacher_dir))
    train, held, report = load_cache_span_splits(xchat, s_tok, len(s_tok), int(CHAT_STUDENT_BLOCK))
    assert len(train) == read_manifest(xchat).split("train")["blocks"] and len(held) == 12
    assert report.kept == report.records and report.spans_merged > 0 and report.spans_one_to_one > 0
    # the student's rows are its own template's rendering of the labelled conversations, in order
    params = DataConfig.model_validate(read_manifest(xchat).header["data"]["params"])
    labelled = build_splits(params, t_tok).train
    assert isinstance(labelled, ChatBlocks)
    rows, _ = conversation_blocks(labelled.conversations, s_tok, int(CHAT_STUDENT_BLOCK))
    assert torch.equal(rows.input_ids, train.input_ids) and torch.equal(rows.labels, train.labels)
    start = s_tok.convert_tokens_to_ids("<start_of_turn>")
    assert bool((train.input_ids == start).any())  # the Gemma-like markers, not the teacher's ChatML
    online = CrossTokenizerTeacher(load_causal_lm(str(teacher_dir)), t_tok, s_tok, mode="hybrid", chat=[rows])
    compared = alternatives = ends = 0
    for lo in range(0, 24, 8):
        idx = list(range(lo, lo + 8))
        # every cached span is one the local teacher compares too
        firsts, alts = _assert_spans_equal(InBatchSpanTeacher("hybrid").targets(train.batch(idx)),
                                           online.targets(rows.batch(idx)))
        compared, alternatives = compared + len(firsts), alternatives + alts
        ends += firsts.count(s_tok.convert_tokens_to_ids("<end_of_turn>"))
    print(f"chat cache: {compared} spans equal to the online teacher's, {alternatives} alternatives, {ends} turn ends")
    assert compared >= 50 and alternatives >= 200 and ends >= 8, (compared, alternatives, ends)


def test_a_chat_student_of_another_template_beats_its_ce_twin_from_the_cache(xchat, teacher_dir, gemma_chat_student,
                                                                             chat_file, tmp_path):
    chat = {**CHAT, "data.block_size": CHAT_STUDENT_BLOCK, "train.micro_batch_size": "8"}
    kd = _soft(teacher_dir, gemma_chat_student, chat_file, tmp_path / "kd", xchat, **chat)
    ce = _soft(teacher_dir, gemma_chat_student, chat_file, tmp_path / "ce", xchat, **chat, **{"loss.alpha": "0"})
    print(f"held-out span_kd from the chat cache: hybrid {kd['eval_last']['span_kd']:.4f}, CE twin "
          f"{ce['eval_last']['span_kd']:.4f}")
    assert kd["eval_last"]["span_kd"] < 0.9 * ce["eval_last"]["span_kd"], (kd["eval_last"], ce["eval_last"])
    assert kd["alignment"]["kept"] == kd["alignment"]["records"]


def test_a_chat_cache_read_with_another_teacher_template_is_refused(xchat, gemma_chat_student, tmp_path):
    """The stored messages must render as the labelled blocks: a teacher template changed in the cache's tokenizer
    copy (its fingerprint covers the vocabulary only) is caught by the block digests; a student without a template
    is refused by name."""
    import shutil

    from lmdistill.models import load_tokenizer

    cache = tmp_path / "cache"
    shutil.copytree(xchat, cache)
    template = cache / "tokenizer" / "chat_template.jinja"
    assert template.is_file()
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    s_tok = load_tokenizer(str(gemma_chat_student))
    with pytest.raises(CacheError, match=r"chat template does not render the stored conversations.*relabel"):
        load_cache_span_splits(cache, s_tok, len(s_tok), int(CHAT_STUDENT_BLOCK))
    s_tok.chat_template = None
    with pytest.raises(CacheError, match=r"holds chat data.*chat_template"):
        load_cache_span_splits(xchat, s_tok, len(s_tok), int(CHAT_STUDENT_BLOCK))


def test_a_chat_cache_serves_a_student_of_the_teachers_tokenizer(xchat, teacher_dir, student_dir, chat_file,
                                                                  tmp_path):
    """The same-tokenizer reader ignores the stored messages: it checks the chat blocks against the data as ever."""
    out = _soft(teacher_dir, student_dir, chat_file, tmp_path / "same", xchat, **{
        **CHAT, "loss.cross_tokenizer": "refuse", "train.max_steps": "6", "train.eval_every": "6"})
    assert out["eval_last"]["kl_to_teacher"] < out["eval_first"]["kl_to_teacher"], out
