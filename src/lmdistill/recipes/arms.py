"""The arms `lmdistill compare` can run: a registry of kinds, each a function from the shared config to a trained student.

A kind names the recipe it runs, what it needs (`requires`: modules and functions; a missing one makes the arm
SKIPPED with that reason, never silently), and how many bytes of teacher data its student consumes per target token:

    ce              0
    soft            V * 4: a dense fp32 distribution over the shared vocabulary, computed in the step, never stored
    cached_topk     the soft-label cache's real bytes on disk / the target tokens it covers (`lmdistill label`)
    cached_sampled  the same, for the sampled (Random-Sampling KD) encoding
    cached_topk_sampled  the same, for the exact top-k head + systematic tail samples encoding
    hard_token      the bytes of one token id, ceil(log2(V) / 8): the teacher's argmax is all the student sees
    hard_sequence   UTF-8 bytes of the teacher's completions / their tokens: the text is the label
    codistill       V * 4: the live teacher's dense distribution, like online soft
    onpolicy        V * 4 (dense), (k + 1) * (4 + id bytes) (topk) or 4 (sampled_token) per token the student wrote

Every kind builds its recipe's config from the same shared pieces (teacher, student, data, train with the step
budget and seed), so only the method differs; an arm's `overrides` may change method settings but not those pieces.
Adding a kind: write `fn(ctx: ArmContext) -> ArmOutcome`, wrap the work in `ctx.monitor.phase("prepare" | "train")`
and call `register_arm(ArmKind(...))`.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from lmdistill.assets import EMBEDDED_GEMMA, EMBEDDED_QUESTIONS
from lmdistill.cache.estimate import describe_encoding, measure_cache
from lmdistill.config import (
    ArmSpec,
    CodistillConfig,
    CompareConfig,
    DataConfig,
    HardConfig,
    LabelConfig,
    OnPolicyConfig,
    SoftConfig,
    deep_merge,
    format_validation_error,
)
from lmdistill.errors import ConfigError, LmdistillError
from lmdistill.generate import GenerateConfig, run_generate
from lmdistill.generate.run import output_paths
from lmdistill.generate.store import read_records
from lmdistill.models import load_tokenizer
from lmdistill.recipes.codistill import run_codistill
from lmdistill.recipes.common import build_setup, save_model
from lmdistill.recipes.hard import run_hard
from lmdistill.recipes.label import run_label
from lmdistill.recipes.onpolicy import run_onpolicy
from lmdistill.recipes.soft import run_soft

# ---------------------------------------------------------------------------------------------------------------------
# resources: wall-clock and peak memory of one phase of an arm

MEMORY_METHOD_CPU = "peak resident-set growth over the phase start, sampled every 10 ms (after gc + malloc_trim)"
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated over the phase"


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux); None where /proc is not available."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS, so the next phase's baseline is not inflated by an earlier arm's leftovers."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class PhaseStats:
    seconds: float = 0.0
    peak_memory_mb: float | None = None


@dataclass
class ResourceMonitor:
    """Wall-clock and peak memory per named phase (e.g. `prepare` = labelling/generation, `train`).

    On CUDA the peak is `torch.cuda.max_memory_allocated` (exact, device tensors). On CPU no allocator counter covers
    torch tensors (tracemalloc sees only Python objects), so a thread samples the resident set size every 10 ms and the
    peak growth over the phase's start is reported; memory an earlier arm freed is returned to the OS first.
    """

    phases: dict[str, PhaseStats] = field(default_factory=dict)
    method: str = field(default_factory=lambda: MEMORY_METHOD_CUDA if torch.cuda.is_available() else MEMORY_METHOD_CPU)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _release_freed_memory()
        stats = self.phases.setdefault(name, PhaseStats())
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start_rss = _rss_bytes()
        peak = [start_rss or 0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                now = _rss_bytes()
                if now is not None and now > peak[0]:
                    peak[0] = now

        sampler = threading.Thread(target=sample, daemon=True) if (start_rss is not None and not cuda) else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            stats.seconds += time.perf_counter() - t0
            if sampler:
                stop.set()
                sampler.join()
            mb: float | None
            if cuda:
                mb = torch.cuda.max_memory_allocated() / 2**20
            elif start_rss is not None:
                mb = max(peak[0] - start_rss, 0) / 2**20
            else:
                mb = None
            if mb is not None:
                stats.peak_memory_mb = max(stats.peak_memory_mb or 0.0, mb)

    @property
    def total_seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())


# ---------------------------------------------------------------------------------------------------------------------
# the arm registry


@dataclass
class ArmContext:
    """What an arm's function gets: the shared config, its own spec and directory, and the phase monitor."""

    cfg: CompareConfig
    spec: ArmSpec
    out_dir: Path
    monitor: ResourceMonitor


@dataclass
class ArmOutcome:
    """What an arm's function returns: the recipe's run summary and the teacher data it consumed per token.

    `kl_reference` says what the held-out KL in the run's own log (its learning curve) is measured against, and
    `curve_data` which held-out data those curves are on when it is not the blocks every arm shares; the final
    scoring by `compare` always uses the frozen teacher and the shared blocks.
    """

    summary: dict[str, Any]
    teacher_bytes_per_token: float
    bytes_note: str
    kl_reference: str = "teacher"
    curve_data: str = ""


@dataclass
class ArmKind:
    """A registered arm kind: `run(ctx)` trains one student; `requires` lists (module, attribute) it needs."""

    kind: str
    label: str
    run: Callable[[ArmContext], ArmOutcome]
    requires: tuple[tuple[str, str], ...] = ()

    def unavailable(self) -> str | None:
        """Why this kind cannot run here (a recipe module or function missing), or None."""
        for module, attr in self.requires:
            try:
                mod = importlib.import_module(module)
            except ImportError as e:
                return f"recipe {module} not available ({e})"
            if not hasattr(mod, attr):
                return f"recipe {module} has no `{attr}` (this lmdistill version predates the arm)"
        return None


ARM_KINDS: dict[str, ArmKind] = {}


class SkipArm(LmdistillError):
    """Raised by an arm's function when a prerequisite is missing at run time; the arm is reported as skipped."""


def register_arm(kind: ArmKind) -> ArmKind:
    ARM_KINDS[kind.kind] = kind
    return kind


# Fields every arm shares; an arm override of one would break the equal terms the comparison promises.
_SHARED_FIELDS = ("teacher", "student", "data", "train.max_steps", "train.seed", "train.micro_batch_size",
                  "train.grad_accum", "train.output_dir")


def nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"loss.kind": "jsd", "train": {"lr": 1e-3}} -> {"loss": {"kind": "jsd"}, "train": {"lr": 1e-3}}."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = deep_merge(node[parts[-1]], nest(value))
        else:
            node[parts[-1]] = nest(value) if isinstance(value, dict) else value
    return out


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def check_equal_terms(spec: ArmSpec) -> None:
    touched = [k for k in _flat_keys(nest(spec.overrides)) if k in _SHARED_FIELDS]
    if touched:
        raise ConfigError(
            f"arm `{spec.name}` overrides {touched}; compare gives every arm the same teacher, data, student, step "
            "budget and seed, so set those once at the top level of the compare config"
        )


def recipe_config(cls: type[BaseModel], base: dict[str, Any], spec: ArmSpec, *, what: str = "overrides") -> Any:
    """`cls` validated from the shared pieces `base` with the arm's overrides (or prepare fields) on top."""
    extra = nest(spec.overrides if what == "overrides" else spec.prepare)
    try:
        return cls.model_validate(deep_merge(base, extra))
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, f"arm `{spec.name}` ({spec.kind}) {what}")) from None


def _shared(ctx: ArmContext, *, loss: bool = True) -> dict[str, Any]:
    cfg = ctx.cfg
    base = {
        "teacher": cfg.teacher.model_dump(),
        "student": cfg.student.model_dump(),
        "data": cfg.data.model_dump(),
        "train": {**cfg.train.model_dump(), "output_dir": str(ctx.out_dir)},
    }
    if loss:
        base["loss"] = cfg.loss.model_dump()
    return base


def dense_bytes(n_vocab: int) -> float:
    return float(n_vocab * 4)


def id_bytes(n_vocab: int) -> float:
    return float(max(1, math.ceil(math.log2(max(n_vocab, 2)) / 8)))


# ---------------------------------------------------------------------------------------------------------------------
# arm kinds available in the core: the CE baseline and online soft KD


def _ce_arm(ctx: ArmContext) -> ArmOutcome:
    # `hard` at alpha = 0 computes no teacher label: the ground truth alone, the baseline every method must beat. The
    # teacher only scores held-out KL and agreement, so the arm's wall-clock is the cost of plain training.
    cfg = recipe_config(HardConfig, {**_shared(ctx, loss=False), "mode": "token", "loss": {"alpha": 0.0}}, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_hard(cfg)
    return ArmOutcome(summary, 0.0, "no teacher data: ground-truth tokens only")


def _soft_arm(ctx: ArmContext) -> ArmOutcome:
    cfg = recipe_config(SoftConfig, _shared(ctx), ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_soft(cfg)
    v = int(summary["vocab"])
    return ArmOutcome(summary, dense_bytes(v), f"dense fp32 distribution over {v:,} tokens, computed online, not stored")


register_arm(ArmKind("ce", "cross-entropy on the ground truth (no teacher)", _ce_arm,
                     (("lmdistill.recipes.hard", "run_hard"),)))
register_arm(ArmKind("soft", "online soft KD: the frozen teacher's full distribution in every step", _soft_arm,
                     (("lmdistill.recipes.soft", "run_soft"),)))


# ---------------------------------------------------------------------------------------------------------------------
# offline soft labels: `lmdistill label` once, then `soft --teacher_cache`


def _cached_arm(encoding: str) -> Callable[[ArmContext], ArmOutcome]:
    def run(ctx: ArmContext) -> ArmOutcome:
        cfg = ctx.cfg
        # The cache stores log-probs at one temperature; the student's loss must use the same one.
        label_base = {"teacher": cfg.teacher.model_dump(), "data": cfg.data.model_dump(), "progress": cfg.train.progress,
                      "cache": {"output_dir": str(ctx.out_dir / "cache"), "encoding": encoding,
                                "temperature": cfg.loss.temperature}}
        label_cfg = recipe_config(LabelConfig, label_base, ctx.spec, what="prepare")
        with ctx.monitor.phase("prepare"):
            run_label(label_cfg)
        soft_cfg = recipe_config(SoftConfig, {**_shared(ctx), "teacher_cache": label_cfg.cache.output_dir}, ctx.spec)
        with ctx.monitor.phase("train"):
            summary = run_soft(soft_cfg)
        measured = measure_cache(label_cfg.cache.output_dir)
        train = measured["splits"]["train"]
        note = (f"{describe_encoding(measured['encoding'])}: {train['bytes']:,} bytes on disk for "
                f"{train['target_tokens']:,} train tokens")
        summary["cache"] = {"dir": label_cfg.cache.output_dir, "bytes_per_token": train["bytes_per_token"]}
        return ArmOutcome(summary, float(train["bytes_per_token"]), note, kl_reference="its cache's sparse targets")

    return run


_CACHE_NEEDS = (("lmdistill.recipes.label", "run_label"), ("lmdistill.cache.estimate", "measure_cache"),
                ("lmdistill.config", "LabelConfig"))
register_arm(ArmKind("cached_topk", "offline soft KD from a top-k (+ tail) soft-label cache", _cached_arm("topk"),
                     _CACHE_NEEDS))
register_arm(ArmKind("cached_sampled", "offline soft KD from a sampled (Random-Sampling KD) soft-label cache",
                     _cached_arm("sampled"), _CACHE_NEEDS))
register_arm(ArmKind("cached_topk_sampled",
                     "offline soft KD from a top-k head + sampled tail soft-label cache (the issue #16 encoding)",
                     _cached_arm("topk_sampled"), _CACHE_NEEDS))


# ---------------------------------------------------------------------------------------------------------------------
# hard labels: the teacher's argmax tokens, or text it generates


def _hard_token_arm(ctx: ArmContext) -> ArmOutcome:
    cfg = recipe_config(HardConfig, {**_shared(ctx, loss=False), "mode": "token"}, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_hard(cfg)
    v = int(summary["vocab"])
    return ArmOutcome(summary, id_bytes(v), f"one token id (the teacher's argmax) of a {v:,}-token vocabulary")


def _hard_sequence_arm(ctx: ArmContext) -> ArmOutcome:
    cfg = ctx.cfg
    # Enough prompts for one epoch of the step budget; the teacher answers each once.
    needed = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum
    gen_base = {
        "teacher": {"backend": "hf", "model": cfg.teacher.model_dump(), "batch_size": 8},
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": cfg.data.block_size, "seed": cfg.train.seed},
        "prompts": {"max_prompts": needed + cfg.data.eval_documents},
        # Under a token budget many answers end at max_new_tokens; their text is still the teacher's, so keep them.
        "filters": {"drop_truncated": False},
        "output": str(ctx.out_dir / "completions.jsonl"),
        "progress": cfg.train.progress,
    }
    gen_cfg = recipe_config(GenerateConfig, gen_base, ctx.spec, what="prepare")
    with ctx.monitor.phase("prepare"):
        run_generate(gen_cfg)
    filtered = output_paths(gen_cfg.output)[1]
    records = read_records(filtered)[0] if filtered.is_file() else []
    if not records:
        raise SkipArm(f"the teacher's completions in {filtered} were all filtered out; nothing to train on")
    # The text is the label: the data are the teacher's completions (chat template, loss on the completion only), one
    # conversation per block, so a block must hold the longest prompt + completion or the completion is cut away.
    longest = max(int(r.get("prompt_tokens") or 0) + int(r.get("completion_tokens") or 0) for r in records) + 2
    data = {**cfg.data.model_dump(), "source": str(filtered), "stage": "chat", "max_documents": None,
            "block_size": max(cfg.data.block_size, -(-longest // 8) * 8),
            "eval_documents": min(cfg.data.eval_documents, max(len(records) // 10, 1))}
    base = {**_shared(ctx, loss=False), "data": data, "mode": "sequence", "eval_teacher": True}
    hard_cfg = recipe_config(HardConfig, base, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_hard(hard_cfg)
    tok = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                         trust_remote_code=cfg.teacher.trust_remote_code)
    texts = [r["completion"] for r in records]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    note = f"teacher text: {len(records)} completions, {n_bytes:,} UTF-8 bytes for {n_tokens:,} tokens"
    summary["completions"] = {"file": str(filtered), "records": len(records)}
    return ArmOutcome(summary, n_bytes / max(n_tokens, 1), note, curve_data="held-out teacher completions")


register_arm(ArmKind("hard_token", "hard labels: CE on the teacher's argmax token at every position",
                     _hard_token_arm, (("lmdistill.recipes.hard", "run_hard"), ("lmdistill.config", "HardConfig"))))
register_arm(ArmKind("hard_sequence", "hard labels: fine-tuning on text the teacher generated (sequence-level)",
                     _hard_sequence_arm, (("lmdistill.recipes.hard", "run_hard"), ("lmdistill.config", "HardConfig"),
                                          ("lmdistill.generate", "run_generate"))))


# ---------------------------------------------------------------------------------------------------------------------
# co-distillation: the teacher keeps training (on CE) in the same step, the student learns from it


def _codistill_arm(ctx: ArmContext) -> ArmOutcome:
    cfg = ctx.cfg
    if cfg.student.lora.enabled:
        raise SkipArm("co-distillation trains full models; this comparison's student uses LoRA")
    with ctx.monitor.phase("prepare"):
        # The same initial student as every other arm, saved once so the co-distillation recipe can start from it.
        setup = build_setup(cfg, teacher=False, data=False)
        init_dir = save_model(setup.student, setup.tokenizer, ctx.out_dir / "initial_student")
        del setup
    loss = cfg.loss
    base = {
        "tokenizer": cfg.teacher.name_or_path,
        "teacher": {"init": "pretrained", "name_or_path": cfg.teacher.name_or_path, "dtype": cfg.teacher.dtype,
                    "trust_remote_code": cfg.teacher.trust_remote_code},
        "student": {"init": "pretrained", "name_or_path": str(init_dir), "dtype": cfg.student.dtype},
        "data": cfg.data.model_dump(),
        "loss": {"kind": loss.kind, "beta": loss.beta, "temperature": loss.temperature, "fused": loss.fused,
                 "backend": loss.backend},
        "train": {**cfg.train.model_dump(), "output_dir": str(ctx.out_dir)},
    }
    co_cfg = recipe_config(CodistillConfig, base, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_codistill(co_cfg)
    v = int(summary["vocab"])
    return ArmOutcome(summary, dense_bytes(v), f"the live teacher's dense fp32 distribution over {v:,} tokens",
                      kl_reference="the live (co-trained) teacher")


register_arm(ArmKind("codistill", "co-distillation: the teacher trains on CE in the same steps, the student learns "
                     "from both", _codistill_arm,
                     (("lmdistill.recipes.codistill", "run_codistill"), ("lmdistill.config", "CodistillConfig"))))


# ---------------------------------------------------------------------------------------------------------------------
# on-policy: the student answers the embedded questions itself, the teacher scores its tokens


def question_data(cfg: CompareConfig) -> DataConfig:
    """The chat data of the on-policy arm and of the on-policy columns: the embedded Wikipedia questions, one epoch of
    prompts for the step budget, its held-out split the prompts every student is scored on."""
    needed = cfg.train.max_steps * cfg.train.micro_batch_size * cfg.train.grad_accum
    return DataConfig(source=EMBEDDED_QUESTIONS, stage="chat", prompt_column="prompt", completion_column="reference",
                      block_size=max(cfg.data.block_size, 96), max_documents=needed + cfg.generation.onpolicy_prompts,
                      eval_documents=cfg.generation.onpolicy_prompts, seed=cfg.data.seed)


def _onpolicy_arm(ctx: ArmContext) -> ArmOutcome:
    cfg = ctx.cfg
    base = {**_shared(ctx, loss=False), "data": question_data(cfg).model_dump(),
            "rollout": {"max_new_tokens": cfg.generation.max_new_tokens}}
    op_cfg = recipe_config(OnPolicyConfig, base, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_onpolicy(op_cfg)
    v = int(summary["vocab"])
    note = (f"the teacher's dense fp32 distribution over {v:,} tokens at each token the student wrote "
            f"({op_cfg.signal})") if op_cfg.signal == "dense" else f"teacher signal `{op_cfg.signal}` on the student's tokens"
    bytes_per_token = dense_bytes(v) if op_cfg.signal == "dense" else \
        (op_cfg.k + 1) * (4 + id_bytes(v)) if op_cfg.signal == "topk" else 4.0
    return ArmOutcome(summary, float(bytes_per_token), note, curve_data="the student's own answers to questions")


register_arm(ArmKind("onpolicy", "on-policy: the student answers questions itself, the teacher scores every token it "
                     "wrote", _onpolicy_arm, (("lmdistill.recipes.onpolicy", "run_onpolicy"),)))


# ---------------------------------------------------------------------------------------------------------------------
# across tokenizers: a teacher of another family (default the embedded Gemma-3-270M) teaches the same student


def _cross_tokenizer_arm(ctx: ArmContext) -> ArmOutcome:
    # The student starts from the weights every arm starts from (built with the shared teacher, saved once); only the
    # teacher differs, named in the arm's `prepare.teacher` (the shared teacher scores every arm's held-out KL).
    other = str(nest(ctx.spec.prepare).get("teacher", EMBEDDED_GEMMA))
    with ctx.monitor.phase("prepare"):
        setup = build_setup(recipe_config(SoftConfig, _shared(ctx), ArmSpec(name="init", kind="soft")), teacher=False,
                            data=False)
        init = save_model(setup.student, setup.tokenizer, ctx.out_dir / "student-init")
        del setup
    base = {**_shared(ctx), "teacher": {"name_or_path": other},
            "student": {**ctx.cfg.student.model_dump(), "init": "pretrained", "name_or_path": str(init)}}
    base["loss"] = {**base["loss"], "cross_tokenizer": "hybrid"}
    cfg = recipe_config(SoftConfig, base, ctx.spec)
    with ctx.monitor.phase("train"):
        summary = run_soft(cfg)
    v = len(load_tokenizer(other))
    return ArmOutcome(summary, dense_bytes(v), f"`{other}`'s dense fp32 distribution over its {v:,} tokens, aligned "
                      "to the student's by byte spans, computed online", kl_reference="the arm's own teacher (span KL)")


register_arm(ArmKind("cross_tokenizer", "soft KD from a teacher of another tokenizer (byte-span aligned, hybrid loss)",
                     _cross_tokenizer_arm, (("lmdistill.cross_tokenizer_teacher", "CrossTokenizerTeacher"),)))
