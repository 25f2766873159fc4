"""From raw teacher completions to training data: reasoning-trace handling, length/duplicate filters, and a verifier
for R1-style rejection sampling. Each dropped sample is counted under the first filter that drops it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lmdistill.errors import ConfigError, DataError
from lmdistill.generate.config import FilterConfig

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
# Order in which filters run, which is also the order of the report.
FILTERS = ("unclosed_think", "truncated", "too_short", "too_long", "no_reference", "verifier", "duplicate")

Verifier = Callable[[str, Any], bool]


def strip_think(text: str) -> str | None:
    """The completion without its reasoning: the text after the last `</think>`.

    Also covers chat templates that open `<think>` inside the prompt (the completion has only the closing tag).
    Returns None when a `<think>` block never closes (a trace cut off before its answer).
    """
    if THINK_CLOSE in text:
        return text.rsplit(THINK_CLOSE, 1)[1].lstrip()
    if THINK_OPEN in text:
        return None
    return text


def _boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}`, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(completion: str) -> str:
    """The final answer in a completion: reasoning removed, then the last `\\boxed{...}`, else the text after the last
    `answer:` / `answer is`, else the whole remaining text."""
    text = strip_think(completion) or ""
    boxed = _boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(re.finditer(r"answer(?:\s+is|\s*:)\s*", text, flags=re.IGNORECASE))
    if matches:
        return text[matches[-1].end() :].strip()
    return text.strip()


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding quotes/punctuation/markdown emphasis removed."""
    text = " ".join(str(text).casefold().split())
    return text.strip(" \t\n.,;:!?\"'`*_()[]")


def exact_match(completion: str, reference: Any) -> bool:
    """Built-in `exact` verifier: the extracted answer equals the reference after `normalise`."""
    return normalise(extract_answer(completion)) == normalise(str(reference))


def parse_number(text: str) -> float | None:
    """The last number in `text` (thousands separators allowed), or None."""
    found = _NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def numeric_match(completion: str, reference: Any) -> bool:
    """Built-in `numeric` verifier: the last number of the extracted answer equals the reference number."""
    expected = float(reference) if isinstance(reference, int | float) else parse_number(str(reference))
    got = parse_number(extract_answer(completion))
    if expected is None or got is None:
        return False
    return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)


BUILTIN_VERIFIERS: dict[str, Verifier] = {"exact": exact_match, "numeric": numeric_match}


def load_verifier(spec: str) -> Verifier:
    """`exact`, `numeric`, or `package.module:function` / `package.module.function` taking (completion, reference).

    Raises:
        ConfigError: the module or function cannot be found, or is not callable with two arguments.
    """
    if spec in BUILTIN_VERIFIERS:
        return BUILTIN_VERIFIERS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"filters.verifier `{spec}` is neither a built-in ({', '.join(BUILTIN_VERIFIERS)}) nor a dotted path like "
            "`mypackage.checks:is_correct`"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"filters.verifier `{spec}`: cannot import `{module_name}` ({e}); is it on PYTHONPATH?") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ConfigError(f"filters.verifier `{spec}`: `{module_name}` has no callable `{attr}`")
    try:
        inspect.signature(func).bind("completion", "reference")
    except TypeError:
        raise ConfigError(f"filters.verifier `{spec}` must accept (completion, reference)") from None
    except ValueError:
        pass  # builtins without a signature: trust them
    return func


@dataclass
class FilterReport:
    """How many samples came in, how many were kept, and how many each filter dropped."""

    total: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    prompts: int = 0
    prompts_without_sample: int = 0
    verifier_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"kept {self.kept} of {self.total} samples ({self.prompts} prompts, "
               f"{self.prompts_without_sample} left without a sample)"]
        out += [f"  dropped by {name}: {count}" for name, count in self.dropped.items()]
        if self.verifier_errors:
            out.append(f"  (the verifier raised on {self.verifier_errors} samples; they count as rejected)")
        return out


def _set_completion(record: dict[str, Any], text: str) -> dict[str, Any]:
    out = copy.deepcopy(record)
    out["completion"] = text
    messages = out.get("messages")
    if messages and messages[-1].get("role") == "assistant":
        messages[-1]["content"] = text
    return out


def filter_records(records: list[dict[str, Any]], cfg: FilterConfig) -> tuple[list[dict[str, Any]], FilterReport]:
    """Apply think handling and filters; return the kept records (completions rewritten when think=strip) and a report.

    Raises:
        DataError: a verifier is set but no record carries `cfg.reference_field`.
    """
    verifier = load_verifier(cfg.verifier) if cfg.verifier else None
    if verifier is not None and records and not any(r.get(cfg.reference_field) is not None for r in records):
        raise DataError(
            f"filters.verifier is set but no record has a `{cfg.reference_field}` field; give the prompts a reference "
            "column (prompts.reference_column) or set filters.reference_field"
        )
    report = FilterReport(total=len(records))
    seen_global: set[str] = set()
    seen_per_prompt: dict[str, set[str]] = {}
    kept: list[dict[str, Any]] = []
    first_error: Exception | None = None
    for record in records:
        raw = str(record.get("completion", ""))
        answer = strip_think(raw)
        reason = None
        if answer is None and (cfg.think == "strip" or verifier is not None):
            reason = "unclosed_think"
        text = (answer or "") if cfg.think == "strip" else raw
        if reason is None and cfg.drop_truncated and record.get("finish_reason") == "length":
            reason = "truncated"
        if reason is None and len(text.strip()) < cfg.min_chars:
            reason = "too_short"
        if reason is None and cfg.max_chars is not None and len(text) > cfg.max_chars:
            reason = "too_long"
        if reason is None and verifier is not None:
            reference = record.get(cfg.reference_field)
            if reference is None:
                reason = "no_reference"
            else:
                try:
                    ok = bool(verifier(raw, reference))
                except Exception as e:  # noqa: BLE001  (a user's verifier; counted, first one logged)
                    report.verifier_errors += 1
                    first_error = first_error or e
                    ok = False
                if not ok:
                    reason = "verifier"
        if reason is None and cfg.dedup != "none":
            key = " ".join(text.casefold().split())
            seen = seen_global if cfg.dedup == "global" else seen_per_prompt.setdefault(str(record.get("id")), set())
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        kept.append(_set_completion(record, text) if text != raw else record)
    if first_error is not None:
        log.warning("the verifier raised on %d samples; first error: %r", report.verifier_errors, first_error)
    ids = Counter(str(r.get("id")) for r in records)
    kept_ids = {str(r.get("id")) for r in kept}
    report.kept = len(kept)
    report.prompts = len(ids)
    report.prompts_without_sample = sum(1 for i in ids if i not in kept_ids)
    return kept, report
