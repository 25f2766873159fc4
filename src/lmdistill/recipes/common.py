"""What every recipe shares: the student and data set-up, and `run_recipe`, which takes a recipe's models, step loss
and evaluation through accelerator -> engine check -> Trainer -> teacher placement -> fit -> export and summary."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import Tensor, nn

from lmdistill.cache.reader import CachedTeacher
from lmdistill.config import CodistillConfig, CoModelConfig, ModelConfig, StudentRunConfig, dump_config
from lmdistill.data import DataSplits, TokenBlocks, build_splits, check_block_size
from lmdistill.errors import ConfigError, ModelLoadError, write_failure
from lmdistill.evaluate import byte_lengths_of
from lmdistill.io import atomic_dir, write_json
from lmdistill.models import (
    build_student,
    count_parameters,
    load_teacher,
    load_tokenizer,
    resolve_model_path,
    shared_vocab_size,
)
from lmdistill.teachers import HFTeacher
from lmdistill.train.distributed import (
    check_supported,
    prepare_frozen,
    shards_parameters,
    unsharded_replica,
    without_tied_copies,
)
from lmdistill.train.logging import read_log
from lmdistill.train.loop import (
    EvalFn,
    LossFn,
    RolloutFn,
    Stateful,
    StepHook,
    Trained,
    Trainer,
    TrainResult,
    make_accelerator,
)
from lmdistill.train.prefetch import PrepareFn


@dataclass
class Setup:
    tokenizer: Any
    teacher: nn.Module | None
    student: nn.Module
    n_vocab: int
    splits: DataSplits | None
    teacher_tokenizer: Any = None  # set where it differs from the student's (cross-tokenizer distillation)

    @property
    def byte_lengths(self) -> Tensor | None:
        """[len(tokenizer)] bytes each token spells, for held-out bits per byte (None: bytes unknown)."""
        return byte_lengths_of(self.tokenizer)


def build_setup(cfg: StudentRunConfig, *, teacher: bool, data: bool = True, cross_tokenizer: bool = False,
                teacher_tokenizer: bool = False) -> Setup:
    """The student (every recipe builds it here), the tokenizer that reads the data, the shared vocab, the data splits
    (`data`), and the frozen teacher when the recipe runs it (`teacher`).

    `cfg` has `teacher`, `student`, `data` and `train` sections. init=pretrained touches no teacher unless `teacher`
    (or `teacher_tokenizer`: its tokenizer alone, for a served teacher of another tokenizer):
    the student's own tokenizer reads the data (the teacher may be only text or log-probs in a file). init=prune and
    init=config build the student from the teacher's weights or config, with its tokenizer.
    """
    set_seed(cfg.train.seed)
    s_cfg = cfg.student
    t_tok = None
    if teacher or teacher_tokenizer or s_cfg.init != "pretrained":
        t_tok = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
    model = load_teacher(cfg.teacher) if teacher or s_cfg.init == "prune" else None
    if s_cfg.init == "pretrained":
        tokenizer = load_tokenizer(s_cfg.name_or_path or "", trust_remote_code=s_cfg.trust_remote_code)
    else:
        assert t_tok is not None
        tokenizer = t_tok
    base_config = None
    if s_cfg.init == "config":
        base_config = model.config if model is not None else teacher_config(cfg.teacher)
    student = build_student(s_cfg, tokenizer, teacher=model, teacher_config=base_config, seed=cfg.train.seed)
    if not teacher:
        model = None
    other_tokenizer = cross_tokenizer and t_tok is not None and t_tok.get_vocab() != tokenizer.get_vocab()
    if other_tokenizer:  # each model scores its own vocabulary; lmdistill.align relates them
        if s_cfg.init != "pretrained":
            raise ConfigError("loss.cross_tokenizer needs a student with its own tokenizer: student.init=pretrained "
                              f"(init={s_cfg.init} builds the student with the teacher's tokenizer)")
        n_vocab = shared_vocab_size(tokenizer, tokenizer, None, student)
        shared_vocab_size(t_tok, t_tok, model, None)
    else:
        n_vocab = shared_vocab_size(t_tok or tokenizer, tokenizer, model, student)
    for m in (student, model):
        if m is not None:
            check_block_size(cfg.data.block_size, m.config)
    splits = build_splits(cfg.data, tokenizer) if data else None
    return Setup(tokenizer=tokenizer, teacher=model, student=student, n_vocab=n_vocab, splits=splits,
                 teacher_tokenizer=t_tok if other_tokenizer else None)


def build_co_setup(cfg: CodistillConfig) -> Setup:
    """Co-distillation's tokenizer, teacher (seed train.seed) and student (seed train.seed + 1), both trainable, their
    shared vocab and the data splits."""
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    teacher = _co_model(cfg.teacher, tokenizer, seed=cfg.train.seed, what="teacher")
    student = _co_model(cfg.student, tokenizer, seed=cfg.train.seed + 1, what="student")
    n_vocab = shared_vocab_size(tokenizer, tokenizer, teacher, student)
    for model in (teacher, student):
        check_block_size(cfg.data.block_size, model.config)
    return Setup(tokenizer, teacher, student, n_vocab, build_splits(cfg.data, tokenizer))


def _co_model(cfg: CoModelConfig, tokenizer: Any, *, seed: int, what: str) -> nn.Module:
    if cfg.init == "pretrained":  # the checkpoint's own tokenizer, when it has one, must be the shared one
        try:
            shared_vocab_size(tokenizer, load_tokenizer(cfg.name_or_path or "",
                                                        trust_remote_code=cfg.trust_remote_code))
        except ModelLoadError:
            pass  # a bare checkpoint without a tokenizer: only the embedding size can be checked
    return build_student(cfg, tokenizer, seed=seed, what=what)


def open_cache(root: str, setup: Setup, data_params: dict[str, Any], **checks: Any) -> tuple[CachedTeacher,
                                                                                                CachedTeacher | None]:
    """The cache's train split and, when it was labelled, its eval split, checked against this run's tokenizer, data
    and `checks` (temperature, loss kind)."""
    assert setup.splits is not None

    def split(name: str) -> CachedTeacher:
        return CachedTeacher(root, name, tokenizer=setup.tokenizer, blocks=getattr(setup.splits, name),
                             data_params=data_params, **checks)

    train = split("train")
    has_eval = "eval" in train.manifest.header["data"]["splits"] and len(setup.splits.eval) > 0
    return train, split("eval") if has_eval else None


def teacher_config(cfg: ModelConfig) -> Any:
    """The teacher's transformers config, without loading its weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(cfg.name_or_path), revision=cfg.revision,
                                      trust_remote_code=cfg.trust_remote_code)


def describe(setup: Setup, train: TokenBlocks, held: TokenBlocks) -> dict[str, Any]:
    info = {
        "student_parameters": count_parameters(setup.student),
        "student_trainable": count_parameters(setup.student, trainable_only=True),
        "vocab": setup.n_vocab,
        "train_blocks": len(train),
        "eval_blocks": len(held),
        "train_target_tokens": train.n_target_tokens,
    }
    if setup.teacher is not None:
        info["teacher_parameters"] = count_parameters(setup.teacher)
    return info


@dataclass
class Recipe:
    """A recipe as `run_recipe` runs it.

    name: the recipe's name in the checkpoint and summary (`soft`, `hard-token`, `codistill`, ...).
    cfg: the command's config (`train` section; its whole is written beside the summary).
    models: what the loop trains, by name; each is exported to `<output_dir>/<name>`.
    loss: the step loss (`lmdistill.train.loop.LossFn`). evaluate: held-out metrics of the unwrapped models, or None.
    teachers: frozen online teachers, placed for the engine once the trained models are prepared.
    rollout: turns each data micro-batch into the one trained on (on-policy recipes sample it there).
    prepare: the CPU work on each data micro-batch that does not depend on the models (a teacher of another
        tokenizer's alignment), run ahead of the step in worker processes.
    fused / lora: what the engine check needs to know (fused losses and LoRA exports need whole weights).
    """

    name: str
    cfg: Any
    tokenizer: Any
    data: TokenBlocks
    models: dict[str, Trained]
    loss: LossFn
    evaluate: EvalFn | None = None
    teachers: list[HFTeacher] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Stateful] = field(default_factory=dict)
    on_step: StepHook | None = None
    rollout: RolloutFn | None = None
    prepare: PrepareFn | None = None  # CPU work per data batch, done ahead of the step (lmdistill.train.prefetch)
    finish: Callable[[TrainResult], dict[str, Any]] | None = None  # more summary fields, once training ended
    fused: bool = True
    lora: bool = False


def run_recipe(recipe: Recipe) -> dict[str, Any]:
    """Train `recipe` on the one loop and finish the run; returns the summary (also `<output_dir>/summary.json`)."""
    cfg = recipe.cfg
    accelerator = make_accelerator(cfg.train)
    check_supported(accelerator, fused_loss=recipe.fused, lora=recipe.lora)
    trainer = Trainer(cfg.train, models=recipe.models, data=recipe.data, loss_fn=recipe.loss, eval_fn=recipe.evaluate,
                      accelerator=accelerator, state=recipe.state, on_step=recipe.on_step, rollout=recipe.rollout,
                      prepare=recipe.prepare,
                      # the resolved config goes with every checkpoint; a resume with another one is refused
                      run_info={"recipe": recipe.name, "config": cfg.model_dump(mode="json")})
    for teacher in recipe.teachers:
        teacher.model = prepare_frozen(accelerator, teacher.model)
    result = trainer.fit()
    summary: dict[str, Any] = {"recipe": recipe.name, **recipe.info, "steps": result.step, "final": result.last,
                               "train_tokens_per_s": result.tokens_per_s, "train_step_s": result.step_seconds}
    if recipe.finish is not None:
        summary.update(recipe.finish(result))
    if "loss" in result.last:
        summary["final_train_loss"] = result.last["loss"]
    return finish_run(trainer, recipe.tokenizer, cfg, summary)


def finish_run(trainer: Trainer, tokenizer: Any, cfg: Any, summary: dict[str, Any]) -> dict[str, Any]:
    """Export every trained model to `<output_dir>/<name>`, add the log and the first/last held-out metrics to
    `summary`, write it. Called on every rank (a sharded model's weights are gathered collectively); rank 0 writes."""
    out = Path(cfg.train.output_dir)
    acc = trainer.accelerator
    for name, model in trainer.models.items():
        full_state = acc.get_state_dict(model) if shards_parameters(acc) else None
        if trainer.is_main:
            plain = trainer.unwrapped[name]
            if full_state is not None and hasattr(plain, "merge_and_unload"):  # LoRA under FSDP2: merge whole weights
                plain, full_state = unsharded_replica(plain, full_state), None
            elif full_state is not None:
                full_state = without_tied_copies(plain, full_state)
            summary[f"{name}_dir"] = str(save_model(plain, tokenizer, out / name, full_state))
    if trainer.is_main:
        summary["log"] = str(out / "log.jsonl")
        evals = eval_rows(out)
        if evals:
            summary["eval_first"], summary["eval_last"] = evals[0], evals[-1]
        write_summary(out, cfg, summary)
    acc.wait_for_everyone()
    return summary


def on_main_rank() -> bool:
    """Whether this is the main process (before the accelerator exists: the launcher's RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def print_main(line: str) -> None:
    """One line about the run, printed by the main process only (before the accelerator exists)."""
    if on_main_rank():
        print(line, flush=True)


def eval_rows(output_dir: str | Path) -> list[dict[str, Any]]:
    """The held-out evaluations in a run's log.jsonl, `eval/` prefix removed, with their step."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/") or k == "step"}
            for r in read_log(path) if any(k.startswith("eval/") for k in r)]


def save_model(model: Any, tokenizer: Any, out_dir: str | Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Save a trained model so plain transformers can load it (LoRA adapters are merged; the adapter is kept beside).

    `state_dict`: the full weights when the model itself holds only shards (FSDP, ZeRO-3; gathered by
    `accelerator.get_state_dict` on every rank), written instead of the model's own. Written atomically, so `out_dir`
    either holds a complete model or does not exist.
    """
    out = Path(out_dir)
    with atomic_dir(out, "student model") as tmp:
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
    return out


def write_summary(output_dir: str | Path, cfg: Any, summary: dict[str, Any]) -> Path:
    """config.yaml and summary.json; summary.json is written last and atomically: it marks a finished run."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    except OSError as e:
        raise write_failure("run config", out / "config.yaml", e) from None
    write_json(out / "summary.json", summary, "run summary")
    return out / "summary.json"
