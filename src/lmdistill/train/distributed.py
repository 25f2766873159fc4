"""What changes when `accelerate launch` shards the models (FSDP, DeepSpeed ZeRO) instead of replicating them (DDP).

The training loop itself is engine-agnostic; four things are not, and live here:

1. **The frozen teacher** is prepared for the engine but never given an optimizer:
   - DDP / one process: moved to the device, replicated (it has no gradients, so DDP has nothing to synchronise).
   - FSDP2: `fully_shard` on every transformer block and the root, with the same plugin settings as the student
     (reshard after forward, mixed precision, CPU offload, rank-0 loading), through accelerate's
     `fsdp2_prepare_model`, then resharded after every forward, its output layer included. Each forward all-gathers
     one block at a time, so a teacher larger than one GPU fits.
   - FSDP1: wrapped by `accelerator.prepare_model` (FullyShardedDataParallel); no optimizer is ever built for it.
   - DeepSpeed ZeRO-3: its own inference engine (`deepspeed.initialize` with the student's ZeRO-3 config minus the
     optimizer), as TRL prepares reference models; ZeRO-1/2 only shard optimizer state, so the teacher is replicated.
2. **Head weights are shards outside forward** under FSDP and ZeRO-3. Under FSDP2 the fused loss still works:
   accelerate keeps a trained model's [norm, lm_head] unit unsharded from forward to backward, and `gathered`
   all-gathers a resharded head (the teacher's) for the loss. FSDP1 and ZeRO-3 refuse it (`loss.fused=false`).
   Several trained models under DeepSpeed (co-distillation) would need one engine each: the Trainer refuses it.
3. **Checkpoints stay pickle-free and rank-0-written**: under FSDP the full model and optimizer state are gathered to
   rank 0's CPU with torch's `get_model_state_dict` / `get_optimizer_state_dict` and restored on every rank with the
   `set_*` counterparts. DeepSpeed's optimizer state is partitioned and pickled by DeepSpeed, so mid-run checkpoints
   under DeepSpeed are refused (train with FSDP for resumable sharded runs).
4. **DeepSpeed's own accumulation**: its engine steps inside `backward` at a boundary and divides the loss by its
   `gradient_accumulation_steps`; `deepspeed_defaults` fills the config's `auto` fields from ours, and the loop marks
   boundaries and undoes the division (the loop already normalises by the global token count).

On a CPU machine accelerate ignores FSDP and DeepSpeed configs; `enable_sharding_on_cpu` turns them on (gloo), which
is how CI runs them (tests/test_fsdp.py, tests/test_deepspeed_cpu.py). docs/scaling.md says which paths have run where.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from lmdistill.config import TrainConfig
from lmdistill.errors import ConfigError


def local_cpu_cores(shared_with_ranks: bool = True) -> int:
    """This process's CPU cores (its affinity), divided among the node's ranks (the launcher's LOCAL_WORLD_SIZE) when
    they all work at once; at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if shared_with_ranks else 1
    return max(1, cores // ranks)


def engine(accelerator: Any) -> str:
    """`fsdp`, `deepspeed`, `ddp` (any multi-process replicated run) or `single`."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def enable_sharding_on_cpu(accelerator: Any, mixed_precision: str) -> None:
    """Turn a multi-process CPU accelerator into the FSDP2 or DeepSpeed one that `accelerate launch --config_file
    fsdp.yaml` (or `deepspeed_zero*.yaml`) asked for.

    Why: accelerate (checked up to 1.15) builds its FSDP / DeepSpeed plugin from the environment `accelerate launch`
    sets (ACCELERATE_USE_FSDP + FSDP_*, ACCELERATE_USE_DEEPSPEED + ACCELERATE_DEEPSPEED_*), but only switches
    `distributed_type` to them for GPU-like devices; with `cpu=True` it stays MULTI_CPU, so the same launch on a CPU
    machine silently trains *replicated* models. FSDP2 (`fully_shard`, DTensor parameters, gloo all-gathers and
    reduce-scatters) and DeepSpeed's ZeRO-2/3 (its CPU accelerator, gloo) both run on CPU, so we set the state to the
    engine asked for, with the plugin built from the same variables exactly as accelerate builds it on GPUs. From
    then on accelerate's own code does the work (`_prepare_fsdp2` / `_prepare_deepspeed`, `clip_grad_norm_`,
    `get_state_dict`, `no_sync`), so what CI runs on CPU is the GPU code path with gloo instead of NCCL. No-op unless
    the state is MULTI_CPU and one of the two was asked for.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = AcceleratorState()  # a shared-state singleton: this is the accelerator's own state
    if _flag("ACCELERATE_USE_FSDP"):
        fsdp = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... like accelerate
        if mixed_precision != "no":
            fsdp.set_mixed_precision(mixed_precision)
        state.fsdp_plugin = fsdp
        kind = DistributedType.FSDP
    elif _flag("ACCELERATE_USE_DEEPSPEED"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the gloo group accelerate made
        ds = DeepSpeedPlugin()  # reads ACCELERATE_DEEPSPEED_CONFIG_FILE, ... like accelerate
        ds.set_mixed_precision(mixed_precision)  # into the DeepSpeed config, which then owns precision
        ds.select(_from_accelerator_state=True)
        state.deepspeed_plugins = ds
        state._mixed_precision = "no"  # as accelerate does under DeepSpeed: no autocast on top of its bf16/fp16
        accelerator.native_amp = False
        kind = DistributedType.DEEPSPEED
    else:
        return
    state.distributed_type = kind
    PartialState._shared_state["distributed_type"] = kind


def zero_stage(accelerator: Any) -> int:
    if engine(accelerator) != "deepspeed":
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def shards_parameters(accelerator: Any) -> bool:
    """True when a parameter outside its module's forward is only this rank's shard (FSDP, ZeRO-3)."""
    return engine(accelerator) == "fsdp" or zero_stage(accelerator) == 3


def check_supported(accelerator: Any, *, fused_loss: bool, lora: bool) -> None:
    """Refuse combinations that would silently compute on shards; call before building the Trainer.

    FSDP2 runs both: `models.lm_head` gets the whole output layer (unsharded by the forward, or gathered), and a LoRA
    student's export is built from the gathered full state (`recipes.common.finish_run`). FSDP1 and ZeRO-3 expose
    flat or partitioned parameters outside forward, so both stay refused there."""
    if not shards_parameters(accelerator) or getattr(accelerator, "is_fsdp2", False):
        return
    name = "FSDP1" if engine(accelerator) == "fsdp" else "DeepSpeed ZeRO-3"
    if fused_loss:
        raise ConfigError(
            f"loss.fused=true reads the output-layer weights outside the model's forward, where {name} holds only "
            "this rank's shard; use FSDP2 (fsdp_version: 2, as in configs/accelerate/fsdp.yaml), or set "
            "--loss.fused false under this accelerate config (or use DDP / ZeRO-2)"
        )
    if lora:
        raise ConfigError(
            f"a LoRA student under {name} is not supported (its merged export needs the full weights on one rank); "
            "use FSDP2 (configs/accelerate/fsdp.yaml), DDP or ZeRO-2 (configs/accelerate/ddp.yaml)"
        )


class _GatherRows(torch.autograd.Function):
    """All-gather dim-0 shards laid out as FSDP2 lays them out (torch.chunk: rank r holds rows [r*c, (r+1)*c), c =
    ceil(rows / world), the last ranks fewer) into the whole tensor; backward reduce-scatters the gradient back to
    this rank's rows, averaged over the ranks as FSDP2 averages gradients. Plain process-group collectives (not
    DTensor's functional ones, whose pending work made CPU/gloo processes abort at exit now and then)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, rows: int, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        chunk = -(-rows // world)
        send = local.contiguous()
        if send.shape[0] != chunk:  # this rank holds fewer rows: pad them to the common size
            send = torch.cat([send, send.new_zeros((chunk - send.shape[0], *send.shape[1:]))])
        out = send.new_empty((chunk * world, *send.shape[1:]))
        dist.all_gather_into_tensor(out, send, group=group)
        ctx.rows, ctx.chunk, ctx.n_local, ctx.group = rows, chunk, local.shape[0], group
        return out[:rows]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        world = dist.get_world_size(ctx.group)
        send = grad.contiguous()
        if send.shape[0] != ctx.chunk * world:
            send = torch.cat([send, send.new_zeros((ctx.chunk * world - send.shape[0], *send.shape[1:]))])
        shard = send.new_empty((ctx.chunk, *send.shape[1:]))
        dist.reduce_scatter_tensor(shard, send, group=ctx.group)  # sum over ranks
        return shard[: ctx.n_local].div_(world), None, None


def gathered(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or, when it is a DTensor shard (an FSDP2 parameter outside its unit's forward), the whole tensor:
    an all-gather whose backward reduce-scatters the gradient averaged over the ranks, which is what FSDP2 does with
    the gradient of an unsharded parameter (so the optimizer sees the same gradient either way; FSDP2 adds it to any
    gradient it reduces itself).

    Under accelerate's FSDP2 wrapping the output layer shares a unit with the final norm that stays unsharded from
    the model's forward until its backward (`reshard_after_forward=False`), so `lm_head`, which is read after the
    forward, gets a plain tensor there and this is a no-op. It gathers where the head was resharded after forward
    (the frozen teacher, see `prepare_frozen`) or is read before any forward."""
    if not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t
    mesh = t.device_mesh
    if mesh.ndim == 1 and tuple(t.placements) == (Shard(0),):  # FSDP2's layout
        local = t.to_local(grad_placements=t.placements)  # its gradient becomes this rank's shard of t's gradient
        return _GatherRows.apply(local, t.shape[0], mesh.get_group())
    # other layouts (HSDP: replicate x shard): DTensor's own gather; the gradient is averaged over every rank
    from torch.distributed.tensor import Partial

    full = t.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    return _ScaleGrad.apply(full, 1.0 / mesh.size()) if full.requires_grad else full


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


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

            model = fsdp2_prepare_model(accelerator, model)
            sharded: Any = model  # an FSDPModule now
            # accelerate leaves the [final norm, lm_head] unit unsharded after forward, until the backward that a
            # frozen model never has: the teacher's whole output layer would stay on every GPU for the whole run.
            # Resharded after every forward, `lm_head` gathers it for the loss instead (`gathered`) and frees it.
            # benchmarks/fsdp_loss_memory.py (V = 151,936, teacher H 1536, student H 896, 512 tokens/rank, fp32,
            # 2 CPU ranks), peak per rank above the sharded models: fused loss 3,000 MiB with the teacher's head
            # kept unsharded vs 2,112 MiB resharded and gathered (unfused: 4,518 vs 3,628 MiB); the cost is one more
            # all-gather of the teacher's head per micro-batch.
            # The trained student keeps accelerate's layout: its head is needed again in backward anyway.
            sharded.set_reshard_after_forward(True)
            return model
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


def without_tied_copies(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (gathered full weights) less the second and later names of tied parameters (a tied lm_head), which
    `save_pretrained` drops itself when it sees one shared tensor but cannot see in separately gathered copies: the
    export then has the same keys as a single-process run's."""
    kept = {name for name, _ in model.named_parameters()}  # one name per parameter object
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - kept
    return {k: v for k, v in state.items() if k not in tied}


def unsharded_replica(model: nn.Module, full_state: dict[str, Any]) -> nn.Module:
    """A plain CPU copy of an FSDP2-sharded peft (LoRA) model holding `full_state` (its whole weights, gathered by
    `accelerator.get_state_dict`): peft saves its adapter from, and merges it into, whole tensors, which the sharded
    model does not have. Rank 0 only; costs one copy of the student in CPU memory (LoRA students are small)."""
    from peft import get_peft_model
    from torch.distributed.fsdp import FSDPModule

    peft: Any = model
    base = peft.get_base_model()
    # FSDP2 swaps the model's class for a subclass of (FSDPModule, its class): build the original class
    plain: Any = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))
    replica: Any = get_peft_model(plain(base.config), peft.peft_config[peft.active_adapter])
    replica.load_state_dict(full_state, strict=True, assign=True)  # assign: the trained dtypes, not fresh fp32
    if callable(getattr(replica.get_base_model(), "tie_weights", None)):
        replica.get_base_model().tie_weights()
    return replica


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
