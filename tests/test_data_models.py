"""Data path (packing, chat masks, schedule) and model set-up (pruning, LoRA, arch init, vocab)."""

from __future__ import annotations

import json

import pytest
import torch

from lmdistill.config import DataConfig, LoraConfig, StudentConfig
from lmdistill.data import IGNORE, BatchSchedule, build_splits, pack_text, render_chat
from lmdistill.errors import ConfigError, DataError
from lmdistill.models import (
    apply_lora,
    build_student,
    load_causal_lm,
    load_tokenizer,
    prune_layers,
    tokenizer_fingerprint,
)


def test_packing_has_no_padding_and_shifted_labels(tokenizer):
    texts = ["The cat sees the ball.", "A dog likes a small house near the sea."]
    blocks = pack_text(texts, tokenizer, 8)
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = (len(stream) - 1) // 8
    assert blocks.input_ids.shape == (n, 8)
    assert blocks.attention_mask.all()
    assert blocks.input_ids.flatten().tolist() == stream[: n * 8]
    assert blocks.labels.flatten().tolist() == stream[1 : n * 8 + 1]


def test_chat_masks_only_assistant_tokens(tokenizer):
    msgs = [{"role": "user", "content": "Tell me about the cat."},
            {"role": "assistant", "content": "The cat sees the ball."},
            {"role": "user", "content": "And the dog?"},
            {"role": "assistant", "content": "A dog likes the moon."}]
    ids, mask = render_chat(msgs, tokenizer, 512)
    learned = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "The cat sees the ball." in learned and "A dog likes the moon." in learned
    assert "Tell me" not in learned and "And the dog" not in learned and "user" not in learned


def test_chat_splits_label_only_completions(tokenizer, chat_file):
    cfg = DataConfig(source=str(chat_file), stage="chat", block_size=64, eval_documents=5)
    splits = build_splits(cfg, tokenizer)
    assert len(splits.train) == 55 and len(splits.eval) == 5
    b = splits.train.batch([0])
    labelled = b["labels"][0][b["labels"][0] != IGNORE]
    text = tokenizer.decode(labelled)
    assert "Tell me" not in text and len(labelled) > 5
    # padding never carries a label
    assert (b["labels"][0][b["attention_mask"][0] == 0] == IGNORE).all()


def test_eval_documents_are_held_out_before_packing(tokenizer, tmp_path):
    from lmdistill.data import load_raw_dataset, split_documents

    path = tmp_path / "ids.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} the cat sees the ball"}) + "\n" for i in range(100)))
    cfg = DataConfig(source=str(path), block_size=8, eval_documents=20, seed=3)
    train, held = split_documents(load_raw_dataset(str(path)), cfg)
    assert len(held) == 20 and len(train) == 80
    assert set(train["text"]).isdisjoint(held["text"])
    splits = build_splits(cfg, tokenizer)
    eval_text = tokenizer.decode(splits.eval.input_ids.flatten())
    assert all(f"document {int(t.split()[1])} " in eval_text for t in held["text"][:5])


def test_several_answers_to_one_prompt_stay_on_one_side_of_the_held_out_split(tmp_path):
    from lmdistill.data import load_raw_dataset, split_documents

    path = tmp_path / "completions.jsonl"  # the shape `lmdistill generate` writes: 3 samples per prompt id
    path.write_text("".join(json.dumps({"id": f"p{i}", "sample": k, "prompt": f"q{i}", "completion": f"a{i}.{k}"})
                            + "\n" for i in range(20) for k in range(3)))
    ds = load_raw_dataset(str(path))
    cfg = DataConfig(source=str(path), stage="chat", prompt_column="prompt", completion_column="completion",
                     eval_documents=10, seed=1)
    train, held = split_documents(ds, cfg)
    assert set(train["id"]).isdisjoint(held["id"])
    assert len(held) == 12 and len(train) == 48  # whole groups: 4 prompts x 3 answers
    assert len(split_documents(ds, cfg.model_copy(update={"max_documents": 9}))[0]) == 9
    # record by record, some prompt would straddle the split and the held-out score would reward memorising it
    train, held = split_documents(ds, cfg.model_copy(update={"split_by": None}))
    assert len(held) == 10 and set(train["id"]) & set(held["id"])
    # an explicit column must exist; every group but one may be held out, never all
    with pytest.raises(DataError, match="split_by"):
        split_documents(ds, cfg.model_copy(update={"split_by": "prompt_id"}))
    train, held = split_documents(ds, cfg.model_copy(update={"split_by": "prompt", "eval_documents": 1000}))
    assert len(set(train["prompt"])) == 1 and len(held) == 57


def test_batch_schedule_shards_the_same_global_batch_across_ranks():
    one = BatchSchedule(50, micro_batch_size=3, grad_accum=2, seed=7, world_size=1)
    two = [BatchSchedule(50, micro_batch_size=3, grad_accum=1, seed=7, world_size=2, rank=r) for r in (0, 1)]
    for step in range(20):  # crosses epoch boundaries
        single = [i for mb in one.micro_batches(step) for i in mb]
        split = [i for r in two for mb in r.micro_batches(step) for i in mb]
        assert sorted(single) == sorted(split)
        if step < 50 // 6:  # inside one epoch no example repeats, so rank slices share no example
            assert set(two[0].micro_batches(step)[0]).isdisjoint(two[1].micro_batches(step)[0])
    fresh = BatchSchedule(50, micro_batch_size=3, grad_accum=2, seed=7)
    assert fresh.micro_batches(13) == one.micro_batches(13)  # a pure function of (seed, step): resume needs no state
    assert BatchSchedule(50, 3, 2, seed=8).micro_batches(0) != one.micro_batches(0)


def test_bad_data_sources_are_named(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        build_splits(DataConfig(source=str(tmp_path / "nope.jsonl")), tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2"):
        build_splits(DataConfig(source=str(bad)), tokenizer)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(DataError, match="no column `text`.*body"):
        build_splits(DataConfig(source=str(other)), tokenizer)


def test_prune_keeps_the_chosen_layers_exactly(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir))
    student = prune_layers(teacher, [1])
    assert student.config.num_hidden_layers == 1
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    for k, v in s_sd.items():
        src = k.replace("layers.0.", "layers.1.")
        assert torch.equal(v, t_sd[src]), k
    with pytest.raises(ConfigError, match=r"keep_layers must be distinct indices in \[0, 1\]"):
        prune_layers(teacher, [0, 5])


def test_prune_with_all_layers_reproduces_the_teacher(teacher_dir):
    teacher = load_causal_lm(str(teacher_dir))
    student = prune_layers(teacher, [0, 1])
    x = torch.randint(0, 100, (2, 10))
    torch.testing.assert_close(student(x).logits, teacher(x).logits)


def test_student_from_arch_and_lora(teacher_dir, tokenizer):
    teacher = load_causal_lm(str(teacher_dir))
    student = build_student(StudentConfig(init="config", arch={"hidden_size": 16, "num_hidden_layers": 1,
                                                               "intermediate_size": 32}),
                            tokenizer, teacher_config=teacher.config)
    assert student.config.hidden_size == 16 and student.config.vocab_size == len(tokenizer)
    lora = apply_lora(student, LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match=r"\['wq'\] do not exist.*q_proj"):
        apply_lora(build_student(StudentConfig(init="config", arch={"hidden_size": 16, "num_hidden_layers": 1}),
                                 tokenizer, teacher_config=teacher.config),
                   LoraConfig(enabled=True, target_modules=["wq"]))
    # a misspelt field would be stored by transformers and silently ignored: the student would not be what was asked
    with pytest.raises(ConfigError, match=r"student.arch has field\(s\) \['hiden_size'\].*hidden_size"):
        build_student(StudentConfig(init="config", arch={"hiden_size": 16, "num_hidden_layers": 1}), tokenizer,
                      teacher_config=teacher.config)


def test_tokenizer_fingerprint_tracks_the_vocab(tokenizer_dir, tmp_path):
    from conftest import train_tokenizer

    a = load_tokenizer(str(tokenizer_dir))
    b = load_tokenizer(str(tokenizer_dir))
    c = train_tokenizer(tmp_path / "c", vocab_size=400)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(c)
