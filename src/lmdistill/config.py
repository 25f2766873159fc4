"""Typed configs: one per command, loaded from YAML, every field overridable from the command line.

`lmdistill soft --config configs/soft.yaml --train.lr 3e-4 --loss.kind jsd` sets `train.lr` and `loss.kind` on top of
the file. An unknown or invalid field is refused with one message naming it and the allowed values.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmdistill.errors import ConfigError

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
Precision = Literal["fp32", "bf16", "fp16"]
FusedBackend = Literal["auto", "torch", "triton"]


class BaseConfig(BaseModel):
    """Strict base: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(BaseConfig):
    """A Hugging Face causal LM by hub id or local path."""

    name_or_path: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Hub id, local directory, or an embedded teacher: `embedded:smollm2-135m-instruct` (the offline "
        "default) or `embedded:gemma3-270m` (Gemma-3-270M, another tokenizer).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Precision = Field("fp32", description="Precision the weights are loaded in.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint (off unless asked).")
    allow_pickle: bool = Field(
        False,
        description="Also load `.bin`/`.pt` pickle weights when a checkpoint has no safetensors. Off by default because "
        "unpickling runs arbitrary code stored in the file: turn it on only for a checkpoint you trust, or convert it "
        "to safetensors once instead.",
    )


class LoraConfig(BaseConfig):
    enabled: bool = Field(False, description="Train LoRA adapters instead of the full student.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters; every one must exist in the student.",
    )


WidthAxis = Literal["hidden", "heads", "mlp"]


class PruneConfig(BaseConfig):
    """student.init=prune: which of the teacher's decoder layers the student keeps, and (minitron) how wide it is."""

    method: Literal["keep_layers", "influence", "minitron"] = Field(
        "keep_layers",
        description="`keep_layers`: exactly student.keep_layers; `influence` (ShortGPT style): score every teacher "
        "layer by 1 - cos(input, output) of its hidden states on calibration batches and keep the len(keep_layers) "
        "layers that change their input most, in their order; `minitron` (Muralidharan et al. 2024): the layers as "
        "`influence` chooses them, then the width axes of `width_axes` pruned by activation importance on the same "
        "batches down to `target_params`.",
    )
    target_params: float | None = Field(
        None, gt=0,
        description="method=minitron: the student's parameter count in MILLIONS (49.6 = 49,600,000; tied embeddings "
        "counted once); the student is the widest one at or below it.",
    )
    width_axes: list[WidthAxis] = Field(
        default_factory=lambda: list(get_args(WidthAxis)), min_length=1,
        description="method=minitron: the widths that shrink, all by one common fraction: `hidden` (embedding and "
        "residual channels), `heads` (attention heads: whole KV groups, or the same number of query heads in each "
        "kept group; head_dim unchanged), `mlp` (intermediate channels).",
    )
    calibration_source: str = Field(
        "embedded:wikipedia",
        description="method=influence|minitron: the text (as data.source) the layers and channels are scored on.",
    )
    calibration_batches: int = Field(4, ge=1, description="method=influence|minitron: batches of calibration text.")
    calibration_batch_size: int = Field(
        4, ge=1, description="method=influence|minitron: sequences per calibration batch."
    )
    calibration_block_size: int = Field(
        128, ge=8, description="method=influence|minitron: tokens per calibration sequence."
    )

    @model_validator(mode="after")
    def _target_with_minitron(self) -> PruneConfig:
        if self.method == "minitron" and self.target_params is None:
            raise ValueError("method=minitron needs student.prune.target_params (the student's size in millions of "
                             "parameters, e.g. 49.6)")
        if self.method != "minitron" and self.target_params is not None:
            raise ValueError(f"student.prune.target_params is read by method=minitron only (method is "
                             f"`{self.method}`); remove it or set method: minitron")
        return self


class StudentConfig(BaseConfig):
    """How the student starts: a checkpoint, a fresh model from a config, or layers pruned from the teacher."""

    init: Literal["pretrained", "config", "prune"] = Field(
        "prune",
        description="`pretrained`: load name_or_path; `config`: random init from `arch` with the teacher's tokenizer; "
        "`prune`: copy the teacher keeping `keep_layers`.",
    )
    name_or_path: str | None = Field(None, description="Checkpoint to load when init=pretrained.")
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="init=config: transformers config fields (model_type, hidden_size, num_hidden_layers, ...); "
        "unset fields are taken from the teacher's config.",
    )
    keep_layers: list[int] = Field(
        default_factory=lambda: [0, 6, 12, 18, 24, 29],
        description="init=prune: indices of the teacher's decoder layers the student keeps (Minitron/DistilBERT style); "
        "with prune.method=influence or minitron only their number counts.",
    )
    prune: PruneConfig = Field(
        default_factory=PruneConfig,
        description="init=prune: how the layers (and with method=minitron the widths) are chosen.",
    )
    dtype: Precision = Field("fp32", description="Precision the student's master weights are kept in.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint.")

    @model_validator(mode="after")
    def _needs_path(self) -> StudentConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("student.init=pretrained needs student.name_or_path (a hub id or a local directory)")
        return self


class SourceConfig(BaseConfig):
    """A dataset: a local file or directory, a hub dataset, or an embedded one."""

    source: str = Field(
        "embedded:wikipedia",
        description="A local file (.jsonl/.json/.parquet/.txt/.csv), a directory of them, a hub dataset name, or "
        "`embedded:wikipedia` (10,033 offline Wikipedia summaries).",
    )
    hub_config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")


class DataConfig(SourceConfig):
    """Where text comes from and how it becomes fixed-length blocks."""

    stage: Literal["pretrain", "chat"] = Field(
        "pretrain",
        description="`pretrain`: raw text, tokenised and packed into blocks; `chat`: conversations rendered with the "
        "tokenizer's chat template, loss on assistant tokens only.",
    )
    text_column: str = Field("text", description="Column with raw text (stage=pretrain).")
    messages_column: str = Field("messages", description="Column with a list of {role, content} (stage=chat).")
    prompt_column: str | None = Field(
        None, description="stage=chat without messages: column with the prompt (user turn)."
    )
    completion_column: str | None = Field(
        None, description="stage=chat without messages: column with the answer (assistant turn)."
    )
    block_size: int = Field(256, ge=8, description="Tokens per training sequence.")
    max_documents: int | None = Field(None, ge=1, description="Use at most this many documents (after shuffling).")
    eval_documents: int = Field(200, ge=0, description="Documents held out for evaluation (taken before packing).")
    seed: int = Field(0, description="Seed of the document shuffle and held-out split.")
    split_by: str | None = Field(
        "auto",
        description="Column whose equal values stay on one side of the held-out split, so several answers to one "
        "prompt never straddle it (the held-out score would reward memorised prompts). `auto`: `id` for "
        "`lmdistill generate` output (records with `id` and `sample`), else none; null: split records one by one.",
    )


class DivergenceConfig(BaseConfig):
    """The divergence between two models' distributions, and how it is computed."""

    kind: DivergenceKind = Field("forward_kl", description="Divergence between teacher and student distributions.")
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="jsd: interpolation (0 = forward KL, 1 = reverse KL); skew_*: the skew."
    )
    temperature: float = Field(1.0, gt=0.0, description="Softens both distributions; the loss is multiplied by T^2.")
    fused: bool = Field(
        True,
        description="Use the chunked fused divergence (never materialises [tokens, vocab] logits of both models); "
        "false forces the reference path.",
    )
    backend: FusedBackend = Field(
        "auto",
        description="Kernel of the fused loss: `torch` (chunked torch ops, any device), `triton` (opt-in, CUDA: the "
        "element-wise part in a Triton kernel), `auto` (torch until the Triton kernel has passed the GPU checks in "
        "benchmarks/gpu/).",
    )


class LossConfig(DivergenceConfig):
    alpha: float = Field(
        0.9, ge=0.0, le=1.0, description="Total loss = alpha * divergence + (1 - alpha) * cross-entropy."
    )
    cross_tokenizer: Literal["refuse", "uld", "hybrid"] = Field(
        "refuse",
        description="A teacher whose tokenizer differs from the student's: `refuse` (an error), `uld` (Universal "
        "Logit Distillation: sorted-probability L1 per aligned span) or `hybrid` (`kind` on the tokens both "
        "vocabularies share + ULD on the rest). Spans are aligned by bytes; see lmdistill.losses.cross_tokenizer.",
    )
    matched_weight: float = Field(1.0, ge=0.0, description="cross_tokenizer=hybrid: weight of the shared-token part.")
    unmatched_weight: float = Field(1.0, ge=0.0, description="cross_tokenizer=hybrid: weight of the ULD part.")


class HiddenLossConfig(BaseConfig):
    """Layer-wise distillation (online teacher only): match the student's hidden states to the teacher's."""

    weight: float = Field(0.0, ge=0.0, description="Total loss += weight * mean over pairs of the hidden loss (0: off).")
    kind: Literal["mse", "cosine"] = Field(
        "mse", description="Per-token hidden loss: `mse` (mean over the hidden dim) or `cosine` (1 - cos)."
    )
    pairs: list[tuple[int, int]] | None = Field(
        None,
        description="[student_layer, teacher_layer] pairs, each the hidden state after that decoder layer; null: the "
        "pruning map of a student.init=prune student (its layer i <-> the teacher layer it was copied from). Where "
        "widths differ a learned linear projection (trained with the student, not exported) maps student -> teacher; "
        "for a width-pruned (minitron) student with the default pairs it starts as the pruning map's channel embedding.",
    )


class SoftLossConfig(LossConfig):
    """`soft`'s loss: the divergence and CE of `LossConfig`, plus layer-wise distillation with an online teacher."""

    hidden: HiddenLossConfig = Field(default_factory=HiddenLossConfig,
                                     description="Layer-wise distillation (hidden-state matching).")


class TrainConfig(BaseConfig):
    output_dir: str = Field("runs/soft", description="Where checkpoints, logs and the final student go.")
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(3e-4, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps, then cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor as a fraction of lr.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping norm (null disables).")
    precision: Precision = Field("fp32", description="Autocast precision of forward passes.")
    seed: int = Field(0, description="Seed of model init, data order and sampling.")
    eval_every: int = Field(50, ge=0, description="Evaluate on the held-out split every N steps (0: only at the end).")
    eval_batches: int = Field(8, ge=1, description="Held-out micro-batches per evaluation.")
    save_every: int = Field(50, ge=0, description="Checkpoint every N steps (0: only the final student).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Write a log line every N steps.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in output_dir.")
    progress: bool = Field(True, description="Show a progress bar.")
    prepare_workers: int = Field(
        -1,
        ge=-1,
        description="Processes that prepare the next steps' batches while the current one runs, where a recipe has "
        "CPU work per batch (an online teacher of another tokenizer: the byte-span alignment). -1: one per two cores "
        "of this rank's share (at most 4; none below 4 cores); 0: the step does it. What is trained does not depend "
        "on it.",
    )


def _annotation_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(annotation)) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join(_annotation_name(a) for a in get_args(annotation) if a is not type(None))
    if origin is not None:
        return getattr(origin, "__name__", str(origin)).upper()
    return getattr(annotation, "__name__", str(annotation)).upper()


def field_help(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf field as (`--dotted.name`, type, description with default), for `--help`."""
    rows: list[tuple[str, str, str]] = []
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        dotted = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(field_help(annotation, prefix=f"{dotted}."))
            continue
        default = info.get_default(call_default_factory=True)
        rows.append((f"--{dotted}", _annotation_name(annotation), f"{info.description or ''} [default: {default}]"))
    return rows


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--train.lr', '3e-4', '--loss.kind=jsd']` -> nested dict. Values are parsed as YAML (lists, bools, null)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument `{token}`: overrides look like `--section.field value`")
        key = token[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _is_number(args[i + 1])):
                raw = "true"  # a bare flag, like `--train.resume`
                i += 1
            else:
                raw = args[i + 1]
                i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.replace("-", "_").split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `--{key}` conflicts with an earlier override of `{part}`")
        node[parts[-1]] = value
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _allowed_fields(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = cls
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return []
        model = info.annotation
    return sorted(model.model_fields)


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or True)
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_fields(cls, loc)
            lines.append(f"unknown field `{dotted}`; allowed here: {', '.join(allowed)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"`{dotted}`: {msg} (got {e.get('input')!r})")
    return f"invalid config ({source}):\n  " + "\n  ".join(lines)


T = TypeVar("T", bound=BaseModel)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> T:
    """Read `path` (YAML) into `cls`, apply CLI overrides, validate. Raises ConfigError with a readable message."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file `{p}` not found; pass an existing YAML file (see configs/ for examples)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file `{p}` is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file `{p}` must hold a mapping of sections, got {type(loaded).__name__}")
        data, source = loaded, str(p)
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = deep_merge(data, extra)
        source += " + command-line overrides"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, source)) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


class StudentRunConfig(BaseConfig):
    """What every run that trains a student from a teacher names: the teacher, the student, the data, the training."""

    teacher: ModelConfig = Field(default_factory=ModelConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class SoftConfig(StudentRunConfig):
    """`lmdistill soft`: soft-label distillation with an online teacher (or a soft-label cache)."""

    loss: SoftLossConfig = Field(default_factory=SoftLossConfig)
    teacher_cache: str | None = Field(
        None,
        description="A soft-label cache directory written by `lmdistill label`: train from its sparse targets with no "
        "teacher model in memory (teacher.name_or_path still supplies the tokenizer, and the weights when "
        "student.init=prune). A student of another tokenizer reads a cache labelled with cache.cross_tokenizer=true "
        "when loss.cross_tokenizer is set: it trains on the cache's text in its own tokens (data.source is not read).",
    )

    cache_align_workers: int = Field(
        0,
        ge=0,
        description="A cache read across tokenizers: processes that align its shards with the student's tokens when "
        "the run starts (0: this process's CPU cores, shared among the node's ranks; 1: no worker processes). The "
        "aligned targets do not depend on it.",
    )
    cache_align_store: bool = Field(
        True,
        description="A cache read across tokenizers: keep its aligned targets on disk ($LMDISTILL_CACHE/span-targets,"
        " or $LMDISTILL_SPAN_TARGETS; about the memory they take) and memory-map them, so later runs with the same "
        "cache, student tokenizer and block size skip the alignment and a node's processes share one copy.",
    )

    api_logprobs: str | None = Field(
        None,
        description="Soft labels from a black-box teacher: a `lmdistill generate` JSONL written with "
        "sampling.logprobs=true and top_logprobs > 0. Its records are the training data (chat template, loss on the "
        "completion; data.block_size/eval_documents/max_documents/seed/messages_column apply, data.source is not "
        "read) and the stored top-k log-probs are the targets. No teacher model runs (teacher is read only when "
        "student.init=prune/config builds the student from it).",
    )
    api_logprobs_tail: bool = Field(
        True,
        description="With api_logprobs: score the teacher mass outside the stored top-k as one extra bucket, "
        "log(1 - sum p); false renormalises the top-k instead.",
    )

    @field_validator("teacher_cache")
    @classmethod
    def _cache_path(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("teacher_cache must be a directory written by `lmdistill label` (or null)")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _api_logprobs_settings(self) -> SoftConfig:
        if self.api_logprobs and self.teacher_cache:
            raise ValueError("give one teacher signal: api_logprobs (log-probs stored with completions) or "
                             "teacher_cache (a cache written by `lmdistill label`), not both")
        if self.api_logprobs and self.loss.temperature != 1.0:
            raise ValueError(
                f"api_logprobs holds the teacher's log-probs at temperature 1, so loss.temperature must be 1.0 "
                f"(got {self.loss.temperature})"
            )
        if self.api_logprobs and "source" in self.data.model_fields_set and self.data.source != self.api_logprobs:
            raise ValueError(
                f"with api_logprobs the training data is that file's records; data.source={self.data.source!r} "
                "would not be read: drop it, or set it to the same file"
            )
        return self


class HardLossConfig(BaseConfig):
    alpha: float = Field(
        1.0, ge=0.0, le=1.0,
        description="mode=token: loss = alpha * CE(teacher's argmax tokens) + (1 - alpha) * CE(ground truth). "
        "mode=sequence ignores it (the ground truth is the teacher's text).",
    )
    chunk_size: int = Field(
        1024, ge=1,
        description="Tokens per chunk when hidden states are projected to logits (teacher argmax, student CE): "
        "at most [chunk_size, vocab] logits exist at once.",
    )
    fused: bool = Field(
        True,
        description="Project hidden states to logits chunk by chunk inside the loss (never [tokens, vocab] logits); "
        "false takes full logits from the models' forward (needed under FSDP / DeepSpeed ZeRO-3).",
    )


class HardConfig(StudentRunConfig):
    """`lmdistill hard`: hard-label distillation on the teacher's argmax tokens (token) or its text (sequence)."""

    mode: Literal["token", "sequence"] = Field(
        "token",
        description="`token`: the teacher's argmax at every target position of data.source is the label (online, "
        "or from teacher_cache); "
        "`sequence`: supervised fine-tuning on teacher completions (a `lmdistill generate` JSONL, data.stage=chat, "
        "loss on the completion only; no teacher model is needed).",
    )
    loss: HardLossConfig = Field(default_factory=HardLossConfig)
    teacher_cache: str | None = Field(
        None,
        description="mode=token: read the teacher's tokens (its top-1 id per position) from a top-k soft-label cache "
        "written by `lmdistill label` (k=1 is enough) instead of running the teacher.",
    )
    eval_teacher: bool = Field(
        False,
        description="Also load the teacher where training does not need it (mode=sequence, or a teacher_cache) to "
        "report held-out KL and agreement with it; needs the student to share its tokenizer. mode=token online "
        "always reports them.",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(output_dir="runs/hard"))

    @model_validator(mode="after")
    def _mode_settings(self) -> HardConfig:
        if self.mode == "sequence" and self.data.stage != "chat":
            raise ValueError(
                "mode=sequence trains on teacher completions with the chat template: set data.stage=chat and "
                "data.source to a `lmdistill generate` JSONL (its `messages` column)"
            )
        if self.mode == "sequence" and self.teacher_cache:
            raise ValueError("teacher_cache holds token-level labels: use it with mode=token, not mode=sequence")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# on-policy distillation (`lmdistill onpolicy`)


class RolloutConfig(BaseConfig):
    """How the student writes its completions."""

    backend: Literal["hf"] = Field("hf", description="`hf`: transformers `generate` with a KV cache, any device.")
    n: int = Field(1, ge=1, description="Completions per prompt.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (1: the student's own distribution).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass kept when sampling.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion (also capped by what data.block_size leaves).")
    reuse: int = Field(
        1, ge=1,
        description="Optimizer steps trained on one batch of rollouts (and its teacher scores): sampled at the steps "
        "s with s % reuse == 0, micro-batch i of steps s+1 .. s+reuse-1 reuses micro-batch i of step s.",
    )
    clip: float = Field(
        0.2, ge=0.0,
        description="signal=sampled_token: PPO's clip of the ratio p_student / p_sampling policy (matters when reuse > 1).",
    )


class TeacherServerConfig(BaseConfig):
    """A teacher behind an OpenAI-compatible server (`lmdistill serve`, or vLLM's server) instead of in this process."""

    url: str | None = Field(
        None, description="Base URL ending in /v1 (e.g. http://127.0.0.1:8000/v1); null: the local teacher model.")
    api_model: str | None = Field(None, description="The model name the server serves (null: the first it lists).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (never logged).")
    timeout_s: float = Field(120.0, gt=0, description="Seconds one scoring request may take before a retry.")
    max_retries: int = Field(6, ge=0, description="Retries of one request (429/5xx/timeouts/dropped connections).")


class OnPolicyConfig(StudentRunConfig):
    """`lmdistill onpolicy`: the student writes completions to the prompts, the teacher scores the student's tokens."""

    data: DataConfig = Field(
        default_factory=lambda: DataConfig(source="embedded:wikipedia-questions", stage="chat", block_size=128,
                                           prompt_column="prompt", completion_column="reference", eval_documents=40),
        description="Chat data: the prompts, and the responses that off-policy steps (lmbda < 1) train on.",
    )
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(output_dir="runs/onpolicy"))
    signal: Literal["dense", "topk", "sampled_token"] = Field(
        "dense",
        description="What the teacher gives on the student's tokens: `dense` its full distribution (local teacher; "
        "any loss.kind through the fused loss), `topk` its top-k log-probs + tail mass, `sampled_token` only the "
        "log-prob of each sampled token (reward log p_T - log p_S, a policy-gradient loss).",
    )
    k: int = Field(20, ge=1, description="signal=topk: log-probs per position (OpenAI-compatible servers allow 20).")
    discount: float = Field(
        0.0, ge=0.0, le=1.0,
        description="signal=sampled_token: a token's advantage adds discount^j times the reward j tokens later.",
    )
    lmbda: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of steps whose sequences the student writes (GKD); the rest train on the dataset's "
        "responses (or the teacher's own answers with seq_kd) as `soft` does. 0: exactly `soft` on this data.",
    )
    seq_kd: bool = Field(False, description="Off-policy steps use answers the (local) teacher writes, not the data's.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    teacher_server: TeacherServerConfig = Field(default_factory=TeacherServerConfig)
    loss: SoftLossConfig = Field(
        default_factory=lambda: SoftLossConfig(kind="reverse_kl", alpha=1.0),
        description="The divergence (signal dense / topk). On the student's own tokens the loss is the divergence "
        "alone; alpha mixes in the CE only on off-policy steps (whose labels are real responses). loss.hidden: "
        "layer-wise distillation on the same tokens (signal=dense with a local teacher only). loss.cross_tokenizer: "
        "a teacher of another tokenizer, scored by byte spans under its own chat template (signal=dense: the "
        "span divergence, local teacher; sampled_token: per-span rewards, local or behind teacher_server.url with "
        "teacher.name_or_path giving its tokenizer; topk: the server's top-k per span).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OnPolicyConfig:
        if self.data.stage != "chat":
            raise ValueError("onpolicy needs chat data (data.stage=chat): the prompt is what the student answers")
        served = self.teacher_server.url is not None
        if self.loss.cross_tokenizer != "refuse":  # lmdistill.onpolicy_cross_tokenizer
            if served and self.signal == "dense":
                raise ValueError("a teacher server of another tokenizer (loss.cross_tokenizer) sends log-probs, not "
                                 "distributions: use --signal sampled_token or --signal topk with teacher_server.url "
                                 "(teacher.name_or_path names its tokenizer), or a local teacher for dense")
            if self.signal == "topk" and not served:
                raise ValueError("signal=topk across tokenizers reads a teacher server's top-k; a local teacher of "
                                 "another tokenizer gives its whole distribution: use --signal dense (the span "
                                 "divergence) or --signal sampled_token (per-span rewards)")
            if self.seq_kd:
                raise ValueError("seq_kd with loss.cross_tokenizer: the teacher would write answers in its own "
                                 "tokens; write them with `lmdistill generate` and give that file as data.source")
        if self.loss.hidden.weight > 0 and (served or self.signal != "dense"):
            raise ValueError(
                "layer-wise distillation (loss.hidden.weight > 0) needs the teacher's hidden states, which only a local "
                f"teacher with signal=dense computes; got {'a teacher server' if served else 'a local teacher'} with "
                f"signal={self.signal}. Use {'no teacher_server.url and ' if served else ''}--signal dense, or set "
                "--loss.hidden.weight 0"
            )
        if served and self.signal == "dense":
            raise ValueError("a teacher server returns top-k log-probs, not whole distributions: with "
                             "teacher_server.url use signal=topk or signal=sampled_token")
        if served and self.seq_kd:
            raise ValueError("seq_kd needs the local teacher to write answers; with a teacher server write them once "
                             "with `lmdistill generate` and give that file as data.source")
        if self.signal == "sampled_token" and self.lmbda < 1:
            raise ValueError("signal=sampled_token rewards the student's own samples; off-policy steps (lmbda < 1) "
                             "need a distribution to match: use signal=dense or topk with lmbda < 1")
        if self.train.save_every % self.rollout.reuse:
            raise ValueError(f"train.save_every ({self.train.save_every}) must be a multiple of rollout.reuse "
                             f"({self.rollout.reuse}): a checkpoint inside a reuse window would lose its cached "
                             "rollouts, and the resumed run would sample different ones")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# co-distillation (`lmdistill codistill`)


def _llama_arch(hidden: int, layers: int) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 512, "tie_word_embeddings": True}


class CoModelConfig(BaseConfig):
    """One of the two co-trained models: a fresh model from `arch`, or a checkpoint to continue from."""

    init: Literal["config", "pretrained"] = Field(
        "config", description="`config`: random init from `arch`; `pretrained`: start from the checkpoint name_or_path."
    )
    name_or_path: str | None = Field(None, description="init=pretrained: hub id or local directory.")
    arch: dict[str, Any] = Field(
        default_factory=lambda: _llama_arch(128, 2),
        description="init=config: transformers config fields; the ones given replace those of this default "
        "(vocab size and special-token ids come from the tokenizer unless set).",
    )
    dtype: Precision = Field("fp32", description="Precision the master weights are kept in.")
    lr: float | None = Field(None, gt=0.0, description="Peak learning rate of this model (null: train.lr).")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint.")

    @field_validator("arch", mode="before")
    @classmethod
    def _on_default_arch(cls, value: Any) -> Any:
        # `--student.arch.hidden_size 64` changes one field; the rest stay those of the default architecture
        if isinstance(value, dict):
            factory = cls.model_fields["arch"].default_factory
            return {**(factory() if factory else {}), **value}  # type: ignore[call-arg]
        return value

    @model_validator(mode="after")
    def _check_init(self) -> CoModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("init=pretrained needs name_or_path (a hub id or a local directory)")
        if self.init == "config" and not self.arch.get("model_type"):
            raise ValueError("init=config needs arch.model_type (e.g. llama, qwen2)")
        return self


class CoTeacherConfig(CoModelConfig):
    """The co-trained teacher: like the student's, plus how often it takes an optimizer step."""

    arch: dict[str, Any] = Field(
        default_factory=lambda: _llama_arch(256, 4),
        description="init=config: transformers config fields; the ones given replace those of this default.",
    )
    update_every: int = Field(
        1, ge=1, description="Update the teacher every k steps (it still gives targets every step)."
    )


class CodistillWeightConfig(BaseConfig):
    """a(t), the weight of the divergence in the student's loss: a*divergence + (1-a)*CE."""

    schedule: Literal["constant", "linear", "cosine", "dynamic"] = Field(
        "dynamic",
        description="`constant`: a=value; `linear`/`cosine`: start_value -> value over [start_step, end_step]; "
        "`dynamic`: value * clip(relative CE gap of student over teacher / gap_scale, 0, 1).",
    )
    value: float = Field(0.5, ge=0.0, le=1.0, description="Constant weight; end of a ramp; ceiling of dynamic.")
    start_value: float = Field(0.0, ge=0.0, le=1.0, description="linear/cosine: weight at and before start_step.")
    start_step: int = Field(0, ge=0, description="linear/cosine: first step of the ramp.")
    end_step: int | None = Field(None, ge=1, description="linear/cosine: step the ramp reaches `value` (null: max_steps).")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="dynamic: decay of the running per-token CE of both models.")
    gap_scale: float = Field(
        0.1, gt=0.0, description="dynamic: relative gap (L_student - L_teacher) / L_student at which a reaches value."
    )

    @model_validator(mode="after")
    def _check_ramp(self) -> CodistillWeightConfig:
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be greater than start_step ({self.start_step})")
        return self


class CodistillLossConfig(DivergenceConfig):
    """Student: a(t)*divergence(student, teacher.detach()) + (1-a(t))*CE; teacher: (1-mutual)*CE + mutual*KD."""

    fused: bool = Field(
        False,
        description="Chunked fused losses from hidden states (never materialise [tokens, vocab] logits); worth it for "
        "large vocabularies.",
    )
    mutual: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Deep-mutual-learning weight of the student->teacher divergence in the teacher's loss (0: off).",
    )
    weight: CodistillWeightConfig = Field(default_factory=CodistillWeightConfig)
    hidden: HiddenLossConfig = Field(
        default_factory=HiddenLossConfig,
        description="Layer-wise distillation of the student toward the live teacher's hidden states (detached: the "
        "teacher still learns from CE alone). pairs null: evenly spaced, student layer i <-> teacher layer "
        "round((i + 1) * teacher_layers / student_layers) - 1 (half up), so the last layers pair.",
    )


class CodistillConfig(BaseConfig):
    """`lmdistill codistill`: teacher and student trained together; the student also learns the teacher's labels."""

    tokenizer: str = Field(
        "embedded:smollm2-135m-instruct",
        description="Tokenizer both models use: a local directory, hub id, or the embedded SmolLM2 one.",
    )
    teacher: CoTeacherConfig = Field(default_factory=CoTeacherConfig)
    student: CoModelConfig = Field(default_factory=CoModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: CodistillLossConfig = Field(default_factory=CodistillLossConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(output_dir="runs/codistill"))


# ---------------------------------------------------------------------------------------------------------------------
# the soft-label cache (`lmdistill label`, `lmdistill estimate`)


_ALL_SPLITS: tuple[Literal["train", "eval"], ...] = ("train", "eval")


class CacheConfig(BaseConfig):
    """What `lmdistill label` stores per target position, and where (docs/cache_format.md)."""

    output_dir: str = Field("runs/cache", description="The cache directory (manifest.json + train/ eval/ shards).")
    encoding: Literal["topk", "sampled", "topk_sampled"] = Field(
        "topk",
        description="`topk`: the k most probable ids and their log-probs (+ tail mass); `sampled`: distinct ids and "
        "counts of `draws` samples from the teacher (Random-Sampling KD, an unbiased forward-KL estimate); "
        "`topk_sampled`: the k most probable ids exactly plus `draws` systematic samples of the teacher's tail "
        "outside them (exact head, unbiased tail; forward KL only).",
    )
    k: int = Field(32, ge=1, description="topk, topk_sampled: ids kept per position (k=1 is token-level hard labels).")
    tail: bool = Field(True, description="topk: also store the log of the mass outside the k ids (a proper distribution).")
    draws: int = Field(
        64, ge=1, le=65535,
        description="sampled: draws per position from the teacher distribution; topk_sampled: draws from its tail.",
    )
    values: Literal["fp32", "fp16", "bf16", "int8"] = Field(
        "fp16", description="Precision of stored log-probs; int8 = 8-bit uniform codes on [-int8_range, 0]."
    )
    int8_range: float = Field(20.0, gt=0.0, description="values=int8: log-probs below -int8_range are clamped to it.")
    temperature: float = Field(1.0, gt=0.0, description="Teacher temperature the log-probs are stored at.")
    shard_blocks: int = Field(256, ge=1, description="Blocks per shard (shard j holds blocks [j*S, (j+1)*S)).")
    batch_size: int = Field(8, ge=1, description="Blocks per teacher forward pass.")
    splits: list[Literal["train", "eval"]] = Field(
        default_factory=lambda: list(_ALL_SPLITS), description="Which data splits to label (eval: held-out KL)."
    )
    seed: int = Field(0, description="Seed of the sampled encoding (each shard draws from its own seeded stream).")
    cross_tokenizer: bool = Field(
        False,
        description="Also store what a student of ANOTHER tokenizer needs (`soft --teacher_cache DIR "
        "--loss.cross_tokenizer hybrid|uld`): each target's actual teacher token and its log-prob, each block's first "
        "token, the teacher's tokenizer files in DIR/tokenizer, and with data.stage=chat each block's messages "
        "(the student renders them with its own chat template). Needs encoding topk or topk_sampled and temperature "
        "1; docs/cache_format.md.",
    )

    @field_validator("splits")
    @classmethod
    def _splits(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError("cache.splits must name train and/or eval, each once")
        return value


class LabelConfig(BaseConfig):
    """`lmdistill label`: run the teacher once over the data and write a soft-label cache."""

    teacher: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    progress: bool = Field(True, description="Show a progress bar.")


class EstimateConfig(BaseConfig):
    """`lmdistill estimate`: bytes of a soft-label cache, dense vs sparse, on paper or measured on a real cache."""

    vocab: int | None = Field(None, ge=2, description="Vocabulary size (default: the cache's, with --cache).")
    tokens: float | None = Field(None, gt=0, description="Corpus size in tokens, e.g. 5e12 (default: the cache's).")
    dtype: Literal["fp32", "fp16", "bf16", "fp8", "int8"] = Field(
        "fp16", description="Bytes per stored probability / log-prob value (fp8 and int8 are 1 byte)."
    )
    k: list[int] = Field(default_factory=lambda: [1, 8, 32, 128], description="top-k sizes to compare, e.g. 1,8,32.")
    draws: list[int] = Field(default_factory=lambda: [8, 32, 64], description="Sampled draws per token to compare.")
    cache: str | None = Field(None, description="An existing cache directory: report its real bytes/token.")

    @field_validator("k", "draws", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # `--k 1,8,32` arrives as one string
            return [v for v in value.replace(" ", "").split(",") if v]
        if isinstance(value, int):
            return [value]
        return value

    @model_validator(mode="after")
    def _needs_input(self) -> EstimateConfig:
        if self.cache is None and (self.vocab is None or self.tokens is None):
            raise ValueError("give --vocab and --tokens (a corpus on paper), or --cache DIR (a real cache)")
        if any(v < 1 for v in self.k) or any(v < 1 for v in self.draws):
            raise ValueError(f"k and draws must be positive integers, got k={self.k}, draws={self.draws}")
        return self


# ---------------------------------------------------------------------------------------------------------------------
# comparisons (`lmdistill compare`, `lmdistill demo`)


class GenerationOptions(BaseConfig):
    """Prompts and sampling for the side-by-side generations of teacher and students."""

    prompts: list[str] = Field(
        default_factory=list,
        description="Prompt texts (chat data: user messages, rendered with the chat template). Empty: the first "
        "`prompt_tokens` tokens of the first `n_prompts` held-out blocks (chat blocks: their prompt part).",
    )
    n_prompts: int = Field(3, ge=0, description="Prompts taken from the held-out blocks when `prompts` is empty.")
    prompt_tokens: int = Field(16, ge=1, description="Tokens of a held-out block used as its prompt (raw text).")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per prompt.")
    temperature: float = Field(0.8, gt=0.0, description="Temperature of the sampled generation (greedy is also shown).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus mass of the sampled generation.")
    seed: int = Field(0, description="Seed of the sampled generation; the same for every model.")
    onpolicy_prompts: int = Field(
        8, ge=0,
        description="Held-out embedded Wikipedia questions every student answers itself, for the on-policy columns "
        "(reverse KL on its own samples, the teacher's NLL of its greedy answers, answer length); 0: none.",
    )


class ArmSpec(BaseConfig):
    """One arm of a comparison: a registered kind, a name for the report, and overrides of that kind's config."""

    name: str = Field(description="Row name in the report (letters, digits, `_`, `-`, `.`).")
    kind: str = Field(description="One of the registered arm kinds: " + ", ".join(
        ["ce", "soft", "cached_topk", "cached_sampled", "cached_topk_sampled", "hard_token", "hard_sequence",
         "codistill", "onpolicy", "cross_tokenizer"]) + " (cross_tokenizer: opt-in, its teacher in prepare.teacher, default "
        "embedded:gemma3-270m).")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of the arm's training config, dotted or nested (e.g. {loss.kind: reverse_kl}). Data, "
        "student, teacher, step budget and seed are shared by all arms and cannot be overridden here.",
    )
    prepare: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields of the arm's preparation step (the `label` config of cached arms, the `generate` config of "
        "hard_sequence), dotted or nested.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value == "teacher":
            raise ValueError(f"arm names are letters, digits, `_`, `-`, `.` and not `teacher` (used for the "
                             f"reference row), got {value!r}")
        return value


def default_arms() -> list[ArmSpec]:
    return [
        ArmSpec(name="ce", kind="ce"),
        ArmSpec(name="soft", kind="soft"),
        ArmSpec(name="cached_topk", kind="cached_topk"),
        ArmSpec(name="cached_sampled", kind="cached_sampled"),
        ArmSpec(name="hard_token", kind="hard_token"),
        ArmSpec(name="hard_sequence", kind="hard_sequence"),
        ArmSpec(name="codistill", kind="codistill"),
        ArmSpec(name="onpolicy", kind="onpolicy"),
    ]


class CompareConfig(StudentRunConfig):
    """`lmdistill compare`: run several arms on the same data, student init, steps and seed; write a report."""

    title: str = Field("lmdistill: distillation methods compared", description="Heading of the report.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The divergence of the soft-label arms.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(output_dir="runs/compare"),
        description="Shared by every arm (train.seed: see `seeds`); an arm writes to "
        "<output_dir>/arms/<name>/seed-<seed>. Held-out metrics use "
        "micro_batch_size x eval_batches blocks, during training (learning curves) and in the final scoring.",
    )
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    arms: list[ArmSpec] = Field(default_factory=default_arms, description="The arms, run in this order.")
    fail_fast: bool = Field(
        False, description="Stop at the first arm that fails (default: record the failure in the report and go on)."
    )
    seeds: list[int] | None = Field(
        None, description="Every arm runs once per seed (train.seed = s, in <output_dir>/arms/<name>/seed-<s>); the "
        "report gives per metric the mean and a 95 % interval (t-interval over seeds when there are two or more, a "
        "bootstrap over the held-out blocks with one). Default: [train.seed].",
    )

    @property
    def run_seeds(self) -> list[int]:
        """The seeds every arm runs with: `seeds`, or [train.seed] when it is not set."""
        return list(self.seeds) if self.seeds else [self.train.seed]

    @model_validator(mode="after")
    def _unique_names(self) -> CompareConfig:
        names = [a.name for a in self.arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique; repeated: {dupes}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {self.seeds}")
        if not self.arms:
            raise ValueError("compare needs at least one arm")
        return self
