"""Held-out metrics of a student against ground truth and (optionally) its teacher, and `lmdistill eval`.

Per target token: cross-entropy (-> perplexity), KL(teacher || student), top-1 agreement with the teacher, and the
expected calibration error of the student's top-1 prediction against the ground-truth next token. Plus throughput and
greedy / sampled generations of teacher and student side by side for the same prompts. Per byte of the target text:
bits per byte (the CE sum in bits over the bytes the target tokens spell), which does not depend on the tokenizer, so
models of different vocabularies compare on equal terms.

The training loop calls `evaluate_blocks` every `train.eval_every` steps (logged as `eval/*`), so every run has
learning curves of these metrics; `compare` scores all its students with `evaluate_models` on the same batches.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from lmdistill.config import BaseConfig, DataConfig, GenerationOptions, ModelConfig
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.io import write_json
from lmdistill.token_bytes import ByteOffsetError, token_byte_lengths, tokenizer_name

ECE_BINS = 15


def expected_calibration_error(confidence: Tensor, correct: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE = sum_b (|B_b| / N) * |accuracy(B_b) - mean confidence(B_b)| over equal-width confidence bins.

    Args:
        confidence: [N] top-1 probability of each prediction, in [0, 1].
        correct: [N] bool, whether the top-1 prediction was the true token.
    """
    hist = CalibrationHistogram(n_bins)
    hist.add(confidence, correct)
    return hist.ece()


@dataclass
class CalibrationHistogram:
    """Running per-bin sums, so ECE over many batches equals ECE over the concatenation."""

    n_bins: int = ECE_BINS
    count: Tensor = field(init=False)
    conf_sum: Tensor = field(init=False)
    correct_sum: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.n_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(self.n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(self.n_bins, dtype=torch.float64)

    def add(self, confidence: Tensor, correct: Tensor) -> None:
        conf = confidence.detach().double().flatten().cpu()
        # Bin b holds (b/n, (b+1)/n]; confidence exactly 0 goes to the first bin.
        idx = (torch.ceil(conf * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
        self.count.index_add_(0, idx, torch.ones_like(conf))
        self.conf_sum.index_add_(0, idx, conf)
        self.correct_sum.index_add_(0, idx, correct.detach().double().flatten().cpu())

    def ece(self) -> float:
        total = float(self.count.sum())
        if total == 0:
            return 0.0
        nonempty = self.count > 0
        gap = (self.correct_sum[nonempty] - self.conf_sum[nonempty]).abs()
        return float(gap.sum() / total)


@dataclass
class MetricSums:
    """Sums over target tokens; `result()` turns them into per-token means."""

    tokens: int = 0
    ce: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    teacher_ce: float = 0.0
    has_teacher: bool = False
    n_bytes: int = 0
    has_bytes: bool = False
    calib: CalibrationHistogram = field(default_factory=CalibrationHistogram)

    def add(self, student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
            byte_lengths: Tensor | None = None) -> None:
        """student_logits/teacher_logits [B, T, V] (sliced to the shared vocab), labels [B, T] with -100 ignored.

        byte_lengths: [len(tokenizer)] bytes each token id spells (`byte_lengths_of`), for bits per byte: the bytes
        of the target tokens are summed. A special-token target (the EOS between packed documents) spells 0 bytes but
        its CE counts: predicting where a document ends is part of modelling the text (the usual convention).
        """
        mask = labels != IGNORE
        if not mask.any():
            return
        s = student_logits[mask].float()
        y = labels[mask]
        logp = torch.log_softmax(s, dim=-1)
        self.tokens += int(y.numel())
        if byte_lengths is not None:
            self.has_bytes = True
            self.n_bytes += target_bytes(y, byte_lengths)
        self.ce += float(F.nll_loss(logp, y, reduction="sum"))
        conf, pred = logp.max(dim=-1)
        self.calib.add(conf.exp(), pred == y)
        if teacher_logits is not None:
            self.has_teacher = True
            lt = torch.log_softmax(teacher_logits[mask].float(), dim=-1)
            pt = lt.exp()
            self.kl += float((pt * (lt - logp)).nan_to_num(0.0).sum())
            self.agree += float((pred == lt.argmax(dim=-1)).sum())
            self.teacher_ce += float(F.nll_loss(lt, y, reduction="sum"))

    def result(self) -> dict[str, float]:
        """Per-token means; with byte lengths also `bits_per_byte` and the target `bytes` (and `teacher_bits_per_byte`
        with a teacher), left out when the targets spell no byte at all."""
        n = max(self.tokens, 1)
        out = {"ce": self.ce / n, "perplexity": math.exp(min(self.ce / n, 50.0)), "ece": self.calib.ece(),
               "tokens": float(self.tokens)}
        if self.has_bytes and self.n_bytes > 0:
            out.update(bits_per_byte=bits_per_byte(self.ce, self.n_bytes), bytes=float(self.n_bytes))
        if self.has_teacher:
            out.update(kl_to_teacher=self.kl / n, agreement=self.agree / n,
                       teacher_perplexity=math.exp(min(self.teacher_ce / n, 50.0)))
            if self.has_bytes and self.n_bytes > 0:
                out["teacher_bits_per_byte"] = bits_per_byte(self.teacher_ce, self.n_bytes)
        return out


def bits_per_byte(ce_sum: float, n_bytes: float) -> float:
    """Bits per byte of text: the CE sum in nats over the target tokens / (ln 2 * the bytes those tokens spell)."""
    return ce_sum / (math.log(2) * n_bytes)


def target_bytes(targets: Tensor, byte_lengths: Tensor) -> int:
    """Bytes spelled by target token ids `targets` (any shape, no -100) under the table `byte_lengths` [V]."""
    return int(byte_lengths.to(targets.device)[targets].sum())


_WARNED_NO_BYTES: set[str] = set()


def byte_lengths_of(tokenizer: Any) -> Tensor | None:
    """[len(tokenizer)] bytes each token spells (0 for special tokens), or None, with one warning per tokenizer, for
    a tokenizer whose tokens' bytes are unknown (then bits per byte is left out; the other metrics are reported)."""
    try:
        return token_byte_lengths(tokenizer)
    except ByteOffsetError as e:
        name = tokenizer_name(tokenizer)
        if name not in _WARNED_NO_BYTES:
            _WARNED_NO_BYTES.add(name)
            warnings.warn(f"no bits per byte: {e}", stacklevel=2)
        return None


def _per_block_sums(logits: Tensor, labels: Tensor, teacher_logits: Tensor | None,
                    byte_lengths: Tensor | None = None) -> list[list[float]]:
    """[target tokens, CE sum, KL(teacher || student) sum, agreements, target bytes (0 without `byte_lengths`)] of
    every block (row) of a batch."""
    out = []
    for b in range(labels.shape[0]):
        mask = labels[b] != IGNORE
        n = int(mask.sum())
        if n == 0:
            out.append([0.0, 0.0, 0.0, 0.0, 0.0])
            continue
        logp = torch.log_softmax(logits[b][mask].float(), dim=-1)
        y = labels[b][mask]
        n_bytes = float(target_bytes(y, byte_lengths)) if byte_lengths is not None else 0.0
        row = [float(n), float(F.nll_loss(logp, y, reduction="sum")), 0.0, 0.0, n_bytes]
        if teacher_logits is not None:
            lt = torch.log_softmax(teacher_logits[b][mask].float(), dim=-1)
            row[2] = float((lt.exp() * (lt - logp)).nan_to_num(0.0).sum())
            row[3] = float((logp.argmax(dim=-1) == lt.argmax(dim=-1)).sum())
        out.append(row)
    return out


def held_out_batches(blocks: TokenBlocks, batch_size: int, max_batches: int | None,
                     device: torch.device | str) -> Iterator[dict[str, Tensor]]:
    """Consecutive batches of `blocks` in order (the same ones for every model scored), at most `max_batches`."""
    n_batches = math.ceil(len(blocks) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        idx = list(range(b * batch_size, min((b + 1) * batch_size, len(blocks))))
        yield {k: v.to(device) for k, v in blocks.batch(idx).items()}


@torch.no_grad()
def evaluate_blocks(student: nn.Module, blocks: TokenBlocks, *, n_vocab: int, batch_size: int = 4,
                    max_batches: int | None = None,
                    teacher_logits_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
                    device: torch.device | str | None = None, byte_lengths: Tensor | None = None) -> dict[str, float]:
    """Metrics of `student` on held-out blocks; with `teacher_logits_fn` also KL to the teacher and agreement; with
    `byte_lengths` (the student tokenizer's [V] table, `byte_lengths_of`) also bits per byte."""
    if len(blocks) == 0:
        return {}
    was_training = student.training
    student.eval()
    device = device or next(student.parameters()).device
    sums = MetricSums()
    t0 = time.perf_counter()
    student_s = 0.0
    for batch in held_out_batches(blocks, batch_size, max_batches, device):
        ts = time.perf_counter()
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., :n_vocab]
        student_s += _synced_elapsed(ts, logits)
        t_logits = teacher_logits_fn(batch)[..., :n_vocab] if teacher_logits_fn is not None else None
        sums.add(logits, batch["labels"], t_logits, byte_lengths)
    out = sums.result()
    # eval_tokens_per_s: the whole evaluation (teacher included); student_tokens_per_s: the student's forward alone.
    out["eval_tokens_per_s"] = sums.tokens / max(time.perf_counter() - t0, 1e-9)
    out["student_tokens_per_s"] = sums.tokens / max(student_s, 1e-9)
    student.train(was_training)
    return out


def _synced_elapsed(start: float, tensor: Tensor) -> float:
    """Seconds since `start`, after the device has finished computing `tensor` (CUDA runs asynchronously)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate_models(models: Mapping[str, nn.Module], blocks: TokenBlocks, *, n_vocab: int,
                    teacher: nn.Module | None = None, batch_size: int = 4, max_batches: int | None = None,
                    device: torch.device | str | None = None,
                    block_sums: dict[str, list[list[float]]] | None = None, byte_lengths: Tensor | None = None,
                    teacher_byte_lengths: Tensor | None = None) -> dict[str, dict[str, float]]:
    """Several students on the same held-out batches; the teacher runs once per batch and serves them all.

    Returns {name: metrics} as `evaluate_blocks` computes them (`student_tokens_per_s` times each model's own forward),
    plus `"teacher"`: the teacher's own perplexity, ECE, bits per byte and tokens/s when a teacher is given. With
    `block_sums` (a dict to fill) each model's per-block sums [target tokens, CE, KL to the teacher, top-1 agreements,
    target bytes] are appended to block_sums[name], one list per held-out block in order: what a bootstrap over blocks
    resamples. `byte_lengths` is the students' [V] token-byte table (`byte_lengths_of`); `teacher_byte_lengths` the
    teacher's own (default: the same), so its bits per byte is over its own tokens of the same text.
    """
    if len(blocks) == 0 or not models:
        return {}
    device = torch.device(device) if device is not None else next(next(iter(models.values())).parameters()).device
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    sums = {name: MetricSums() for name in models}
    seconds = dict.fromkeys(models, 0.0)
    teacher_sums, teacher_s = MetricSums(), 0.0
    t_bytes = teacher_byte_lengths if teacher_byte_lengths is not None else byte_lengths
    for batch in held_out_batches(blocks, batch_size, max_batches, device):
        t_logits = None
        if teacher is not None:
            ts = time.perf_counter()
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits[..., :n_vocab]
            teacher_s += _synced_elapsed(ts, t_logits)
            teacher_sums.add(t_logits, batch["labels"], byte_lengths=t_bytes)
        for name, model in models.items():
            ts = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits[..., :n_vocab]
            seconds[name] += _synced_elapsed(ts, logits)
            sums[name].add(logits, batch["labels"], t_logits, byte_lengths)
            if block_sums is not None:
                block_sums.setdefault(name, []).extend(_per_block_sums(logits, batch["labels"], t_logits,
                                                                       byte_lengths))
    out: dict[str, dict[str, float]] = {}
    for name, s in sums.items():
        out[name] = {**s.result(), "student_tokens_per_s": s.tokens / max(seconds[name], 1e-9)}
    if teacher is not None:
        out["teacher"] = {**teacher_sums.result(), "student_tokens_per_s": teacher_sums.tokens / max(teacher_s, 1e-9)}
    for name, m in models.items():
        m.train(modes[name])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# generations side by side


def prompts_from_blocks(blocks: TokenBlocks, n: int, prompt_tokens: int) -> list[Tensor]:
    """Prompt ids [P] from the first `n` held-out blocks: a chat block's prompt part (up to its first target), or the
    first `prompt_tokens` tokens of a raw-text block."""
    out = []
    for i in range(min(n, len(blocks))):
        labels, ids, mask = blocks.labels[i], blocks.input_ids[i], blocks.attention_mask[i]
        targets = (labels != IGNORE).nonzero().flatten()
        first = int(targets[0]) if len(targets) else 0
        # labels[t] is the token after position t: the prompt of a chat block ends at (and includes) position `first`
        end = first + 1 if first > 0 else prompt_tokens
        end = min(end, int(mask.sum()))
        out.append(ids[:end].clone())
    return out


def prompts_from_text(texts: list[str], tokenizer: Any, chat: bool) -> list[Tensor]:
    out = []
    for text in texts:
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(torch.as_tensor(ids, dtype=torch.long).flatten())
    return out


@torch.no_grad()
def generate_one(model: Any, tokenizer: Any, prompt_ids: Tensor, *, sample: bool, opts: GenerationOptions,
                 seed: int) -> dict[str, Any]:
    """One completion of `prompt_ids` [P]: greedy, or sampled at opts.temperature/top_p with `seed`."""
    device = next(model.parameters()).device
    ids = prompt_ids.view(1, -1).to(device)
    kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": opts.max_new_tokens,
                              "pad_token_id": tokenizer.pad_token_id}
    if sample:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    else:
        # a checkpoint's generation_config may carry sampling defaults; greedy means none of them
        kwargs.update(temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    seconds = _synced_elapsed(t0, out)
    model.train(was_training)
    new = out[0, ids.shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": int(new.numel()),
            "seconds": round(seconds, 4)}


def side_by_side(models: Mapping[str, nn.Module], tokenizer: Any, prompts: list[Tensor],
                 opts: GenerationOptions) -> list[dict[str, Any]]:
    """For each prompt: {"prompt": text, "outputs": {model name: {"greedy": {...}, "sampled": {...}}}}."""
    rows = []
    for i, prompt in enumerate(prompts):
        outputs = {}
        for name, model in models.items():
            outputs[name] = {
                "greedy": generate_one(model, tokenizer, prompt, sample=False, opts=opts, seed=opts.seed + i),
                "sampled": generate_one(model, tokenizer, prompt, sample=True, opts=opts, seed=opts.seed + i),
            }
        rows.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=False), "outputs": outputs})
    return rows


def generation_tokens_per_s(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Generated tokens per second of each model over all its side-by-side generations."""
    tokens: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for row in rows:
        for name, outs in row["outputs"].items():
            for g in outs.values():
                tokens[name] = tokens.get(name, 0) + g["tokens"]
                seconds[name] = seconds.get(name, 0.0) + g["seconds"]
    return {name: tokens[name] / max(seconds[name], 1e-9) for name in tokens}


# ---------------------------------------------------------------------------------------------------------------------
# `lmdistill eval`


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as torch spells it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EvalConfig(BaseConfig):
    """`lmdistill eval`: held-out metrics of a student against its teacher, and side-by-side generations, as JSON."""

    student: ModelConfig = Field(
        default_factory=lambda: ModelConfig(name_or_path="runs/soft/student"),
        description="The model evaluated (a `student/` directory written by a recipe, a hub id, or a local path).",
    )
    teacher: ModelConfig = Field(default_factory=ModelConfig)
    with_teacher: bool = Field(
        True, description="Load the teacher for KL, agreement and its generations (needs the same tokenizer)."
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="Held-out data: the same settings (source, block_size, eval_documents, seed) as training give the "
        "same held-out documents the run never trained on.",
    )
    batch_size: int = Field(4, ge=1, description="Held-out blocks per forward pass.")
    max_batches: int | None = Field(16, ge=1, description="Evaluate at most this many batches (null: all).")
    generation: GenerationOptions = Field(default_factory=GenerationOptions)
    device: str = Field("auto", description="`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ...")
    output: str | None = Field(None, description="JSON file for the results (default: <student>/eval.json).")
    lm_eval: str | list[str] | None = Field(
        None,
        description="lm-evaluation-harness tasks (comma-separated) to also run on the student, e.g. "
        "`--lm-eval hellaswag,arc_easy`; needs `pip install lm-eval` and its datasets locally or a network.",
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="Examples per lm-eval task (null: all).")


def lm_eval_tasks(tasks: str | list[str]) -> list[str]:
    """The task names of `--lm-eval`, after checking that lm-evaluation-harness is importable (a clear error if not)."""
    from lmdistill.errors import ConfigError

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ConfigError("--lm-eval needs at least one task name, e.g. `--lm-eval hellaswag,arc_easy`")
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--lm-eval delegates to EleutherAI's lm-evaluation-harness, which is not installed: "
            "pip install 'lmdistill[lm-eval]' (or pip install lm-eval); its tasks need their datasets cached locally "
            "or a network"
        ) from None
    return names


def run_lm_eval(model: nn.Module, tokenizer: Any, tasks: str | list[str], *, limit: int | None = None,
                batch_size: int = 4) -> dict[str, Any]:
    """Delegate to EleutherAI's lm-evaluation-harness on an in-memory model; returns its per-task results."""
    from lmdistill.errors import LmdistillError

    names = lm_eval_tasks(tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit)
    except Exception as e:  # noqa: BLE001  (unknown task, dataset not cached offline, ...: one readable message)
        raise LmdistillError(f"lm-evaluation-harness could not run tasks {names}: {type(e).__name__}: {e}") from None
    return _jsonable((results or {}).get("results", {}))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def load_eval_models(cfg: EvalConfig, device: torch.device) -> tuple[Any, nn.Module, nn.Module | None, int]:
    """(tokenizer, student, teacher or None, shared vocab size) for `lmdistill eval`."""
    from lmdistill.errors import VocabMismatchError
    from lmdistill.models import load_causal_lm, load_teacher, load_tokenizer, shared_vocab_size

    tok = load_tokenizer(cfg.student.name_or_path, revision=cfg.student.revision,
                         trust_remote_code=cfg.student.trust_remote_code)
    student = load_causal_lm(cfg.student).to(device).eval()
    teacher = None
    n_vocab = len(tok)
    if cfg.with_teacher:
        t_tok = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
        teacher = load_teacher(cfg.teacher).to(device)
        try:
            n_vocab = shared_vocab_size(t_tok, tok, teacher, student)
        except VocabMismatchError as e:
            raise VocabMismatchError(f"{e}\nTo evaluate the student alone, set --with_teacher false.") from None
    return tok, student, teacher, n_vocab


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Metrics (+ generations, + lm-eval tasks) of one student; written as JSON and returned."""
    from lmdistill.data import build_splits
    from lmdistill.errors import DataError

    if cfg.lm_eval:
        lm_eval_tasks(cfg.lm_eval)  # fail before minutes of evaluation, not after
    device = resolve_device(cfg.device)
    tok, student, teacher, n_vocab = load_eval_models(cfg, device)
    out = Path(cfg.output) if cfg.output else _default_output(cfg.student.name_or_path)
    try:  # an output that cannot be written fails now, not after the evaluation
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from lmdistill.errors import write_failure

        raise write_failure("evaluation result", out, e) from None
    held = build_splits(cfg.data, tok).eval
    if len(held) == 0:
        raise DataError(
            f"no held-out block of {cfg.data.block_size} tokens in `{cfg.data.source}`: raise data.eval_documents or "
            "lower data.block_size"
        )
    metrics = evaluate_models({"student": student}, held, n_vocab=n_vocab, teacher=teacher, batch_size=cfg.batch_size,
                              max_batches=cfg.max_batches, device=device, byte_lengths=byte_lengths_of(tok))
    opts = cfg.generation
    prompts = (prompts_from_text(opts.prompts, tok, cfg.data.stage == "chat") if opts.prompts
               else prompts_from_blocks(held, opts.n_prompts, opts.prompt_tokens))
    gen_models = {"teacher": teacher, "student": student} if teacher is not None else {"student": student}
    generations = side_by_side(gen_models, tok, prompts, opts)
    result: dict[str, Any] = {
        "student": cfg.student.name_or_path,
        "teacher": cfg.teacher.name_or_path if teacher is not None else None,
        "device": str(device),
        "held_out_blocks": min(len(held), cfg.batch_size * (cfg.max_batches or len(held))),
        "block_size": cfg.data.block_size,
        "metrics": metrics["student"],
        "teacher_metrics": metrics.get("teacher"),
        "generation_tokens_per_s": generation_tokens_per_s(generations),
        "generations": generations,
    }
    if cfg.lm_eval:
        result["lm_eval"] = run_lm_eval(student, tok, cfg.lm_eval, limit=cfg.lm_eval_limit, batch_size=cfg.batch_size)
    write_json(out, result, "evaluation result")
    result["output"] = str(out)
    return result


def _default_output(name_or_path: str) -> Path:
    p = Path(name_or_path).expanduser()
    return p / "eval.json" if p.is_dir() else Path("runs") / "eval" / f"{name_or_path.replace('/', '__')}.json"


def eval_command(cfg: EvalConfig) -> dict[str, Any]:
    """`lmdistill eval`: run, print the headline numbers and where the JSON went."""
    result = run_eval(cfg)
    m = result["metrics"]
    line = f"perplexity {m['perplexity']:.3f}  ECE {m['ece']:.4f}  student {m['student_tokens_per_s']:,.0f} tokens/s"
    if "bits_per_byte" in m:
        line += f"  bits/byte {m['bits_per_byte']:.4f}"
    if "kl_to_teacher" in m:
        line += f"  KL(teacher||student) {m['kl_to_teacher']:.4f}  agreement {m['agreement']:.3f}"
    print(line)
    if result.get("teacher_metrics"):
        t = result["teacher_metrics"]
        print(f"teacher perplexity {t['perplexity']:.3f}"
              + (f"  bits/byte {t['bits_per_byte']:.4f}" if "bits_per_byte" in t else ""))
    for i, g in enumerate(result["generations"], 1):
        print(f"--- prompt {i}: {g['prompt']!r}")
        for name, o in g["outputs"].items():
            print(f"  {name:>8} greedy : {o['greedy']['text']!r}")
            print(f"  {name:>8} sampled: {o['sampled']['text']!r}")
    print(f"results: {result['output']}")
    return result
