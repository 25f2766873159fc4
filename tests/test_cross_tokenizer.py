"""Soft labels across tokenizers: byte-span alignment, the ULD / hybrid span losses, and `soft` with a teacher of
another tokenizer, on two real tokenizers trained in-process on the same text (byte-level BPE and SentencePiece-style
BPE with byte fallback)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import make_model, soft_overrides, synthetic_sentences
from lmdistill.align import align_batch, align_sequence, byte_spans, vocab_map
from lmdistill.config import SoftConfig, load_config
from lmdistill.losses.cross_tokenizer import (
    coarse,
    cross_tokenizer_kd,
    span_divergence,
    span_parts,
    teacher_spans,
    top_sorted,
)
from lmdistill.losses.divergences import divergence
from lmdistill.losses.head import Head
from lmdistill.recipes.soft import run_soft
from lmdistill.token_bytes import token_bytes

UNICODE = ["é", "ö", "😀", "日本", "\n", "\t", "ß", "—", "ñ", "🙂🙃"]


def train_spiece_tokenizer(out_dir: Path | None, vocab_size: int = 300, seed: int = 0):
    """A SentencePiece-style BPE (`▁` for spaces, `<0xNN>` byte fallback), as Gemma's and Llama 2's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # the 256 byte tokens come first (as in Gemma's vocabulary); registered as special so the trainer keeps them
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 260, show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"]
                                  + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(synthetic_sentences(400, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>",
                                   unk_token="<unk>")
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    return train_spiece_tokenizer(tmp_path_factory.mktemp("spiece") / "tok")


def random_text(rng: random.Random) -> str:
    sents = synthetic_sentences(50)
    words = " ".join(" ".join(rng.choice(sents).split()[: rng.randint(2, 9)]) for _ in range(3))
    out = []
    for w in words.split(" "):
        out.append(w + (rng.choice(UNICODE) if rng.random() < 0.3 else ""))
    return " ".join(out)


def _token_ranges(ids: list[int], tok) -> list[tuple[int, int]]:
    table, pos, out = token_bytes(tok), 0, []
    for i in ids:
        n = len(table[i] or b"\0")
        out.append((pos, pos + n))
        pos += n
    return out


@pytest.mark.parametrize("seed", range(12))
def test_spans_partition_the_bytes_and_every_student_token_is_in_one_span(tokenizer, spiece, seed):
    rng = random.Random(seed)
    docs = [random_text(rng) for _ in range(3)]
    ids: list[int] = []
    for d in docs:
        ids += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[rng.randint(0, 3):]  # a packed block may start inside a character
    for student, teacher, seq in ((tokenizer, spiece, ids),):
        a = align_sequence(seq, student, teacher)
        s_cover = [i for s, _ in a.spans for i in s]
        assert len(s_cover) == len(set(s_cover)), "a student token in two spans"
        assert len(s_cover) + a.unaligned == len(seq)
        s_ranges = _token_ranges(seq, student)
        for s_span, t_span in a.spans:
            start, end = s_ranges[s_span.start][0], s_ranges[s_span.stop - 1][1]
            assert end > start
            t_bytes = b"".join(token_bytes(teacher)[a.teacher_ids[j]] or b"\0" for j in t_span)
            s_bytes = b"".join(token_bytes(student)[seq[i]] or b"\0" for i in s_span)
            assert t_bytes == s_bytes
        # consecutive spans tile the covered bytes without gaps
        for (s1, _), (s2, _) in zip(a.spans, a.spans[1:], strict=False):
            assert s_ranges[s1.stop - 1][1] == s_ranges[s2.start][0] or s2.start > s1.stop


def test_byte_spans_groups_by_common_boundaries():
    student = [(0, 2), (2, 5), (5, 6), (6, 9)]
    teacher = [(0, 2), (2, 3), (3, 6), (6, 8), (8, 9)]
    assert byte_spans(student, teacher) == [(range(0, 1), range(0, 1)), (range(1, 3), range(1, 3)),
                                            (range(3, 4), range(3, 5))]
    # a side that starts inside the other's first token (a cut character) is skipped until both start together
    assert byte_spans([(1, 3), (3, 4)], [(0, 3), (3, 4)]) == [(range(1, 2), range(1, 2))]


@pytest.mark.parametrize("seed", range(4))
def test_span_distributions_sum_to_one(tokenizer, spiece, seed):
    g = torch.Generator().manual_seed(seed)
    vm = vocab_map(spiece, tokenizer)
    S = 16
    lt = torch.log_softmax(torch.randn(S, len(spiece), generator=g) * 3, -1)
    ls = torch.log_softmax(torch.randn(S, len(tokenizer), generator=g) * 3, -1)
    first_t = torch.randint(0, len(spiece), (S,), generator=g)
    first_s = torch.randint(0, len(tokenizer), (S,), generator=g)
    rest = -torch.rand(S, generator=g) * 4
    for lp, first, cls in ((lt, first_t, vm.teacher_class), (ls, first_s, vm.student_class)):
        a, span, other = span_parts(lp, first, rest)
        assert torch.allclose(a.sum(-1) + span + other, torch.ones(S), atol=1e-5)
        assert torch.allclose(coarse(a, span, other, cls, vm.n_shared).sum(-1), torch.ones(S), atol=1e-5)


def test_hybrid_with_identical_tokenizers_is_the_same_tokenizer_divergence(tokenizer):
    g = torch.Generator().manual_seed(0)
    vm = vocab_map(tokenizer, tokenizer)
    assert vm.n_shared == len(tokenizer)
    V, S = len(tokenizer), 24
    zs, zt = torch.randn(S, V, generator=g) * 2, torch.randn(S, V, generator=g) * 2
    first = torch.randint(0, V, (S,), generator=g)
    zero = torch.zeros(S)
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got = span_divergence(torch.log_softmax(zs, -1), torch.log_softmax(zt, -1), first, first, zero, zero, vm,
                              "hybrid", kind)
        want = divergence(zs, zt, kind, reduction="none")
        assert torch.allclose(got, want, atol=1e-5), kind


@pytest.mark.parametrize("mode", ["uld", "hybrid"])
def test_chunked_loss_matches_the_reference_with_gradients(tokenizer, spiece, mode):
    g = torch.Generator().manual_seed(1)
    vm = vocab_map(spiece, tokenizer)
    S, Hs, Ht = 10, 8, 12
    h_s = torch.randn(S, Hs, generator=g, dtype=torch.float64).requires_grad_()
    w_s = torch.randn(len(tokenizer), Hs, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(S, Ht, generator=g, dtype=torch.float64)
    w_t = torch.randn(len(spiece), Ht, generator=g, dtype=torch.float64)
    fs, ft = torch.randint(0, len(tokenizer), (S,), generator=g), torch.randint(0, len(spiece), (S,), generator=g)
    rs = (-torch.rand(S, generator=g, dtype=torch.float64)).requires_grad_()
    rt = -torch.rand(S, generator=g, dtype=torch.float64)
    T = 2.0
    reduced = teacher_spans(h_t, Head(w_t), ft, rt, vm, mode, T, chunk_size=4)
    got = cross_tokenizer_kd(h_s, Head(w_s), reduced, fs, rs, vm, mode=mode, temperature=T, chunk_size=3)
    grads = torch.autograd.grad(got, (h_s, w_s, rs))
    ref = span_divergence(torch.log_softmax(h_s @ w_s.T / T, -1), torch.log_softmax(h_t @ w_t.T / T, -1), fs, ft,
                          rs, rt, vm, mode).sum() * T**2
    ref_grads = torch.autograd.grad(ref, (h_s, w_s, rs))
    assert torch.allclose(got, ref, rtol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)


def test_uld_beyond_the_top_entries_is_one_entry():
    """Truncated ULD: exact where a row has no more entries than the cut; beyond it, the mass left is one entry."""
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(3, 50, generator=g), -1)
    q = torch.softmax(torch.randn(3, 70, generator=g), -1)
    from lmdistill.losses.cross_tokenizer import sorted_l1

    tp, bp = top_sorted(p, 100)
    tq, bq = top_sorted(q, 100)
    assert torch.allclose((tp - tq).abs().sum(1) + (bp - bq).abs(), sorted_l1(p, q), atol=1e-6)
    tp, bp = top_sorted(p, 10)
    tq, bq = top_sorted(q, 10)
    cut = (tp - tq).abs().sum(1) + (bp - bq).abs()
    assert torch.all(cut <= sorted_l1(p, q) + 1e-6) and torch.all(bp > 0)


def test_align_batch_indexes_the_positions_before_each_span(tokenizer, spiece):
    text = "The cat sees the dog. Héllo 😀 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = {"input_ids": torch.tensor([ids[:-1]]), "labels": torch.tensor([ids[1:]])}
    ab = align_batch(batch, tokenizer, spiece)
    assert ab.n_spans > 0
    s_table, t_table = token_bytes(tokenizer), token_bytes(spiece)
    for k in range(ab.n_spans):
        # both first tokens start the same bytes: one is a prefix of the other
        s_first, t_first = s_table[int(ab.student_first[k])], t_table[int(ab.teacher_first[k])]
        assert s_first.startswith(t_first) or t_first.startswith(s_first)
        assert int(ab.student_first[k]) == ids[int(ab.student_pos[k]) + 1]
        assert int(ab.teacher_first[k]) == int(ab.teacher_input_ids[0, int(ab.teacher_pos[k]) + 1])


@pytest.fixture(scope="module")
def spiece_student(tmp_path_factory, spiece):
    d = tmp_path_factory.mktemp("spiece-student")
    make_model(d, spiece, hidden=32, layers=2, seed=3)
    return d


def _cross_run(teacher_dir, student_dir, text_file, out, **extra):
    args = soft_overrides(teacher_dir, student_dir, text_file, out, **{
        "loss.cross_tokenizer": "hybrid", "train.max_steps": "30", "train.eval_every": "30",
        "train.eval_batches": "4", **extra})
    return run_soft(load_config(SoftConfig, None, args))


def test_soft_across_tokenizers_beats_its_ce_twin(teacher_dir, spiece_student, text_file, tmp_path):
    """A byte-level teacher teaches a SentencePiece-style student: its held-out span divergence to the teacher ends
    below the CE-trained twin's (same init, data, steps, seed; alpha 0)."""
    runs = {name: _cross_run(teacher_dir, spiece_student, text_file, tmp_path / name, **extra)["eval_last"]
            for name, extra in (("hybrid", {}), ("uld", {"loss.cross_tokenizer": "uld"}),
                                ("ce", {"loss.alpha": "0"}))}
    for r in runs.values():
        assert r["aligned_one_to_one"] > 0.05 and r["aligned_merged"] > 0.3, r
        assert torch.isfinite(torch.tensor(r["span_kd"]))
    ce_under_hybrid = _cross_run(teacher_dir, spiece_student, text_file, tmp_path / "ce2",
                                 **{"loss.alpha": "0"})["eval_last"]["span_kd"]
    assert runs["hybrid"]["span_kd"] < 0.9 * ce_under_hybrid, (runs, ce_under_hybrid)
    print({k: (round(v["span_kd"], 4), round(v["aligned_one_to_one"], 3), round(v["aligned_merged"], 3)) for k, v in runs.items()}, ce_under_hybrid)


def test_alignment_prepared_ahead_by_workers_trains_the_same(teacher_dir, spiece_student, text_file, tmp_path,
                                                             monkeypatch):
    """The alignment done in two forked workers ahead of each step (lmdistill.train.prefetch) gives the step exactly
    what aligning in the step gives: the same loss at every step and the same held-out numbers; and the step does
    no aligning of its own."""
    from lmdistill import cross_tokenizer_teacher
    from lmdistill.train.logging import read_log

    common = {"train.max_steps": "6", "train.eval_every": "6", "train.grad_accum": "2"}
    inline = _cross_run(teacher_dir, spiece_student, text_file, tmp_path / "inline",
                        **{**common, "train.prepare_workers": "0"})
    aligned_in_step: list[int] = []
    real = cross_tokenizer_teacher.align_batch

    def counting(*args, **kwargs):
        aligned_in_step.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cross_tokenizer_teacher, "align_batch", counting)  # the parent's module (workers forked later)
    ahead = _cross_run(teacher_dir, spiece_student, text_file, tmp_path / "ahead",
                       **{**common, "train.prepare_workers": "2"})
    rows = {name: [r["loss"] for r in read_log(Path(out["log"])) if "loss" in r]
            for name, out in (("inline", inline), ("ahead", ahead))}
    assert len(rows["inline"]) == 6 and rows["inline"] == rows["ahead"]
    assert inline["eval_last"]["span_kd"] == ahead["eval_last"]["span_kd"]
    n_eval_batches = 2 * 4  # two evaluations (steps 0 and 6) of eval_batches=4: aligned in the process, as ever
    assert len(aligned_in_step) == n_eval_batches, aligned_in_step


def test_cross_tokenizer_refuses_layer_wise_distillation(teacher_dir, spiece_student, text_file, tmp_path):
    from lmdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="loss.hidden"):
        _cross_run(teacher_dir, spiece_student, text_file, tmp_path / "h", **{"loss.hidden.weight": "1.0"})


def test_compare_runs_the_cross_tokenizer_arm(teacher_dir, student_dir, spiece, text_file, tmp_path):
    """The opt-in compare arm: a teacher of another tokenizer (prepare.teacher) teaches the same student init as the
    other arms; compare scores it with the shared teacher like every arm."""
    from lmdistill.recipes.compare import CompareConfig, run_compare

    other = tmp_path / "spiece-teacher"
    make_model(other, spiece, hidden=48, layers=2, seed=4)
    cfg = load_config(CompareConfig, None, {
        "teacher": {"name_or_path": str(teacher_dir)},
        "student": {"init": "pretrained", "name_or_path": str(student_dir)},
        "data": {"source": str(text_file), "block_size": 32, "eval_documents": 30},
        "train": {"output_dir": str(tmp_path / "cmp"), "max_steps": 2, "micro_batch_size": 4, "eval_every": 0,
                  "eval_batches": 2, "save_every": 0, "progress": False},
        "generation": {"n_prompts": 1, "max_new_tokens": 4},
        "arms": [{"name": "ce", "kind": "ce"},
                 {"name": "gemma_like", "kind": "cross_tokenizer", "prepare": {"teacher": str(other)}}],
    })
    results = run_compare(cfg, echo=lambda _: None)
    by = {a["name"]: a for a in results["arms"]}
    assert by["gemma_like"]["status"] == "ok", by["gemma_like"]
    metrics = by["gemma_like"]["seeds"][0]["metrics"]
    assert metrics["kl_to_teacher"] > 0 and "bits_per_byte" in metrics


def _lowercasing_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_sentences(200), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def test_a_teacher_tokenizer_without_byte_offsets_is_named(spiece_student, text_file, tmp_path):
    """A lowercasing teacher tokenizer cannot spell the student's text back: one clear error naming it, exit 2."""
    import subprocess
    import sys

    t_dir = tmp_path / "lower-teacher"
    make_model(t_dir, _lowercasing_tokenizer(t_dir), seed=7)
    proc = subprocess.run([sys.executable, "-m", "lmdistill", "soft", *soft_overrides(
        t_dir, spiece_student, text_file, tmp_path / "run", **{"loss.cross_tokenizer": "hybrid",
                                                                 "train.max_steps": "1"})],
        capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not spell its input back" in proc.stderr and str(t_dir) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_tokenizer_of_unknown_kind_is_refused_by_name():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmdistill.token_bytes import ByteOffsetError

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", name_or_path="my-wordpiece")
    with pytest.raises(ByteOffsetError, match="my-wordpiece.*WordPiece"):
        token_bytes(fast)
