"""Tiny real models and a locally trained tokenizer, written to disk and loaded back through from_pretrained.

Nothing here touches the network: the tokenizer is trained on synthetic text, the models are built from configs.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# aligned cross-tokenizer cache targets are stored per session, so no test reads what an earlier session aligned
os.environ["LMDISTILL_SPAN_TARGETS"] = tempfile.mkdtemp(prefix="lmdistill-span-targets-")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a student", "the river", "an old man", "the city"]
VERBS = ["sees", "likes", "follows", "finds", "carries", "remembers", "paints", "visits"]
OBJECTS = ["the ball", "a small house", "the red book", "a green tree", "the bright moon", "a quiet lake"]
PLACES = ["in the morning", "at night", "near the sea", "after lunch", "in winter", "by the road"]


def synthetic_sentences(n: int, seed: int = 0) -> list[str]:
    """A small regular language: enough structure that a 2-layer model learns it in a few dozen steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)]
        out.append(" ".join(parts).capitalize() + ".")
    return out


def synthetic_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    sents = synthetic_sentences(n * 4, seed)
    return [" ".join(sents[i * 4 : i * 4 + rng.randint(2, 4)]) for i in range(n)]


def train_tokenizer(out_dir: Path, vocab_size: int = 160, seed: int = 0, extra_text: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = synthetic_sentences(400, seed) + ([extra_text] if extra_text else [])
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: Path, tokenizer, *, arch: str = "llama", hidden: int = 32, layers: int = 2,
               vocab_pad: int = 0, seed: int = 0):
    """A tiny causal LM saved with save_pretrained; `vocab_pad` extra embedding rows mimic padded vocabularies."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tokenizer) + vocab_pad, hidden_size=hidden, intermediate_size=hidden * 2,
              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = AutoConfig.for_model(arch, **kw)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_dir: Path) -> Path:
    d = tiny_dir / "tokenizer"
    train_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def text_file(tiny_dir: Path) -> Path:
    """A jsonl dataset of synthetic documents with a `text` column."""
    path = tiny_dir / "text.jsonl"
    with open(path, "w") as fh:
        for doc in synthetic_documents(300):
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_file(tiny_dir: Path) -> Path:
    path = tiny_dir / "chat.jsonl"
    sents = synthetic_sentences(120, seed=3)
    with open(path, "w") as fh:
        for i in range(60):
            msgs = [{"role": "user", "content": f"Tell me about {SUBJECTS[i % len(SUBJECTS)]}."},
                    {"role": "assistant", "content": sents[2 * i] + " " + sents[2 * i + 1]}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="session")
def teacher_dir(tiny_dir: Path, tokenizer) -> Path:
    """A 2-layer Llama teacher, briefly trained on the synthetic language so its distributions carry knowledge."""
    d = tiny_dir / "teacher"
    model = make_model(d, tokenizer, hidden=64, layers=2, seed=1)
    _pretrain(model, tokenizer, steps=60)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def student_dir(tiny_dir: Path, tokenizer) -> Path:
    d = tiny_dir / "student"
    make_model(d, tokenizer, hidden=32, layers=2, seed=2)
    return d


def _pretrain(model, tokenizer, steps: int) -> None:
    from lmdistill.data import pack_text

    blocks = pack_text(synthetic_documents(200, seed=7), tokenizer, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(blocks), (8,), generator=g)
        b = blocks.batch(idx)
        logits = model(input_ids=b["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def soft_overrides(teacher_dir: Path, student_dir: Path, data: Path, out: Path, **extra: str) -> list[str]:
    """CLI-style overrides for a fast tiny soft run."""
    args = {
        "teacher.name_or_path": str(teacher_dir),
        "student.init": "pretrained",
        "student.name_or_path": str(student_dir),
        "data.source": str(data),
        "data.block_size": "32",
        "data.eval_documents": "40",
        "train.output_dir": str(out),
        "train.max_steps": "30",
        "train.micro_batch_size": "4",
        "train.lr": "3e-3",
        "train.warmup_steps": "2",
        "train.eval_every": "0",
        "train.save_every": "0",
        "train.progress": "false",
        "loss.alpha": "1.0",
    }
    args.update(extra)
    out_args: list[str] = []
    for k, v in args.items():
        out_args += [f"--{k}", v]
    return out_args
