"""The byte string of every token of a tokenizer, and text tokenized with exact byte offsets.

Cross-tokenizer alignment (lmdistill.align) and bits per byte (lmdistill.evaluate) are computed from these. Bytes
come from the vocabulary, not from decoding: decoded strings break on tokens that hold part of a UTF-8 character
(byte-level BPE splits an emoji over two tokens; SentencePiece's byte fallback spells it as `<0xF0>` ...), and a
tokenizer's character offsets cannot say where inside a character a token ends.

Two families of fast tokenizers are read: byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM: every character of a token
string stands for one byte) and SentencePiece-style (Llama 2, Gemma, Mistral: `▁` for a space, `<0xNN>` for a byte).
Special tokens have no bytes (None). `encode_bytes` checks, on every text it tokenizes, that the tokens' bytes spell
the text, so a tokenizer this module misreads is refused with its name instead of misaligned.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from lmdistill.errors import ConfigError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPIECE_SPACE = "\u2581"


class ByteOffsetError(ConfigError):
    """A tokenizer whose tokens cannot be mapped to the bytes of the text they came from."""


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character of each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = _byte_level_decoder()


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def _decoder_kinds(tokenizer: Any) -> set[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ByteOffsetError(
            f"tokenizer `{tokenizer_name(tokenizer)}` is a slow (Python) tokenizer, which gives no byte offsets; "
            "load its fast version (AutoTokenizer.from_pretrained(..., use_fast=True), a tokenizer.json)"
        )
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return {str(p.get("type")) for p in parts if p}


@lru_cache(maxsize=16)
def token_bytes(tokenizer: Any) -> tuple[bytes | None, ...]:
    """The bytes of every token id in `range(len(tokenizer))`; None for special tokens (they spell no text)."""
    kinds = _decoder_kinds(tokenizer)
    byte_level = "ByteLevel" in kinds
    if not byte_level and not kinds & {"Metaspace", "ByteFallback", "Replace"}:
        raise ByteOffsetError(
            f"tokenizer `{tokenizer_name(tokenizer)}` has a decoder ({', '.join(sorted(kinds)) or 'none'}) that is "
            "neither byte-level BPE nor SentencePiece-style, so its tokens' bytes are unknown; cross-tokenizer "
            "alignment and bits per byte need one of those two"
        )
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()} if hasattr(tokenizer,
                                                                                "added_tokens_decoder") else {}
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if not byte_level and piece is not None and (m := _BYTE_TOKEN.match(piece)) is not None:
            out.append(bytes([int(m.group(1), 16)]))  # byte fallback, even where registered as a special token
        elif i in special or piece is None or (i in added and getattr(added[i], "special", False)):
            out.append(None)
        elif i in added:  # a plain added token is its literal text
            out.append(str(added[i].content).encode("utf-8"))
        elif byte_level:
            try:
                out.append(bytes(_BYTE_OF_CHAR[c] for c in piece))
            except KeyError:
                out.append(piece.encode("utf-8"))
        else:
            out.append(piece.replace(SPIECE_SPACE, " ").encode("utf-8"))
    return tuple(out)


def token_byte_lengths(tokenizer: Any) -> Tensor:
    """[len(tokenizer)] int64: bytes each token spells (0 for special tokens), for bits per byte."""
    return torch.tensor([len(b) if b is not None else 0 for b in token_bytes(tokenizer)], dtype=torch.long)


def encode_bytes(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """`text` tokenized without special tokens, and the byte offset where each token ends in `text.encode()`.

    Raises ByteOffsetError when the tokens do not spell the text (a normalizer that rewrites it: lowercasing,
    NFKC, ...), naming the tokenizer. A dummy-prefix space (SentencePiece's "▁Hello" for "Hello") is allowed for and
    not counted.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    table = token_bytes(tokenizer)
    pieces = [table[i] if i < len(table) else None for i in ids]
    if any(p is None for p in pieces):
        bad = next(i for i, p in zip(ids, pieces, strict=True) if p is None)
        raise ByteOffsetError(
            f"tokenizer `{tokenizer_name(tokenizer)}` turned plain text into the special token {bad} "
            f"({tokenizer.convert_ids_to_tokens(bad)!r}); the text contains a special token's spelling. Remove it "
            "from the data or use a tokenizer that does not parse special tokens in text"
        )
    spelled = b"".join(p for p in pieces if p is not None)
    want = text.encode("utf-8")
    skip = 0
    if spelled != want:
        if spelled == b" " + want:
            skip = 1
        else:
            at = next((i for i, (a, b) in enumerate(zip(spelled, want, strict=False)) if a != b),
                      min(len(spelled), len(want)))
            raise ByteOffsetError(
                f"tokenizer `{tokenizer_name(tokenizer)}` does not spell its input back byte for byte (first "
                f"difference at byte {at}: {want[max(0, at - 8):at + 8]!r} became {spelled[max(0, at - 8):at + 8]!r})"
                "; it normalizes text (lowercase, unicode forms, ...), so its tokens have no byte offsets in the "
                "text and cannot be aligned with another tokenizer's"
            )
    ends, pos = [], -skip
    for p in pieces:
        assert p is not None
        pos += len(p)
        ends.append(max(pos, 0))
    return list(ids), ends
