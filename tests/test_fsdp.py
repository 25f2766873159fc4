"""FSDP2 for real, on CPU: `soft`, `hard --mode token` and `codistill` under
`accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2` (gloo) equal the 1-process run of the
same global batch; the frozen teacher is sharded and never gets a gradient; a run killed after its step-2 checkpoint
resumes under FSDP, and with 1 process, to the uninterrupted result; the exported students load with
AutoModelForCausalLM; the fused losses equal the reference path under FSDP (values and gradients), LoRA included.

accelerate only turns its FSDP plugin on for GPU-like devices; lmdistill switches it on for CPU processes
(`lmdistill.train.distributed.enable_sharding_on_cpu`), so these runs take accelerate's own FSDP2 code path (fully_shard
per decoder layer + embeddings + [norm, lm_head] + root, DTensor parameters, reduce-scatter of gradients) with gloo.
The launches go through `tests/fsdp_driver.py`, which runs `python -m lmdistill ...` after installing counters.

Tolerance (the DDP test's): logged losses `rel 1e-5`, weights `rtol 1e-5, atol 1e-6`; 2 processes x grad_accum 1
against 1 process x grad_accum 2 differ only in float summation order (measured: bitwise equal or within ~1e-7).
The fused-vs-reference checks allow 1e-5 relative on values and 1e-5 relative (to the largest entry) on gradients
(measured: ~1e-7 and ~5e-7).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import soft_overrides
from lmdistill.config import CodistillConfig, HardConfig, SoftConfig, load_config
from lmdistill.recipes.codistill import run_codistill
from lmdistill.recipes.hard import run_hard
from lmdistill.recipes.soft import run_soft
from lmdistill.train.logging import read_log

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "fsdp_driver.py"
STEPS = 4
LORA = {"student.lora.enabled": "true", "student.lora.r": "4", "student.lora.target_modules": "[q_proj,v_proj]"}


def _soft(teacher_dir: Path, student_dir: Path, chat_file: Path, out: Path, **extra: str) -> list[str]:
    settings = {"data.stage": "chat", "data.block_size": "48", "data.eval_documents": "8", "train.max_steps": str(STEPS),
                "train.micro_batch_size": "2", "train.save_every": "2", "train.warmup_steps": "1",
                "loss.alpha": "0.6", "loss.kind": "jsd", "train.eval_batches": "1", **extra}
    return soft_overrides(teacher_dir, student_dir, chat_file, out, **settings)


def _hard(teacher_dir: Path, student_dir: Path, chat_file: Path, out: Path, **extra: str) -> list[str]:
    settings = {"mode": "token", "data.stage": "chat", "data.block_size": "48", "data.eval_documents": "8",
                "train.max_steps": str(STEPS), "train.micro_batch_size": "2", "train.warmup_steps": "1",
                "loss.alpha": "0.7", "loss.chunk_size": "16", "train.eval_batches": "1", "train.save_every": "2",
                **extra}
    return soft_overrides(teacher_dir, student_dir, chat_file, out, **settings)


def _codistill(tokenizer_dir: Path, text_file: Path, out: Path, **extra: str) -> list[str]:
    settings = {"tokenizer": str(tokenizer_dir),
                "teacher.arch": "{model_type: llama, hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2}",
                "student.arch": "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1}",
                "data.source": str(text_file), "data.block_size": "32", "data.eval_documents": "8",
                "train.output_dir": str(out), "train.max_steps": str(STEPS), "train.micro_batch_size": "2",
                "train.lr": "3e-3", "train.warmup_steps": "1", "train.eval_every": "0", "train.eval_batches": "1",
                "train.save_every": "2", "train.progress": "false", "loss.weight.schedule": "dynamic",
                "loss.mutual": "0.2", "loss.fused": "true", **extra}
    return [x for k, v in settings.items() for x in (f"--{k}", v)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(root: Path, phases: list[list[str]], config: str = "fsdp.yaml",
            env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    """One `accelerate launch --config_file configs/accelerate/<config> --num_processes 2` of the driver."""
    probes = root / "probes"
    probes.mkdir(parents=True)
    args: list[str] = []
    for i, phase in enumerate(phases):
        args += (["::"] if i else []) + phase
    env = {**os.environ, "LMDISTILL_PROBE_DIR": str(probes), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           **(env_extra or {})}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
           str(_free_port()), str(DRIVER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO), probes


def _probes(probes: Path, phase: int) -> list[dict]:
    return [json.loads((probes / f"phase{phase}-rank{r}.json").read_text()) for r in (0, 1)]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def _assert_same_run(one: Path, two: Path, models: tuple[str, ...] = ("student",)) -> float:
    """Logged losses and every exported weight equal within the stated tolerance; returns the largest weight
    difference."""
    a_log = {r["step"]: r for r in read_log(one / "log.jsonl") if any(k.startswith("loss") for k in r)}
    b_log = {r["step"]: r for r in read_log(two / "log.jsonl") if any(k.startswith("loss") for k in r)}
    assert sorted(a_log) == sorted(b_log) == list(range(1, STEPS + 1))
    for step, rec in a_log.items():
        for key in rec:
            if key.startswith(("loss", "kd", "ce")):
                assert b_log[step][key] == pytest.approx(rec[key], rel=1e-5, abs=1e-7), (step, key)
    worst = 0.0
    for name in models:
        a, b = _weights(one / name), _weights(two / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=f"{name}.{k}": f"{k}: {m}")
            worst = max(worst, float((a[k] - b[k]).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------------------------------
# the runs: 1 process in this process, 2 processes (FSDP) in two launches


@pytest.fixture(scope="module")
def runs(teacher_dir, student_dir, chat_file, text_file, tokenizer_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    one, two = root / "one", root / "two"
    soft = lambda out, **k: _soft(teacher_dir, student_dir, chat_file, out, **k)  # noqa: E731
    hard = lambda out, **k: _hard(teacher_dir, student_dir, chat_file, out, **k)  # noqa: E731
    co = lambda out, **k: _codistill(tokenizer_dir, text_file, out, **k)  # noqa: E731

    # 1 process, grad_accum 2: the same global batch as 2 processes x grad_accum 1
    run_soft(load_config(SoftConfig, None, soft(one / "soft", **{"train.grad_accum": "2"})))
    run_hard(load_config(HardConfig, None, hard(one / "hard", **{"train.grad_accum": "2"})))
    run_codistill(load_config(CodistillConfig, None, co(one / "codistill", **{"train.grad_accum": "2"})))
    run_soft(load_config(SoftConfig, None, soft(one / "lora", **{"train.grad_accum": "2", **LORA})))

    g1 = {"train.grad_accum": "1"}
    proc, probes = _launch(two / "launch1", [
        ["cli", "soft", *soft(two / "soft", **g1)],
        ["cli", "hard", *hard(two / "hard", **g1)],
        ["cli", "codistill", *co(two / "codistill", **g1)],
        ["cli", "soft", *soft(two / "lora", **g1, **LORA)],
        ["unit", str(teacher_dir), str(student_dir)],
        ["gather"],
        # last: rank 0 is SIGKILLed right after the step-2 checkpoint, which ends this launch
        ["kill", "2", "soft", *soft(two / "killed", **g1)],
    ])
    assert proc.returncode != 0, "the killed phase should have ended the launch"
    assert (probes / "phase5-rank0.json").exists(), proc.stderr[-3000:]

    # The killed run's checkpoint, resumed with 1 process (a copy) and under FSDP.
    killed = two / "killed"
    shutil.copytree(killed, one / "resumed")
    run_soft(load_config(SoftConfig, None, soft(one / "resumed", **{"train.grad_accum": "2", "train.resume": "true"})))
    proc2, probes2 = _launch(two / "launch2", [["cli", "soft", *soft(killed, **g1, **{"train.resume": "true"})]])
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    return {"one": one, "two": two, "probes": probes, "probes2": probes2, "stdout": proc.stdout + proc2.stdout}


# ---------------------------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("phase,recipe,models", [(0, "soft", ("student",)), (1, "hard", ("student",)),
                                                 (2, "codistill", ("teacher", "student"))])
def test_fsdp_run_equals_one_process(runs, phase, recipe, models):
    ranks = _probes(runs["probes"], phase)
    for r, p in enumerate(ranks):
        assert (p["world"], p["rank"], p["engine"]) == (2, r, "fsdp"), p  # a real FSDP process group
        assert set(p["trained"]) == set(models)
        for name, s in p["trained"].items():  # every trained parameter is a DTensor shard, about half of it here
            assert s["dtensors"] == s["params"] > 0 and s["local_numel"] < 0.6 * s["numel"], (name, s)
    # only rank 0 writes: checkpoints (step 2 and the final one), the log, the summary, the exported models
    assert (ranks[0]["checkpoint_saves"], ranks[1]["checkpoint_saves"]) == (2, 0)
    assert ranks[0]["log_writes"] > 0 and ranks[1]["log_writes"] == 0
    assert (ranks[0]["students_saved"], ranks[1]["students_saved"]) == (len(models), 0)
    assert (ranks[0]["summaries"], ranks[1]["summaries"]) == (1, 0)
    assert all(p["fused_calls"] > 0 for p in ranks)  # the fused loss ran under FSDP (no --loss.fused false)
    worst = _assert_same_run(runs["one"] / recipe, runs["two"] / recipe, models)
    print(f"\n{recipe}: FSDP (2 processes) vs 1 process, max |dw| {worst:.3e}")


@pytest.mark.parametrize("phase", [0, 1])
def test_frozen_teacher_is_sharded_and_never_gets_gradients(runs, phase):
    for p in _probes(runs["probes"], phase):
        (teacher,) = p["teachers"]
        assert teacher["dtensors"] == teacher["params"] > 0 and teacher["local_numel"] < 0.6 * teacher["numel"]
        assert p["teacher_params_in_optimizers"] == 0
        assert not p["teacher_requires_grad"] and not p["teacher_has_grads"], p


def test_exported_students_reload_with_auto_model(runs):
    from transformers import AutoModelForCausalLM

    for recipe, name in (("soft", "student"), ("hard", "student"), ("codistill", "teacher"), ("codistill", "student"),
                         ("lora", "student")):
        out = runs["two"] / recipe / name
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        model = AutoModelForCausalLM.from_pretrained(out)
        saved = _weights(out)
        for k, v in model.state_dict().items():
            if k in saved:
                assert torch.equal(v, saved[k]), k
        assert not any("lora" in k for k in saved)  # LoRA: the merged model, the adapter beside it
    assert (runs["two"] / "lora" / "student" / "adapter" / "adapter_config.json").exists()


def test_lora_student_under_fsdp_equals_one_process(runs):
    ranks = _probes(runs["probes"], 3)
    for p in ranks:
        s = p["trained"]["student"]
        assert p["engine"] == "fsdp" and s["dtensors"] == s["params"]
    worst = _assert_same_run(runs["one"] / "lora", runs["two"] / "lora")
    print(f"\nLoRA: FSDP vs 1 process, max |dw| (merged) {worst:.3e}")


def test_fused_losses_equal_the_reference_path_under_fsdp(runs):
    """Soft (JSD + CE from hidden states) and hard (chunked CE on teacher argmax + ground truth) against the models'
    own logits, both under FSDP2, for a full and a LoRA student: values and every gradient shard."""
    for p in _probes(runs["probes"], 4):
        assert p["engine"] == "fsdp" and p["full_student"]["dtensors"] == p["full_student"]["params"]
        assert p["lora_student"]["dtensors"] == p["lora_student"]["params"]
        for case in ("full_soft", "full_hard", "lora_soft", "lora_hard"):
            r = p[case]
            assert r["value"] == pytest.approx(r["ref_value"], rel=1e-5), (case, r)
            assert r["max_rel_grad_diff"] < 1e-5, (case, r)
            assert r["grads"] == (21 if case.startswith("full") else 12), (case, r)  # LoRA: only A and B


def test_gathered_shards_all_gather_forward_and_average_the_gradient(runs):
    """Rows sharded 4 + 3 over 2 ranks: the whole weight forward; each rank's gradient rows are the ranks' mean."""
    ranks = _probes(runs["probes"], 5)
    assert [p["local_rows"] for p in ranks] == [4, 3]
    for p in ranks:
        assert p["value_equal"] and p["no_grad_equal"] and not p["no_grad_requires_grad"]
        assert p["grad_max_diff"] == 0.0


def test_killed_fsdp_run_resumes_under_fsdp_and_with_one_process(runs):
    two, one = runs["two"], runs["one"]
    assert not (runs["probes"] / "phase6-rank0.json").exists()  # the kill happened before the run finished
    # Resumed under FSDP (2 processes): only the final checkpoint is new, the result is the uninterrupted run's.
    assert "resumed from step 2" in runs["stdout"]
    ranks = _probes(runs["probes2"], 0)
    assert [p["engine"] for p in ranks] == ["fsdp", "fsdp"]
    assert (ranks[0]["checkpoint_saves"], ranks[1]["checkpoint_saves"]) == (1, 0)
    worst = _assert_same_run(one / "soft", two / "killed")
    # The FSDP checkpoint resumed by 1 process: also the uninterrupted run.
    worst_one = _assert_same_run(one / "soft", one / "resumed")
    print(f"\nkilled at step 2, resumed: under FSDP max |dw| {worst:.3e}; with 1 process {worst_one:.3e}")
