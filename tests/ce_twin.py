"""The honest baseline of a quality test: the CE twin of a tiny distillation run.

A distilled student has to beat plain cross-entropy training on the same terms, not an untrained student (which CE
training beats too). The twin is `lmdistill hard --loss.alpha 0` (CE on the ground truth only, see recipes/hard.py)
with the same student initialisation, data, step budget and seed; its run evaluates against the online teacher, so
its summary has the held-out KL to the teacher that distillation targets. Twins are memoised per session: several
tests compare with the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import soft_overrides
from lmdistill.config import HardConfig, load_config
from lmdistill.recipes.hard import run_hard

_TWINS: dict[tuple[str, ...], dict[str, Any]] = {}
# the shared terms of a run; everything else (loss.*, teacher_cache, rollout.*, signal, ...) belongs to the method
_SHARED = ("teacher.name_or_path", "teacher.revision", "student.", "data.", "train.")


def ce_twin_of(args: list[str]) -> dict[str, Any]:
    """The summary of the CE run on the shared terms of a method's CLI-style overrides `args` (--key value ...)."""
    pairs = list(zip(args[::2], args[1::2], strict=True))
    shared = [(k, v) for k, v in pairs if k.removeprefix("--").startswith(_SHARED)]
    key = tuple(x for kv in shared for x in kv if not kv[0] == "--train.output_dir")
    if key not in _TWINS:
        cfg = load_config(HardConfig, None, [x for kv in shared for x in kv] + ["--loss.alpha", "0"])
        assert cfg.mode == "token" and cfg.loss.alpha == 0 and cfg.teacher_cache is None
        _TWINS[key] = run_hard(cfg)
    return _TWINS[key]


def ce_twin(teacher_dir: Path, student_dir: Path, data: Path, out: Path, **extra: str) -> dict[str, Any]:
    """The CE twin of the run `soft_overrides(teacher_dir, student_dir, data, out, **extra)` configures."""
    return ce_twin_of(soft_overrides(teacher_dir, student_dir, data, out, **extra))
