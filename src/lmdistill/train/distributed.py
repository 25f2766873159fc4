"""What changes when `accelerate launch` shards the models (FSDP, DeepSpeed ZeRO) instead of replicating them (DDP).

The training loop itself is engine-agnostic; four things are not, and live here:

1. **The frozen teacher** is prepared for the engine but never given an optimizer:
   - DDP / one process: moved to the device, replicated (it has no gradients, so DDP has nothing to synchronise).
   - FSDP2: `fully_shard` on every transformer block and the root, with the same plugin settings as the student
     (reshard after forward, mixed precision, CPU offload, rank-0 loading), through accelerate's
     `fsdp2_prepare_model`. Each forward all-gathers one block at a time, so a teacher larger than one GPU fits.
   - FSDP1: wrapped by `accelerator.prepare_model` (FullyShardedDataParallel); no optimizer is ever built for it.
   - DeepSpeed ZeRO-3: its own inference engine (`deepspeed.initialize` with the student's ZeRO-3 config minus the
     optimizer), as TRL prepares reference models; ZeRO-1/2 only shard optimizer state, so the teacher is replicated.
2. **Head weights are shards outside forward** under FSDP and ZeRO-3, so the fused loss (which reads `lm_head.weight`
   directly) is refused there with a message pointing at `loss.fused=false`.
   Several trained models under DeepSpeed (co-distillation) would need one engine each: the Trainer refuses it.
3. **Checkpoints stay pickle-free and rank-0-written**: under FSDP the full model and optimizer state are gathered to
   rank 0's CPU with torch's `get_model_state_dict` / `get_optimizer_state_dict` and restored on every rank with the
   `set_*` counterparts. DeepSpeed's optimizer state is partitioned and pickled by DeepSpeed, so mid-run checkpoints
   under DeepSpeed are refused (train with FSDP for resumable sharded runs).
4. **DeepSpeed's own accumulation**: its engine steps inside `backward` at a boundary and divides the loss by its
   `gradient_accumulation_steps`; `deepspeed_defaults` fills the config's `auto` fields from ours, and the loop marks
   boundaries and undoes the division (the loop already normalises by the global token count).

docs/scaling.md says which of these paths have run where.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lmdistill.config import TrainConfig
from lmdistill.errors import ConfigError


def engine(accelerator: Any) -> str:
    """`fsdp`, `deepspeed`, `ddp` (any multi-process replicated run) or `single`."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def zero_stage(accelerator: Any) -> int:
    if engine(accelerator) != "deepspeed":
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(accelerator: Any) -> bool:
    """True when a parameter outside its module's forward is only this rank's shard (FSDP, ZeRO-3)."""
    return engine(accelerator) == "fsdp" or zero_stage(accelerator) == 3


def check_supported(accelerator: Any, *, fused_loss: bool, lora: bool) -> None:
    """Refuse combinations that would silently compute on shards; call before building the Trainer."""
    if not shards_parameters(accelerator):
        return
    name = "FSDP" if engine(accelerator) == "fsdp" else "DeepSpeed ZeRO-3"
    if fused_loss:
        raise ConfigError(
            f"loss.fused=true reads the output-layer weights outside the model's forward, where {name} holds only "
            "this rank's shard; set --loss.fused false under this accelerate config (or use DDP / ZeRO-2)"
        )
    if lora:
        raise ConfigError(
            f"a LoRA student under {name} is not supported (its merged export needs the full weights on one rank); "
            "LoRA students are small: train them with DDP or ZeRO-2 (configs/accelerate/ddp.yaml)"
        )


def deepspeed_defaults(accelerator: Any, cfg: TrainConfig) -> int:
    """Fill the DeepSpeed config's `auto` batch fields from `train.*`; returns its gradient accumulation steps (1
    for other engines). Must run before `accelerator.prepare`."""
    if engine(accelerator) != "deepspeed":
        return 1
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes,
        "gradient_clipping": cfg.max_grad_norm or 0.0,
    }
    for key, value in wanted.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if int(ds["gradient_accumulation_steps"]) != cfg.grad_accum:
        raise ConfigError(
            f"the DeepSpeed config sets gradient_accumulation_steps={ds['gradient_accumulation_steps']} but "
            f"train.grad_accum={cfg.grad_accum}; set it to \"auto\" in the DeepSpeed config"
        )
    if cfg.save_every:
        raise ConfigError(
            "train.save_every > 0 under DeepSpeed: its optimizer state is partitioned per rank and pickled, which "
            "lmdistill's pickle-free, rank-0 checkpoints cannot hold. Use FSDP for resumable sharded training "
            "(configs/accelerate/fsdp.yaml), or set --train.save_every 0"
        )
    return int(ds["gradient_accumulation_steps"])


def prepare_frozen(accelerator: Any, model: nn.Module) -> nn.Module:
    """Place a frozen model (the teacher) for the current engine. It never gets an optimizer or gradients."""
    model.eval()
    model.requires_grad_(False)
    kind = engine(accelerator)
    if kind == "fsdp":
        if getattr(accelerator, "is_fsdp2", False):
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(accelerator, model)
        return accelerator.prepare_model(model)
    if kind == "deepspeed" and zero_stage(accelerator) == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden:  # TRL's settings for a ZeRO-3 model used only for inference
            zero = config.setdefault("zero_optimization", {})
            zero.update({"reduce_bucket_size": hidden * hidden, "stage3_param_persistence_threshold": 10 * hidden,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden)})
        wrapped, *_ = deepspeed.initialize(model=model, config=config)
        wrapped.eval()
        return wrapped
    return model.to(accelerator.device)


def full_training_state(accelerator: Any, model: nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """FSDP only, called on every rank: (full model state, full optimizer state) gathered to CPU (rank 0's copies are
    the ones saved)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    model_state: dict[str, Any] = get_model_state_dict(model, options=opts)
    return model_state, get_optimizer_state_dict(model, inner, options=opts)


def load_full_training_state(model: nn.Module, optimizer: Any, model_state: dict[str, Any],
                             optimizer_state: Any) -> None:
    """FSDP only, called on every rank with the full states read from a checkpoint: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    inner = getattr(optimizer, "optimizer", optimizer)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, inner, optimizer_state, options=opts)
