"""Set-up shared by the recipes: teacher, tokenizer, student, shared vocab, data splits; the run's end (the
exported student and its summary)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmdistill.config import DataConfig, ModelConfig, StudentConfig, TrainConfig, dump_config
from lmdistill.data import DataSplits, build_splits, check_block_size
from lmdistill.errors import write_failure
from lmdistill.models import build_student, count_parameters, load_teacher, load_tokenizer, shared_vocab_size
from lmdistill.train.distributed import shards_parameters
from lmdistill.train.logging import read_log
from lmdistill.train.loop import save_student

log = logging.getLogger(__name__)


@dataclass
class Setup:
    tokenizer: Any
    teacher: nn.Module | None
    student: nn.Module
    n_vocab: int
    splits: DataSplits


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def build_setup(teacher_cfg: ModelConfig, student_cfg: StudentConfig, data_cfg: DataConfig, train_cfg: TrainConfig,
                *, load_teacher_model: bool = True) -> Setup:
    """Teacher (frozen) + its tokenizer, the student, the shared vocab size and tokenised data."""
    seed_everything(train_cfg.seed)
    t_tok = load_tokenizer(teacher_cfg.name_or_path, revision=teacher_cfg.revision,
                           trust_remote_code=teacher_cfg.trust_remote_code)
    teacher = load_teacher(teacher_cfg) if load_teacher_model or student_cfg.init == "prune" else None
    teacher_config = teacher.config if teacher is not None else _config_of(teacher_cfg)
    student = build_student(student_cfg, teacher, teacher_config, len(t_tok), seed=train_cfg.seed)
    if student_cfg.init == "pretrained":
        s_tok = load_tokenizer(student_cfg.name_or_path or "", trust_remote_code=student_cfg.trust_remote_code)
    else:
        s_tok = t_tok
    n_vocab = shared_vocab_size(t_tok, s_tok, teacher, student)
    check_block_size(data_cfg.block_size, student.config)
    if teacher is not None:
        check_block_size(data_cfg.block_size, teacher.config)
    if not load_teacher_model:
        teacher = None
    splits = build_splits(data_cfg, s_tok)
    return Setup(tokenizer=s_tok, teacher=teacher, student=student, n_vocab=n_vocab, splits=splits)


def _config_of(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig

    from lmdistill.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)


def describe(setup: Setup) -> dict[str, Any]:
    info = {
        "student_parameters": count_parameters(setup.student),
        "student_trainable": count_parameters(setup.student, trainable_only=True),
        "vocab": setup.n_vocab,
        "train_blocks": len(setup.splits.train),
        "eval_blocks": len(setup.splits.eval),
        "train_target_tokens": setup.splits.train.n_target_tokens,
    }
    if setup.teacher is not None:
        info["teacher_parameters"] = count_parameters(setup.teacher)
    return info


def write_summary(output_dir: str | Path, cfg: Any, summary: dict[str, Any]) -> Path:
    """config.yaml and summary.json; summary.json is written last and atomically: it marks a finished run."""
    out = Path(output_dir)
    path = out / "summary.json"
    tmp = out / ".tmp-summary.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure("run summary", path, e) from None
    return path


def finish_run(trainer: Any, tokenizer: Any, cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Save the student, add its path, the log and the first/last held-out metrics to `summary`, write it.

    Called on every rank (a sharded student's weights are gathered collectively); rank 0 writes.
    """
    out = Path(cfg.train.output_dir)
    # sharded engines gather the full weights collectively (every rank calls this); rank 0 writes them
    full_state = trainer.accelerator.get_state_dict(trainer.model) if shards_parameters(trainer.accelerator) else None
    if trainer.is_main:
        summary["student_dir"] = str(save_student(trainer.unwrapped, tokenizer, out / "student", state_dict=full_state))
        summary["log"] = str(out / "log.jsonl")
        rows = read_log(out / "log.jsonl") if (out / "log.jsonl").is_file() else []
        evals = [{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/") or k == "step"}
                 for r in rows if any(k.startswith("eval/") for k in r)]
        if evals:
            summary["eval_first"], summary["eval_last"] = evals[0], evals[-1]
        write_summary(out, cfg, summary)
    trainer.accelerator.wait_for_everyone()
    return summary
