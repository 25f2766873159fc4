"""Co-distillation end to end on tiny models: gradients stay apart, losses fall, resume is exact, a(t) reacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lmdistill.config import CodistillConfig, load_config
from lmdistill.recipes.codistill import codistill_losses, codistill_recipe, run_codistill
from lmdistill.recipes.common import build_co_setup
from lmdistill.train.logging import read_log
from lmdistill.train.loop import StepLoss, Trained, Trainer

TEACHER_ARCH = "{model_type: llama, hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2}"
STUDENT_ARCH = "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1}"


def _overrides(tokenizer_dir: Path, data: Path, out: Path, **extra: str) -> list[str]:
    args = {
        "tokenizer": str(tokenizer_dir),
        "teacher.arch": TEACHER_ARCH,
        "student.arch": STUDENT_ARCH,
        "data.source": str(data),
        "data.block_size": "32",
        "data.eval_documents": "40",
        "train.output_dir": str(out),
        "train.max_steps": "20",
        "train.micro_batch_size": "4",
        "train.lr": "3e-3",
        "train.warmup_steps": "2",
        "train.eval_every": "0",
        "train.eval_batches": "2",
        "train.save_every": "0",
        "train.progress": "false",
        "loss.weight.schedule": "constant",
        "loss.weight.value": "0.5",
    }
    args.update(extra)
    flat: list[str] = []
    for k, v in args.items():
        flat += [f"--{k}", v]
    return flat


def _cfg(tokenizer_dir: Path, data: Path, out: Path, **extra: str) -> CodistillConfig:
    return load_config(CodistillConfig, None, _overrides(tokenizer_dir, data, out, **extra))


def _trainer(cfg: CodistillConfig) -> Trainer:
    """The co-distillation recipe on the one loop, stepped by hand."""
    r = codistill_recipe(cfg)
    return Trainer(cfg.train, models=r.models, data=r.data, loss_fn=r.loss, eval_fn=r.evaluate, state=r.state,
                   on_step=r.on_step)


# ---------------------------------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("fused", [False, True])
def test_teacher_gradients_never_see_the_students_kd_term_unless_mutual(tokenizer_dir, text_file, tmp_path, fused):
    cfg = _cfg(tokenizer_dir, text_file, tmp_path, **{"loss.fused": str(fused).lower(), "loss.kind": "jsd"})
    setup = build_co_setup(cfg)
    batch = setup.splits.train.batch([0, 1, 2])
    teacher, student = setup.teacher, setup.student

    def teacher_grads(a: float, mutual: float) -> dict[str, torch.Tensor]:
        teacher.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        loss_cfg = cfg.loss.model_copy(update={"mutual": mutual})
        lt, ls = codistill_losses(teacher, student, batch, loss_cfg, setup.n_vocab, a=a)
        (lt.loss_sum + ls.loss_sum).backward()  # one backward through both graphs, as the loop does
        return {n: p.grad.clone() for n, p in teacher.named_parameters()}

    # Reference: the teacher's CE alone, through its own forward, no student anywhere.
    teacher.zero_grad(set_to_none=True)
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[..., : setup.n_vocab]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").backward()
    reference = {n: p.grad.clone() for n, p in teacher.named_parameters()}

    for a in (0.0, 0.5, 1.0):
        grads = teacher_grads(a, mutual=0.0)
        for n, g in grads.items():
            torch.testing.assert_close(g, reference[n], rtol=1e-5, atol=1e-6, msg=f"a={a}: {n} got KD gradient")
    # the student, for its part, does receive the KD term
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    with_mutual = teacher_grads(0.5, mutual=0.3)
    moved = max(float((with_mutual[n] - reference[n]).abs().max()) for n in reference)
    assert moved > 1e-4, "mutual distillation should give the teacher a gradient from the student"


def test_teacher_trains_exactly_as_alone_without_mutual(tokenizer_dir, text_file, tmp_path):
    """Loop level: the co-trained teacher ends bitwise where a CE-only teacher on the same batches ends."""
    cfg = _cfg(tokenizer_dir, text_file, tmp_path / "co", **{"train.max_steps": "4", "train.grad_accum": "2"})
    co = _trainer(cfg)
    for step in range(4):
        co.train_step(step)
    setup = build_co_setup(cfg)  # same seeds: the same initial teacher
    data = setup.splits.train
    solo_train = cfg.train.model_copy(update={"output_dir": str(tmp_path / "solo")})

    def ce(models, batch, step):
        logits = models["teacher"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {"teacher": StepLoss(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                                      reduction="sum"))}

    solo = Trainer(solo_train, models={"teacher": Trained(setup.teacher)}, data=data, loss_fn=ce)
    solo.fit()
    co_teacher = co.unwrapped["teacher"]
    for (n, p), q in zip(co_teacher.named_parameters(), solo.unwrapped["teacher"].parameters(), strict=True):
        assert torch.equal(p, q), n


def test_teacher_update_every_k_steps(tokenizer_dir, text_file, tmp_path):
    cfg = _cfg(tokenizer_dir, text_file, tmp_path, **{"teacher.update_every": "2", "train.max_steps": "4",
                                                      "train.max_grad_norm": "null"})
    tr = _trainer(cfg)
    teacher, student = tr.unwrapped["teacher"], tr.unwrapped["student"]

    def snap(m):
        return [p.detach().clone() for p in m.parameters()]

    t0 = snap(teacher)
    rec0 = tr.train_step(0)  # teacher updates at steps 0, 2, ...
    t1, s1 = snap(teacher), snap(student)
    rec1 = tr.train_step(1)
    t2, s2 = snap(teacher), snap(student)
    assert rec0["grad_norm_teacher"] > 0 and "grad_norm_teacher" not in rec1  # unclipped norms are still logged
    assert any(not torch.equal(a, b) for a, b in zip(t0, t1, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(t1, t2, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(s1, s2, strict=True))
    assert tr.schedulers["teacher"].last_epoch == 1 and tr.schedulers["student"].last_epoch == 2


# ---------------------------------------------------------------------------------------------------------------------
# whole runs


def test_tiny_run_both_losses_fall_and_both_models_load(tokenizer_dir, text_file, tmp_path):
    summary = run_codistill(_cfg(tokenizer_dir, text_file, tmp_path / "run", **{
        "loss.weight.schedule": "linear", "loss.weight.start_value": "0.0", "loss.weight.value": "0.6",
        "loss.weight.end_step": "10", "train.eval_every": "10",
    }))
    rows = read_log(Path(summary["log"]))
    train = [r for r in rows if "loss_student" in r]
    assert [r["step"] for r in train] == list(range(1, 21))
    first, last = train[0], train[-1]
    assert last["ce_teacher"] < first["ce_teacher"] - 1.0, (first, last)
    assert last["ce_student"] < first["ce_student"] - 0.5, (first, last)  # the 1-layer h16 student is slower
    # a(t) is logged every step and is the linear ramp: 0 at step 0, 0.6 from step 10 on
    a = [r["a"] for r in train]
    assert a[0] == 0.0 and a[5] == pytest.approx(0.3) and a[-1] == pytest.approx(0.6)
    ev0, ev1 = summary["eval_first"], summary["eval_last"]
    assert ev1["perplexity"] < ev0["perplexity"] and ev1["teacher_perplexity"] < ev0["teacher_perplexity"]
    # the honest baseline: the CE twin is the same run with a = 0; its teacher trains exactly the same (the student's
    # KD term never reaches the teacher), so its student is plain CE on the same terms against the same teacher
    twin = run_codistill(_cfg(tokenizer_dir, text_file, tmp_path / "ce", **{
        "loss.weight.schedule": "constant", "loss.weight.value": "0.0", "train.eval_every": "10"}))["eval_last"]
    assert twin["teacher_perplexity"] == pytest.approx(ev1["teacher_perplexity"], rel=1e-5)
    print(f"codistill vs CE twin: held-out KL to the teacher {ev1['kl_to_teacher']:.4f} vs {twin['kl_to_teacher']:.4f}, "
          f"perplexity {ev1['perplexity']:.1f} vs {twin['perplexity']:.1f}")
    # NOT asserted, measured: at 20 steps co-distillation does not beat its CE twin (KL 0.4114 vs 0.4118, perplexity
    # 107.6 vs 107.1, agreement 0.504 vs 0.602): the teacher is barely ahead of the student yet (issue #16).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for key, hidden in (("teacher_dir", 48), ("student_dir", 16)):
        model = AutoModelForCausalLM.from_pretrained(summary[key])
        tok = AutoTokenizer.from_pretrained(summary[key])
        assert model.config.hidden_size == hidden
        assert torch.isfinite(model(tok("The cat sees", return_tensors="pt").input_ids).logits).all()


def test_resume_restores_both_models_exactly(tokenizer_dir, text_file, tmp_path):
    extra = {"train.max_steps": "6", "train.save_every": "3", "train.grad_accum": "2", "loss.mutual": "0.1",
             "loss.weight.schedule": "dynamic", "loss.weight.value": "0.9", "loss.weight.gap_scale": "0.01",
             "loss.weight.ema": "0.5"}
    full = run_codistill(_cfg(tokenizer_dir, text_file, tmp_path / "full", **extra))
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step-00000006")
    for name in ("teacher", "student"):
        shutil.rmtree(part / name)
    (part / "summary.json").unlink()
    resumed = run_codistill(_cfg(tokenizer_dir, text_file, part, **extra, **{"train.resume": "true"}))
    from safetensors.torch import load_file

    for key in ("teacher_dir", "student_dir"):
        a = load_file(str(Path(full[key]) / "model.safetensors"))
        b = load_file(str(Path(resumed[key]) / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{key}: {k} differs after resume"
    a_full = [(r["step"], r["a"]) for r in read_log(Path(full["log"])) if "a" in r]
    a_resumed = [(r["step"], r["a"]) for r in read_log(Path(resumed["log"])) if "a" in r]
    assert a_full == a_resumed and any(a > 0 for _, a in a_full)  # the dynamic state came back too


def test_resume_refuses_another_weight_schedule(tokenizer_dir, text_file, tmp_path):
    from lmdistill.errors import CheckpointError

    run_codistill(_cfg(tokenizer_dir, text_file, tmp_path, **{"train.max_steps": "2", "train.save_every": "1"}))
    with pytest.raises(CheckpointError, match="schedule"):
        run_codistill(_cfg(tokenizer_dir, text_file, tmp_path, **{
            "train.max_steps": "3", "train.save_every": "1", "train.resume": "true",
            "loss.weight.schedule": "dynamic"}))


def test_dynamic_weight_grows_with_the_teacher_and_falls_when_it_is_made_worse(tokenizer_dir, text_file, tmp_path):
    """A teacher that pulls ahead of a (nearly frozen) student earns weight; wrecking its weights takes it away."""
    cfg = _cfg(tokenizer_dir, text_file, tmp_path, **{
        "student.lr": "1e-7", "teacher.lr": "1e-2", "loss.weight.schedule": "dynamic", "loss.weight.value": "0.8",
        "loss.weight.ema": "0.5", "loss.weight.gap_scale": "0.1", "train.max_steps": "16",
    })
    tr = _trainer(cfg)
    a = [tr.train_step(step)["a"] for step in range(10)]
    assert a[0] == 0.0 and a[-1] == pytest.approx(0.8), a
    assert a[-1] > a[1]
    teacher = tr.unwrapped["teacher"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    after = [tr.train_step(step)["a"] for step in range(10, 16)]
    assert all(0.0 <= x <= 1.0 for x in a + after)
    assert after[1] < a[-1] and after[-1] < 0.2 * a[-1], after


def test_teacher_can_start_from_a_checkpoint(tokenizer, tokenizer_dir, text_file, tmp_path):
    from conftest import make_model

    saved = make_model(tmp_path / "ckpt", tokenizer, hidden=24, layers=1, seed=5)
    cfg = _cfg(tokenizer_dir, text_file, tmp_path / "run", **{
        "teacher.init": "pretrained", "teacher.name_or_path": str(tmp_path / "ckpt")})
    teacher = build_co_setup(cfg).teacher
    assert teacher.config.hidden_size == 24
    for (n, p), q in zip(teacher.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_cli_runs_and_shipped_configs_validate(tokenizer_dir, text_file, tmp_path):
    from lmdistill.cli import main
    from lmdistill.errors import ConfigError

    shipped = sorted(Path(__file__).parents[1].glob("configs/codistill*.yaml"))
    assert shipped
    for path in shipped:
        load_config(CodistillConfig, path)
    args = _overrides(tokenizer_dir, text_file, tmp_path / "cli", **{"train.max_steps": "2"})
    main(["codistill", *args], standalone_mode=False)
    assert (tmp_path / "cli" / "teacher" / "model.safetensors").is_file()
    assert (tmp_path / "cli" / "student" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="teacher.arch"):
        main(["codistill", *args, "--teacher.arch.model_type", "nope"], standalone_mode=False)
    # `{hidden_size:48}` (no space) is YAML for the key "hidden_size:48": refused, not silently ignored
    with pytest.raises(ConfigError, match="space after each colon"):
        main(["codistill", *args, "--student.arch", "{hidden_size:48}"], standalone_mode=False)
