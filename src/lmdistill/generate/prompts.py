"""Prompts for `generate`: rows of any `datasets` source with a prompt or messages column, or the embedded default.

Every prompt has a stable id, so a rerun can tell which ones are finished even if the source was re-shuffled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.assets import EMBEDDED_QUESTIONS, wikipedia_questions
from lmdistill.errors import DataError
from lmdistill.generate.config import PromptsConfig

log = logging.getLogger(__name__)

@dataclass
class Prompt:
    """One prompt. `messages` is set for chat prompts, `text` for raw (completions) prompts; `prompt` is the text shown
    in records (the last user turn, or the raw text)."""

    id: str
    prompt: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    reference: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def _read_rows(cfg: PromptsConfig) -> list[dict[str, Any]]:
    source = cfg.source
    if source == EMBEDDED_QUESTIONS:
        return wikipedia_questions()
    if source.startswith("embedded:"):
        raise DataError(f"unknown embedded prompt source `{source}`; the embedded one is `{EMBEDDED_QUESTIONS}`")
    path = Path(source)
    # JSON Lines are read directly: the commonest case, and no Arrow cache is written next to the user's data.
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            bad_line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"prompt file `{path}` line {bad_line} is not valid UTF-8 ({e.reason}); re-encode the file "
                            "as UTF-8") from None
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError as e:
                raise DataError(f"prompt file `{path}` is not valid JSON: {e}") from None
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"prompt file `{path}` line {lineno} is not valid JSON ({e.msg}); fix or remove that "
                                "line") from None
        return rows
    import datasets

    try:
        if path.is_file():
            kind = {".parquet": "parquet", ".csv": "csv", ".txt": "text"}.get(path.suffix)
            if kind is None:
                raise DataError(f"prompt file `{path}`: unsupported type; use .jsonl, .json, .parquet or .csv")
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=cfg.split)
        else:
            ds = datasets.load_dataset(source, cfg.hub_config, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types for "not found"; all mean the same to the user
        raise DataError(
            f"could not load prompts from `{source}` (split `{cfg.split}`): {e}. Give a local .jsonl/.parquet file, a "
            f"directory, a hub dataset name, or `{EMBEDDED_QUESTIONS}`"
        ) from None
    return list(ds)


def _hash_id(payload: Any) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def load_prompts(cfg: PromptsConfig, api: str = "chat") -> list[Prompt]:
    """Read prompts, give each an id, and check they fit the API (`chat` needs messages or a prompt column, `completions`
    a prompt column).

    Raises:
        DataError: the source is missing, empty, lacks the needed column, or repeats an id.
    """
    rows = _read_rows(cfg)
    if not rows:
        raise DataError(f"prompt source `{cfg.source}` has no rows")
    if cfg.max_prompts is not None:
        rows = rows[: cfg.max_prompts]
    columns = set(rows[0])
    has_messages = cfg.messages_column in columns
    if api == "completions" and cfg.prompt_column not in columns:
        raise DataError(
            f"prompt source `{cfg.source}` has no `{cfg.prompt_column}` column, which teacher.api=completions needs; "
            f"columns: {sorted(columns)} (set prompts.prompt_column)"
        )
    if not has_messages and cfg.prompt_column not in columns:
        raise DataError(
            f"prompt source `{cfg.source}` has neither a `{cfg.messages_column}` nor a `{cfg.prompt_column}` column; "
            f"columns: {sorted(columns)} (set prompts.messages_column or prompts.prompt_column)"
        )
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    merged = 0
    for index, row in enumerate(rows):
        reference = row.get(cfg.reference_column)
        if api == "completions":
            text = str(row[cfg.prompt_column])
            messages, shown = None, text
        else:
            text = None
            if has_messages:
                messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row[cfg.messages_column]]
                if not messages:
                    raise DataError(f"prompt row {index} of `{cfg.source}` has an empty `{cfg.messages_column}` list")
            else:
                messages = [{"role": "user", "content": str(row[cfg.prompt_column])}]
            if cfg.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
            users = [m["content"] for m in messages if m["role"] == "user"]
            shown = users[-1] if users else messages[-1]["content"]
        if not str(shown).strip():
            raise DataError(
                f"prompt row {index} of `{cfg.source}` is empty, so the teacher has nothing to answer; remove it or "
                "fill it in"
            )
        if cfg.id_column in row and row[cfg.id_column] is not None:
            pid = str(row[cfg.id_column])
            if pid in seen:
                raise DataError(
                    f"prompt id `{pid}` appears at rows {seen[pid]} and {index} of `{cfg.source}`; ids must be unique "
                    f"(fix the `{cfg.id_column}` column or point prompts.id_column at a unique one)"
                )
        else:
            pid = _hash_id(messages if messages is not None else text)
            if pid in seen:
                merged += 1
                continue
        seen[pid] = index
        prompts.append(Prompt(id=pid, prompt=shown, messages=messages, text=text, reference=reference))
    if merged:
        log.warning("%d duplicate prompts in `%s` were merged (same text, no id column)", merged, cfg.source)
    return prompts
