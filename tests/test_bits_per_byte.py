"""Held-out bits per byte: CE sum / (ln 2 * bytes of the target tokens), against hand computations; special tokens
spell 0 bytes; the teacher row has it; two tokenizers of the same text count the same bytes; the compare report ranks
it lower-is-better."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, synthetic_sentences, train_tokenizer
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.evaluate import (
    MetricSums,
    _per_block_sums,
    byte_lengths_of,
    evaluate_blocks,
    evaluate_models,
)
from lmdistill.token_bytes import token_byte_lengths

MULTIBYTE = ["Café crème à Paris, naïve Ærøskøbing.", "東京の漢字と日本語。", "Emoji 😀👍🏽 and a flag 🇫🇷!",
             "Tabs\tand\nnewlines — €5, x².", "Straße über Köln.\n"]
LN2 = math.log(2)


def doc_blocks(tokenizer, texts: list[str]) -> TokenBlocks:
    """One block per text: EOS, then the text, then EOS, so every token of the text (and the closing EOS) is a target:
    the target bytes are exactly len(text.encode()). Padded to the longest block (pad positions ignored)."""
    eos = tokenizer.eos_token_id
    rows = [[eos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    width = max(len(r) for r in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r) - 1
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r[:-1]), torch.tensor(r[1:]), 1
    return TokenBlocks(ids, labels, mask)


def ce_sum(model, blocks: TokenBlocks) -> float:
    """The summed CE in nats of every target token, straight from the definition."""
    with torch.no_grad():
        logits = model(input_ids=blocks.input_ids, attention_mask=blocks.attention_mask).logits
    mask = blocks.labels != IGNORE
    return float(F.cross_entropy(logits[mask].float(), blocks.labels[mask], reduction="sum"))


@pytest.fixture(scope="module")
def multibyte_tokenizer(tmp_path_factory):
    """A second byte-level tokenizer with another vocab size, trained with multi-byte text so it has tokens of several
    bytes that hold accented letters, CJK and parts of emoji."""
    return train_tokenizer(tmp_path_factory.mktemp("tok300"), vocab_size=300, seed=3,
                           extra_text=" ".join(MULTIBYTE * 20))


def test_metric_sums_on_a_hand_made_byte_table():
    # V = 4: token 0 is special (0 bytes), tokens 1..3 spell 1, 3 and 4 bytes (an ASCII letter, "漢", "😀")
    lengths = torch.tensor([0, 1, 3, 4])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    labels = torch.tensor([[3, 2, 0, IGNORE]])  # the third target is the special token: its CE counts, 0 bytes
    sums = MetricSums()
    sums.add(probs.log()[None], labels, probs.log()[None], lengths)
    r = sums.result()
    ce = -(math.log(0.4) + math.log(0.25) + math.log(0.7))
    assert r["bytes"] == 4 + 3 + 0
    assert r["bits_per_byte"] == pytest.approx(ce / (LN2 * 7), rel=1e-6)
    assert r["teacher_bits_per_byte"] == pytest.approx(r["bits_per_byte"], rel=1e-6)  # the same distribution
    assert r["ce"] == pytest.approx(ce / 3, rel=1e-6)  # per token: all three targets
    # without a byte table there is no bits per byte; with targets that spell nothing, none either
    plain = MetricSums()
    plain.add(probs.log()[None], labels)
    assert "bits_per_byte" not in plain.result()
    only_special = MetricSums()
    only_special.add(probs.log()[None], torch.tensor([[0, 0, IGNORE, IGNORE]]), byte_lengths=lengths)
    assert "bits_per_byte" not in only_special.result() and only_special.result()["tokens"] == 2
    # per-block sums carry the bytes as a fifth column
    assert _per_block_sums(probs.log()[None], labels, None, lengths)[0][4] == 7.0
    assert _per_block_sums(probs.log()[None], labels, None)[0][4] == 0.0


def test_bits_per_byte_of_a_tiny_model_equals_the_hand_computation(tokenizer, student_dir):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    texts = synthetic_sentences(6, seed=7)
    blocks = doc_blocks(tokenizer, texts)
    r = evaluate_blocks(student, blocks, n_vocab=len(tokenizer), batch_size=4,
                        byte_lengths=byte_lengths_of(tokenizer))
    n_bytes = sum(len(t.encode()) for t in texts)  # the closing EOS of each text spells nothing
    assert r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(ce_sum(student, blocks) / (LN2 * n_bytes), rel=1e-5)
    # the same number from the per-token mean: CE * tokens / (ln 2 * bytes)
    assert r["bits_per_byte"] == pytest.approx(r["ce"] * r["tokens"] / (LN2 * r["bytes"]), rel=1e-9)


def test_multibyte_text_counts_its_utf8_bytes(multibyte_tokenizer, tmp_path):
    tok = multibyte_tokenizer
    lengths = token_byte_lengths(tok)
    # trained on the multi-byte text, the vocabulary holds tokens of 2, 3 and 4 bytes ("é", "漢", parts of emoji)
    assert {2, 3, 4} <= set(lengths.tolist())
    for t in ("é", "漢"):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert int(lengths[ids].sum()) == len(t.encode())
    model = make_model(tmp_path / "m", tok, seed=1)
    blocks = doc_blocks(tok, MULTIBYTE)
    r = evaluate_blocks(model, blocks, n_vocab=len(tok), batch_size=2, byte_lengths=byte_lengths_of(tok))
    n_bytes = sum(len(t.encode()) for t in MULTIBYTE)
    assert n_bytes > sum(len(t) for t in MULTIBYTE)  # characters are not bytes here
    assert r["bytes"] == n_bytes
    assert r["bits_per_byte"] == pytest.approx(ce_sum(model, blocks) / (LN2 * n_bytes), rel=1e-5)


def test_two_tokenizers_of_the_same_text_count_the_same_bytes(tokenizer, multibyte_tokenizer, tmp_path):
    """The tokenizer-independent denominator: both tokenizations of a text spell the same bytes, however many tokens
    each takes, so bits per byte of models with different vocabularies divide by the same byte count."""
    texts = synthetic_sentences(5, seed=11) + MULTIBYTE
    a, b = tokenizer, multibyte_tokenizer
    assert len(a) != len(b)
    la, lb = token_byte_lengths(a), token_byte_lengths(b)
    for text in texts:
        ia, ib = a(text, add_special_tokens=False)["input_ids"], b(text, add_special_tokens=False)["input_ids"]
        assert int(la[ia].sum()) == int(lb[ib].sum()) == len(text.encode())
    assert sum(len(a(t)["input_ids"]) for t in texts) != sum(len(b(t)["input_ids"]) for t in texts)
    results = {}
    for name, tok in (("a", a), ("b", b)):
        model = make_model(tmp_path / name, tok, seed=2)
        blocks = doc_blocks(tok, texts)
        results[name] = evaluate_blocks(model, blocks, n_vocab=len(tok), batch_size=4,
                                        byte_lengths=byte_lengths_of(tok))
        assert results[name]["bits_per_byte"] == pytest.approx(
            ce_sum(model, blocks) / (LN2 * sum(len(t.encode()) for t in texts)), rel=1e-5)
    assert results["a"]["bytes"] == results["b"]["bytes"] == sum(len(t.encode()) for t in texts)
    assert results["a"]["tokens"] != results["b"]["tokens"]


def test_the_teacher_row_has_bits_per_byte(teacher_dir, student_dir, tokenizer, text_file):
    from transformers import AutoModelForCausalLM

    from lmdistill.config import DataConfig
    from lmdistill.data import build_splits

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    held = build_splits(DataConfig(source=str(text_file), block_size=32, eval_documents=30), tokenizer).eval
    lengths = byte_lengths_of(tokenizer)
    sums: dict[str, list[list[float]]] = {}
    out = evaluate_models({"s": student}, held, n_vocab=len(tokenizer), teacher=teacher, batch_size=4,
                          max_batches=2, byte_lengths=lengths, block_sums=sums)
    t, s = out["teacher"], out["s"]
    assert s["bytes"] == t["bytes"] > 0  # the same targets
    assert t["bits_per_byte"] == pytest.approx(s["teacher_bits_per_byte"], rel=1e-6)
    assert t["bits_per_byte"] < s["bits_per_byte"]  # the trained teacher beats the untrained student
    assert s["bits_per_byte"] == pytest.approx(s["ce"] * s["tokens"] / (LN2 * s["bytes"]), rel=1e-9)
    assert sum(r[4] for r in sums["s"]) == s["bytes"]
    # the teacher's own table (a teacher of another tokenizer scores its own tokens): here twice the bytes, half
    doubled = evaluate_models({"s": student}, held, n_vocab=len(tokenizer), teacher=teacher, batch_size=4,
                              max_batches=2, byte_lengths=lengths, teacher_byte_lengths=lengths * 2)
    assert doubled["teacher"]["bits_per_byte"] == pytest.approx(t["bits_per_byte"] / 2, rel=1e-6)
    assert doubled["s"]["bits_per_byte"] == pytest.approx(s["bits_per_byte"], rel=1e-6)


def test_a_tokenizer_without_byte_offsets_gives_no_bits_per_byte(student_dir, tokenizer):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    wordlevel = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", name_or_path="wordlevel-bpb")
    with pytest.warns(UserWarning, match="wordlevel-bpb"):
        assert byte_lengths_of(wordlevel) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per tokenizer, not at every evaluation
        assert byte_lengths_of(wordlevel) is None
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    r = evaluate_blocks(student, doc_blocks(tokenizer, ["the cat"]), n_vocab=len(tokenizer), byte_lengths=None)
    assert "bits_per_byte" not in r and r["tokens"] > 0


def test_the_report_ranks_bits_per_byte_lower_is_better_and_shows_the_teacher():
    from lmdistill.report import bootstrap_blocks, table_rows, verdicts, winners

    def arm(name, bpb, half):
        return {"name": name, "kind": "ce", "status": "ok", "label": name,
                "metrics": {"bits_per_byte": bpb, "perplexity": 10.0},
                "intervals": {"bits_per_byte": [bpb - half, bpb + half], "perplexity": [9.0, 11.0]}}

    results = {"arms": [arm("ce", 1.40, 0.02), arm("soft", 1.20, 0.02), arm("top", 1.30, 0.02)],
               "teacher": "t", "teacher_metrics": {"perplexity": 5.0, "bits_per_byte": 0.9876, "ece": 0.01}}
    assert winners(results)["bits_per_byte"] == ["soft"]
    results["arms"][2]["intervals"]["bits_per_byte"] = [1.21, 1.35]  # overlaps soft's: a tie
    v = verdicts(results)["bits_per_byte"]
    assert v["verdict"] == "tie" and v["best"] == "soft" and v["arms"] == ["soft", "top"]
    header, rows, _ = table_rows(results)
    col = header.index("held-out bits / byte")
    assert rows[1][col].startswith("1.2000") and rows[-1][0] == "teacher" and rows[-1][col] == "0.9876"
    # one seed: a bootstrap interval over per-block sums [tokens, CE, KL, agreements, bytes]
    blocks = [[10.0, 10.0 * c, 0.0, 5.0, 40.0] for c in (1.0, 1.5, 2.0, 2.5, 3.0, 1.2, 2.2, 2.8)]
    b = bootstrap_blocks(blocks)
    point = sum(r[1] for r in blocks) / (LN2 * sum(r[4] for r in blocks))
    assert b["bits_per_byte"][0] < point < b["bits_per_byte"][1]
    assert "bits_per_byte" not in bootstrap_blocks([r[:4] for r in blocks])  # blocks without bytes: no interval
