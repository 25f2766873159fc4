"""`lmdistill hard`: token-level labels from the teacher's argmax, and sequence-level SFT on generated completions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ce_twin import ce_twin
from conftest import SUBJECTS, soft_overrides
from lmdistill.config import HardConfig, load_config
from lmdistill.data import IGNORE, pack_text
from lmdistill.errors import ConfigError
from lmdistill.recipes.common import build_setup
from lmdistill.recipes.hard import cached_top1, hard_step_loss, run_hard, teacher_argmax
from lmdistill.teachers import HFTeacher
from lmdistill.train.logging import read_log

REPO = Path(__file__).resolve().parents[1]


def hard_config(teacher_dir: Path, student_dir: Path, data: Path, out: Path, **extra: str) -> HardConfig:
    return load_config(HardConfig, None, soft_overrides(teacher_dir, student_dir, data, out, **extra))


@pytest.fixture(scope="module")
def completions(tmp_path_factory, teacher_dir) -> Path:
    """Teacher completions written by `lmdistill generate` (HF backend) for a few chat prompts."""
    from lmdistill.generate import GenerateConfig, run_generate

    d = tmp_path_factory.mktemp("hard-gen")
    prompts = d / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"Tell me about {SUBJECTS[i % len(SUBJECTS)]} ({i})."}) + "\n")
    args = {"teacher.model.name_or_path": str(teacher_dir), "teacher.device": "cpu", "teacher.batch_size": "20",
            "prompts.source": str(prompts), "sampling.max_new_tokens": "16", "sampling.temperature": "0.8",
            "output": str(d / "gen.jsonl"), "progress": "false", "filters.drop_truncated": "false"}
    summary = run_generate(load_config(GenerateConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)]))
    return Path(summary["filtered_output"])


def sequence_args(completions: Path, **extra: str) -> dict[str, str]:
    return {"mode": "sequence", "data.source": str(completions), "data.stage": "chat", "data.block_size": "64",
            "data.eval_documents": "8", "train.eval_batches": "2", **extra}


# ---------------------------------------------------------------------------------------------- token level


def test_token_labels_are_the_teacher_argmax_and_the_loss_uses_them(teacher_dir, student_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import synthetic_documents

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    n_vocab = len(tokenizer)
    batch = pack_text(synthetic_documents(20, seed=11), tokenizer, 24).batch([0, 1, 2])
    batch["labels"][0, :5] = IGNORE  # a prompt-like prefix that is not learned
    batch["labels"][2, 10:] = IGNORE
    mask = batch["labels"] != IGNORE

    labels = teacher_argmax(HFTeacher(teacher, n_vocab).targets(batch), mask, chunk_size=7)  # several chunks
    with torch.no_grad():
        ref_logits = teacher(input_ids=batch["input_ids"]).logits[..., :n_vocab]
    ref = ref_logits.argmax(-1)
    assert torch.equal(labels[~mask], torch.full_like(labels[~mask], IGNORE))
    top2 = ref_logits.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) < 1e-5  # the one place two exact computations may disagree
    assert bool(((labels == ref) | near_tie)[mask].all())
    assert int((labels == ref)[mask].sum()) >= int(mask.sum()) - 1
    # The labels must differ from the ground truth somewhere, or this test could not tell them apart.
    assert bool((labels != batch["labels"])[mask].any())

    # The loss is CE on exactly those labels (alpha=1), and the alpha mix with ground truth, values and gradients.
    for alpha, fused in ((1.0, True), (0.3, True), (0.3, False)):
        student.zero_grad()
        out = hard_step_loss(student, batch, labels, alpha, n_vocab, chunk_size=5, fused=fused)
        out.loss_sum.backward()
        got = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        logits = student(input_ids=batch["input_ids"]).logits[..., :n_vocab].flatten(0, 1)
        ref_loss = alpha * F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE, reduction="sum") + (
            1 - alpha) * F.cross_entropy(logits, batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
        ref_loss.backward()
        torch.testing.assert_close(out.loss_sum, ref_loss.detach(), rtol=1e-5, atol=1e-4)
        for n, p in student.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_token_mode_raises_agreement_with_the_teacher(teacher_dir, student_dir, text_file, tmp_path):
    cfg = hard_config(teacher_dir, student_dir, text_file, tmp_path / "run",
                      **{"train.max_steps": "20", "train.eval_batches": "3"})
    assert cfg.mode == "token" and cfg.loss.alpha == 1.0
    summary = run_hard(cfg)
    first, last = summary["eval_first"], summary["eval_last"]
    assert last["agreement"] > first["agreement"] + 0.2, (first, last)
    assert last["kl_to_teacher"] < first["kl_to_teacher"]
    # the honest baseline: the CE twin (same init, data, steps, seed) on the metric distillation targets
    twin = ce_twin(teacher_dir, student_dir, text_file, tmp_path / "ce",
                   **{"train.max_steps": "20", "train.eval_batches": "3"})["eval_last"]
    print(f"hard-token vs CE twin, held-out KL to the teacher: {last['kl_to_teacher']:.4f} vs "
          f"{twin['kl_to_teacher']:.4f}; agreement {last['agreement']:.3f} vs {twin['agreement']:.3f}")
    assert last["agreement"] > twin["agreement"] + 0.1, (last, twin)
    # NOT asserted, measured: on held-out KL to the teacher hard-token labels (alpha 1) do NOT beat the CE twin at this
    # scale (1.999 vs 1.829 at 20 steps): argmax labels teach the teacher's top-1, not its distribution (issue #16).
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert len(rows) == 20 and {"ce_teacher", "ce"} <= set(rows[0])
    assert rows[-1]["ce_teacher"] < rows[0]["ce_teacher"]
    assert summary["recipe"] == "hard-token" and Path(summary["student_dir"], "model.safetensors").exists()


def test_token_mode_from_a_k1_cache_matches_the_teacher_and_needs_no_teacher(teacher_dir, student_dir, text_file,
                                                                            tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmdistill.cache.reader import CachedTeacher
    from lmdistill.cache.writer import CacheWriter, build_header
    from lmdistill.config import CacheConfig
    from lmdistill.models import tokenizer_fingerprint

    data = {"data.source": str(text_file), "data.block_size": "32", "data.eval_documents": "40",
            "data.max_documents": "60"}  # labelling is the slow part: label only what 20 steps read
    # No teacher at that path: the run must take every label from the cache.
    cfg = hard_config(tmp_path / "no-teacher", student_dir, text_file, tmp_path / "run", **data, **{
        "teacher_cache": str(tmp_path / "cache"), "train.max_steps": "20", "train.eval_batches": "3"})
    setup = build_setup(cfg, teacher=False)
    splits = {"train": setup.splits.train, "eval": setup.splits.eval}
    n = len(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    # What `lmdistill label --cache.k 1` writes: the teacher's top-1 id per target position.
    header = build_header(teacher={"name_or_path": str(teacher_dir)}, tokenizer_fingerprint=tokenizer_fingerprint(
        tokenizer), vocab=n, data_params=cfg.data.model_dump(mode="json"), splits=splits,
        cfg=CacheConfig(output_dir=str(tmp_path / "cache"), k=1))
    writer = CacheWriter(tmp_path / "cache", header)
    for name, blocks in splits.items():
        writer.write_split(name, blocks, HFTeacher(teacher, n).logits)
    writer.merge()

    batch = setup.splits.train.batch([0, 1, 2])
    labels = cached_top1(CachedTeacher(tmp_path / "cache", "train").targets(batch), batch["labels"])
    with torch.no_grad():
        ref = teacher(input_ids=batch["input_ids"]).logits[..., :n]
    top2 = ref.topk(2, dim=-1).values
    assert bool(((labels == ref.argmax(-1)) | (top2[..., 0] - top2[..., 1] < 1e-5)).all())

    summary = run_hard(cfg)
    first, last = summary["eval_first"], summary["eval_last"]  # agreement with the cached top-1 on held-out blocks
    assert last["agreement"] > first["agreement"] + 0.2, (first, last)
    # the honest baseline: the CE twin's agreement with the teacher's top-1 (the cached ids, checked above)
    twin = ce_twin(teacher_dir, student_dir, text_file, tmp_path / "ce",
                   **data, **{"train.max_steps": "20", "train.eval_batches": "3"})["eval_last"]
    print(f"hard-token from a k=1 cache vs CE twin, held-out agreement: {last['agreement']:.3f} vs "
          f"{twin['agreement']:.3f}")
    assert last["agreement"] > twin["agreement"], (last, twin)  # measured: 0.411 vs 0.375 (60 documents)
    assert summary["teacher_cache"] == str(tmp_path / "cache")
    with pytest.raises(ConfigError, match="use it with mode=token"):
        hard_config(teacher_dir, student_dir, text_file, tmp_path, mode="sequence", **{
            "data.stage": "chat", "teacher_cache": str(tmp_path / "cache")})


def test_fused_and_reference_token_runs_agree(teacher_dir, student_dir, text_file, tmp_path):
    common = {"train.max_steps": "2", "train.eval_batches": "1", "loss.alpha": "0.5"}
    runs = [run_hard(hard_config(teacher_dir, student_dir, text_file, tmp_path / name, **common,
                                 **{"loss.fused": name})) for name in ("true", "false")]
    assert runs[0]["final_train_loss"] == pytest.approx(runs[1]["final_train_loss"], rel=1e-4)
    assert runs[0]["eval_last"]["agreement"] == pytest.approx(runs[1]["eval_last"]["agreement"], abs=1e-3)


# ---------------------------------------------------------------------------------------------- sequence level


def test_sequence_mode_learns_only_completion_tokens(completions, teacher_dir, student_dir, tokenizer, tmp_path):
    records = [json.loads(line) for line in completions.read_text().splitlines()]
    assert len(records) >= 30 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    cfg = hard_config(teacher_dir, student_dir, completions, tmp_path / "run", **sequence_args(completions))
    setup = build_setup(cfg, teacher=False)
    assert setup.teacher is None  # sequence mode never needs the teacher model
    ends = {r["completion"] + "<|im_end|>\n" for r in records}
    prompts = {r["prompt"] for r in records}
    for split in (setup.splits.train, setup.splits.eval):
        for b in range(len(split)):
            learned = split.labels[b] != IGNORE
            text = tokenizer.decode(split.labels[b][learned])
            # the completion and the end-of-turn marker (cut where the block ends), nothing of the prompt
            assert text in ends or (learned[-1] and any(e.startswith(text) for e in ends)), text
            context = tokenizer.decode(split.input_ids[b][split.attention_mask[b].bool()])
            assert any(p in context for p in prompts)


def test_sequence_mode_fine_tunes_on_generated_completions(completions, student_dir, tmp_path):
    # No usable teacher at all: sequence mode must not try to load one.
    cfg = hard_config(tmp_path / "no-teacher", student_dir, completions, tmp_path / "run",
                      **sequence_args(completions, **{"train.max_steps": "15"}))
    summary = run_hard(cfg)
    first, last = summary["eval_first"], summary["eval_last"]
    # below where it started, and below a uniform guess over the vocabulary
    assert last["ce"] < 0.9 * first["ce"] and last["ce"] < math.log(summary["vocab"]), (first, last)
    assert "kl_to_teacher" not in last
    rows = [r for r in read_log(Path(summary["log"])) if "loss" in r]
    assert sum(r["loss"] for r in rows[-5:]) < 0.9 * sum(r["loss"] for r in rows[:5])


def test_cli_sequence_mode_with_eval_teacher_reports_agreement(completions, teacher_dir, student_dir, tmp_path):
    args = soft_overrides(teacher_dir, student_dir, completions, tmp_path / "run",
                          **sequence_args(completions, **{"train.max_steps": "2", "eval_teacher": "true"}))
    from click.testing import CliRunner

    from lmdistill.cli import main

    result = CliRunner().invoke(main, ["hard", *args])  # in-process: a subprocess would re-import torch
    assert result.exit_code == 0, result.output
    assert "hard distillation (sequence, teacher text)" in result.output and "agreement" in result.output
    assert (tmp_path / "run" / "student" / "model.safetensors").exists()


def test_sequence_mode_on_raw_text_is_refused_with_the_fix(teacher_dir, student_dir, text_file, tmp_path):
    with pytest.raises(ConfigError, match="set data.stage=chat"):
        hard_config(teacher_dir, student_dir, text_file, tmp_path, mode="sequence")


def test_shipped_hard_configs_validate():
    paths = sorted((REPO / "configs").glob("hard*.yaml"))
    assert {p.name for p in paths} >= {"hard-token.yaml", "hard-sequence.yaml"}
    for path in paths:
        cfg = load_config(HardConfig, path)
        assert path.read_text().startswith(f"# lmdistill hard --config configs/{path.name}")
        assert cfg.mode in path.name
