"""Soft labels from API top-logprobs: alignment with the student's tokens, and `soft --api_logprobs` training."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import SUBJECTS, soft_overrides
from lmdistill.api_targets import InBatchTeacher, build_api_targets, load_api_splits
from lmdistill.config import DataConfig, LossConfig, SoftConfig, load_config
from lmdistill.data import IGNORE
from lmdistill.errors import ConfigError, DataError
from lmdistill.recipes.soft import run_soft, soft_step_loss

TOP_K = 5
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def served(model_dir: Path):
    """`lmdistill serve`'s app around `model_dir` on a free 127.0.0.1 port (uvicorn in a thread); yields its /v1 URL."""
    import uvicorn

    from lmdistill.config import ModelConfig
    from lmdistill.generate.config import ServeConfig
    from lmdistill.generate.hf import HFGenerator
    from lmdistill.serve import create_app

    cfg = ServeConfig(model=ModelConfig(name_or_path=str(model_dir)), served_model_name="teacher", device="cpu")
    app = create_app(HFGenerator.load(cfg.model, "cpu"), cfg)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def api_file(tmp_path_factory, teacher_dir) -> Path:
    """Completions with per-token top-5 log-probs from the real teacher behind `lmdistill serve`, written by
    `lmdistill generate` through its OpenAI-compatible backend (the official `openai` client)."""
    from lmdistill.generate import GenerateConfig, run_generate

    d = tmp_path_factory.mktemp("api")
    prompts = d / "prompts.jsonl"
    with open(prompts, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"id": f"q{i}", "prompt": f"Tell me about {SUBJECTS[i % len(SUBJECTS)]} ({i})."}) + "\n")
    with served(teacher_dir) as base_url:
        args = {"teacher.backend": "openai", "teacher.base_url": base_url, "teacher.api_model": "teacher",
                "teacher.api_key_env": "LMDISTILL_TEST_NO_KEY", "teacher.concurrency": "4",
                "prompts.source": str(prompts), "sampling.max_new_tokens": "16", "sampling.temperature": "1.0",
                "sampling.logprobs": "true", "sampling.top_logprobs": str(TOP_K), "output": str(d / "gen.jsonl"),
                "progress": "false"}
        run_generate(load_config(GenerateConfig, None, [x for k, v in args.items() for x in (f"--{k}", v)]))
    return d / "gen.jsonl"


@pytest.fixture(scope="module")
def records(api_file) -> list[dict]:
    return [json.loads(line) for line in api_file.read_text().splitlines()]


def chat_data(**extra) -> DataConfig:
    return DataConfig(stage="chat", block_size=64, **extra)


def teacher_logprobs(teacher_dir: Path, input_ids: torch.Tensor, n_vocab: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(teacher(input_ids=input_ids).logits[..., :n_vocab].float(), dim=-1)


def test_targets_are_the_teachers_distribution_at_the_right_positions(records, teacher_dir, tokenizer):
    n_vocab = len(tokenizer)
    # `lmdistill serve` sends each token's id beside its string, and generate keeps it
    assert all(e["id"] is not None and e["token"] for r in records for e in r["logprobs"])
    blocks, report = build_api_targets(records, tokenizer, chat_data(), n_vocab)
    # Sampling from a tiny model sometimes picks a tokenisation the tokenizer would not produce: skipped, counted.
    assert report.kept >= 0.6 * report.records and report.kept + sum(report.skipped.values()) == report.records
    assert set(report.skipped) <= {"whose tokens differ from the tokenizer's"}
    assert report.soft_positions > 200 and report.alternatives_dropped == 0

    batch = blocks.batch(list(range(len(blocks))))
    learned = batch["labels"] != IGNORE
    soft, ids, lps, tail = batch["target_soft"], batch["target_ids"], batch["target_logprobs"], batch["target_tail"]
    assert bool((soft <= learned).all()) and int(soft.sum()) == report.soft_positions
    assert blocks.k == TOP_K + 1  # the top-5 plus the sampled token when it is not among them
    # The token written at each position is among its targets, with the log-prob the API gave it.
    assert bool((ids == batch["labels"].unsqueeze(-1)).any(-1)[learned].all())

    # The stored log-probs are the real teacher's, at exactly these positions, and the tail is the rest of its mass.
    ref = teacher_logprobs(teacher_dir, batch["input_ids"], n_vocab)
    valid = (ids >= 0) & soft.unsqueeze(-1)
    got = ref.gather(-1, ids.clamp_min(0))
    torch.testing.assert_close(lps[valid], got[valid], atol=2e-4, rtol=0)
    rest = 1 - (got.exp() * valid).sum(-1)
    torch.testing.assert_close(tail[soft].exp(), rest[soft].clamp_min(0), atol=2e-4, rtol=0)

    # Learned positions the API did not score are the end-of-turn tokens the template adds: one-hot on them.
    hard = learned & ~soft
    assert {tokenizer.decode([t]) for t in batch["labels"][hard].tolist()} <= {"<|im_end|>", "\n"}
    assert bool((lps[hard][:, 0] == 0).all()) and bool((ids[hard][:, 1:] == -1).all())


def test_token_strings_without_ids_align_the_same_way(records, tokenizer):
    stripped = copy.deepcopy(records)
    for r in stripped:
        for e in r["logprobs"]:
            e["id"] = None
            for t in e["top_logprobs"]:
                t["id"] = None
    a, rep_a = build_api_targets(records, tokenizer, chat_data(), len(tokenizer))
    b, rep_b = build_api_targets(stripped, tokenizer, chat_data(), len(tokenizer))
    assert rep_a.kept == rep_b.kept and rep_b.soft_positions == rep_a.soft_positions
    # byte tokens that decode to the same replacement character name no single id: only those may drop
    if rep_b.alternatives_dropped == 0:
        assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert torch.equal(a.positions, b.positions)


def test_misaligned_or_edited_records_are_skipped_and_counted(records, tokenizer):
    blocks, base = build_api_targets(records, tokenizer, chat_data(), len(tokenizer))
    good = [r for r in records if build_api_targets([r], tokenizer, chat_data(), len(tokenizer))[1].kept]
    edited, shifted, bare = (copy.deepcopy(good[i]) for i in range(3))
    edited["messages"][-1]["content"] += " and more"  # a completion changed after generation
    for e in shifted["logprobs"]:
        e["id"] = (e["id"] + 1) % len(tokenizer)  # as if another tokenizer had written it
    del bare["logprobs"]
    blocks, report = build_api_targets([*good[3:], edited, shifted, bare], tokenizer, chat_data(), len(tokenizer))
    assert report.kept == len(good) - 3 == len(blocks)
    assert report.skipped == {"whose completion text differs from its tokens": 1,
                              "whose tokens differ from the tokenizer's": 1, "without logprobs": 1}


def test_a_file_with_nothing_to_learn_is_a_clear_error(records, tokenizer, tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "logprobs"}) + "\n" for r in records))
    with pytest.raises(DataError, match="none of the 40 records.*lmdistill hard --mode sequence"):
        load_api_splits(path, chat_data(), tokenizer, len(tokenizer))
    with pytest.raises(DataError, match="not found"):
        load_api_splits(tmp_path / "missing.jsonl", chat_data(), tokenizer, len(tokenizer))
    with pytest.raises(ConfigError, match="loss.temperature must be 1.0"):
        load_config(SoftConfig, None, ["--api_logprobs", str(path), "--loss.temperature", "2"])


def test_held_out_split_keeps_all_samples_of_a_prompt_together(records, tokenizer, tmp_path):
    path = tmp_path / "n2.jsonl"
    twice = [dict(r, sample=s) for r in records for s in (0, 1)]  # two samples per prompt
    path.write_text("".join(json.dumps(r) + "\n" for r in twice))
    train, held, report = load_api_splits(path, chat_data(eval_documents=7, max_documents=30), tokenizer,
                                          len(tokenizer))

    def prompts(blocks) -> list[str]:
        texts = tokenizer.batch_decode(blocks.input_ids)
        return [re.search(r"Tell me about .*?\(\d+\)", t).group(0) for t in texts]

    assert len(held) >= 7 and len(train) == 30 and report.kept >= 40
    assert not set(prompts(held)) & set(prompts(train))
    assert all(prompts(held).count(p) == 2 for p in prompts(held))


@pytest.mark.parametrize("tail", [True, False])
def test_fused_and_reference_sparse_losses_agree(records, student_dir, tokenizer, tail):
    from transformers import AutoModelForCausalLM

    blocks, _ = build_api_targets(records, tokenizer, chat_data(), len(tokenizer), tail=tail)
    batch = blocks.batch([0, 1])
    assert ("target_tail" in batch) == tail
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    out = {}
    for fused in (True, False):
        student.zero_grad()
        loss = soft_step_loss(student, batch, InBatchTeacher().targets(batch), LossConfig(alpha=0.7, fused=fused),
                              len(tokenizer))
        loss.loss_sum.backward()
        out[fused] = (loss.loss_sum.detach(), [p.grad.clone() for p in student.parameters()])
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for g_fused, g_ref in zip(out[True][1], out[False][1], strict=True):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)


def test_soft_on_api_logprobs_lowers_kl_to_the_teacher(api_file, teacher_dir, student_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    # The teacher path does not exist: API soft labels never load a teacher model.
    args = soft_overrides(tmp_path / "no-teacher", student_dir, api_file, tmp_path / "run", **{
        "api_logprobs": str(api_file), "data.stage": "chat", "data.block_size": "64", "data.eval_documents": "8",
        "train.max_steps": "20", "train.eval_batches": "2"})
    summary = run_soft(load_config(SoftConfig, None, args))
    first, last = summary["eval_first"], summary["eval_last"]
    assert summary["recipe"] == "soft-api" and summary["alignment"]["kept"] >= 24
    # held-out KL to the API's targets and agreement with its top-1
    assert last["kl_to_teacher"] < 0.7 * first["kl_to_teacher"], (first, last)
    assert last["agreement"] > first["agreement"]

    # Independently: the dense KL(teacher || student) from the real teacher on the held-out API-scored positions.
    n_vocab = len(tokenizer)
    _, held, _ = load_api_splits(api_file, chat_data(eval_documents=8), tokenizer, n_vocab)
    batch = held.batch(list(range(len(held))))
    soft = batch["target_soft"]
    lt = teacher_logprobs(teacher_dir, batch["input_ids"], n_vocab)[soft]

    def kl(model_dir: str | Path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            ls = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[..., :n_vocab].float(), -1)[soft]
        return float((lt.exp() * (lt - ls)).sum(-1).mean())

    before, after = kl(student_dir), kl(summary["student_dir"])
    assert after < 0.7 * before, (before, after)
    assert math.isfinite(after)
    # the honest baseline: its CE twin trains on exactly the same aligned API blocks (same init, steps, seed) with the
    # divergence switched off (loss.alpha 0: CE on the ground truth alone; `hard` would split the file differently)
    twin_args = [*args[:args.index("--train.output_dir") + 1], str(tmp_path / "ce"),
                 *args[args.index("--train.output_dir") + 2:], "--loss.alpha", "0"]
    twin = run_soft(load_config(SoftConfig, None, twin_args))
    ce = kl(twin["student_dir"])
    print(f"API top-{TOP_K} soft vs CE twin, held-out KL to the teacher: {after:.4f} vs {ce:.4f}")
    assert after < ce, (after, ce)


def test_student_pruned_from_the_served_teacher_and_the_shipped_config(api_file, teacher_dir, tmp_path):
    # The teacher's weights seed the student (init=prune); its log-probs still come only from the file.
    args = soft_overrides(teacher_dir, teacher_dir, api_file, tmp_path / "run", **{
        "api_logprobs": str(api_file), "student.init": "prune", "student.keep_layers": "[1]", "data.stage": "chat",
        "data.block_size": "64", "data.eval_documents": "4", "train.max_steps": "2", "train.eval_batches": "1"})
    summary = run_soft(load_config(SoftConfig, None, args))
    assert summary["recipe"] == "soft-api" and summary["steps"] == 2
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(summary["student_dir"]).num_hidden_layers == 1
    path = REPO / "configs" / "soft-api.yaml"
    cfg = load_config(SoftConfig, path)
    assert cfg.api_logprobs and path.read_text().startswith("# lmdistill soft --config configs/soft-api.yaml")
