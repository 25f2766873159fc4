"""The one training loop: accelerate, AdamW + warmup/cosine, accumulation, clipping, eval, checkpoints, resume.

It trains one or more models (co-distillation: a teacher and a student, each with its own optimizer, LR schedule and
update cadence). A recipe hands it a loss function that receives the prepared models, a micro-batch and the step, and
returns a `StepLoss` per trained model holding *sums* over the micro-batch's target tokens; the loop divides once by
the number of target tokens in the whole accumulated, all-rank batch. That keeps every loss equal to the per-token
mean however the batch is split into micro-batches, padded or sharded across processes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmdistill.config import TrainConfig
from lmdistill.data import IGNORE, BatchSchedule, TokenBlocks
from lmdistill.errors import CheckpointError, ConfigError, Interrupted, NonFiniteError, TeacherUnavailableError
from lmdistill.io import StopFlag, lock_dir, resume_command, stop_on_signals
from lmdistill.losses.objective import StepLoss
from lmdistill.train.checkpoint import CheckpointManager, config_changes, config_fingerprint, global_batch
from lmdistill.train.distributed import (
    deepspeed_defaults,
    enable_sharding_on_cpu,
    engine,
    full_training_state,
    load_full_training_state,
)
from lmdistill.train.logging import RunLogger, make_progress
from lmdistill.train.prefetch import Prefetcher, PrepareFn, prefetch_workers

Batch = dict[str, Tensor]


@dataclass
class Trained:
    """A model the loop trains, with its optimizer settings.

    lr: peak learning rate (None: train.lr).
    update_every: take an optimizer step every k steps; its LR schedule spans its own number of updates.
    """

    module: nn.Module
    lr: float | None = None
    update_every: int = 1


@dataclass(frozen=True)
class StepInfo:
    """Which step the loss function is computing, and which models take an optimizer step on it."""

    step: int
    updating: frozenset[str]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[dict[str, nn.Module], Batch, StepInfo], dict[str, StepLoss]]
# Turns a data micro-batch into the one trained on, before the step's token count: on-policy recipes sample the
# student's completions here (and score them with the teacher), with every micro-batch of a step seeing the same
# pre-step weights. Receives the unwrapped models.
RolloutFn = Callable[[dict[str, nn.Module], Batch, StepInfo], Batch]
EvalFn = Callable[[dict[str, nn.Module]], dict[str, float]]
# Called after each optimizer step with the step's global per-token means; returns extra fields for the log.
StepHook = Callable[[int, dict[str, float]], dict[str, float]]


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator

    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    # Under plain `torchrun` on a machine without a GPU, accelerate only sets up a (gloo) process group when told to
    # use the CPU; without this every rank would silently train alone on the whole batch and write the same files.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu)
    if cpu:  # accelerate ignores FSDP and DeepSpeed configs on CPU; both run there (see enable_sharding_on_cpu)
        enable_sharding_on_cpu(accelerator, mixed)
    return accelerator


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


def model_train_config(cfg: TrainConfig, spec: Trained) -> TrainConfig:
    """`cfg` as one model sees it: its own lr, and warmup and decay counted in its own updates."""
    k = spec.update_every
    return cfg.model_copy(update={"lr": spec.lr or cfg.lr, "max_steps": math.ceil(cfg.max_steps / k),
                                  "warmup_steps": math.ceil(cfg.warmup_steps / k)})


def global_token_count(accelerator: Any, batches: list[Batch]) -> Tensor:
    """Target tokens in the whole optimizer step: all micro-batches, all ranks."""
    local = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
    count = torch.tensor(float(local), device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return count.clamp_min(1.0)


@dataclass
class TrainResult:
    step: int
    last: dict[str, float]  # the last step's log record
    tokens_per_s: float
    step_seconds: float  # wall-clock inside the optimizer steps of this run (evaluation and checkpoints excluded)


class Trainer:
    """Trains `models` (name -> `Trained`) with a recipe's loss function; NaN stop, accumulation, clipping,
    checkpoint/resume of every model, engine handling, logging and evaluation live here and nowhere else.

    Log keys: with one trained model `loss`, the parts (`kd`, `ce`), `lr`, `grad_norm`; with several the same keys
    suffixed with the model's name (`loss_student`, `ce_teacher`, `lr_teacher`, ...).
    """

    def __init__(self, cfg: TrainConfig, *, models: dict[str, Trained], data: TokenBlocks, loss_fn: LossFn,
                 eval_fn: EvalFn | None = None, accelerator: Any | None = None, run_info: dict[str, Any] | None = None,
                 state: dict[str, Stateful] | None = None, on_step: StepHook | None = None,
                 rollout: RolloutFn | None = None, prepare: PrepareFn | None = None) -> None:
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.engine = engine(acc)
        if self.engine == "deepspeed" and len(models) > 1:
            raise ConfigError(
                f"training {len(models)} models at once ({', '.join(models)}) under DeepSpeed needs one engine per "
                "model, which lmdistill does not set up; use FSDP (configs/accelerate/fsdp.yaml) or DDP"
            )
        # DeepSpeed divides each backward by its own accumulation count; the loop normalises by tokens instead.
        self.ds_accum = deepspeed_defaults(acc, cfg)
        self.specs = models
        own_cfgs = {name: model_train_config(cfg, spec) for name, spec in models.items()}
        optimizers = {name: build_optimizer(spec.module, own_cfgs[name]) for name, spec in models.items()}
        self.schedulers = {name: torch.optim.lr_scheduler.LambdaLR(optimizers[name], lr_lambda(own_cfgs[name]))
                           for name in models}
        if self.engine == "fsdp":  # accelerate's FSDP2 prepares one model, with its optimizer, per call
            pairs = [acc.prepare(spec.module, optimizers[name]) for name, spec in models.items()]
            prepared = (*(model for model, _ in pairs), *(opt for _, opt in pairs))
        else:
            prepared = acc.prepare(*(spec.module for spec in models.values()), *optimizers.values())
        if len(models) == 1 and not isinstance(prepared, tuple | list):
            prepared = (prepared,)
        names = list(models)
        self.models: dict[str, nn.Module] = dict(zip(names, prepared[: len(names)], strict=True))
        self.optimizers: dict[str, Any] = dict(zip(names, prepared[len(names):], strict=True))
        self.data, self.loss_fn, self.eval_fn = data, loss_fn, eval_fn
        self.state, self.on_step, self.rollout = state or {}, on_step, rollout
        self.schedule = BatchSchedule(len(data), cfg.micro_batch_size, cfg.grad_accum, cfg.seed,
                                      world_size=acc.num_processes, rank=acc.process_index)
        # a recipe's CPU work per data batch, done ahead of the step in worker processes (lmdistill.train.prefetch)
        self.prefetch = Prefetcher(data, prepare, prefetch_workers(cfg.prepare_workers)) if prepare else None
        self.ckpt = CheckpointManager(cfg.output_dir, keep=cfg.keep_checkpoints)
        self.run_info = run_info or {}
        self.resumed_from: Path | None = None  # the checkpoint fit() resumed from
        self.is_main = acc.is_main_process

    @property
    def unwrapped(self) -> dict[str, nn.Module]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def _key(self, key: str, name: str) -> str:
        return key if len(self.models) == 1 else f"{key}_{name}"

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _save(self, step: int, last: dict[str, float]) -> None:
        self.accelerator.wait_for_everyone()
        models: dict[str, Any] = self.unwrapped
        optimizers: dict[str, Any] = dict(self.optimizers)
        if self.engine == "fsdp":  # every rank takes part in gathering the full state; rank 0 writes it
            for name in self.models:
                models[name], optimizers[name] = full_training_state(self.accelerator, self.models[name],
                                                                     self.optimizers[name])
        if self.is_main:
            extra: dict[str, Any] = {"run": self.run_info, "last": last,
                                     "state": {name: obj.state_dict() for name, obj in self.state.items()}}
            if isinstance(self.run_info.get("config"), dict):
                extra["config_fingerprint"] = config_fingerprint(self.run_info["config"])
                extra["world_size"] = self.accelerator.num_processes
            self.ckpt.save(step, models=models, optimizers=optimizers, schedulers=self.schedulers, extra=extra)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> tuple[int, dict[str, float]]:
        """(step, last log record) of the newest intact checkpoint; (0, {}) when there is none. A damaged newer one is
        reported and skipped; a checkpoint written with a different config (safe fields aside) is refused."""
        try:
            latest = self.ckpt.latest_good()
        except CheckpointError as none_intact:
            newest = self.ckpt.latest()
            if newest is not None and self.engine != "fsdp":
                # Where loading names a structural reason (another model's weights, a torn file), that says more
                # than a checksum; it raises. A checkpoint that loads despite its checksum is still refused.
                self.ckpt.load(newest, models=self.unwrapped, optimizers=self.optimizers, schedulers=self.schedulers)
            raise none_intact from None
        self.resumed_from = latest
        if latest is None:
            return 0, {}
        if self.engine == "fsdp":
            saved = self.ckpt.load(latest, models={}, optimizers={}, schedulers=self.schedulers)
            for name in self.models:
                load_full_training_state(self.models[name], self.optimizers[name],
                                         *self.ckpt.read_states(latest, name))
        else:
            saved = self.ckpt.load(latest, models=self.unwrapped, optimizers=self.optimizers,
                                   schedulers=self.schedulers)
        extra = saved.get("extra", {})
        old_cfg, new_cfg = (extra.get("run") or {}).get("config"), self.run_info.get("config")
        if isinstance(old_cfg, dict) and isinstance(new_cfg, dict) and \
                extra.get("config_fingerprint") != config_fingerprint(new_cfg):
            old_batch = global_batch(old_cfg, int(extra.get("world_size", 1)))
            same_batch = old_batch is not None and old_batch == global_batch(new_cfg, self.accelerator.num_processes)
            changes = config_changes(old_cfg, new_cfg, same_global_batch=same_batch)
            if changes:
                raise CheckpointError(
                    f"cannot resume from `{latest}`: it was written with a different config, and resuming would mix "
                    "two runs. Changed: " + "; ".join(changes) + ". Rerun with the checkpoint's settings, or start a "
                    "fresh output_dir (only step counts, eval/log/save cadence, output paths and, with the global "
                    "batch kept, its split into micro-batches and processes may change on resume)"
                )
        for name, obj in self.state.items():
            obj.load_state_dict(extra.get("state", {}).get(name, {}))
        return int(saved["step"]), dict(extra.get("last") or {})

    # -- one optimizer step ------------------------------------------------------------------------------------------

    def _evaluate(self, step: int) -> dict[str, float]:
        assert self.eval_fn is not None
        try:
            return {f"eval/{k}": v for k, v in self.eval_fn(self.unwrapped).items()}
        except NonFiniteError as e:
            raise NonFiniteError(f"evaluation at step {step}: {e}") from None

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        if not last and self.accelerator.num_processes > 1:
            for model in self.models.values():
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def train_step(self, step: int) -> dict[str, float]:
        """Forward/backward every micro-batch of `step`, step the optimizers that update; returns the log record."""
        acc = self.accelerator
        updating = frozenset(name for name, spec in self.specs.items() if step % spec.update_every == 0)
        info = StepInfo(step, updating)
        for model in self.models.values():
            model.train()
        cpu = self.prefetch.batches(step, self.schedule.micro_batches, self.cfg.max_steps) if self.prefetch else \
            [self.data.batch(idx) for idx in self.schedule.micro_batches(step)]
        batches = [{k: v.to(acc.device) for k, v in batch.items()} for batch in cpu]
        if self.rollout is not None:
            models = self.unwrapped
            batches = [self.rollout(models, batch, info) for batch in batches]
        n_global = global_token_count(acc, batches)
        # Each rank's backward is scaled by world size because DDP averages gradients across ranks.
        scale = acc.num_processes * self.ds_accum / n_global
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            if self.engine == "deepspeed":  # its engine steps inside backward at a boundary
                acc.gradient_state._set_sync_gradients(sync)
            # The backward must sit inside no_sync too: that is where DDP would all-reduce the gradients.
            with self._no_sync(last=sync):
                with acc.autocast():
                    try:
                        outs = self.loss_fn(self.models, batch, info)
                    except NonFiniteError as e:
                        raise NonFiniteError(f"training step {step + 1}, micro-batch {i + 1}: {e}") from None
                # One backward through every updating model's graph; the loss function keeps them apart.
                losses = [outs[name].loss_sum * scale for name in self.models if name in updating]
                if losses:
                    acc.backward(sum(losses[1:], losses[0]))
            for name, out in outs.items():
                _add(sums, self._key("loss", name), out.loss_sum)
                for k, v in out.parts.items():
                    _add(sums, self._key(k, name), v)
        if not all(math.isfinite(sums[self._key("loss", name)]) for name in outs):
            # Checked before the optimizer step, so the last checkpoint and the weights stay finite.
            raise NonFiniteError(
                f"the training loss is not finite at step {step + 1} although the teacher's outputs are finite: "
                "the model diverged. Lower train.lr, keep train.max_grad_norm set, or train in bf16/fp32 rather "
                "than fp16; resume from the last checkpoint with --train.resume true"
            )
        record: dict[str, float] = {}
        for name in self.models:
            if name not in updating:
                continue
            norm = self._clip(self.models[name])
            if norm is not None:
                record[self._key("grad_norm", name)] = norm
            self.optimizers[name].step()
            self.schedulers[name].step()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        # Logged numbers are means over the whole global batch (all ranks), so they do not depend on how many
        # processes share it.
        denom = float(n_global)
        means = {k: v / denom for k, v in _global_sums(acc, sums).items()}
        record = {**means, **record}
        for name in self.models:
            record[self._key("lr", name)] = float(self.schedulers[name].get_last_lr()[0])
        if self.on_step is not None:
            record.update(self.on_step(step, means))
        record["tokens"] = float(sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes)
        record["target_tokens"] = denom  # the tokens this step learned from, all ranks
        return record

    def _clip(self, model: nn.Module) -> float | None:
        # an infinite bound clips nothing and still returns the norm, on every engine's sharded parameters
        bound = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else math.inf
        norm = self.accelerator.clip_grad_norm_(model.parameters(), bound)
        return None if norm is None else float(norm)  # DeepSpeed clips inside its step

    # -- the whole run -----------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train to cfg.max_steps. The output directory is locked for the run (one writer). A first SIGTERM/SIGINT
        finishes the current optimizer step, writes a checkpoint and raises `Interrupted` (exit 143/130) naming the
        resume command; a second one stops the process at once."""
        lock = lock_dir(self.cfg.output_dir, "training run") if self.is_main else None
        try:
            with stop_on_signals("optimizer step") as stop:
                return self._fit(stop)
        finally:
            if self.prefetch is not None:
                self.prefetch.close()
            if lock is not None:
                lock.close()

    def _stop_requested(self, stop: StopFlag) -> bool:
        """Whether any rank was asked to stop (all ranks agree, so they save and stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return bool(stop)
        flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _interrupted(self, stop: StopFlag, done: int) -> Interrupted:
        import signal

        signum = stop.signum or int(signal.SIGTERM)
        return Interrupted(
            f"stopped by {signal.Signals(signum).name} after step {done} of {self.cfg.max_steps}; every finished step "
            f"is in the checkpoint `{self.ckpt.root / f'step-{done:08d}'}`. Resume with:\n  "
            f"{resume_command('--train.resume')}", signum)

    def _fit(self, stop: StopFlag) -> TrainResult:
        cfg, acc = self.cfg, self.accelerator
        self.resumed_from = None
        start, last = self._resume() if cfg.resume else (0, {})
        # Resumed from the final checkpoint (killed while exporting): the final evaluation was logged and the
        # checkpoint written before that, so neither is repeated.
        finished = start >= cfg.max_steps
        # No checkpoint to resume from is a fresh start: a fresh log too (else its step-0 rows would repeat).
        logger = RunLogger(cfg.output_dir, enabled=self.is_main, resume_step=start if cfg.resume and start else None)
        if self.is_main and start:
            acc.print(f"resumed from step {start} ({self.resumed_from})")
        if self.eval_fn is not None and start == 0:
            logger.log(0, self._evaluate(0))
        tokens, t_start, in_steps = 0.0, time.perf_counter(), 0.0
        with make_progress(cfg.progress and self.is_main) as progress:
            task = progress.add_task("train", total=cfg.max_steps, completed=start, stats="")
            done = saved = start
            for step in range(start, cfg.max_steps):
                t_step = time.perf_counter()
                try:
                    last = self.train_step(step)
                    in_steps += time.perf_counter() - t_step
                    tokens += last.pop("tokens")
                    last["tokens_per_s"] = tokens / max(time.perf_counter() - t_start, 1e-9)
                    done = step + 1
                    if done % cfg.log_every == 0 or done == cfg.max_steps:
                        logger.log(done, last)
                    if self.eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and \
                            done != cfg.max_steps:
                        logger.log(done, self._evaluate(done))
                except TeacherUnavailableError as e:
                    if done > saved:  # the steps finished since the last checkpoint are kept
                        self._save(done, last)
                    raise TeacherUnavailableError(
                        f"{e}. Stopped after {done} steps, all of them in the newest checkpoint: bring the teacher "
                        "back and resume with --train.resume true"
                    ) from None
                if cfg.save_every and done % cfg.save_every == 0 and done != cfg.max_steps:
                    self._save(done, last)
                    saved = done
                losses = " ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss"))
                progress.update(task, completed=done, stats=f"{losses} | {last['tokens_per_s']:,.0f} tok/s")
                if done < cfg.max_steps and self._stop_requested(stop):
                    if done > saved:
                        self._save(done, last)
                    logger.close()
                    raise self._interrupted(stop, done)
        if self.eval_fn is not None and not finished:
            logger.log(cfg.max_steps, self._evaluate(cfg.max_steps))
        if cfg.save_every and not finished:
            self._save(cfg.max_steps, last)
        logger.close()
        if not finished and self._stop_requested(stop):  # stopped after the last step: resuming only exports
            if not cfg.save_every:
                self._save(cfg.max_steps, last)
            raise self._interrupted(stop, cfg.max_steps)
        return TrainResult(cfg.max_steps, last, tokens / max(time.perf_counter() - t_start, 1e-9), in_steps)


def _add(sums: dict[str, float], key: str, value: Tensor) -> None:
    sums[key] = sums.get(key, 0.0) + float(value.detach())


def _global_sums(accelerator: Any, sums: dict[str, float]) -> dict[str, float]:
    """Sum the step's logged sums over ranks (one all-reduce); identity on one process."""
    if accelerator.num_processes == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}
