"""Co-distillation: a teacher and a student learn in the same loop, on the same batches, usually both from scratch.

Per optimizer step, on each micro-batch (one forward per model):

    teacher loss = (1 - mutual) * CE_T + mutual * D(teacher, student.detach())          mutual = 0 unless asked
    student loss = a(t) * D(student, teacher.detach()) + (1 - a(t)) * CE_S

then both optimizers step (the teacher only every `teacher.update_every` steps). The student's target is the
teacher's logits from the teacher's own training forward, taken before the teacher's update on that batch, so there
is no extra teacher forward. Losses are sums over target tokens divided once by the global token count, as in the core
loop. a(t) comes from lmdistill.codistill_weights (constant, ramp, or driven by the teacher's measured quality).

Both models are checkpointed together (weights, optimizers, schedulers, RNG, a(t) state) and saved at the end with
save_pretrained under `<output_dir>/teacher` and `<output_dir>/student`.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.codistill_weights import Weighting, build_weighting
from lmdistill.config import CodistillConfig, CodistillLossConfig, CoModelConfig, ModelConfig
from lmdistill.data import IGNORE, BatchSchedule, TokenBlocks, build_splits, check_block_size
from lmdistill.errors import CheckpointError, ConfigError, ModelLoadError
from lmdistill.evaluate import evaluate_blocks
from lmdistill.losses import ce_sum_and_count, divergence_sum_and_count, mix
from lmdistill.losses.chunked_ce import chunked_ce_sum_and_count
from lmdistill.losses.fused import fused_distill_loss_sums
from lmdistill.models import (
    DTYPES,
    check_arch_fields,
    count_parameters,
    decoder_hidden,
    lm_head_of,
    load_causal_lm,
    load_tokenizer,
    shared_vocab_size,
)
from lmdistill.recipes.common import seed_everything, write_summary
from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.logging import RunLogger, make_progress, read_log
from lmdistill.train.loop import (
    StepLoss,
    build_optimizer,
    build_scheduler,
    global_token_count,
    make_accelerator,
    save_student,
)

# ---------------------------------------------------------------------------------------------------------------------
# models


def build_model(cfg: CoModelConfig, tokenizer: Any, *, seed: int, what: str) -> nn.Module:
    """A trainable causal LM: random init from `cfg.arch` (seeded) or the checkpoint `cfg.name_or_path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.init == "pretrained":
        model = load_causal_lm(ModelConfig(name_or_path=cfg.name_or_path or "", dtype=cfg.dtype,
                                           trust_remote_code=cfg.trust_remote_code))
        try:
            own = load_tokenizer(cfg.name_or_path or "", trust_remote_code=cfg.trust_remote_code)
        except ModelLoadError:
            own = None  # a bare checkpoint without a tokenizer: only the embedding size can be checked
        if own is not None:
            shared_vocab_size(tokenizer, own)
    else:
        fields = dict(cfg.arch)
        model_type = fields.pop("model_type")
        eos = tokenizer.eos_token_id
        fields.setdefault("vocab_size", len(tokenizer))
        fields.setdefault("eos_token_id", eos)
        fields.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
        try:
            config = AutoConfig.for_model(model_type, **fields)
        except Exception as e:  # noqa: BLE001  (transformers raises several kinds for a bad field)
            raise ConfigError(f"{what}.arch is not a valid `{model_type}` config: {e}") from None
        check_arch_fields(config, fields, what)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(DTYPES[cfg.dtype])
    model.requires_grad_(True)
    model.train()
    return model


@dataclass
class CoSetup:
    tokenizer: Any
    teacher: nn.Module
    student: nn.Module
    n_vocab: int


def build_models(cfg: CodistillConfig) -> CoSetup:
    """Tokenizer, teacher (seed train.seed) and student (seed train.seed + 1), with their shared vocab checked."""
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.tokenizer)
    teacher = build_model(cfg.teacher, tokenizer, seed=cfg.train.seed, what="teacher")
    student = build_model(cfg.student, tokenizer, seed=cfg.train.seed + 1, what="student")
    n_vocab = shared_vocab_size(tokenizer, tokenizer, teacher, student)
    for model in (teacher, student):
        check_block_size(cfg.data.block_size, model.config)
    return CoSetup(tokenizer, teacher, student, n_vocab)


# ---------------------------------------------------------------------------------------------------------------------
# the per-micro-batch losses


def _head(model: nn.Module, n_vocab: int) -> dict[str, Any]:
    weight, bias, scale, softcap = lm_head_of(model)
    return {"weight": weight[:n_vocab], "bias": None if bias is None else bias[:n_vocab], "scale": scale,
            "softcap": softcap}


def _fused_div(h: Tensor, head: dict[str, Any], target_h: Tensor, target_head: dict[str, Any], loss: CodistillLossConfig,
               labels: Tensor, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """(alpha * D + (1 - alpha) * CE, D, CE) summed, from hidden states in one pass; the target side arrives
    detached."""
    sums = fused_distill_loss_sums(
        h, head["weight"], teacher_hidden=target_h, teacher_weight=target_head["weight"], student_bias=head["bias"],
        teacher_bias=target_head["bias"], student_logit_scale=head["scale"], teacher_logit_scale=target_head["scale"],
        student_softcap=head["softcap"], teacher_softcap=target_head["softcap"], kind=loss.kind, beta=loss.beta,
        temperature=loss.temperature, labels=labels, alpha=alpha,
    )
    return sums.total, sums.kd, sums.ce


def _chunked_ce(h: Tensor, head: dict[str, Any], labels: Tensor) -> Tensor:
    return chunked_ce_sum_and_count(h, head["weight"], labels, bias=head["bias"], logit_scale=head["scale"],
                                    softcap=head["softcap"])[0]


def _detached(head: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in head.items()}


def codistill_losses(teacher: nn.Module, student: nn.Module, batch: dict[str, Tensor], loss: CodistillLossConfig,
                     n_vocab: int, *, a: float, teacher_grad: bool = True) -> tuple[StepLoss, StepLoss]:
    """Both models' loss sums over this micro-batch's target tokens, from one forward pass each.

    Args:
        batch: input_ids / labels / attention_mask, each [B, T]; labels already shifted, -100 = not learned.
        a: weight of the divergence in the student's loss, in [0, 1].
        teacher_grad: whether the teacher learns on this step; False runs its forward under no_grad (its targets are
            still needed) and drops the mutual term.

    Returns:
        (teacher, student) StepLoss; teacher parts: ce (and kd with mutual > 0); student parts: ce, kd. The student's
        divergence sees the teacher only through detached tensors, so it never reaches the teacher's gradients;
        the teacher's mutual term sees the student only detached.
    """
    labels = batch["labels"]
    mask = labels != IGNORE
    ids, attn = batch["input_ids"], batch["attention_mask"]
    mutual = loss.mutual if teacher_grad else 0.0
    grad_ctx = contextlib.nullcontext() if teacher_grad else torch.no_grad()
    if loss.fused:
        # Hidden states + output layer instead of [B, T, V] logits. Each model's lm_head runs once per step: its CE
        # is folded into the pass that computes its divergence.
        with grad_ctx:
            h_t = decoder_hidden(teacher, ids, attn)
            head_t = _head(teacher, n_vocab)
        h_s = decoder_hidden(student, ids, attn)
        head_s = _head(student, n_vocab)
        if a > 0:
            student_sum, kd_s, ce_s = _fused_div(h_s, head_s, h_t.detach(), _detached(head_t), loss, labels, a)
        else:  # at a = 0 the divergence is only logged: no gradient work for it
            student_sum = ce_s = _chunked_ce(h_s, head_s, labels)
            with torch.no_grad():
                kd_s = _fused_div(h_s, head_s, h_t.detach(), _detached(head_t), loss, labels, 1.0)[0]
        if mutual > 0:
            teacher_sum, kd_t, ce_t = _fused_div(h_t, head_t, h_s.detach(), _detached(head_s), loss, labels, mutual)
        else:
            with grad_ctx:
                teacher_sum = ce_t = _chunked_ce(h_t, head_t, labels)
            kd_t = None
        teacher_parts = {"ce": ce_t} if kd_t is None else {"ce": ce_t, "kd": kd_t}
        return (StepLoss(teacher_sum, teacher_parts),
                StepLoss(student_sum, {"ce": ce_s, "kd": kd_s}))
    else:
        with grad_ctx:
            t_logits = teacher(input_ids=ids, attention_mask=attn, use_cache=False).logits[..., :n_vocab]
            ce_t = ce_sum_and_count(t_logits, labels)[0]
        s_logits = student(input_ids=ids, attention_mask=attn, use_cache=False).logits[..., :n_vocab]
        ce_s = ce_sum_and_count(s_logits, labels)[0]
        def div(model_logits: Tensor, target_logits: Tensor) -> Tensor:
            return divergence_sum_and_count(model_logits, target_logits, loss.kind, beta=loss.beta,
                                            temperature=loss.temperature, mask=mask)[0]

        with contextlib.nullcontext() if a > 0 else torch.no_grad():  # at a = 0 the divergence is only logged
            kd_s = div(s_logits, t_logits.detach())
        kd_t = div(t_logits, s_logits.detach()) if mutual > 0 else None
    # mix(..., n_tokens=1) is the weighted *sum*: the loop divides by the global token count once.
    teacher_parts = {"ce": ce_t} if kd_t is None else {"ce": ce_t, "kd": kd_t}
    teacher_loss = StepLoss(mix(kd_t, ce_t, 1, mutual), teacher_parts)
    student_loss = StepLoss(mix(kd_s, ce_s, 1, a), {"ce": ce_s, "kd": kd_s})
    return teacher_loss, student_loss


# ---------------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class CoTrainResult:
    step: int
    last: dict[str, float]
    tokens_per_s: float


class CoTrainer:
    """One loop, two models, two optimizers and LR schedules, prepared together by accelerate."""

    def __init__(self, cfg: CodistillConfig, *, teacher: nn.Module, student: nn.Module, data: TokenBlocks,
                 n_vocab: int, eval_blocks: TokenBlocks | None = None, accelerator: Any | None = None,
                 run_info: dict[str, Any] | None = None) -> None:
        self.cfg, self.train_cfg, self.loss_cfg = cfg, cfg.train, cfg.loss
        self.resumed_last: dict[str, Any] = {}  # the last logged record of a resumed run
        self.accelerator = acc = accelerator or make_accelerator(cfg.train)
        self.teacher_every = cfg.teacher.update_every
        # The teacher's LR schedule spans its own number of updates, so warmup and decay fit `update_every`.
        t_cfg = cfg.train.model_copy(update={
            "lr": cfg.teacher.lr or cfg.train.lr,
            "max_steps": math.ceil(cfg.train.max_steps / self.teacher_every),
            "warmup_steps": math.ceil(cfg.train.warmup_steps / self.teacher_every),
        })
        s_cfg = cfg.train.model_copy(update={"lr": cfg.student.lr or cfg.train.lr})
        opt_t, opt_s = build_optimizer(teacher, t_cfg), build_optimizer(student, s_cfg)
        self.sched_t, self.sched_s = build_scheduler(opt_t, t_cfg), build_scheduler(opt_s, s_cfg)
        self.teacher, self.student, self.opt_t, self.opt_s = acc.prepare(teacher, student, opt_t, opt_s)
        self.data, self.n_vocab, self.eval_blocks = data, n_vocab, eval_blocks
        self.weighting: Weighting = build_weighting(cfg.loss.weight, cfg.train.max_steps)
        self.schedule = BatchSchedule(len(data), cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seed,
                                      world_size=acc.num_processes, rank=acc.process_index)
        self.ckpt = CheckpointManager(cfg.train.output_dir, keep=cfg.train.keep_checkpoints)
        self.run_info = run_info or {"recipe": "codistill"}
        self.is_main = acc.is_main_process

    def unwrapped(self) -> tuple[nn.Module, nn.Module]:
        return self.accelerator.unwrap_model(self.teacher), self.accelerator.unwrap_model(self.student)

    # -- one optimizer step ---------------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict[str, float]:
        """Forward/backward every micro-batch of `step` for both models, then step the optimizers; returns the log row."""
        acc = self.accelerator
        self.teacher.train()
        self.student.train()
        batches = [{k: v.to(acc.device) for k, v in self.data.batch(idx).items()}
                   for idx in self.schedule.micro_batches(step)]
        n_global = global_token_count(acc, batches)
        # Each rank's backward is scaled by world size because DDP averages gradients across ranks.
        scale = acc.num_processes / n_global
        update_teacher = step % self.teacher_every == 0
        a = self.weighting.value(step)
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            with self._no_sync(last=i == len(batches) - 1):
                with acc.autocast():
                    lt, ls = codistill_losses(self.teacher, self.student, batch, self.loss_cfg, self.n_vocab, a=a,
                                              teacher_grad=update_teacher)
                # One backward through both graphs: the detaches inside codistill_losses keep them apart.
                total = ls.loss_sum * scale
                if update_teacher:
                    total = total + lt.loss_sum * scale
                acc.backward(total)
            for prefix, out in (("teacher", lt), ("student", ls)):
                _add(sums, f"loss_{prefix}", out.loss_sum)
                for k, v in out.parts.items():
                    _add(sums, f"{k}_{prefix}", v)
        record: dict[str, float] = {"a": a, "teacher_updated": float(update_teacher)}
        if update_teacher:
            record["grad_norm_teacher"] = self._clip(self.teacher)
            self.opt_t.step()
            self.sched_t.step()
        record["grad_norm_student"] = self._clip(self.student)
        self.opt_s.step()
        self.sched_s.step()
        self.opt_t.zero_grad(set_to_none=True)
        self.opt_s.zero_grad(set_to_none=True)
        # a(t+1) must be the same on every rank: feed it the global per-token CE, not this rank's.
        ce = torch.tensor([sums["ce_teacher"], sums["ce_student"]], device=acc.device, dtype=torch.float64)
        if acc.num_processes > 1:
            ce = acc.reduce(ce, reduction="sum")
        ce_t, ce_s = (float(x) / float(n_global) for x in ce)
        self.weighting.observe(ce_t, ce_s)
        denom = float(n_global) / acc.num_processes  # this rank's share, for per-token averages in the log
        record.update({k: v / denom for k, v in sums.items()})
        record.update(ce_teacher_global=ce_t, ce_student_global=ce_s,
                      lr_teacher=float(self.sched_t.get_last_lr()[0]), lr_student=float(self.sched_s.get_last_lr()[0]),
                      tokens=float(sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes))
        return record

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        if not last and self.accelerator.num_processes > 1:
            stack.enter_context(self.accelerator.no_sync(self.teacher))
            stack.enter_context(self.accelerator.no_sync(self.student))
        return stack

    def _clip(self, model: nn.Module) -> float:
        if self.train_cfg.max_grad_norm is None:
            return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
        return float(self.accelerator.clip_grad_norm_(model.parameters(), self.train_cfg.max_grad_norm))

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Held-out student metrics plus the teacher's perplexity, KL(teacher || student) and top-1 agreement."""
        if self.eval_blocks is None or len(self.eval_blocks) == 0:
            return {}
        teacher, student = self.unwrapped()

        @torch.no_grad()
        def teacher_logits(batch: dict[str, Tensor]) -> Tensor:
            was = teacher.training
            teacher.eval()
            out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            teacher.train(was)
            return out.logits[..., : self.n_vocab]

        return evaluate_blocks(student, self.eval_blocks, n_vocab=self.n_vocab,
                               batch_size=self.train_cfg.micro_batch_size, max_batches=self.train_cfg.eval_batches,
                               teacher_logits_fn=teacher_logits)

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _parts(self) -> dict[str, Any]:
        teacher, student = self.unwrapped()
        return {"models": {"teacher": teacher, "student": student},
                "optimizers": {"teacher": self.opt_t, "student": self.opt_s},
                "schedulers": {"teacher": self.sched_t, "student": self.sched_s}}

    def save_checkpoint(self, step: int, last: dict[str, Any] | None = None) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            weighting = {"schedule": self.loss_cfg.weight.schedule, "state": self.weighting.state_dict()}
            self.ckpt.save(step, **self._parts(),
                           extra={"run": self.run_info, "weighting": weighting, "last": last or {}})
        self.accelerator.wait_for_everyone()

    def resume(self) -> int:
        """Restore both models, optimizers, schedulers, RNG and the a(t) state from the newest checkpoint."""
        latest = self.ckpt.latest()
        if latest is None:
            return 0
        state = self.ckpt.load(latest, **self._parts())
        saved = state.get("extra", {}).get("weighting")
        if saved is None or saved.get("schedule") != self.loss_cfg.weight.schedule:
            raise CheckpointError(
                f"checkpoint `{latest}` was written with loss.weight.schedule="
                f"{(saved or {}).get('schedule')!r}, this run asks for {self.loss_cfg.weight.schedule!r}; resume with "
                "the same schedule or start a fresh output_dir"
            )
        self.weighting.load_state_dict(saved["state"])
        self.resumed_last = dict(state.get("extra", {}).get("last") or {})
        return int(state["step"])

    # -- the whole run -------------------------------------------------------------------------------------------

    def fit(self) -> CoTrainResult:
        cfg, acc = self.train_cfg, self.accelerator
        self.resumed_last = {}
        start = self.resume() if cfg.resume else 0
        # Resumed from the final checkpoint (killed while exporting): the final evaluation was logged and the
        # checkpoint written before, so neither is repeated. No checkpoint at all: a fresh start and a fresh log.
        finished = start >= cfg.max_steps
        logger = RunLogger(cfg.output_dir, enabled=self.is_main, resume_step=start if cfg.resume and start else None)
        if self.is_main and start:
            acc.print(f"resumed from step {start} ({self.ckpt.latest()})")
        has_eval = self.eval_blocks is not None and len(self.eval_blocks) > 0
        if has_eval and start == 0:
            logger.log(0, {f"eval/{k}": v for k, v in self.evaluate().items()})
        tokens, t0, last = 0.0, time.perf_counter(), self.resumed_last
        with make_progress(cfg.progress and self.is_main) as progress:
            task = progress.add_task("codistill", total=cfg.max_steps, completed=start, stats="")
            for step in range(start, cfg.max_steps):
                last = self.train_step(step)
                tokens += last.pop("tokens")
                last["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-9)
                done = step + 1
                # a(t) goes in the log every step; the other numbers every log_every steps.
                full = done % cfg.log_every == 0 or done == cfg.max_steps
                logger.log(done, last if full else {"a": last["a"]})
                if has_eval and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                    logger.log(done, {f"eval/{k}": v for k, v in self.evaluate().items()})
                if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
                    self.save_checkpoint(done, last)
                progress.update(task, completed=done, stats=f"a {last['a']:.2f} | CE teacher "
                                f"{last['ce_teacher']:.3f} student {last['ce_student']:.3f}")
        if has_eval and not finished:
            logger.log(cfg.max_steps, {f"eval/{k}": v for k, v in self.evaluate().items()})
        if cfg.save_every and not finished:
            self.save_checkpoint(cfg.max_steps, last)
        logger.close()
        return CoTrainResult(cfg.max_steps, last, tokens / max(time.perf_counter() - t0, 1e-9))


def _add(sums: dict[str, float], key: str, value: Tensor) -> None:
    sums[key] = sums.get(key, 0.0) + float(value.detach())


# ---------------------------------------------------------------------------------------------------------------------
# entry point


def run_codistill(cfg: CodistillConfig) -> dict[str, Any]:
    """Co-train teacher and student; returns the run summary (also written to output_dir/summary.json)."""
    t_start = time.perf_counter()
    accelerator = make_accelerator(cfg.train)
    setup = build_models(cfg)
    splits = build_splits(cfg.data, setup.tokenizer)
    info = {"teacher_parameters": count_parameters(setup.teacher),
            "student_parameters": count_parameters(setup.student), "vocab": setup.n_vocab,
            "train_blocks": len(splits.train), "eval_blocks": len(splits.eval),
            "train_target_tokens": splits.train.n_target_tokens}
    w = cfg.loss.weight
    if accelerator.is_main_process:
        accelerator.print(
            f"co-distillation: teacher {info['teacher_parameters'] / 1e6:.2f}M params, student "
            f"{info['student_parameters'] / 1e6:.2f}M, {info['train_blocks']} train blocks x {cfg.data.block_size} "
            f"tokens, {cfg.train.max_steps} steps, a(t) {w.schedule}"
            f"{', mutual ' + str(cfg.loss.mutual) if cfg.loss.mutual else ''}"
        )
    trainer = CoTrainer(cfg, teacher=setup.teacher, student=setup.student, data=splits.train, n_vocab=setup.n_vocab,
                        eval_blocks=splits.eval, accelerator=accelerator)
    result = trainer.fit()
    summary: dict[str, Any] = {"recipe": "codistill", **info, "steps": result.step,
                               "final": result.last, "train_tokens_per_s": result.tokens_per_s}
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        teacher, student = trainer.unwrapped()
        summary["teacher_dir"] = str(save_student(teacher, setup.tokenizer, out / "teacher"))
        summary["student_dir"] = str(save_student(student, setup.tokenizer, out / "student"))
        summary["log"] = str(out / "log.jsonl")
        evals = [{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/") or k == "step"}
                 for r in read_log(out / "log.jsonl") if any(k.startswith("eval/") for k in r)]
        if evals:
            summary["eval_first"], summary["eval_last"] = evals[0], evals[-1]
        summary["wall_s"] = time.perf_counter() - t_start
        write_summary(out, cfg, summary)
    accelerator.wait_for_everyone()
    return summary
