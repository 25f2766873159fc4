"""Importance pruning: `student.prune.method: influence` keeps the teacher layers that change their input most;
`minitron` also prunes width (heads, MLP channels, embedding channels) by activation importance to a parameter count;
`lmdistill prune` writes the student and scores it before training."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import make_model
from lmdistill.config import StudentConfig
from lmdistill.errors import ConfigError
from lmdistill.models import build_student
from lmdistill.prune import (
    choose_heads,
    count_unique_parameters,
    layer_influence,
    most_influential,
    plan_width,
    prune_layers,
    prune_width,
    width_importance,
)


def _known_teacher(tmp_path, tokenizer):
    """Five layers whose influence is known: 1 and 4 pass their input on unchanged (their residual branches write
    zeros), 2 barely changes it (branches scaled by 0.01), 0 and 3 change it most (scaled by 10)."""
    model = make_model(tmp_path / "t", tokenizer, hidden=32, layers=5, seed=3)
    with torch.no_grad():
        for i, scale in ((0, 10.0), (1, 0.0), (2, 0.01), (3, 10.0), (4, 0.0)):
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    model.save_pretrained(tmp_path / "t")
    return model


def test_influence_is_one_minus_cosine_and_keeps_the_layers_that_change_their_input(tmp_path, tokenizer):
    model = _known_teacher(tmp_path, tokenizer)
    ids = tokenizer(["The cat sees the river in the morning.", "A dog walks by the road at night."],
                    return_tensors="pt", padding=True)
    scores = layer_influence(model, [dict(ids)])
    assert scores[1] == pytest.approx(0.0, abs=1e-6) and scores[4] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 < scores[2] < min(scores[0], scores[3]), scores
    assert most_influential(scores, 2) == [0, 3]
    assert most_influential(scores, 3) == [0, 2, 3]  # in layer order, not by score
    assert most_influential([0.5, 0.5, 0.1], 1) == [0]  # a tie goes to the earlier layer
    with pytest.raises(ConfigError, match="asks for 6 layers"):
        most_influential(scores, 6)


def test_influence_pruned_student_is_a_plain_reloadable_model(tmp_path, tokenizer, text_file):
    from transformers import AutoModelForCausalLM

    teacher = _known_teacher(tmp_path, tokenizer)
    cfg = StudentConfig.model_validate({
        "init": "prune", "keep_layers": [0, 1],  # only their number counts for method=influence
        "prune": {"method": "influence", "calibration_source": str(text_file), "calibration_block_size": 32,
                  "calibration_batches": 2}})
    student = build_student(cfg, tokenizer, teacher=teacher)
    assert student.config.num_hidden_layers == 2
    t_sd = teacher.state_dict()
    for new, old in ((0, 0), (1, 3)):  # the student's layers are the teacher's 0 and 3
        for name, w in student.model.layers[new].state_dict().items():
            torch.testing.assert_close(w, t_sd[f"model.layers.{old}.{name}"])
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert again.config.num_hidden_layers == 2
    ids = tokenizer("The cat sees", return_tensors="pt").input_ids
    torch.testing.assert_close(again(ids).logits, student(ids).logits)
    # method=keep_layers (the default) keeps exactly keep_layers
    plain = build_student(StudentConfig.model_validate({"init": "prune", "keep_layers": [0, 1]}), tokenizer,
                          teacher=teacher)
    torch.testing.assert_close(plain.model.layers[1].mlp.down_proj.weight, teacher.model.layers[1].mlp.down_proj.weight)


# ---------------------------------------------------------------------------------------------------------------------
# minitron: width pruning


def _minitron(target_m: float, text_file, keep: int = 2, **prune) -> StudentConfig:
    return StudentConfig.model_validate({
        "init": "prune", "keep_layers": list(range(keep)),
        "prune": {"method": "minitron", "target_params": target_m, "calibration_source": str(text_file),
                  "calibration_block_size": 32, "calibration_batches": 2, **prune}})


def _batches(tokenizer) -> list[dict[str, torch.Tensor]]:
    ids = tokenizer(["The cat sees the river in the morning. A dog walks by the road at night.",
                     "My friend paints a green tree near the sea."], return_tensors="pt", padding=True)
    return [dict(ids)]


def _tied(model):
    """The same model with its lm_head tied to the embedding (Qwen2-0.5B, SmolLM2 and Llama 3.2 are tied)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(config)
    tied.load_state_dict({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, strict=False)
    return tied


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_minitron_student_is_a_plain_model_that_reloads_with_equal_logits(tmp_path, tokenizer, text_file, arch, tied):
    from transformers import AutoModelForCausalLM

    teacher = make_model(tmp_path / "t", tokenizer, arch=arch, hidden=64, layers=3, seed=4)
    if tied:
        teacher = _tied(teacher)
    depth_only = count_unique_parameters(prune_layers(teacher, [0, 1]))
    target = 0.6 * depth_only / 1e6
    student = build_student(_minitron(target, text_file), tokenizer, teacher=teacher)
    assert type(student) is type(teacher)  # a plain HF class, nothing of ours inside
    c, tc = student.config, teacher.config
    assert c.num_hidden_layers == 2 and len(student.lmdistill_kept_layers) == 2
    assert c.hidden_size < tc.hidden_size and c.intermediate_size < tc.intermediate_size
    assert c.head_dim == tc.hidden_size // tc.num_attention_heads == 16  # head_dim unchanged
    assert c.num_attention_heads % c.num_key_value_heads == 0  # GQA stays valid
    assert c.num_attention_heads <= tc.num_attention_heads and c.num_key_value_heads <= tc.num_key_value_heads
    n = count_unique_parameters(student)
    assert 0.98 * target * 1e6 <= n <= target * 1e6, (n, target)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    student.save_pretrained(tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert type(again) is type(teacher) and again.config.hidden_size == c.hidden_size
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied
    ids = tokenizer(["The cat sees the river", "A dog"], return_tensors="pt", padding=True)
    torch.testing.assert_close(again(**ids).logits, student(**ids).logits)


def test_minitron_meets_each_target_from_below(tmp_path, tokenizer):
    model = make_model(tmp_path / "t", tokenizer, hidden=64, layers=2, seed=5)
    importance = width_importance(model, _batches(tokenizer))
    full = count_unique_parameters(model)
    for fraction in (0.35, 0.5, 0.75, 0.95):
        for axes in (["hidden", "heads", "mlp"], ["hidden", "mlp"], ["mlp"]):
            target = int(fraction * full)
            try:
                plan = plan_width(model, importance, target, axes)
            except ConfigError:  # the MLP alone is 46 % of the model: it cannot take it down to a half
                assert axes == ["mlp"] and fraction <= 0.5
                continue
            student = prune_width(model, plan)
            n = count_unique_parameters(student)
            assert 0.98 * target <= n <= target, (fraction, axes, n, target)
            c = student.config
            assert c.num_attention_heads % c.num_key_value_heads == 0 and c.hidden_size % c.num_attention_heads == 0
            if "heads" not in axes:
                assert c.num_attention_heads == 4 and c.num_key_value_heads == 2
            if "hidden" not in axes:
                assert c.hidden_size == 64


def test_minitron_prunes_the_heads_and_channels_that_carry_nothing(tmp_path, tokenizer):
    """KV group 1 writes zeros (both its query heads output nothing), MLP channels 5..12 of each layer are zero
    (their up_proj rows are), residual channels 3, 17 and 30 are zero after every norm: exactly those go first."""
    model = make_model(tmp_path / "t", tokenizer, hidden=32, layers=2, seed=6)  # 4 heads of 8, 2 KV heads, mlp 64
    dead_mlp, dead_hidden = list(range(5, 13)), [3, 17, 30]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[8:16] = 0.0  # KV head 1 (query heads 2, 3)
            layer.mlp.up_proj.weight[dead_mlp] = 0.0
            layer.input_layernorm.weight[dead_hidden] = 0.0
            layer.post_attention_layernorm.weight[dead_hidden] = 0.0
        model.model.norm.weight[dead_hidden] = 0.0
    importance = width_importance(model, _batches(tokenizer))
    for i in range(2):
        assert importance.heads[i][2:].abs().max() == 0 and importance.heads[i][:2].min() > 0
        assert importance.mlp[i][dead_mlp].abs().max() == 0 and importance.mlp[i][13:].min() > 0
    assert importance.hidden[dead_hidden].abs().max() == 0 and (importance.hidden > 0).sum() == 29
    plan = plan_width(model, importance, int(0.55 * count_unique_parameters(model)), ["hidden", "heads", "mlp"])
    assert plan.n_heads == 2 and plan.hidden_size <= 29 and plan.intermediate_size <= 64 - len(dead_mlp)
    for i in range(2):  # the live group keeps both its heads rather than one head from each group
        assert plan.kv_heads[i].tolist() == [0] and plan.heads[i].tolist() == [0, 1]
        assert not set(plan.mlp[i].tolist()) & set(dead_mlp)
    assert not set(plan.hidden.tolist()) & set(dead_hidden)
    student = prune_width(model, plan)
    torch.testing.assert_close(student.model.layers[0].self_attn.k_proj.weight,
                               model.model.layers[0].self_attn.k_proj.weight[:8][:, plan.hidden])
    torch.testing.assert_close(student.model.layers[1].mlp.down_proj.weight,
                               model.model.layers[1].mlp.down_proj.weight[plan.hidden][:, plan.mlp[1]])


def test_choose_heads_keeps_whole_groups_or_the_same_number_per_group():
    scores = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.3, 0.3])  # 3 KV groups of 2 query heads
    heads, kv, total = choose_heads(scores, n_kv=3, groups=2, per_group=1)
    assert heads.tolist() == [1, 2] and kv.tolist() == [0, 1] and total == pytest.approx(1.7)
    heads, kv, _ = choose_heads(scores, n_kv=3, groups=1, per_group=2)  # groups 0 and 1 tie at 1.0: the earlier
    assert heads.tolist() == [0, 1] and kv.tolist() == [0]
    heads, kv, _ = choose_heads(scores, n_kv=3, groups=2, per_group=2)
    assert heads.tolist() == [0, 1, 2, 3] and kv.tolist() == [0, 1]


def test_minitron_refuses_what_it_cannot_do(tmp_path, tokenizer, text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    teacher = make_model(tmp_path / "t", tokenizer, hidden=32, layers=3, seed=7)
    full = count_unique_parameters(teacher) / 1e6
    with pytest.raises(ConfigError, match=r"target_params=.* not below the teacher's"):
        build_student(_minitron(full * 1.5, text_file), tokenizer, teacher=teacher)
    with pytest.raises(ConfigError, match=r"target_params=.* more than the 1 kept layers have at full width"):
        build_student(_minitron(full * 0.99, text_file, keep=1), tokenizer, teacher=teacher)
    with pytest.raises(ConfigError, match=r"target_params=0.0001 .* below the smallest model"):
        build_student(_minitron(0.0001, text_file), tokenizer, teacher=teacher)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    with pytest.raises(ConfigError, match="model_type `gpt2`"):
        build_student(_minitron(0.01, text_file), tokenizer, teacher=gpt2)
    with pytest.raises(ValueError, match="needs student.prune.target_params"):
        StudentConfig.model_validate({"prune": {"method": "minitron"}})
    with pytest.raises(ValueError, match="target_params is read by method=minitron only"):
        StudentConfig.model_validate({"prune": {"method": "influence", "target_params": 10}})


# ---------------------------------------------------------------------------------------------------------------------
# lmdistill prune


def _prune_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from lmdistill.cli import run

    monkeypatch.setattr(sys, "argv", ["lmdistill", "prune", *args])
    code = 0
    try:
        run()
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prune_command_writes_a_loadable_student_and_prints_both_perplexities(tmp_path, monkeypatch, capsys,
                                                                              teacher_dir, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = 0.6 * count_unique_parameters(AutoModelForCausalLM.from_pretrained(teacher_dir)) / 1e6
    out = tmp_path / "pruned"
    common = ["--teacher.name_or_path", str(teacher_dir), "--student.keep_layers", "[0, 1]",
              "--student.prune.calibration_source", str(text_file), "--student.prune.calibration_block_size", "32",
              "--student.prune.calibration_batches", "2", "--data.source", str(text_file), "--data.block_size", "32",
              "--data.eval_documents", "40", "--max_batches", "4", "--device", "cpu"]
    code, stdout, stderr = _prune_cli(monkeypatch, capsys, *common, "--student.prune.method", "minitron",
                                      "--student.prune.target_params", f"{target:.6f}", "--output_dir", str(out))
    assert code == 0, stderr
    assert "perplexity" in stdout, stdout
    summary = json.loads((out / "prune.json").read_text())
    rows = {r["model"]: r for r in summary["rows"]}
    depth, size = rows["every k-th layer (same depth)"], rows["every k-th layer (same size)"]
    assert list(rows) == ["teacher", "every k-th layer (same depth)", "every k-th layer (same size)", "minitron"]
    for name, r in rows.items():
        assert r["perplexity"] > 1 and f"{r['perplexity']:.2f}" in stdout and name in stdout
    assert rows["minitron"]["params"] <= target * 1e6 < depth["params"] == rows["teacher"]["params"]
    assert depth["teacher_layers"] == [0, 1] and size["teacher_layers"] == [0] and size["layers"] == 1
    assert rows["minitron"]["layers"] == 2 and rows["minitron"]["hidden"] < 64
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == rows["minitron"]["hidden"]
    assert count_unique_parameters(student) == rows["minitron"]["params"]
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(teacher_dir))
    # a target the teacher cannot be cut to: one message naming the field, exit code 2, no traceback
    code, _, stderr = _prune_cli(monkeypatch, capsys, *common, "--student.prune.method", "minitron",
                                 "--student.prune.target_params", "1000", "--output_dir", str(tmp_path / "no"))
    assert code == 2 and "student.prune.target_params=1000" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "no").exists()
    code, _, stderr = _prune_cli(monkeypatch, capsys, *common, "--student.init", "config")
    assert code == 2 and "needs student.init=prune" in stderr


def test_every_kth_layer_spans_the_teacher():
    from lmdistill.recipes.prune import every_kth_layer

    assert every_kth_layer(30, 6) == [0, 6, 12, 17, 23, 29]
    assert every_kth_layer(4, 2) == [0, 3] and every_kth_layer(5, 1) == [0] and every_kth_layer(3, 3) == [0, 1, 2]


def test_minitron_student_pairs_with_the_teacher_layers_it_kept_through_projections(teacher_dir, student_dir,
                                                                                     text_file, tmp_path):
    """Layer-wise distillation takes the pruning map as its pairs; the narrower student's hidden states reach the
    teacher's width through the learned projection."""
    from conftest import soft_overrides
    from lmdistill.config import SoftConfig, load_config
    from lmdistill.losses.hidden import HiddenProjections, hidden_pair_sum, layer_match
    from lmdistill.recipes.common import build_setup

    cfg = load_config(SoftConfig, overrides=soft_overrides(teacher_dir, student_dir, text_file, tmp_path / "run", **{
        "student.init": "prune", "student.keep_layers": "[0, 1]", "student.prune.method": "minitron",
        "student.prune.target_params": "0.05", "student.prune.calibration_source": str(text_file),
        "student.prune.calibration_block_size": "32", "loss.hidden.weight": "1"}))
    setup = build_setup(cfg, teacher=True)
    assert setup.student.config.hidden_size < setup.teacher.config.hidden_size
    match = layer_match(cfg.loss.hidden, setup.student, setup.teacher, seed=0)
    assert match is not None and match.pairs == [(0, 0), (1, 1)] and len(match.projections.maps) == 2

    # each map starts as the pruning map: student channel j -> the teacher channel it was cut from
    kept = setup.student.lmdistill_kept_channels
    assert len(kept) == setup.student.config.hidden_size
    for linear in match.projections.maps.values():
        want = torch.zeros_like(linear.weight)
        want[torch.tensor(kept), torch.arange(len(kept))] = 1.0
        assert torch.equal(linear.weight, want)
    # so layer 0's embedding output (the teacher's embedding rows restricted to the kept channels) lands on the
    # teacher's own: far closer at step 0 than through a random map of the same shape
    assert setup.splits is not None
    batch = setup.splits.train.batch([0, 1, 2, 3])
    with torch.no_grad():
        s = setup.student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        t = setup.teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    mask = torch.ones(batch["input_ids"].shape, dtype=torch.bool)
    mapped = hidden_pair_sum(match.projections.project((0, 0), s[0]), t[0], mask, "cosine") / mask.sum()
    rand = HiddenProjections([(0, 0)], len(kept), setup.teacher.config.hidden_size, seed=0)
    random = hidden_pair_sum(rand.project((0, 0), s[0]), t[0], mask, "cosine") / mask.sum()
    assert mapped < 0.5 < random, (mapped, random)


def test_shipped_prune_config_validates_and_names_its_command():
    from pathlib import Path

    from lmdistill.config import load_config
    from lmdistill.recipes.prune import PruneRunConfig

    path = Path(__file__).parents[1] / "configs" / "prune.yaml"
    cfg = load_config(PruneRunConfig, path)
    assert path.read_text().startswith("# lmdistill prune --config configs/prune.yaml")
    assert cfg.student.prune.method == "minitron" and cfg.student.prune.target_params == pytest.approx(49.6)
