"""Layer-wise distillation (loss.hidden): the per-pair loss, the default pairs, the projection, a soft run, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import soft_overrides
from lmdistill.config import SoftConfig, load_config
from lmdistill.errors import ConfigError
from lmdistill.losses.hidden import PROJECTION_ATTR, HiddenProjections, hidden_pair_sum
from lmdistill.recipes.common import build_setup
from lmdistill.recipes.soft import layer_pairs, run_soft
from lmdistill.train.logging import read_log


def _cfg(teacher_dir: Path, student_dir: Path, data: Path, out: Path, **extra: str) -> SoftConfig:
    return load_config(SoftConfig, None, soft_overrides(teacher_dir, student_dir, data, out, **extra))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_pair_loss_values_and_gradients_match_a_hand_computation(kind):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    got = hidden_pair_sum(s, t, mask, kind)
    want = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(s)
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            x, y = s[b, i].detach(), t[b, i]
            if kind == "mse":
                want += ((x - y) ** 2).sum() / 4
                grad[b, i] = 2 * (x - y) / 4
            else:
                nx, ny = x.norm(), y.norm()
                cos = (x @ y) / (nx * ny)
                want += 1 - cos
                grad[b, i] = -(y / (nx * ny) - cos * x / nx**2)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    got.backward()
    assert s.grad is not None
    torch.testing.assert_close(s.grad, grad, rtol=1e-5, atol=1e-6)  # computed in float32
    assert (s.grad[~mask] == 0).all()


def test_pruned_student_pairs_default_to_the_keep_layers_map(teacher_dir, student_dir, text_file, tmp_path):
    cfg = _cfg(teacher_dir, student_dir, text_file, tmp_path / "run", **{
        "student.init": "prune", "student.keep_layers": "[1, 0]", "loss.hidden.weight": "1"})
    setup = build_setup(cfg, teacher=True)
    pairs, projections = layer_pairs(cfg, setup)
    assert pairs == [(0, 1), (1, 0)]
    assert len(projections.maps) == 0  # same width: no projection


def test_other_width_trains_a_projection_that_is_not_exported(teacher_dir, student_dir, text_file, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = run_soft(_cfg(teacher_dir, student_dir, text_file, out, **{
        "loss.hidden.weight": "1", "loss.hidden.pairs": "[[0, 0], [1, 1]]", "train.max_steps": "20",
        "train.save_every": "100"}))  # a checkpoint at the end only
    assert summary["hidden_pairs"] == [[0, 0], [1, 1]]
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert {"hidden_0_0", "hidden_1_1", "kd", "ce"} <= set(rows[0])
    for key in ("hidden_0_0", "hidden_1_1"):
        assert rows[-1][key] < rows[0][key], (key, rows[0][key], rows[-1][key])
    # the projection is trained with the student: in its checkpoint, moved away from its initial weights
    ckpt = load_file(str(out / "checkpoints" / "step-00000020" / "model-student.safetensors"))
    initial = HiddenProjections([(0, 0), (1, 1)], 32, 64, seed=0)
    for key in ("0_0", "1_1"):
        trained = ckpt[f"{PROJECTION_ATTR}.maps.{key}.weight"]
        assert trained.shape == (64, 32)
        assert not torch.allclose(trained, initial.maps[key].weight)
    # ... and not exported: the student is a plain model with exactly the original keys
    exported = load_file(str(Path(summary["student_dir"]) / "model.safetensors"))
    assert set(exported) == set(load_file(str(student_dir / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(summary["student_dir"])
    assert not hasattr(model, PROJECTION_ATTR)
    assert "lmdistill" not in json.dumps(model.config.to_dict())


def test_soft_run_with_hidden_loss_lowers_the_paired_loss(teacher_dir, student_dir, text_file, tmp_path):
    summary = run_soft(_cfg(teacher_dir, student_dir, text_file, tmp_path / "run", **{
        "student.init": "prune", "student.keep_layers": "[1]", "loss.hidden.weight": "1", "train.max_steps": "15"}))
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert summary["hidden_pairs"] == [[0, 1]]
    assert rows[-1]["hidden_0_1"] < 0.7 * rows[0]["hidden_0_1"], (rows[0], rows[-1])
    # the total is the soft loss + weight * the hidden loss
    last = rows[-1]
    assert last["loss"] == pytest.approx(last["kd"] + last["hidden_0_1"], rel=1e-4)


@pytest.mark.parametrize("source", ["teacher_cache", "api_logprobs"])
def test_hidden_loss_refuses_a_teacher_without_hidden_states(teacher_dir, student_dir, text_file, tmp_path, source):
    nowhere = tmp_path / "nowhere"  # never read: the refusal comes first
    data = nowhere if source == "api_logprobs" else text_file  # api_logprobs: its records are the data
    cfg = _cfg(teacher_dir, student_dir, data, tmp_path / "run", **{"loss.hidden.weight": "1", source: str(nowhere)})
    with pytest.raises(ConfigError, match="online teacher"):
        run_soft(cfg)


def test_resume_with_a_projection_reproduces_the_uninterrupted_run(teacher_dir, student_dir, text_file, tmp_path):
    import shutil

    from safetensors.torch import load_file

    base = {"loss.hidden.weight": "1", "loss.hidden.pairs": "[[1, 1]]", "loss.hidden.kind": "cosine",
            "train.max_steps": "6", "train.save_every": "3"}
    full = run_soft(_cfg(teacher_dir, student_dir, text_file, tmp_path / "full", **base))
    part = tmp_path / "part"  # the run directory as it stood right after the step-3 checkpoint
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    shutil.rmtree(part / "student")
    resumed = run_soft(_cfg(teacher_dir, student_dir, text_file, part, **base, **{"train.resume": "true"}))
    assert resumed["final_train_loss"] == full["final_train_loss"]
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000006" / "model-student.safetensors"))
    b = load_file(str(part / "checkpoints" / "step-00000006" / "model-student.safetensors"))
    assert f"{PROJECTION_ATTR}.maps.1_1.weight" in a and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fused_and_reference_paths_agree_with_the_hidden_loss(teacher_dir, student_dir, text_file, tmp_path):
    common = {"loss.hidden.weight": "0.5", "loss.hidden.pairs": "[[0, 1]]", "train.max_steps": "3",
              "loss.alpha": "0.7"}
    fused = run_soft(_cfg(teacher_dir, student_dir, text_file, tmp_path / "f", **common, **{"loss.fused": "true"}))
    ref = run_soft(_cfg(teacher_dir, student_dir, text_file, tmp_path / "r", **common, **{"loss.fused": "false"}))
    assert fused["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-4)
    assert fused["final"]["hidden_0_1"] == pytest.approx(ref["final"]["hidden_0_1"], rel=1e-4)
