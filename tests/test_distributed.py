"""`lmdistill soft` under `torchrun` with 2 CPU processes (gloo) equals the 1-process run.

One global batch is split across ranks (BatchSchedule), the loss is divided by the global target-token count, so
2 processes x grad_accum 1 must reproduce 1 process x grad_accum 2 up to float summation order. The data is chat-style
(prompt tokens masked) so every micro-batch has a different number of target tokens: a per-rank or per-micro-batch
mean instead of the global one would move the result well outside the tolerance.

The 2-process run goes through `python -m torch.distributed.run ... -m lmdistill soft` with a small probe loaded in
front of the CLI (it counts who writes what and which tensors optimizers hold; it changes nothing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import soft_overrides
from lmdistill.config import SoftConfig, load_config
from lmdistill.recipes.soft import run_soft
from lmdistill.train.logging import read_log

# Runs `python -m lmdistill ...` exactly as the CLI would, after installing counters; the argument list may hold
# several runs separated by `::`, done one after the other by the same processes (one torchrun start-up for all).
PROBE = textwrap.dedent(
    """
    import json, os, runpy, sys

    import torch

    import lmdistill.recipes.common as common
    import lmdistill.recipes.soft as soft
    from lmdistill.train.checkpoint import CheckpointManager
    from lmdistill.train.logging import RunLogger

    counts, optimizers, teachers = {}, [], []

    def counting(name, fn):
        def wrapper(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapper

    orig_opt_init = torch.optim.Optimizer.__init__
    def opt_init(self, *a, **k):
        orig_opt_init(self, *a, **k)
        optimizers.append(self)
    torch.optim.Optimizer.__init__ = opt_init

    orig_load_teacher = common.load_teacher
    def load_teacher(cfg):
        model = orig_load_teacher(cfg)
        teachers.append(model)
        return model
    common.load_teacher = load_teacher

    CheckpointManager.save = counting("checkpoint_saves", CheckpointManager.save)
    orig_log = RunLogger.log
    def log(self, step, record):
        if self.enabled:
            counts["log_writes"] += 1
        return orig_log(self, step, record)
    RunLogger.log = log
    common.save_model = counting("students_saved", common.save_model)  # the end of every run: finish_run
    common.write_summary = counting("summaries", common.write_summary)

    runs, current = [], []
    for arg in sys.argv[1:]:
        if arg == "::":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    for phase, args in enumerate(runs):
        counts.update(checkpoint_saves=0, log_writes=0, students_saved=0, summaries=0)
        optimizers.clear()
        teachers.clear()
        sys.argv = ["lmdistill", *args]
        runpy.run_module("lmdistill", run_name="__main__", alter_sys=True)
        from accelerate.state import PartialState

        teacher_ids = {id(p) for t in teachers for p in t.parameters()}
        in_optimizers = sum(1 for o in optimizers for g in o.param_groups for p in g["params"] if id(p) in teacher_ids)
        probe = {
            **counts,
            "world": PartialState().num_processes,
            "rank": PartialState().process_index,
            "optimizers": len(optimizers),
            "teacher_params_in_optimizers": in_optimizers,
            "teacher_requires_grad": any(p.requires_grad for t in teachers for p in t.parameters()),
            "teacher_has_grads": any(p.grad is not None for t in teachers for p in t.parameters()),
            "teachers": len(teachers),
        }
        out = os.environ["LMDISTILL_PROBE_DIR"]
        with open(os.path.join(out, f"phase{phase}-rank{os.environ.get('RANK', '0')}.json"), "w") as fh:
            json.dump(probe, fh)
    """
)

STEPS = 4


def _args(teacher_dir: Path, student_dir: Path, chat_file: Path, out: Path, **extra: str) -> list[str]:
    settings = {
        "data.stage": "chat", "data.block_size": "48", "data.eval_documents": "8", "train.max_steps": str(STEPS),
        "train.micro_batch_size": "2", "train.save_every": "2", "train.warmup_steps": "1", "loss.alpha": "0.6",
        "loss.kind": "jsd", "train.eval_batches": "1",
    }
    settings.update(extra)
    return soft_overrides(teacher_dir, student_dir, chat_file, out, **settings)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(teacher_dir, student_dir, chat_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "one"
    cfg = load_config(SoftConfig, None, _args(teacher_dir, student_dir, chat_file, out, **{"train.grad_accum": "2"}))
    run_soft(cfg)
    return out


@pytest.fixture(scope="module")
def two_processes(one_process, teacher_dir, student_dir, chat_file, tmp_path_factory) -> dict:
    """One `torchrun --nproc_per_node 2` start-up, two runs: (0) from scratch; (1) resuming a copy of the 1-process
    run's step-2 checkpoint (its later checkpoints and student removed)."""
    root = tmp_path_factory.mktemp("two")
    resumed = root / "resumed"
    shutil.copytree(one_process, resumed)
    shutil.rmtree(resumed / "student")
    (resumed / "summary.json").unlink()
    for ckpt in (resumed / "checkpoints").glob("step-*"):
        if ckpt.name != "step-00000002":
            shutil.rmtree(ckpt)
    (root / "probe.py").write_text(PROBE)
    probes = root / "probes"
    probes.mkdir()
    scratch = root / "scratch"
    args = ["soft", *_args(teacher_dir, student_dir, chat_file, scratch, **{"train.grad_accum": "1"}), "::", "soft",
            *_args(teacher_dir, student_dir, chat_file, resumed, **{"train.grad_accum": "1", "train.resume": "true"})]
    env = {**os.environ, "LMDISTILL_PROBE_DIR": str(probes), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "probe.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = {(ph, r): json.loads((probes / f"phase{ph}-rank{r}.json").read_text()) for ph in (0, 1) for r in (0, 1)}
    return {"scratch": scratch, "resumed": resumed, "probe": probe, "stdout": proc.stdout}


def test_two_processes_match_one_and_only_rank0_writes(one_process, two_processes):
    ranks = [two_processes["probe"][0, r] for r in (0, 1)]
    out = two_processes["scratch"]
    for r, p in enumerate(ranks):
        assert p["world"] == 2 and p["rank"] == r, p  # a real process group, not two independent runs
        assert p["teachers"] == 1 and p["optimizers"] >= 1
        assert p["teacher_params_in_optimizers"] == 0, p
        assert not p["teacher_requires_grad"] and not p["teacher_has_grads"], p
    assert ranks[0]["checkpoint_saves"] == 2 and ranks[1]["checkpoint_saves"] == 0  # step 2 and the final one
    assert ranks[0]["log_writes"] > 0 and ranks[1]["log_writes"] == 0
    assert (ranks[0]["students_saved"], ranks[1]["students_saved"]) == (1, 0)
    assert (ranks[0]["summaries"], ranks[1]["summaries"]) == (1, 0)
    train_steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert train_steps == list(range(1, STEPS + 1))  # one writer: no duplicated or interleaved lines

    one = {r["step"]: r for r in read_log(one_process / "log.jsonl") if "loss" in r}
    two = {r["step"]: r for r in read_log(out / "log.jsonl") if "loss" in r}
    for step in one:
        for key in ("loss", "kd", "ce"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-7), (step, key)
    summary_one = json.loads((one_process / "summary.json").read_text())
    summary_two = json.loads((out / "summary.json").read_text())
    assert summary_two["final_train_loss"] == pytest.approx(summary_one["final_train_loss"], rel=1e-5)
    a, b = _weights(one_process), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # Print the comparison so the CI log shows the numbers.
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"\n1-proc loss {summary_one['final_train_loss']:.8f} 2-proc {summary_two['final_train_loss']:.8f} "
          f"max |dw| {diff:.3e}")


def test_two_processes_resume_a_one_process_checkpoint(one_process, two_processes):
    """Every rank loads the step-2 checkpoint (model, optimizer, scheduler, RNG) and finishes the run identically."""
    out = two_processes["resumed"]
    assert "resumed from step 2" in two_processes["stdout"]
    ranks = [two_processes["probe"][1, r] for r in (0, 1)]
    assert ranks[0]["checkpoint_saves"] == 1 and ranks[1]["checkpoint_saves"] == 0  # only the final one is new
    a, b = _weights(one_process), _weights(out)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, STEPS + 1))


# ---------------------------------------------------------------- engine-specific set-up, with stand-in accelerators
# These check lmdistill's own decisions per engine (what is refused, what is filled in); FSDP2 itself runs for real on
# CPU in tests/test_fsdp.py, DeepSpeed needs a GPU.

def _fake_accelerator(kind: str, processes: int = 8, ds_config: dict | None = None):
    from types import SimpleNamespace

    plugin = SimpleNamespace(deepspeed_config=ds_config or {})
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin), device=torch.device("cpu"))


def test_sharded_engines_refuse_the_fused_loss_and_lora_except_fsdp2():
    from lmdistill.errors import ConfigError
    from lmdistill.train.distributed import check_supported, engine, shards_parameters

    fsdp1 = _fake_accelerator("FSDP")
    fsdp2 = _fake_accelerator("FSDP")
    fsdp2.is_fsdp2 = True
    zero3 = _fake_accelerator("DEEPSPEED", ds_config={"zero_optimization": {"stage": 3}})
    zero2 = _fake_accelerator("DEEPSPEED", ds_config={"zero_optimization": {"stage": 2}})
    assert [engine(a) for a in (fsdp1, zero2, _fake_accelerator("MULTI_GPU"), _fake_accelerator("NO", 1))] == [
        "fsdp", "deepspeed", "ddp", "single"]
    assert shards_parameters(fsdp1) and shards_parameters(zero3) and not shards_parameters(zero2)
    for acc in (fsdp1, zero3):
        with pytest.raises(ConfigError, match="--loss.fused false"):
            check_supported(acc, fused_loss=True, lora=False)
        with pytest.raises(ConfigError, match="LoRA"):
            check_supported(acc, fused_loss=False, lora=True)
        check_supported(acc, fused_loss=False, lora=False)
    check_supported(zero2, fused_loss=True, lora=True)  # parameters are whole there
    # FSDP2: lm_head gathers the head, LoRA exports merge gathered weights (run for real in tests/test_fsdp.py)
    check_supported(fsdp2, fused_loss=True, lora=True)


def test_deepspeed_auto_fields_come_from_the_train_config():
    from lmdistill.config import TrainConfig
    from lmdistill.errors import ConfigError
    from lmdistill.train.distributed import deepspeed_defaults

    cfg = TrainConfig(micro_batch_size=2, grad_accum=3, max_grad_norm=0.5, save_every=0)
    ds = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}
    assert deepspeed_defaults(_fake_accelerator("DEEPSPEED", 4, ds), cfg) == 3
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
    assert deepspeed_defaults(_fake_accelerator("MULTI_GPU"), cfg) == 1
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=5"):
        deepspeed_defaults(_fake_accelerator("DEEPSPEED", 4, {"gradient_accumulation_steps": 5}), cfg)
    with pytest.raises(ConfigError, match="train.save_every 0"):
        deepspeed_defaults(_fake_accelerator("DEEPSPEED", 4, {}), TrainConfig(save_every=10))


def test_frozen_teacher_is_placed_without_gradients():
    from lmdistill.train.distributed import prepare_frozen

    teacher = torch.nn.Linear(3, 3)
    teacher.train()
    placed = prepare_frozen(_fake_accelerator("MULTI_CPU", 2), teacher)
    assert placed is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parent.parent / "configs" / "accelerate"
    kinds = {p.stem: str(load_config_from_file(str(p)).distributed_type) for p in sorted(root.glob("*.yaml"))}
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp": "DistributedType.FSDP",
                     "deepspeed_zero2": "DistributedType.DEEPSPEED", "deepspeed_zero3": "DistributedType.DEEPSPEED"}
    for stage in (2, 3):
        ds = json.loads((root / f"ds_zero{stage}.json").read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == ds["train_micro_batch_size_per_gpu"] == "auto"
