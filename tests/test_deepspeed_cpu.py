"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on CPU (DeepSpeed's CPU accelerator, gloo), when `deepspeed` is installed:
`lmdistill soft` under `accelerate launch --config_file configs/accelerate/deepspeed_zero{2,3}.yaml --num_processes 2`
equals the 1-process run of the same global batch; the teacher never gets a gradient (under ZeRO-3 it is its own
partitioned inference engine); only rank 0 writes.

Skipped where `deepspeed` is not importable (it is not a dependency of lmdistill: `pip install deepspeed`).
accelerate refuses DeepSpeed on CPU just as it refuses FSDP; `lmdistill.train.distributed.enable_sharding_on_cpu`
switches it on, so this is accelerate's own DeepSpeed path (`_prepare_deepspeed`, DeepSpeedEngine.backward/step).

ZeRO-2 runs the fused loss (parameters are whole); ZeRO-3 the reference path (`--loss.fused false`, refused
otherwise: its parameters are partitions outside forward). Tolerance: losses rel 1e-5; weights rtol 1e-5 with atol
1e-6 (ZeRO-2) and 1e-5 (ZeRO-3, whose bucketed fp32 reductions add in another order; measured 1.4e-6).
"""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.config import SoftConfig, load_config
from lmdistill.recipes.soft import run_soft
from lmdistill.train.logging import read_log
from test_fsdp import STEPS, _launch, _probes, _soft, _weights

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(teacher_dir, student_dir, chat_file, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deepspeed")
    soft = lambda out, **k: _soft(teacher_dir, student_dir, chat_file, out,  # noqa: E731
                                  **{"train.save_every": "0", **k})
    for fused in ("true", "false"):
        run_soft(load_config(SoftConfig, None, soft(root / f"one-{fused}", **{"train.grad_accum": "2",
                                                                               "loss.fused": fused})))
    launches = {}
    for stage, fused in ((2, "true"), (3, "false")):
        proc, probes = _launch(root / f"zero{stage}", [["cli", "soft", *soft(root / f"zero{stage}" / "run", **{
            "train.grad_accum": "1", "loss.fused": fused})]], config=f"deepspeed_zero{stage}.yaml")
        assert proc.returncode == 0, proc.stderr[-3000:]
        launches[stage] = (root / f"zero{stage}" / "run", probes, root / f"one-{fused}")
    return launches


@pytest.mark.parametrize("stage,atol", [(2, 1e-6), (3, 1e-5)])
def test_deepspeed_run_equals_one_process(runs, stage, atol):
    out, probes, one = runs[stage]
    ranks = _probes(probes, 0)
    for r, p in enumerate(ranks):
        assert (p["world"], p["rank"], p["engine"]) == (2, r, "deepspeed"), p
        assert p["teacher_params_in_optimizers"] == 0
        assert not p["teacher_requires_grad"] and not p["teacher_has_grads"], p
        assert (p["fused_calls"] > 0) == (stage == 2)
    assert (ranks[0]["students_saved"], ranks[1]["students_saved"]) == (1, 0)
    assert (ranks[0]["summaries"], ranks[1]["summaries"]) == (1, 0)
    a_log = {r["step"]: r for r in read_log(one / "log.jsonl") if "loss" in r}
    b_log = {r["step"]: r for r in read_log(out / "log.jsonl") if "loss" in r}
    assert sorted(b_log) == list(range(1, STEPS + 1))
    for step, rec in a_log.items():
        for key in ("loss", "kd", "ce"):
            assert b_log[step][key] == pytest.approx(rec[key], rel=1e-5), (step, key)
    a, b = _weights(one / "student"), _weights(out / "student")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert json.loads((out / "student" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    print(f"\nZeRO-{stage}: max |dw| vs 1 process {max(float((a[k] - b[k]).abs().max()) for k in a):.3e}")
