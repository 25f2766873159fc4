"""Importance pruning: `student.prune.method: influence` keeps the teacher layers that change their input most."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from lmdistill.config import StudentConfig
from lmdistill.errors import ConfigError
from lmdistill.models import build_student, layer_influence, most_influential


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
