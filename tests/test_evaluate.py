"""Evaluation metrics against hand-computed values, and `lmdistill eval` on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmdistill.config import load_config
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.evaluate import (
    EvalConfig,
    GenerationOptions,
    MetricSums,
    evaluate_blocks,
    evaluate_models,
    expected_calibration_error,
    generate_one,
    prompts_from_blocks,
    run_eval,
)


def test_ece_on_a_constructed_case():
    # 15 equal-width bins. 0.9 -> bin (13/15, 14/15]; 0.6 -> (8/15, 9/15]; 0.3 -> (4/15, 5/15].
    # bin 0.9: 2 predictions, 1 right: |0.5 - 0.9| * 2/5 = 0.16
    # bin 0.6: 2 predictions, 2 right: |1.0 - 0.6| * 2/5 = 0.16
    # bin 0.3: 1 prediction, wrong:    |0.0 - 0.3| * 1/5 = 0.06
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6, 0.3])
    correct = torch.tensor([True, False, True, True, False])
    assert expected_calibration_error(conf, correct) == pytest.approx(0.38)
    # one bin: |overall accuracy - mean confidence| = |3/5 - 3.3/5|
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.06)
    # perfectly calibrated: confidence 1 and always right
    assert expected_calibration_error(torch.ones(4), torch.ones(4, dtype=torch.bool)) == 0.0


def test_metric_sums_on_tiny_distributions():
    # V = 3, one sequence of 3 positions, the last one ignored.
    s_probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    t_probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    labels = torch.tensor([[0, 2, IGNORE]])
    sums = MetricSums()
    # logits = log-probs + an arbitrary per-row shift: softmax must undo it
    sums.add((s_probs.log() + 3.0)[None], labels, (t_probs.log() - 1.0)[None])
    r = sums.result()
    kl = [sum(float(p * math.log(p / q)) for p, q in zip(t_probs[i], s_probs[i], strict=True)) for i in range(2)]
    assert r["tokens"] == 2
    assert r["kl_to_teacher"] == pytest.approx(sum(kl) / 2, rel=1e-5)
    # student argmax (0, 1), teacher argmax (0, 2): they agree on one position of two
    assert r["agreement"] == pytest.approx(0.5)
    assert r["ce"] == pytest.approx(-(math.log(0.5) + math.log(0.3)) / 2, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(r["ce"]), rel=1e-6)
    assert r["teacher_perplexity"] == pytest.approx(math.exp(-(math.log(0.7) + math.log(0.5)) / 2), rel=1e-5)
    # top-1 confidence 0.5 (right: label 0) and 0.6 (wrong: label 2), in different bins
    assert r["ece"] == pytest.approx((abs(1 - 0.5) + abs(0 - 0.6)) / 2, rel=1e-5)


def test_identical_models_have_zero_kl_and_full_agreement():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    sums = MetricSums()
    sums.add(logits, labels, logits.clone())
    r = sums.result()
    assert r["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert r["agreement"] == 1.0


def test_ece_accumulates_exactly_across_batches():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(200, generator=g)
    correct = torch.rand(200, generator=g) < conf
    from lmdistill.evaluate import CalibrationHistogram

    hist = CalibrationHistogram()
    for i in range(0, 200, 37):
        hist.add(conf[i : i + 37], correct[i : i + 37])
    assert hist.ece() == pytest.approx(expected_calibration_error(conf, correct), abs=1e-12)


def _models(teacher_dir: Path, student_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(student_dir)


def test_evaluate_models_matches_evaluate_blocks(teacher_dir, student_dir, tokenizer, text_file):
    from lmdistill.config import DataConfig
    from lmdistill.data import build_splits

    teacher, student = _models(teacher_dir, student_dir)
    held = build_splits(DataConfig(source=str(text_file), block_size=32, eval_documents=30), tokenizer).eval
    n = len(tokenizer)

    def t_logits(batch):
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    one = evaluate_blocks(student, held, n_vocab=n, batch_size=4, max_batches=3, teacher_logits_fn=t_logits)
    many = evaluate_models({"a": student, "b": teacher}, held, n_vocab=n, teacher=teacher, batch_size=4,
                           max_batches=3)
    for key in ("ce", "perplexity", "kl_to_teacher", "agreement", "ece", "tokens"):
        assert many["a"][key] == pytest.approx(one[key], rel=1e-5), key
    # the teacher scored against itself, and its own reference row
    assert many["b"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-5) and many["b"]["agreement"] == 1.0
    assert many["teacher"]["perplexity"] == pytest.approx(many["b"]["perplexity"], rel=1e-5)
    assert many["a"]["student_tokens_per_s"] > 0 and "kl_to_teacher" not in many["teacher"]


def test_prompts_from_blocks_take_the_chat_prompt_or_the_first_tokens():
    ids = torch.arange(10).view(1, 10)
    chat = TokenBlocks(ids, torch.tensor([[IGNORE] * 4 + [5, 6, 7, 8, 9, IGNORE]]), torch.ones(1, 10, dtype=torch.long))
    assert prompts_from_blocks(chat, 3, prompt_tokens=2)[0].tolist() == [0, 1, 2, 3, 4]  # up to the first target
    raw = TokenBlocks(ids, torch.arange(1, 11).view(1, 10), torch.ones(1, 10, dtype=torch.long))
    assert prompts_from_blocks(raw, 3, prompt_tokens=3)[0].tolist() == [0, 1, 2]


def test_generation_is_reproducible(student_dir, tokenizer):
    _, student = _models(student_dir, student_dir)
    prompt = torch.tensor(tokenizer("The cat sees")["input_ids"])
    opts = GenerationOptions(max_new_tokens=6)
    a = generate_one(student, tokenizer, prompt, sample=True, opts=opts, seed=3)
    b = generate_one(student, tokenizer, prompt, sample=True, opts=opts, seed=3)
    g1 = generate_one(student, tokenizer, prompt, sample=False, opts=opts, seed=0)
    g2 = generate_one(student, tokenizer, prompt, sample=False, opts=opts, seed=9)
    assert a["text"] == b["text"] and g1["text"] == g2["text"]
    assert 0 < a["tokens"] <= 6


def _eval_overrides(teacher_dir: Path, student_dir: Path, data: Path, out: Path) -> dict:
    return {"student": {"name_or_path": str(student_dir)}, "teacher": {"name_or_path": str(teacher_dir)},
            "data": {"source": str(data), "block_size": 32, "eval_documents": 20}, "max_batches": 2,
            "generation": {"n_prompts": 2, "max_new_tokens": 5}, "output": str(out), "device": "cpu"}


def test_run_eval_writes_metrics_and_side_by_side_generations(teacher_dir, student_dir, text_file, tmp_path):
    cfg = load_config(EvalConfig, None, _eval_overrides(teacher_dir, student_dir, text_file, tmp_path / "e.json"))
    result = run_eval(cfg)
    saved = json.loads((tmp_path / "e.json").read_text())
    m = saved["metrics"]
    assert {"perplexity", "kl_to_teacher", "agreement", "ece", "student_tokens_per_s"} <= set(m)
    assert m["kl_to_teacher"] > 0 and 0 <= m["agreement"] <= 1 and m["tokens"] == 2 * 4 * 32
    assert saved["teacher_metrics"]["perplexity"] < m["perplexity"]  # the trained teacher beats a random student
    assert saved["teacher_metrics"]["bits_per_byte"] < m["bits_per_byte"]  # and per byte, on the same targets
    assert m["bytes"] == saved["teacher_metrics"]["bytes"] > 0
    assert len(saved["generations"]) == 2
    for g in saved["generations"]:
        assert set(g["outputs"]) == {"teacher", "student"}
        assert set(g["outputs"]["student"]) == {"greedy", "sampled"}
    assert result["output"] == str(tmp_path / "e.json")


def test_eval_cli_without_teacher(student_dir, teacher_dir, text_file, tmp_path):
    from click.testing import CliRunner

    from lmdistill.cli import main

    args = ["eval", "--student.name_or_path", str(student_dir),
            "--teacher.name_or_path", str(teacher_dir), "--with_teacher", "false", "--data.source", str(text_file),
            "--data.block_size", "32", "--data.eval_documents", "20", "--max_batches", "1", "--generation.n_prompts",
            "1", "--generation.max_new_tokens", "3", "--output", str(tmp_path / "e.json")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "e.json").read_text())
    assert "kl_to_teacher" not in saved["metrics"] and saved["teacher"] is None
    assert "perplexity" in result.output and str(tmp_path / "e.json") in result.output


def test_lm_eval_without_the_harness_names_the_install():
    from lmdistill.errors import ConfigError
    from lmdistill.evaluate import lm_eval_tasks

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"lm-evaluation-harness.*pip install"):
            lm_eval_tasks("hellaswag,arc_easy")
    else:
        assert lm_eval_tasks("hellaswag, arc_easy") == ["hellaswag", "arc_easy"]
    with pytest.raises(ConfigError, match="at least one task"):
        lm_eval_tasks(" , ")
