"""token_bytes: every token's bytes, and exact byte offsets of tokenized text, for the two tokenizer families it reads
(byte-level BPE, SentencePiece-style with byte fallback), on random text with emoji, accents, CJK, newlines and tabs;
a normalizing tokenizer is refused by name."""

from __future__ import annotations

import json
import random

import pytest

from conftest import synthetic_sentences
from lmdistill.token_bytes import SPIECE_SPACE, ByteOffsetError, encode_bytes, token_byte_lengths, token_bytes

PIECES = ["the", "cat", "sees", "café", "naïve", "Ærøskøbing", "über", "漢字", "日本語", "한국어", "😀", "👍🏽", "🇫🇷",
          "e\u0301", "Straße", "€5", "—", "x²", "\n", "\t", "  ", " ", "\n\n", "a\tb", "<", "0x"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(PIECES) for _ in range(rng.randint(1, 24))]
        out.append("".join(w + rng.choice(["", " ", " ", "\n", "\t"]) for w in words))
    return out


def spiece_tokenizer(*, metaspace: bool, vocab_size: int = 200, name: str = "spiece-test"):
    """A SentencePiece-style fast tokenizer (Llama 2 / Gemma family): BPE with byte fallback, `▁` for a space, the
    256 `<0xNN>` byte tokens in the vocabulary; with a Metaspace pre-tokenizer, or none (a `▁` dummy prefix)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    if metaspace:
        tok.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first")
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE),
                                               normalizers.Replace(" ", SPIECE_SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(synthetic_sentences(300, seed=1) + ["café naïve über"], trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte fallback needs every byte token
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", name_or_path=name)


@pytest.fixture(scope="module", params=["byte_level", "spiece_metaspace", "spiece_prefix"])
def any_tokenizer(request, tokenizer):
    if request.param == "byte_level":
        return tokenizer
    return spiece_tokenizer(metaspace=request.param == "spiece_metaspace")


def test_tokens_spell_random_unicode_text_byte_for_byte(any_tokenizer):
    table = token_bytes(any_tokenizer)
    lengths = token_byte_lengths(any_tokenizer)
    assert lengths.shape == (len(any_tokenizer),)
    for text in random_texts(40):
        ids, ends = encode_bytes(any_tokenizer, text)
        want = text.encode("utf-8")
        assert len(ends) == len(ids) and ends[-1] == len(want)
        assert all(a <= b for a, b in zip(ends, ends[1:], strict=False))
        spelled = b"".join(table[i] or b"" for i in ids)
        # a SentencePiece dummy prefix spells one extra leading space, which the offsets leave out
        assert spelled in (want, b" " + want)
        assert int(lengths[ids].sum()) == len(spelled)
        # each token's end offset is where its bytes end in the text
        skip = len(spelled) - len(want)
        pos = -skip
        for i, end in zip(ids, ends, strict=True):
            pos += len(table[i] or b"")
            assert end == max(pos, 0)


def test_special_tokens_have_no_bytes(any_tokenizer):
    lengths = token_byte_lengths(any_tokenizer)
    table = token_bytes(any_tokenizer)
    # the named special tokens, and added tokens marked special (the conftest tokenizer's <|im_start|>, <|im_end|>)
    special = set(any_tokenizer.all_special_ids) | {i for i, t in any_tokenizer.added_tokens_decoder.items()
                                                    if t.special}
    assert special
    for i in special:
        assert table[i] is None and int(lengths[i]) == 0
    # every other token spells at least one byte
    others = [i for i in range(len(any_tokenizer)) if i not in special]
    assert int(lengths[others].min()) >= 1


def test_byte_fallback_and_byte_level_tokens_are_single_bytes(tokenizer):
    sp = spiece_tokenizer(metaspace=True)
    ids, ends = encode_bytes(sp, "😀")  # not in the vocabulary: four <0xNN> byte tokens (after the dummy prefix)
    assert sp.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert ends[-4:] == [1, 2, 3, 4]
    # a literal "▁" in the text reads back as a space (SentencePiece cannot tell them apart): refused, not misaligned
    with pytest.raises(ByteOffsetError, match="spiece-test"):
        encode_bytes(sp, "a\u2581b")
    # byte-level BPE: every character of a token string stands for one byte ("Ġ" is the space)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    assert token_bytes(tokenizer)[space] == b" "


def test_a_normalizing_tokenizer_is_refused_by_name():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_sentences(100), trainer=trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", name_or_path="lowercasing-tok")
    assert encode_bytes(fast, "the cat")[1][-1] == 7  # text it does not change is fine
    with pytest.raises(ByteOffsetError, match="lowercasing-tok") as e:
        encode_bytes(fast, "The Cat")
    assert "normalizes" in str(e.value)


def test_a_tokenizer_of_neither_family_is_refused_by_name():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "cat": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", name_or_path="wordlevel-tok")
    with pytest.raises(ByteOffsetError, match="wordlevel-tok"):
        token_byte_lengths(fast)
