"""`embedded:gemma3-270m`: the Gemma-3-270M GGUF from its chunk packages, checked, converted once and loaded offline
(vocab 262,144, a fast tokenizer that spells unicode text back byte for byte, finite logits)."""

from __future__ import annotations

import pytest
import torch


def _gemma_missing() -> str | None:
    from lmdistill import assets
    from lmdistill.errors import AssetError

    if (assets.cache_root() / f"gemma3-270m-v{assets._CONVERSION_VERSION}" / "model.safetensors").is_file():
        return None
    try:
        assets.gemma_parts()
    except AssetError as e:
        return str(e)
    try:
        import gguf  # noqa: F401  (needed once, to convert the GGUF)
    except ImportError:
        return f"converting the Gemma GGUF needs the `gguf` package: {assets.GEMMA_INSTALL_HINT}"
    return None


MISSING = _gemma_missing()
needs_gemma = pytest.mark.skipif(MISSING is not None, reason=f"Gemma-3-270M packages not installed: {MISSING}")

TEXTS = [
    "Café naïve résumé, Ångström and Straße.",
    "Emoji 😀👍🏽🇫🇷 and a family 👨‍👩‍👧 in one line",
    "日本語のテキストと中文，한국어도.",
    "line one\nline two\n\n\ttabbed\t\tand  two  spaces ",
    " leading space, math ∑ ≠ √2, and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def gemma():
    if MISSING is not None:
        pytest.skip(f"Gemma-3-270M packages not installed: {MISSING}")
    from lmdistill.assets import EMBEDDED_GEMMA
    from lmdistill.config import ModelConfig
    from lmdistill.models import load_teacher, load_tokenizer

    return load_tokenizer(EMBEDDED_GEMMA), load_teacher(ModelConfig(name_or_path=EMBEDDED_GEMMA))


@pytest.mark.assets
def test_gemma_loads_with_its_full_vocabulary(gemma):
    tok, model = gemma
    assert tok.is_fast
    assert len(tok) == 262_144
    assert model.config.vocab_size == 262_144
    assert model.get_input_embeddings().weight.shape[0] == 262_144
    assert type(model).__name__ == "Gemma3ForCausalLM"


@pytest.mark.assets
@pytest.mark.parametrize("text", TEXTS)
def test_gemma_tokenizer_round_trips_unicode_text(gemma, text):
    tok, _ = gemma
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    with_bos = tok(text).input_ids
    assert with_bos[0] == tok.bos_token_id and with_bos[1:] == ids
    assert tok.decode(with_bos, skip_special_tokens=True) == text


@pytest.mark.assets
@pytest.mark.parametrize("text", TEXTS)
def test_gemma_tokens_have_byte_offsets(gemma, text):
    from lmdistill.token_bytes import encode_bytes

    tok, _ = gemma
    ids, ends = encode_bytes(tok, text)
    assert ids == tok(text, add_special_tokens=False).input_ids
    assert ends == sorted(ends) and ends[-1] == len(text.encode("utf-8"))


@pytest.mark.assets
def test_gemma_forward_gives_finite_logits_and_knows_paris(gemma):
    tok, model = gemma
    prompt = tok("The capital of France is").input_ids  # <bos> + 5 tokens
    ids = torch.tensor([tok("The capital of France is a city on the Seine").input_ids[:8]])
    assert ids[0, : len(prompt)].tolist() == prompt
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 8, 262_144) and torch.isfinite(logits).all()
    # a sanity check of the dequantized weights: the converted model ranks " Paris" third after the prompt
    top = [tok.decode([int(i)]) for i in logits[0, len(prompt) - 1].topk(5).indices]
    assert " Paris" in top, top


@pytest.mark.assets
def test_gemma_chat_template_uses_gemma_turns(gemma):
    tok, _ = gemma
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.assets
@needs_gemma
def test_gemma_chunks_are_checked_against_the_checksum(tmp_path, monkeypatch):
    from lmdistill import assets
    from lmdistill.errors import AssetError

    try:
        assets.gemma_parts()
    except AssetError as e:
        pytest.skip(f"chunk packages not installed (converted copy only): {e}")
    out = assets.assemble_gemma_gguf(tmp_path / "g.gguf")
    assert out.stat().st_size == 253_113_024
    monkeypatch.setattr(assets, "GEMMA_SHA256", "0" * 64)
    with pytest.raises(AssetError, match="sha256"):
        assets.assemble_gemma_gguf(tmp_path / "g.gguf")


def test_unknown_embedded_teacher_names_the_embedded_ones():
    from lmdistill.errors import ConfigError
    from lmdistill.models import resolve_model_path

    with pytest.raises(ConfigError, match="embedded:gemma3-270m"):
        resolve_model_path("embedded:gemma3-1b")


def test_conversion_runs_once_under_the_lock(tmp_path):
    """Concurrent first uses: one builds (into a temporary sibling, renamed), the others wait and find it built."""
    import threading
    import time

    from lmdistill.assets import _converted

    target, calls = tmp_path / "model-v1", []

    def build(tmp):
        calls.append(tmp)
        tmp.mkdir()
        time.sleep(0.3)
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"x")

    results = []
    threads = [threading.Thread(target=lambda: results.append(_converted(target, build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3 and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model-v1.lock", "model-v1"]


def test_a_failed_conversion_leaves_nothing_half_written(tmp_path):
    from lmdistill.assets import _converted

    def build(tmp):
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _converted(tmp_path / "model-v1", build)
    assert [p.name for p in tmp_path.iterdir()] == [".model-v1.lock"]
