"""The one training loop: accelerate, AdamW + warmup/cosine, accumulation, clipping, eval, checkpoints, resume.

A recipe hands it a `loss_fn(batch) -> StepLoss` that returns *sums* over the micro-batch's target tokens; the loop
divides once by the number of target tokens in the whole accumulated, all-rank batch. That keeps the loss equal to
the per-token mean however the batch is split into micro-batches, padded or sharded across processes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmdistill.config import TrainConfig
from lmdistill.data import IGNORE, BatchSchedule, TokenBlocks
from lmdistill.errors import ConfigError, NonFiniteError
from lmdistill.train.checkpoint import CheckpointManager, atomic_dir
from lmdistill.train.distributed import deepspeed_defaults, engine, full_training_state, load_full_training_state
from lmdistill.train.logging import RunLogger, make_progress


@dataclass
class StepLoss:
    """What a recipe's loss function returns for one micro-batch.

    loss_sum: the objective summed over this micro-batch's target tokens (scalar with graph).
    parts: other sums over the same tokens, for logging (e.g. {"kd": ..., "ce": ...}).
    """

    loss_sum: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    # Under plain `torchrun` on a machine without a GPU, accelerate only sets up a (gloo) process group when told to
    # use the CPU; without this every rank would silently train alone on the whole batch and write the same files.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed, cpu=cpu)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights (1-D parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.max_steps - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def global_token_count(accelerator: Any, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Target tokens in the whole optimizer step: all micro-batches, all ranks."""
    local = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    count = torch.tensor(float(local), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return count.clamp_min(1.0)


@dataclass
class TrainResult:
    step: int
    last_loss: float
    tokens_per_s: float
    history: list[dict[str, Any]]


class Trainer:
    """Trains one model with a recipe's loss function. Recipes with two models (co-distillation) reuse the pieces."""

    def __init__(self, cfg: TrainConfig, *, model: nn.Module, data: TokenBlocks,
                 loss_fn: Callable[[dict[str, torch.Tensor]], StepLoss],
                 eval_fn: Callable[[int], dict[str, float]] | None = None, accelerator: Any | None = None,
                 run_info: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.accelerator = accelerator or make_accelerator(cfg)
        self.engine = engine(self.accelerator)
        # DeepSpeed divides each backward by its own accumulation count; the loop normalises by tokens instead.
        self.ds_accum = deepspeed_defaults(self.accelerator, cfg)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.data, self.loss_fn, self.eval_fn = data, loss_fn, eval_fn
        self.schedule = BatchSchedule(
            len(data), cfg.micro_batch_size, cfg.grad_accum, cfg.seed,
            world_size=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )
        self.ckpt = CheckpointManager(cfg.output_dir, keep=cfg.keep_checkpoints)
        self.run_info = run_info or {}
        self.is_main = self.accelerator.is_main_process

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _save(self, step: int, last_loss: float) -> None:
        self.accelerator.wait_for_everyone()
        model: Any = self.unwrapped
        optimizer: Any = self.optimizer
        if self.engine == "fsdp":  # every rank takes part in gathering the full state; rank 0 writes it
            model, optimizer = full_training_state(self.accelerator, self.model, self.optimizer)
        if self.is_main:
            self.ckpt.save(step, models={"student": model}, optimizers={"student": optimizer},
                           schedulers={"student": self.scheduler},
                           extra={"run": self.run_info, "last_loss": last_loss})
        self.accelerator.wait_for_everyone()

    def _resume(self) -> tuple[int, float]:
        """(step, last training loss) of the newest complete checkpoint; (0, nan) when there is none."""
        latest = self.ckpt.latest()
        if latest is None:
            return 0, float("nan")
        if self.engine == "fsdp":
            state = self.ckpt.load(latest, models={}, optimizers={}, schedulers={"student": self.scheduler})
            load_full_training_state(self.model, self.optimizer, *self.ckpt.read_states(latest, "student"))
        else:
            state = self.ckpt.load(latest, models={"student": self.unwrapped},
                                   optimizers={"student": self.optimizer}, schedulers={"student": self.scheduler})
        return int(state["step"]), float(state.get("extra", {}).get("last_loss", float("nan")))

    def _evaluate(self, step: int) -> dict[str, float]:
        assert self.eval_fn is not None
        try:
            return self.eval_fn(step)
        except NonFiniteError as e:
            raise NonFiniteError(f"evaluation at step {step}: {e}") from None

    def fit(self) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        start, last_loss = self._resume() if cfg.resume else (0, float("nan"))
        # Resumed from the final checkpoint (killed while exporting): the final evaluation was logged and the
        # checkpoint written before that, so neither is repeated.
        finished = start >= cfg.max_steps
        # No checkpoint to resume from is a fresh start: a fresh log too (else its step-0 rows would repeat).
        logger = RunLogger(cfg.output_dir, enabled=self.is_main, resume_step=start if cfg.resume and start else None)
        if self.is_main and start:
            acc.print(f"resumed from step {start} ({self.ckpt.latest()})")
        if self.eval_fn is not None and start == 0:
            logger.log(0, {f"eval/{k}": v for k, v in self._evaluate(0).items()})
        history: list[dict[str, Any]] = []
        tokens_done, t_start = 0, time.perf_counter()
        device = acc.device
        with make_progress(cfg.progress and self.is_main) as progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=start, stats="")
            for step in range(start, cfg.max_steps):
                self.model.train()
                batches = [
                    {k: v.to(device) for k, v in self.data.batch(idx).items()}
                    for idx in self.schedule.micro_batches(step)
                ]
                n_global = global_token_count(acc, batches)
                # Each rank's backward is scaled by world size because DDP averages gradients across ranks.
                scale = acc.num_processes * self.ds_accum / n_global
                sums: dict[str, float] = {}
                loss_total = 0.0
                for i, batch in enumerate(batches):
                    sync = i == len(batches) - 1
                    if self.engine == "deepspeed":  # its engine steps inside backward at a boundary
                        acc.gradient_state._set_sync_gradients(sync)
                    ctx = acc.no_sync(self.model) if not sync and acc.num_processes > 1 else _null()
                    # The backward must sit inside no_sync too: that is where DDP would all-reduce the gradients.
                    with ctx:
                        with acc.autocast():
                            try:
                                out = self.loss_fn(batch)
                            except NonFiniteError as e:
                                raise NonFiniteError(f"training step {step + 1}, micro-batch {i + 1}: {e}") from None
                            loss = out.loss_sum * scale
                        acc.backward(loss)
                    loss_total += float(out.loss_sum.detach())
                    for k, v in out.parts.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                if not math.isfinite(loss_total):
                    # Checked before the optimizer step, so the last checkpoint and the weights stay finite.
                    raise NonFiniteError(
                        f"the training loss is {loss_total} at step {step + 1} although the teacher's outputs are "
                        "finite: the student diverged. Lower train.lr, keep train.max_grad_norm set, or train in "
                        "bf16/fp32 rather than fp16; resume from the last checkpoint with --train.resume true"
                    )
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                    grad_norm = None if norm is None else float(norm)  # DeepSpeed clips inside its step
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                n_local = int(sum(int(b["attention_mask"].sum()) for b in batches))
                tokens_done += n_local * acc.num_processes
                # Logged numbers are means over the whole global batch (all ranks), so they do not depend on how
                # many processes share it.
                loss_total, sums = _global_sums(acc, loss_total, sums)
                denom = float(n_global)
                last_loss = loss_total / denom
                elapsed = time.perf_counter() - t_start
                tps = tokens_done / max(elapsed, 1e-9)
                done = step + 1
                record: dict[str, Any] = {
                    "loss": last_loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                    **{k: v / denom for k, v in sums.items()},
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if done % cfg.log_every == 0 or done == cfg.max_steps:
                    logger.log(done, record)
                history.append({"step": done, **record})
                if self.eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                    logger.log(done, {f"eval/{k}": v for k, v in self._evaluate(done).items()})
                if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
                    self._save(done, last_loss)
                progress.update(task, completed=done, stats=f"loss {last_loss:.4f} | {tps:,.0f} tok/s")
        if self.eval_fn is not None and not finished:
            final_eval = self._evaluate(cfg.max_steps)
            logger.log(cfg.max_steps, {f"eval/{k}": v for k, v in final_eval.items()})
        if cfg.save_every and not finished:
            self._save(cfg.max_steps, last_loss)
        logger.close()
        elapsed = time.perf_counter() - t_start
        return TrainResult(cfg.max_steps, last_loss, tokens_done / max(elapsed, 1e-9), history)


def _global_sums(accelerator: Any, loss_sum: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Sum the step's loss and logged parts over ranks (one all-reduce); identity on one process."""
    if accelerator.num_processes == 1:
        return loss_sum, parts
    keys = sorted(parts)
    t = torch.tensor([loss_sum, *(parts[k] for k in keys)], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return float(t[0]), {k: float(v) for k, v in zip(keys, t[1:].tolist(), strict=True)}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def save_student(model: Any, tokenizer: Any, out_dir: str | Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save the student so plain transformers can load it (LoRA adapters are merged; the adapter is kept beside it).

    `state_dict`: the full weights when the model itself holds only shards (FSDP, ZeRO-3; gathered by
    `accelerator.get_state_dict` on every rank), written instead of the model's own.

    Written to a temporary sibling and renamed, so `out_dir` either holds a complete model or does not exist (a kill
    or a full disk mid-write leaves no half-written student that looks finished).
    """
    out = Path(out_dir)
    with atomic_dir(out, "student model") as tmp:
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
    return out
