"""Layer-wise distillation (loss.hidden): the per-pair loss, the default pairs, the projection, soft, codistill and
onpolicy runs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import soft_overrides
from lmdistill.config import CodistillConfig, SoftConfig, load_config
from lmdistill.errors import ConfigError
from lmdistill.losses.hidden import PROJECTION_ATTR, HiddenProjections, even_pairs, hidden_pair_sum, layer_match
from lmdistill.recipes.codistill import run_codistill
from lmdistill.recipes.common import build_setup
from lmdistill.recipes.onpolicy import run_onpolicy
from lmdistill.recipes.soft import run_soft
from lmdistill.train.logging import read_log
from test_codistill import _overrides as codistill_overrides
from test_onpolicy import onpolicy_config


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
    match = layer_match(cfg.loss.hidden, setup.student, setup.teacher, seed=0)
    assert match is not None and match.pairs == [(0, 1), (1, 0)]
    assert len(match.projections.maps) == 0  # same width: no projection
    off = cfg.loss.hidden.model_copy(update={"weight": 0.0})
    assert layer_match(off, setup.student, setup.teacher, seed=0) is None


def test_even_pairs_space_the_student_over_the_teacher_and_pair_the_last_layers():
    assert even_pairs(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # round((i + 1) * 1.5) - 1, halves rounded up
    assert even_pairs(2, 2) == [(0, 0), (1, 1)]
    assert even_pairs(1, 30) == [(0, 29)]
    assert even_pairs(6, 30) == [(0, 4), (1, 9), (2, 14), (3, 19), (4, 24), (5, 29)]
    assert even_pairs(3, 1) == [(0, 0), (1, 0), (2, 0)]  # a deeper student: never below layer 0


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


# --------------------------------------------------------------------------------------------------- codistill


def _codistill(tokenizer_dir: Path, data: Path, out: Path, **extra: str) -> dict:
    return run_codistill(load_config(CodistillConfig, None, codistill_overrides(tokenizer_dir, data, out, **extra)))


@pytest.mark.parametrize("fused", [False, True])
def test_codistill_hidden_loss_never_reaches_the_teachers_gradients(tokenizer_dir, text_file, tmp_path, fused):
    from lmdistill.recipes.codistill import codistill_losses
    from lmdistill.recipes.common import build_co_setup

    cfg = load_config(CodistillConfig, None, codistill_overrides(tokenizer_dir, text_file, tmp_path, **{
        "loss.fused": str(fused).lower(), "loss.hidden.weight": "1", "loss.hidden.kind": "cosine"}))
    setup = build_co_setup(cfg)
    match = layer_match(cfg.loss.hidden, setup.student, setup.teacher, seed=0, default="even")
    assert match is not None and match.pairs == [(0, 1)]
    batch = setup.splits.train.batch([0, 1, 2])

    def grads(hidden):
        setup.teacher.zero_grad(set_to_none=True)
        setup.student.zero_grad(set_to_none=True)
        lt, ls = codistill_losses(setup.teacher, setup.student, batch, cfg.loss, setup.n_vocab, a=0.5, hidden=hidden)
        (lt.loss_sum + ls.loss_sum).backward()  # one backward through both graphs, as the loop does
        return ls, *({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
                     for m in (setup.teacher, setup.student))

    _, teacher_alone, student_alone = grads(None)
    with_hidden, teacher_grads, student_grads = grads(match)
    assert teacher_alone.keys() == teacher_grads.keys()
    assert all(torch.equal(teacher_alone[n], teacher_grads[n]) for n in teacher_alone)  # bitwise: detached states
    assert float(with_hidden.parts["hidden_0_1"].detach()) > 0
    assert any(not torch.equal(student_alone[n], student_grads[n]) for n in student_alone)
    assert f"{PROJECTION_ATTR}.maps.0_1.weight" in student_grads  # the projection learns with the student


def test_codistill_hidden_loss_trains_the_student_leaves_the_teacher_alone_and_resumes_bitwise(tokenizer_dir,
                                                                                                text_file, tmp_path):
    import shutil

    from safetensors.torch import load_file

    # teacher: 2 layers of width 48, student: 1 layer of width 16 -> evenly spaced pairs [(0, 1)], a projection
    hidden = {"loss.hidden.weight": "1", "train.max_steps": "8", "train.save_every": "4", "train.grad_accum": "2"}
    full = _codistill(tokenizer_dir, text_file, tmp_path / "full", **hidden)
    assert full["hidden_pairs"] == [[0, 1]]
    rows = [r for r in read_log(Path(full["log"])) if "loss_student" in r]
    assert len(rows) == 8 and all(torch.isfinite(torch.tensor(r["hidden_0_1_student"])) for r in rows)
    assert rows[-1]["hidden_0_1_student"] < rows[0]["hidden_0_1_student"], (rows[0], rows[-1])
    assert not any(k.startswith("hidden") and k.endswith("_teacher") for k in rows[0])  # the teacher has no such term
    # the student's loss: a * kd + (1 - a) * ce + weight * hidden
    last = rows[-1]
    want = 0.5 * last["kd_student"] + 0.5 * last["ce_student"] + last["hidden_0_1_student"]
    assert last["loss_student"] == pytest.approx(want, rel=1e-4)

    # the teacher ends bitwise where the teacher of a CE-only co-distillation run (a = 0, no hidden loss) ends
    ce = _codistill(tokenizer_dir, text_file, tmp_path / "ce", **{**hidden, "loss.hidden.weight": "0",
                                                                   "loss.weight.value": "0.0"})
    a = load_file(str(Path(full["teacher_dir"]) / "model.safetensors"))
    b = load_file(str(Path(ce["teacher_dir"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the projection rides on the student's checkpoint, not its export
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000008" / "model-student.safetensors"))
    assert ckpt[f"{PROJECTION_ATTR}.maps.0_1.weight"].shape == (48, 16)
    assert not any(PROJECTION_ATTR in k for k in load_file(str(Path(full["student_dir"]) / "model.safetensors")))

    # resumed from the step-4 checkpoint: both models and the projection end bitwise equal
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-00000008")
    for name in ("teacher", "student"):
        shutil.rmtree(part / name)
    (part / "summary.json").unlink()
    resumed = _codistill(tokenizer_dir, text_file, part, **hidden, **{"train.resume": "true"})
    for key in ("loss_student", "loss_teacher", "hidden_0_1_student"):
        assert resumed["final"][key] == full["final"][key], key
    for rel in ("checkpoints/step-00000008/model-student.safetensors",
                "checkpoints/step-00000008/model-teacher.safetensors"):
        a, b = load_file(str(tmp_path / "full" / rel)), load_file(str(part / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


# ---------------------------------------------------------------------------------------------------- onpolicy


def test_onpolicy_dense_hidden_loss_trains_on_the_students_samples(teacher_dir, student_dir, chat_file, tmp_path):
    # student width 32, teacher 64: a projection per pair
    cfg = onpolicy_config(teacher_dir, student_dir, chat_file, tmp_path / "run", **{
        "loss.hidden.weight": "1", "loss.hidden.pairs": "[[0, 0], [1, 1]]", "train.max_steps": "8",
        "data.eval_documents": "0"})
    summary = run_onpolicy(cfg)
    assert summary["hidden_pairs"] == [[0, 0], [1, 1]] and summary["rollouts"]["completions"] == 8 * 4 * 2
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert len(rows) == 8
    total = [r["hidden_0_0"] + r["hidden_1_1"] for r in rows]
    assert all(torch.isfinite(torch.tensor(total)))
    # measured: 1.67 -> 0.90, nearly all of it the last pair (layer 0's states start close: 0.027, and wander)
    assert total[-1] < 0.8 * total[0], total
    last = rows[-1]  # on the student's own tokens: the divergence alone, plus weight * the pairs' mean
    assert last["loss"] == pytest.approx(last["kd"] + (last["hidden_0_0"] + last["hidden_1_1"]) / 2, rel=1e-4)


@pytest.mark.parametrize("extra, fix", [
    ({"signal": "topk"}, "--signal dense"),
    ({"signal": "sampled_token"}, "--signal dense"),
    ({"signal": "topk", "teacher_server.url": "http://x/v1"}, "no teacher_server.url and --signal dense"),
])
def test_onpolicy_hidden_loss_refuses_a_signal_without_hidden_states(teacher_dir, student_dir, chat_file, tmp_path,
                                                                      extra, fix):
    with pytest.raises(ConfigError, match="hidden states") as err:
        onpolicy_config(teacher_dir, student_dir, chat_file, tmp_path, **{"loss.hidden.weight": "1", **extra})
    assert fix in str(err.value) and "--loss.hidden.weight 0" in str(err.value)
