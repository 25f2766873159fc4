"""Soft labels from a black-box teacher of another tokenizer: API top-k log-probs over the teacher's own tokens (a
byte-level BPE), aligned by bytes with a SentencePiece-style student's tokens, the sparse span loss, and `soft
--api_logprobs --loss.cross_tokenizer hybrid`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import CHAT_TEMPLATE, SUBJECTS, make_model, soft_overrides, synthetic_sentences
from lmdistill.api_spans import InBatchSpanTeacher, build_api_span_targets, entry_bytes, load_api_span_splits
from lmdistill.api_targets import load_api_splits
from lmdistill.config import DataConfig, SoftConfig, load_config
from lmdistill.data import IGNORE
from lmdistill.errors import DataError
from lmdistill.losses.cross_tokenizer import sparse_span_divergence, sparse_span_kd
from lmdistill.losses.divergences import divergence
from lmdistill.losses.head import Head
from lmdistill.recipes.soft import run_soft
from lmdistill.token_bytes import token_bytes
from test_cross_tokenizer import train_spiece_tokenizer

TOP_K = 8


def chat_data(**extra) -> DataConfig:
    return DataConfig(stage="chat", block_size=64, **extra)


# ----------------------------------------------------------------------------------------------------------------
# the loss


def _random_case(g: torch.Generator, S: int, V: int, K: int, dtype=torch.float64):
    zs = torch.randn(S, V, generator=g, dtype=dtype) * 2
    first = torch.randint(0, V, (S,), generator=g)
    s_rest = -torch.rand(S, generator=g, dtype=dtype) * 2 * (torch.rand(S, generator=g) < 0.6)
    ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(S)])
    ids = torch.where((ids == first[:, None]) | (torch.rand(S, K, generator=g) < 0.3), -1, ids)
    raw = torch.rand(S, K + 2, generator=g, dtype=dtype) ** 3
    raw = raw / raw.sum(1, keepdim=True) * 0.9  # the top-k, p(x1): 90 % of the teacher's mass is known
    probs = raw[:, :K] * (torch.rand(S, K, generator=g) > 0.15)  # 0 = padding
    p1, cont = raw[:, K], torch.rand(S, generator=g, dtype=dtype)
    return zs, first, s_rest, ids, probs, p1 * cont, p1 * (1 - cont)


@pytest.mark.parametrize("mode", ["hybrid", "uld"])
def test_chunked_sparse_span_loss_matches_the_reference_with_gradients(mode):
    g = torch.Generator().manual_seed(0)
    S, H, V, K, T = 11, 8, 40, 6, 1.5
    _, first, s_rest, ids, probs, span_t, other_t = _random_case(g, S, V, K)
    h = torch.randn(S, H, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_()
    s_rest = s_rest.clone().requires_grad_()
    got = sparse_span_kd(h, Head(w), first, s_rest, ids, probs, span_t, other_t, mode=mode, temperature=T,
                         matched_weight=0.7, unmatched_weight=0.4, chunk_size=4)
    grads = torch.autograd.grad(got, (h, w, s_rest))
    ref = sparse_span_divergence(torch.log_softmax(h @ w.T / T, -1), first, s_rest, ids, probs, span_t, other_t,
                                 mode, matched_weight=0.7, unmatched_weight=0.4).sum() * T**2
    ref_grads = torch.autograd.grad(ref, (h, w, s_rest))
    assert got.dtype == torch.float64 and torch.isfinite(got) and got > 0
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_with_the_same_tokenizer_and_full_top_k_the_hybrid_is_the_same_tokenizer_divergence():
    """1:1 spans, every other token listed with its student id: the buckets are the vocabulary itself."""
    g = torch.Generator().manual_seed(1)
    S, V = 12, 30
    zs, zt = torch.randn(S, V, generator=g) * 2, torch.randn(S, V, generator=g) * 2
    lt = torch.log_softmax(zt, -1)
    first = torch.randint(0, V, (S,), generator=g)
    others = torch.stack([torch.cat([torch.arange(f), torch.arange(f + 1, V)]) for f in first.tolist()])
    probs = lt.exp().gather(1, others)
    span_t, zero = lt.exp().gather(1, first[:, None]).squeeze(1), torch.zeros(S)
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        got = sparse_span_divergence(torch.log_softmax(zs, -1), first, zero, others, probs, span_t, zero, "hybrid",
                                     kind)
        torch.testing.assert_close(got, divergence(zs, zt, kind, reduction="none"), atol=1e-5, rtol=1e-5)


def test_uld_is_zero_for_a_student_that_matches_the_known_entries():
    """The truncated ULD compares the teacher's known entries with the student's largest ones, and the mass left."""
    ls = torch.log(torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05]]))
    ids, probs = torch.tensor([[1, -1]]), torch.tensor([[0.3, 0.1]])  # teacher top-2 besides its first token
    first, zero = torch.tensor([0]), torch.zeros(1)
    got = sparse_span_divergence(ls, first, zero, ids, probs, torch.tensor([0.4]), zero, "uld")
    assert float(got) == pytest.approx(0.0, abs=1e-6)
    worse = sparse_span_divergence(ls, first, zero, ids, torch.tensor([[0.2, 0.1]]), torch.tensor([0.5]), zero,
                                   "uld")
    assert float(worse) == pytest.approx(0.2, abs=1e-6)  # |0.4-0.5| + |0.3-0.2| + tail |0.8 - 0.8|


def test_an_api_token_is_its_bytes_where_sent_else_its_string():
    assert entry_bytes({"token": "\ufffd", "bytes": [0xF0, 0x9F]}) == b"\xf0\x9f"  # part of an emoji
    assert entry_bytes({"token": " café"}) == " café".encode()
    assert entry_bytes({"token": " x", "bytes": None}) == b" x"


# ----------------------------------------------------------------------------------------------------------------
# API records of a byte-level teacher, a SentencePiece-style student


@pytest.fixture(scope="module")
def student_tok_dir(tmp_path_factory) -> Path:
    """The SentencePiece-style tokenizer with the chat markers and template the student is trained with."""
    d = tmp_path_factory.mktemp("spiece-chat")
    tok = train_spiece_tokenizer(None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def student_tok(student_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(student_tok_dir)


@pytest.fixture(scope="module")
def spiece_chat_student(tmp_path_factory, student_tok) -> Path:
    d = tmp_path_factory.mktemp("spiece-chat-student")
    make_model(d, student_tok, hidden=32, layers=2, seed=3)
    return d


def api_records(teacher_dir: Path, tokenizer, contents: list[str], k: int = TOP_K) -> list[dict]:
    """`lmdistill generate` records as an OpenAI-style endpoint writes them: the real teacher's log-prob of each
    completion token and its top-k alternatives, with token strings and `bytes`, and no ids of the student's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    table = token_bytes(tokenizer)

    def entry(tid: int, lp: float) -> dict:
        return {"token": tokenizer.decode([tid]), "id": tid, "logprob": lp, "bytes": list(table[tid] or b"")}

    out = []
    for i, content in enumerate(contents):
        messages = [{"role": "user", "content": f"Tell me about {SUBJECTS[i % len(SUBJECTS)]} ({i})."},
                    {"role": "assistant", "content": content}]
        rendered = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True)
        prompt = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        ids = tokenizer(content, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([prompt + ids])).logits[0].float(), -1)
        lp = lp[len(prompt) - 1: len(prompt) - 1 + len(ids), : len(tokenizer)]
        top_v, top_i = lp.topk(k, dim=-1)
        logprobs = []
        for j, tid in enumerate(ids):
            e = entry(tid, float(lp[j, tid]))
            e["top_logprobs"] = [entry(int(a), float(v)) for a, v in zip(top_i[j], top_v[j], strict=True)]
            logprobs.append(e)
        out.append({"id": f"q{i}", "messages": messages, "logprobs": logprobs, "finish_reason": "stop"})
    return out


def _contents(n: int, seed: int) -> list[str]:
    sents = synthetic_sentences(2 * n, seed=seed)
    return [sents[2 * i] + " " + sents[2 * i + 1] for i in range(n)]


@pytest.fixture(scope="module")
def records(teacher_dir, tokenizer) -> list[dict]:
    return api_records(teacher_dir, tokenizer, _contents(64, seed=5))


def test_spans_pair_the_students_tokens_with_the_api_teachers(records, tokenizer, student_tok):
    blocks, report = build_api_span_targets(records[:16], student_tok, chat_data(), len(student_tok))
    assert report.kept == 16 == len(blocks) and not report.skipped
    assert report.spans_one_to_one > 0 and report.spans_merged > 0
    assert 0.2 < report.alternatives_matched / (report.alternatives_matched + report.alternatives_unmatched) < 1
    batch = blocks.batch(list(range(len(blocks))))
    targets = InBatchSpanTeacher("hybrid").targets(batch)
    s_table, t_table = token_bytes(student_tok), token_bytes(tokenizer)
    labels = batch["labels"]
    # each span starts at a learned student token, the position before it predicts it
    assert torch.equal(labels[targets.span_batch, targets.span_pos], targets.first)
    # the span's later tokens are learned and labelled with their span; no position is in two spans
    later = targets.rest_span >= 0
    assert bool((labels[later] != IGNORE).all()) and torch.equal(targets.rest_labels[later], labels[later])
    starts = set(zip(targets.span_batch.tolist(), targets.span_pos.tolist(), strict=True))
    assert not starts & {tuple(x) for x in later.nonzero().tolist()}
    # learned tokens: every one in exactly one span except the end of turn (<|im_end|> and after)
    assert targets.counts["one_to_one"] + targets.counts["merged"] == targets.n_spans + int(later.sum())
    assert targets.counts["skipped"] == 2 * 16  # "<|im_end|>\n" per record: the API never scored it
    # alternatives map to student tokens with their bytes; never to the span's first token
    valid = targets.ids >= 0
    assert bool((targets.ids != targets.first[:, None]).all())
    for s in range(targets.n_spans):
        for k in valid[s].nonzero().squeeze(-1).tolist():
            sid = int(targets.ids[s, k])
            assert s_table[sid] and any(t_table[t] == s_table[sid] for t in range(len(t_table)))
    # the teacher's known mass: alternatives + p(x1) = span_t + other_t, at most 1
    total = targets.probs.sum(1) + targets.span_t + targets.other_t
    assert bool((total <= 1 + 1e-4).all()) and bool((total > 0.3).all())


def test_api_span_targets_carry_the_teachers_probabilities(records, tokenizer, student_tok):
    """span_t and other_t are built from the API's own per-token log-probs (a 1:1 span: span_t = p(x1))."""
    rec = records[0]
    blocks, _ = build_api_span_targets([rec], student_tok, chat_data(), len(student_tok))
    t = InBatchSpanTeacher("hybrid").targets(blocks.batch([0]))
    lps = [e["logprob"] for e in rec["logprobs"]]
    # the first span starts at the completion's first byte: p(x1) of the API's first token
    assert float(t.span_t[0] + t.other_t[0]) == pytest.approx(math.exp(lps[0]), rel=1e-5)
    # the product over all spans of span_t / p(first) ... equals the whole completion's probability
    assert float(torch.log(t.span_t).sum()) == pytest.approx(sum(lps), rel=1e-4)


def test_records_that_do_not_line_up_are_skipped_and_counted(records, tokenizer, student_tok, teacher_dir):
    good = [json.loads(json.dumps(r)) for r in records[:6]]
    edited = json.loads(json.dumps(records[6]))
    edited["messages"][-1]["content"] += " And more."  # edited after generation: the tokens do not spell it
    no_bytes = json.loads(json.dumps(records[7]))
    for e in no_bytes["logprobs"]:
        e.pop("bytes")
        for a in e["top_logprobs"]:
            a.pop("bytes")
    # a completion with a character the teacher spells over several byte tokens
    emoji = api_records(teacher_dir, tokenizer, ["The cat sees the ball 😀 at night."])[0]
    assert any(e["token"] == "\ufffd" for e in emoji["logprobs"])  # partial characters decode to U+FFFD
    emoji_no_bytes = json.loads(json.dumps(emoji))
    for e in emoji_no_bytes["logprobs"]:
        e.pop("bytes")
    blocks, report = build_api_span_targets([*good, edited, no_bytes, emoji, emoji_no_bytes], student_tok,
                                            chat_data(), len(student_tok))
    assert report.records == 10 and report.kept == 8 == len(blocks)
    assert report.skipped == {"whose tokens do not spell the completion": 2}
    # a record without `bytes` (ASCII) gives exactly the targets it gives with them
    with_bytes, _ = build_api_span_targets([records[7]], student_tok, chat_data(), len(student_tok))
    without, _ = build_api_span_targets([no_bytes], student_tok, chat_data(), len(student_tok))
    for key, value in with_bytes.batch([0]).items():
        assert torch.equal(value, without.batch([0])[key]), key
    # with its bytes, the emoji record aligns: its spans cover every completion token but the end of turn
    t = InBatchSpanTeacher("hybrid").targets(blocks.batch([7]))
    assert t.counts["skipped"] == 2 and t.counts["one_to_one"] + t.counts["merged"] > 0


def test_a_template_that_trims_or_pads_the_completion_still_aligns(teacher_dir, tokenizer, student_tok_dir):
    """Whitespace the student's template adds or strips around the completion is not text either side learns from;
    a template that rewrites the text is skipped and counted."""
    from transformers import AutoTokenizer

    recs = api_records(teacher_dir, tokenizer, [f" {c}\n" for c in _contents(4, seed=9)])
    plain = api_records(teacher_dir, tokenizer, _contents(4, seed=9))
    padded = AutoTokenizer.from_pretrained(student_tok_dir)  # Llama 2 style: a space, then the stripped text
    padded.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ ' ' + m['content'] | trim }}")
    blocks, report = build_api_span_targets(recs, padded, chat_data(), len(padded))
    ref_blocks, ref = build_api_span_targets(plain, padded, chat_data(), len(padded))
    assert report.kept == 4 and not report.skipped and ref.kept == 4
    # the same spans, and one more per record where both spell the first word with its space (" The": the
    # student's space comes from its template); the API's trailing newline aligns with nothing
    assert report.spans_merged == ref.spans_merged and report.spans_one_to_one == ref.spans_one_to_one + 4
    assert report.tokens_uncovered == ref.tokens_uncovered - 4
    assert len(blocks) == len(ref_blocks) == 4
    upper = AutoTokenizer.from_pretrained(student_tok_dir)
    upper.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")
    _, report = build_api_span_targets(recs, upper, chat_data(), len(upper))
    assert report.kept == 0 and report.skipped == {"whose chat template changes the completion text": 4}


def test_refuse_names_the_cross_tokenizer_fix(records, student_tok, tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    with pytest.raises(DataError, match="--loss.cross_tokenizer hybrid"):
        load_api_splits(path, chat_data(), student_tok, len(student_tok))
    train, held, report = load_api_span_splits(path, chat_data(eval_documents=2), student_tok, len(student_tok))
    assert len(train) + len(held) == 8 == report.kept and len(held) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "logprobs": r["logprobs"][1:]}) + "\n" for r in records[:3]))
    with pytest.raises(DataError, match="none of the 3 records.*3 whose tokens do not spell the completion"):
        load_api_span_splits(bad, chat_data(), student_tok, len(student_tok))


def _api_run(api_file: Path, student_dir: Path, out: Path, **extra: str) -> dict:
    args = soft_overrides(out / "no-teacher", student_dir, api_file, out, **{
        "api_logprobs": str(api_file), "data.stage": "chat", "data.block_size": "64", "data.eval_documents": "12",
        "loss.cross_tokenizer": "hybrid", "train.max_steps": "30", "train.eval_every": "30",
        "train.eval_batches": "3", **extra})
    return run_soft(load_config(SoftConfig, None, args))


def test_soft_on_api_logprobs_across_tokenizers_beats_its_ce_twin(records, spiece_chat_student, tmp_path):
    """A byte-level black-box teacher's top-k teaches a SentencePiece-style student: its held-out span divergence
    to the API's targets ends below the CE twin's (same init, records, steps, seed; loss.alpha 0)."""
    api_file = tmp_path / "api.jsonl"
    api_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = {name: _api_run(api_file, spiece_chat_student, tmp_path / name, **extra)
            for name, extra in (("hybrid", {}), ("ce", {"loss.alpha": "0"}), ("uld", {"loss.cross_tokenizer": "uld"}))}
    hybrid, ce = runs["hybrid"]["eval_last"], runs["ce"]["eval_last"]
    assert runs["hybrid"]["recipe"] == "soft-api" and runs["hybrid"]["alignment"]["kept"] == len(records)
    assert hybrid["aligned_one_to_one"] > 0.05 and hybrid["aligned_merged"] > 0.2, hybrid
    assert math.isfinite(hybrid["span_kd"]) and math.isfinite(hybrid["perplexity"]), hybrid  # + ground-truth metrics
    print(f"API top-{TOP_K} across tokenizers, held-out span_kd: hybrid {hybrid['span_kd']:.4f} vs CE twin "
          f"{ce['span_kd']:.4f} (first {runs['hybrid']['eval_first']['span_kd']:.4f}); uld: "
          f"{runs['uld']['eval_first']['span_kd']:.4f} -> {runs['uld']['eval_last']['span_kd']:.4f}")
    assert hybrid["span_kd"] < 0.9 * ce["span_kd"], (hybrid, ce)
    uld = runs["uld"]  # its span_kd is the truncated ULD distance, which training lowers
    assert uld["eval_last"]["span_kd"] < 0.9 * uld["eval_first"]["span_kd"], uld
