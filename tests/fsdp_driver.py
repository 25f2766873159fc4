"""Driver for tests/test_fsdp.py, run once per rank under `accelerate launch --config_file configs/accelerate/fsdp.yaml
--num_processes 2` (CPU, gloo): several phases in one start-up, separated by `::` on the command line.

    cli <lmdistill arguments>        run `python -m lmdistill ...` exactly as the CLI would (after the counters below)
    kill <step> <lmdistill args>     the same, and rank 0 SIGKILLs itself right after writing the step's checkpoint
    unit <teacher_dir> <student_dir> the fused loss against the reference path under FSDP, values and gradients
    gather                           `gathered` on an unevenly sharded parameter: value and reduce-scattered gradient

Each phase writes `phase<i>-rank<r>.json` into $LMDISTILL_PROBE_DIR: what the probe saw (engine, which parameters are
DTensor shards, the frozen teacher's gradients and optimizer membership, who wrote what) or the unit checks' numbers.
The probe only counts and inspects; it changes nothing in the run.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from typing import Any

import torch
from torch.distributed.tensor import DTensor

import lmdistill.losses.objective as objective
import lmdistill.recipes.common as common
import lmdistill.recipes.hard as hard
from lmdistill.train.checkpoint import CheckpointManager
from lmdistill.train.logging import RunLogger
from lmdistill.train.loop import Trainer

counts: dict[str, int] = {}
optimizers: list[torch.optim.Optimizer] = []
teachers: list[torch.nn.Module] = []
trainers: list[Trainer] = []
kill_at: list[int] = []


def counting(name: str, fn: Any) -> Any:
    def wrapper(*a: Any, **k: Any) -> Any:
        counts[name] += 1
        return fn(*a, **k)
    return wrapper


orig_opt_init = torch.optim.Optimizer.__init__


def opt_init(self: Any, *a: Any, **k: Any) -> None:
    orig_opt_init(self, *a, **k)
    optimizers.append(self)


torch.optim.Optimizer.__init__ = opt_init  # type: ignore[method-assign]

orig_prepare_frozen = common.prepare_frozen


def prepare_frozen(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    placed = orig_prepare_frozen(accelerator, model)
    teachers.append(placed)
    return placed


common.prepare_frozen = prepare_frozen
CheckpointManager.save = counting("checkpoint_saves", CheckpointManager.save)  # type: ignore[method-assign]
orig_log = RunLogger.log


def log(self: Any, step: int, record: Any) -> Any:
    if self.enabled:
        counts["log_writes"] += 1
    return orig_log(self, step, record)


RunLogger.log = log  # type: ignore[method-assign]
common.save_model = counting("students_saved", common.save_model)
objective.fused_loss = counting("fused_calls", objective.fused_loss)  # soft, codistill
hard.chunked_ce_sums = counting("fused_calls", hard.chunked_ce_sums)  # hard --mode token
common.write_summary = counting("summaries", common.write_summary)
orig_init, orig_save = Trainer.__init__, Trainer._save


def trainer_init(self: Any, *a: Any, **k: Any) -> None:
    orig_init(self, *a, **k)
    trainers.append(self)


def trainer_save(self: Any, step: int, last: Any) -> None:
    orig_save(self, step, last)
    if kill_at and step == kill_at[0] and self.is_main:
        os.kill(os.getpid(), signal.SIGKILL)  # a preemption right after the checkpoint: nothing else runs


Trainer.__init__ = trainer_init  # type: ignore[method-assign]
Trainer._save = trainer_save  # type: ignore[method-assign]


def shards(model: torch.nn.Module) -> dict[str, Any]:
    params = list(model.named_parameters())
    return {"params": len(params), "dtensors": sum(isinstance(p, DTensor) for _, p in params),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for _, p in params),
            "numel": sum(p.numel() for _, p in params)}


def cli_phase(args: list[str]) -> dict[str, Any]:
    counts.update(checkpoint_saves=0, log_writes=0, students_saved=0, summaries=0, fused_calls=0)
    optimizers.clear()
    teachers.clear()
    trainers.clear()
    sys.argv = ["lmdistill", *args]
    runpy.run_module("lmdistill", run_name="__main__", alter_sys=True)
    from accelerate.state import PartialState

    trainer = trainers[-1]
    teacher_ids = {id(p) for t in teachers for p in t.parameters()}
    return {
        **counts,
        "world": PartialState().num_processes,
        "rank": PartialState().process_index,
        "engine": trainer.engine,
        "trained": {name: shards(m) for name, m in trainer.models.items()},
        "teachers": [shards(t) for t in teachers],
        "teacher_params_in_optimizers": sum(1 for o in optimizers for g in o.param_groups for p in g["params"]
                                            if id(p) in teacher_ids),
        "teacher_requires_grad": any(p.requires_grad for t in teachers for p in t.parameters()),
        "teacher_has_grads": any(p.grad is not None for t in teachers for p in t.parameters()),
    }


def unit_phase(teacher_dir: str, student_dir: str) -> dict[str, Any]:
    """The fused losses (soft: divergence + CE from hidden states; hard: chunked CE) against the reference path (the
    models' own [B, T, V] logits), both under FSDP2 with the same shards: loss values and every gradient shard, for a
    full student and a LoRA student. Returns the largest differences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.config import DivergenceConfig, LoraConfig, TrainConfig
    from lmdistill.data import IGNORE
    from lmdistill.losses.chunked_ce import chunked_ce_sums
    from lmdistill.losses.objective import ce_sum_and_count, distill_loss
    from lmdistill.models import apply_lora, decoder_hidden, lm_head
    from lmdistill.teachers import HFTeacher, model_outputs
    from lmdistill.train.distributed import engine, prepare_frozen
    from lmdistill.train.loop import build_optimizer, make_accelerator

    acc = make_accelerator(TrainConfig())
    n_vocab = len(AutoTokenizer.from_pretrained(student_dir))
    teacher = HFTeacher(prepare_frozen(acc, AutoModelForCausalLM.from_pretrained(teacher_dir)), n_vocab)
    g = torch.Generator().manual_seed(100 + acc.process_index)  # each rank its own micro-batch
    ids = torch.randint(0, n_vocab, (2, 17), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :4] = IGNORE
    batch = {"input_ids": ids[:, :-1], "labels": labels, "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    loss_cfg = DivergenceConfig(kind="jsd", temperature=1.5)
    result: dict[str, Any] = {"engine": engine(acc)}

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {n: (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
               for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    def compare(name: str, model: torch.nn.Module, fused_fn: Any, ref_fn: Any) -> None:
        a = fused_fn()
        acc.backward(a)
        ga = grads(model)
        b = ref_fn()
        acc.backward(b)
        gb = grads(model)
        assert ga.keys() == gb.keys() and ga, (name, sorted(ga), sorted(gb))
        result[name] = {
            "value": float(a.detach()), "ref_value": float(b.detach()), "grads": len(ga),
            "max_rel_grad_diff": max(float((ga[k] - gb[k]).abs().max() / gb[k].abs().max().clamp_min(1e-12))
                                     for k in ga),
            "max_abs_grad_diff": max(float((ga[k] - gb[k]).abs().max()) for k in ga),
        }

    for kind in ("full", "lora"):
        model = AutoModelForCausalLM.from_pretrained(student_dir)
        if kind == "lora":
            model = apply_lora(model, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        student, _ = acc.prepare(model, build_optimizer(model, TrainConfig()))
        result[f"{kind}_student"] = shards(student)

        def soft(fused: bool, student: Any = student) -> torch.Tensor:
            targets = teacher.targets(batch) if fused else teacher.logits(batch)
            out = model_outputs(student, batch, n_vocab, fused)
            return distill_loss(out, targets, batch["labels"], 0.7, loss_cfg).loss_sum

        def hard(fused: bool, student: Any = student) -> torch.Tensor:
            t_labels = torch.where(batch["labels"] != IGNORE, teacher.logits(batch).argmax(-1), IGNORE)
            sets = [t_labels, batch["labels"]]
            if fused:
                h = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])
                sums = chunked_ce_sums(h, lm_head(student, n_vocab), sets, chunk_size=5)
            else:
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                sums = torch.stack([ce_sum_and_count(logits[..., :n_vocab], s)[0] for s in sets])
            return 0.6 * sums[0] + 0.4 * sums[1]

        compare(f"{kind}_soft", student, lambda f=soft: f(True), lambda f=soft: f(False))
        compare(f"{kind}_hard", student, lambda f=hard: f(True), lambda f=hard: f(False))
    return result


def gather_phase() -> dict[str, Any]:
    """`gathered` on a 7-row weight sharded over 2 ranks (4 + 3 rows): the whole tensor forward, and in backward each
    rank's gradient rows averaged over the ranks (rank r's loss is (r + 1) * sum(W * C))."""
    from torch.distributed.fsdp import fully_shard

    from lmdistill.config import TrainConfig
    from lmdistill.train.distributed import gathered
    from lmdistill.train.loop import make_accelerator

    rank = make_accelerator(TrainConfig()).process_index  # the process group
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 7)
    full = layer.weight.detach().clone()
    fully_shard(layer)
    c = torch.arange(35, dtype=torch.float32).reshape(7, 5)
    w = gathered(layer.weight)
    (w * c * (rank + 1)).sum().backward()
    local = layer.weight.grad.to_local()
    rows = range(4 * rank, min(4 * rank + 4, 7))
    expected = c[list(rows)] * 1.5  # mean of (1, 2)
    with torch.no_grad():
        no_grad = gathered(layer.weight)
    return {"value_equal": bool(torch.equal(w.detach(), full)), "local_rows": local.shape[0],
            "grad_max_diff": float((local - expected).abs().max()), "no_grad_equal": bool(torch.equal(no_grad, full)),
            "no_grad_requires_grad": no_grad.requires_grad}


def main() -> None:
    phases: list[list[str]] = [[]]
    for arg in sys.argv[1:]:
        if arg == "::":
            phases.append([])
        else:
            phases[-1].append(arg)
    out = os.environ["LMDISTILL_PROBE_DIR"]
    for i, (kind, *args) in enumerate(phases):
        kill_at.clear()
        if kind == "kill":
            kill_at.append(int(args[0]))
            args = args[1:]
        if kind in ("cli", "kill"):
            probe = cli_phase(args)
        elif kind == "unit":
            probe = unit_phase(*args)
        elif kind == "gather":
            probe = gather_phase()
        else:
            raise SystemExit(f"unknown phase {kind!r}")
        with open(os.path.join(out, f"phase{i}-rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
            json.dump(probe, fh)


if __name__ == "__main__":
    main()
