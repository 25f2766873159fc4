"""The bad-input matrix: every mistake a user can make ends in ONE clear error.

Each case runs the real CLI entry point (`lmdistill.cli.run`, what `python -m lmdistill` calls) in-process, and
asserts: exit code 2, a message that names the problem and the fix, no traceback, and no output left that looks
complete (no `summary.json`, no `student/`, no finished checkpoint or cache that was not there before).
Most cases fail before training starts; the few that need a step (NaN teacher, full disk) run 1-2 tiny steps.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import make_model, soft_overrides, synthetic_documents, train_tokenizer
from lmdistill.cli import run as cli_run


@dataclass
class Ctx:
    teacher_dir: Path
    student_dir: Path
    text_file: Path
    chat_file: Path
    tokenizer: object
    tmp: Path
    cache: Path | None = None

    @property
    def out(self) -> Path:
        return self.tmp / "run"

    def soft(self, **extra: str) -> list[str]:
        settings = {"train.max_steps": "2", "data.eval_documents": "0", "train.log_every": "1"}
        settings.update(extra)
        return ["soft", *soft_overrides(self.teacher_dir, self.student_dir, self.text_file, self.out, **settings)]

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path


def invoke(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI as `python -m lmdistill` would; an exception escaping it is a traceback, i.e. a failure here."""
    old = sys.argv
    sys.argv = ["lmdistill", *argv]
    code = 0
    try:
        cli_run()
    except SystemExit as e:
        code = int(e.code or 0)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"the CLI let an exception escape (a traceback for the user): {type(e).__name__}: {e}")
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    if os.environ.get("LMDISTILL_SHOW_ERRORS"):  # review the messages themselves: LMDISTILL_SHOW_ERRORS=1 pytest -s
        print(f"\n[{' '.join(argv[:1])}] " + "\n".join(ln for ln in captured.err.splitlines() if "it/s]" not in ln),
              file=sys.__stdout__)
    return code, captured.err


# ---------------------------------------------------------------- cases: each returns (argv, expected message parts)

def docs_jsonl(n: int = 40) -> str:
    return "".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(n))


def missing_dataset(c: Ctx):
    return c.soft(**{"data.source": str(c.tmp / "nope" / "data.jsonl")}), ["not found", "existing file"]


def empty_dataset_file(c: Ctx):
    return c.soft(**{"data.source": str(c.write("empty.jsonl", "\n\n"))}), ["empty.jsonl` is empty (no records)",
                                                                             "at least one record"]


def empty_dataset_dir(c: Ctx):
    (c.tmp / "nodata").mkdir()
    return c.soft(**{"data.source": str(c.tmp / "nodata")}), ["holds no", ".jsonl"]


def text_column_missing(c: Ctx):
    return c.soft(**{"data.text_column": "body"}), ["no column `body`", "columns are: text", "data.text_column"]


def messages_column_missing(c: Ctx):
    return c.soft(**{"data.stage": "chat"}), ["no column `messages`", "data.messages_column"]


def chat_without_assistant_turn(c: Ctx):
    rows = [{"messages": [{"role": "user", "content": "hello there"}]}] * 4
    path = c.write("noassistant.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return c.soft(**{"data.stage": "chat", "data.source": str(path)}), ["no assistant turn"]


def block_longer_than_model(c: Ctx):
    return c.soft(**{"data.block_size": "512"}), ["block_size=512", "256 positions", "data.block_size <= 256"]


def data_shorter_than_one_block(c: Ctx):
    path = c.write("short.jsonl", json.dumps({"text": "The cat sees the ball."}) + "\n")
    return c.soft(**{"data.source": str(path)}), ["yields no training block", "lower data.block_size"]


def non_utf8_bytes(c: Ctx):
    lines = docs_jsonl(6).encode().splitlines(keepends=True)
    lines[2] = b'{"text": "caf\xe9 au lait"}\n'  # latin-1, not UTF-8
    return c.soft(**{"data.source": str(c.write("latin1.jsonl", b"".join(lines)))}), [
        "line 3", "not valid UTF-8", "re-encode"]


def malformed_jsonl_line(c: Ctx):
    lines = docs_jsonl(8).splitlines(keepends=True)
    lines[4] = '{"text": "unterminated\n'
    return c.soft(**{"data.source": str(c.write("broken.jsonl", "".join(lines)))}), [
        "broken.jsonl", "line 5", "not valid JSON"]


def tokenizer_mismatch(c: Ctx):
    other = train_tokenizer(c.tmp / "tok2", vocab_size=400, extra_text="zebra quantum xylophone " * 20)
    make_model(c.tmp / "s2", other, seed=6)
    args = c.soft(**{"student.name_or_path": str(c.tmp / "s2")})
    return args, ["tokenizers differ", "lmdistill hard --mode sequence"]


def nan_teacher_logits(c: Ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(c.teacher_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(c.tmp / "nan_teacher")
    c.tokenizer.save_pretrained(c.tmp / "nan_teacher")
    return c.soft(**{"teacher.name_or_path": str(c.tmp / "nan_teacher")}), [
        "training step 1", "NaN/inf", "teacher", "teacher.dtype"]


def inf_teacher_logits_reference_path(c: Ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(c.teacher_dir)
    with torch.no_grad():
        model.lm_head.weight[5] = float("inf")
    model.save_pretrained(c.tmp / "inf_teacher")
    c.tokenizer.save_pretrained(c.tmp / "inf_teacher")
    args = c.soft(**{"teacher.name_or_path": str(c.tmp / "inf_teacher"), "loss.fused": "false"})
    return args, ["training step 1", "NaN/inf logits", "teacher.dtype"]


def nan_teacher_in_first_eval(c: Ctx):
    args, _ = nan_teacher_logits(c)
    i = args.index("--data.eval_documents")
    args[i + 1] = "40"
    return args, ["evaluation at step 0", "NaN/inf"]


def temperature_zero(c: Ctx):
    return c.soft(**{"loss.temperature": "0"}), ["`loss.temperature`", "greater than 0"]


def temperature_negative(c: Ctx):
    return c.soft(**{"loss.temperature": "-2"}), ["`loss.temperature`", "greater than 0", "-2"]


def alpha_above_one(c: Ctx):
    return c.soft(**{"loss.alpha": "1.5"}), ["`loss.alpha`", "less than or equal to 1", "1.5"]


def alpha_below_zero(c: Ctx):
    return c.soft(**{"loss.alpha": "-0.1"}), ["`loss.alpha`", "greater than or equal to 0"]


def lora_target_missing(c: Ctx):
    args = c.soft(**{"student.lora.enabled": "true", "student.lora.target_modules": "[q_proj,qkv_fused]"})
    return args, ["student.lora.target_modules", "qkv_fused", "do not exist", "q_proj"]


def student_path_missing(c: Ctx):
    return c.soft(**{"student.name_or_path": str(c.tmp / "no_student")}), ["could not load", "no_student",
                                                                            "save_pretrained"]


def keep_layers_out_of_range(c: Ctx):
    return c.soft(**{"student.init": "prune", "student.keep_layers": "[0,5]"}), ["student.keep_layers", "[0, 1]"]


def fp16_without_gpu(c: Ctx):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a GPU")
    return c.soft(**{"train.precision": "fp16"}), ["fp16 needs a CUDA GPU", "bf16 or fp32"]


def _checkpoint_dir(c: Ctx, step: int = 2) -> Path:
    d = c.out / "checkpoints" / f"step-{step:08d}"
    d.mkdir(parents=True)
    return d


def _real_checkpoint(c: Ctx) -> Path:
    """A genuine step-2 checkpoint of the tiny run, produced by the CLI itself."""
    from lmdistill.config import SoftConfig, load_config
    from lmdistill.recipes.soft import run_soft

    args = c.soft(**{"train.save_every": "2", "train.max_steps": "2"})[1:]
    run_soft(load_config(SoftConfig, None, args))
    import shutil

    shutil.rmtree(c.out / "student")
    (c.out / "summary.json").unlink()
    return c.out / "checkpoints" / "step-00000002"


def checkpoint_incompatible_version(c: Ctx):
    ckpt = _real_checkpoint(c)
    state = json.loads((ckpt / "state.json").read_text())
    state["format_version"] = 99
    (ckpt / "state.json").write_text(json.dumps(state))
    return c.soft(**{"train.resume": "true", "train.max_steps": "4"}), [
        "format version 99", "reads version 1", "start a fresh output_dir"]


def checkpoint_truncated(c: Ctx):
    ckpt = _real_checkpoint(c)
    data = (ckpt / "model-student.safetensors").read_bytes()
    (ckpt / "model-student.safetensors").write_bytes(data[: len(data) // 3])
    return c.soft(**{"train.resume": "true", "train.max_steps": "4"}), ["is damaged", "resume from an older one"]


def checkpoint_of_another_student(c: Ctx):
    ckpt = _real_checkpoint(c)
    other = make_model(c.tmp / "wide", c.tokenizer, hidden=48, seed=9)
    from safetensors.torch import save_file

    from lmdistill.train.checkpoint import trainable_state

    save_file(trainable_state(other), str(ckpt / "model-student.safetensors"))
    return c.soft(**{"train.resume": "true", "train.max_steps": "4"}), ["the model expects",
                                                                          "same student config"]


# Disk full: RLIMIT_FSIZE makes the kernel refuse writes past N bytes with EFBIG, as a full disk refuses them with
# ENOSPC; the writers (safetensors, torch.save, json) see a real OS error in the middle of a file.
FSIZE_LIMIT = 48 * 1024


def disk_full_checkpoint(c: Ctx):
    return c.soft(**{"train.save_every": "2"}), ["could not write the checkpoint", "disk may be full",
                                                  "--train.resume true"]


def disk_full_student(c: Ctx):
    return c.soft(), ["could not write the student model", "disk may be full"]


SOFT_CASES: dict[str, Callable[[Ctx], tuple[list[str], list[str]]]] = {
    f.__name__: f
    for f in (
        missing_dataset, empty_dataset_file, empty_dataset_dir, text_column_missing, messages_column_missing,
        chat_without_assistant_turn, block_longer_than_model, data_shorter_than_one_block, non_utf8_bytes,
        malformed_jsonl_line, tokenizer_mismatch, nan_teacher_logits, inf_teacher_logits_reference_path,
        nan_teacher_in_first_eval, temperature_zero, temperature_negative, alpha_above_one, alpha_below_zero,
        lora_target_missing, student_path_missing, keep_layers_out_of_range, fp16_without_gpu,
        checkpoint_incompatible_version, checkpoint_truncated, checkpoint_of_another_student,
    )
}
DISK_CASES = {f.__name__: f for f in (disk_full_checkpoint, disk_full_student)}


@pytest.fixture
def ctx(teacher_dir, student_dir, text_file, chat_file, tokenizer, tmp_path) -> Ctx:
    return Ctx(teacher_dir, student_dir, text_file, chat_file, tokenizer, tmp_path)


def assert_one_clear_error(code: int, err: str, needles: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    # Progress bars may precede it on stderr; the error itself is one message, printed once.
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"


def assert_nothing_looks_complete(out: Path, checkpoints_before: set[str]) -> None:
    assert not (out / "summary.json").exists()
    assert not (out / "student").exists()
    ckpts = {p.name for p in (out / "checkpoints").glob("*")} if (out / "checkpoints").exists() else set()
    assert ckpts <= checkpoints_before, f"new checkpoint entries left behind: {ckpts - checkpoints_before}"


def existing_checkpoints(out: Path) -> set[str]:
    root = out / "checkpoints"
    return {p.name for p in root.glob("*")} if root.exists() else set()


@pytest.mark.parametrize("case", sorted(SOFT_CASES))
def test_soft_bad_input(case, ctx, capsys):
    argv, needles = SOFT_CASES[case](ctx)
    before = existing_checkpoints(ctx.out)
    code, err = invoke(argv, capsys)
    assert_one_clear_error(code, err, needles)
    assert_nothing_looks_complete(ctx.out, before)


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_disk_full_while_writing(case, ctx, capsys):
    argv, needles = DISK_CASES[case](ctx)
    # Read the data once with no limit, so only the run's own outputs meet the full disk (not datasets' cache).
    from lmdistill.config import DataConfig
    from lmdistill.data import load_raw_dataset

    load_raw_dataset(DataConfig(source=str(ctx.text_file)).source)
    soft_limit, hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard_limit))
    try:
        code, err = invoke(argv, capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft_limit, hard_limit))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert_one_clear_error(code, err, needles)
    assert_nothing_looks_complete(ctx.out, set())
    assert not list(ctx.out.glob("**/.tmp-*")), "a failed write must not leave its temporary behind"


# ---------------------------------------------------------------- soft-label cache: `label` and `soft --teacher_cache`

CACHE_DATA = {"data.block_size": "16", "data.max_documents": "24", "data.eval_documents": "6"}


def label_argv(teacher: Path, data: Path, out: Path, **extra: str) -> list[str]:
    args = {"teacher.name_or_path": str(teacher), "data.source": str(data), "cache.output_dir": str(out),
            "cache.k": "4", "cache.shard_blocks": "8", "cache.batch_size": "8", "progress": "false", **CACHE_DATA,
            **extra}
    return ["label", *[x for k, v in args.items() for x in (f"--{k}", v)]]


@pytest.fixture(scope="module")
def cache_dir(teacher_dir, text_file, tmp_path_factory) -> Path:
    """A small, complete top-4 cache of the tiny teacher, written once by the real `label` verb."""
    from lmdistill.config import LabelConfig, load_config
    from lmdistill.recipes.label import run_label

    out = tmp_path_factory.mktemp("cache") / "cache"
    run_label(load_config(LabelConfig, None, label_argv(teacher_dir, text_file, out)[1:]))
    return out


def _cache_copy(c: Ctx) -> Path:
    import shutil

    dst = c.tmp / "cache"
    shutil.copytree(c.cache, dst)
    return dst


def soft_from_cache(c: Ctx, cache: Path, **extra: str) -> list[str]:
    return c.soft(**{"teacher_cache": str(cache), **CACHE_DATA, **extra})


def label_k_larger_than_vocab(c: Ctx):
    return label_argv(c.teacher_dir, c.text_file, c.tmp / "newcache", **{"cache.k": "100000"}), [
        "cache.k=100000", "larger than the vocabulary", "k <= "]


def label_into_cache_of_another_teacher(c: Ctx):
    # same tokenizer and data, other weights: resuming would mix two teachers' labels in one cache
    return label_argv(c.student_dir, c.text_file, _cache_copy(c)), ["already holds a cache written with other",
                                                                      "teacher", "choose another cache.output_dir"]


def label_nan_teacher(c: Ctx):
    nan_teacher_logits(c)  # writes c.tmp / "nan_teacher"
    return label_argv(c.tmp / "nan_teacher", c.text_file, c.tmp / "newcache"), [
        "labelling split `train`", "NaN/inf logits", "no manifest was written"]


def cache_of_another_tokenizer(c: Ctx):
    other = train_tokenizer(c.tmp / "tok2", vocab_size=400, extra_text="zebra quantum xylophone " * 20)
    make_model(c.tmp / "t2", other, seed=7)
    make_model(c.tmp / "s2", other, seed=8)
    args = soft_from_cache(c, c.cache, **{"teacher.name_or_path": str(c.tmp / "t2"),
                                          "student.name_or_path": str(c.tmp / "s2")})
    return args, ["tokenizer mismatch", "cache", "--cache.cross_tokenizer true", "--loss.cross_tokenizer hybrid"]


def cross_tokenizer_student_of_a_cache_without_its_fields(c: Ctx):
    # a student of another tokenizer, loss.cross_tokenizer set, but the cache has only the teacher's own ids
    other = train_tokenizer(c.tmp / "tok2", vocab_size=400, extra_text="zebra quantum xylophone " * 20)
    make_model(c.tmp / "s2", other, seed=8)
    args = soft_from_cache(c, c.cache, **{"student.name_or_path": str(c.tmp / "s2"), "loss.cross_tokenizer": "hybrid"})
    return args, ["labelled without cache.cross_tokenizer", "--cache.cross_tokenizer true"]


def label_cross_tokenizer_with_sampled_encoding(c: Ctx):
    return label_argv(c.teacher_dir, c.text_file, c.tmp / "newcache", **{
        "cache.cross_tokenizer": "true", "cache.encoding": "sampled"}), [
        "cache.cross_tokenizer needs the teacher's top-k", "--cache.encoding topk"]


def soft_negative_cache_align_workers(c: Ctx):
    return soft_from_cache(c, c.cache, cache_align_workers="-1"), ["cache_align_workers",
                                                                   "greater than or equal to 0"]


def cache_of_other_data(c: Ctx):
    return soft_from_cache(c, c.cache, **{"data.max_documents": "20"}), ["data mismatch", "max_documents"]


def cache_shard_truncated(c: Ctx):
    cache = _cache_copy(c)
    shard = cache / "train" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    return soft_from_cache(c, cache), ["shard-00001.safetensors` is truncated", "lmdistill label"]


def cache_shard_corrupt(c: Ctx):
    cache = _cache_copy(c)
    shard = cache / "train" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-40:-30] = bytes(b ^ 0xFF for b in data[-40:-30])  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    return soft_from_cache(c, cache, **{"train.max_steps": "8"}), ["shard-00001.safetensors` is corrupt"]


def cache_unfinished(c: Ctx):
    cache = _cache_copy(c)
    (cache / "manifest.json").rename(cache / "manifest.rank-0-of-1.json")  # a label run killed before its merge
    return soft_from_cache(c, cache), ["incomplete", "rerun the same `lmdistill label`"]


def hard_nan_teacher(c: Ctx):
    args, _ = nan_teacher_logits(c)
    return ["hard", "--mode", "token", *args[1:]], ["training step 1", "NaN/inf hidden states"]


def label_missing_dataset(c: Ctx):
    return label_argv(c.teacher_dir, c.tmp / "none.jsonl", c.tmp / "newcache"), ["none.jsonl", "not found"]


def label_empty_dataset(c: Ctx):
    return label_argv(c.teacher_dir, c.write("empty.jsonl", ""), c.tmp / "newcache"), ["empty.jsonl", "is empty"]


def label_missing_teacher(c: Ctx):
    return label_argv(c.tmp / "no-teacher", c.text_file, c.tmp / "newcache"), ["could not load", "no-teacher",
                                                                               "does not exist"]


def label_block_longer_than_teacher(c: Ctx):
    return label_argv(c.teacher_dir, c.text_file, c.tmp / "newcache", **{"data.block_size": "100000"}), [
        "data.block_size=100000", "longer than the model's context"]


def label_unwritable_output(c: Ctx):
    blocker = c.write("a-file", "not a directory")  # as root, permissions would not stop the write; a file does
    return label_argv(c.teacher_dir, c.text_file, blocker / "cache"), ["a-file"]


def label_draws_out_of_range(c: Ctx):
    return label_argv(c.teacher_dir, c.text_file, c.tmp / "newcache", **{"cache.encoding": "sampled",
                                                                         "cache.draws": "0"}), [
        "cache.draws", "greater than or equal to 1"]


CACHE_CASES = {
    f.__name__: f
    for f in (label_missing_dataset, label_empty_dataset, label_missing_teacher, label_block_longer_than_teacher,
              label_unwritable_output, label_draws_out_of_range,
              label_k_larger_than_vocab, label_into_cache_of_another_teacher, label_nan_teacher,
              cache_of_another_tokenizer, cache_of_other_data, cache_shard_truncated, cache_shard_corrupt,
              cache_unfinished, hard_nan_teacher, cross_tokenizer_student_of_a_cache_without_its_fields,
              label_cross_tokenizer_with_sampled_encoding, soft_negative_cache_align_workers)
}


@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_cache_and_label_bad_input(case, ctx, cache_dir, capsys):
    ctx.cache = cache_dir
    argv, needles = CACHE_CASES[case](ctx)
    before = {p.name for p in ctx.tmp.glob("cache/manifest.json")}
    code, err = invoke(argv, capsys)
    assert_one_clear_error(code, err, needles)
    assert_nothing_looks_complete(ctx.out, set())
    new_cache = ctx.tmp / "newcache"
    assert not (new_cache / "manifest.json").exists()  # an unfinished cache is never made to look finished
    assert {p.name for p in ctx.tmp.glob("cache/manifest.json")} == before


# ---------------------------------------------------------------- generate (teacher completions)

def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def generate_args(c: Ctx, prompts: Path, **extra: str) -> list[str]:
    args = {
        "teacher.backend": "hf", "teacher.model.name_or_path": str(c.teacher_dir), "teacher.device": "cpu",
        "prompts.source": str(prompts), "sampling.max_new_tokens": "4", "output": str(c.tmp / "gen" / "out.jsonl"),
        "progress": "false",
    }
    args.update(extra)
    return ["generate", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def api_args(c: Ctx, prompts: Path, base_url: str, **extra: str) -> list[str]:
    return generate_args(c, prompts, **{
        "teacher.backend": "openai", "teacher.base_url": base_url, "teacher.api_model": "fault-model",
        "teacher.api_key_env": "LMDISTILL_BAD_INPUT_KEY", "teacher.max_retries": "1", "teacher.timeout_s": "2",
        "teacher.backoff_base_s": "0.01", "teacher.backoff_max_s": "0.02", **extra})


def gen_empty_prompt(c: Ctx):
    path = write_prompts(c.tmp / "p.jsonl", ["What is 2 + 2?", "   ", "Name a colour."])
    return generate_args(c, path), ["empty", "row 1"]


def gen_malformed_prompt_line(c: Ctx):
    path = write_prompts(c.tmp / "p.jsonl", ["a?", "b?", "c?"])
    path.write_text(path.read_text() + '{"id": "p3", "prompt": "d?"\n')
    return generate_args(c, path), ["p.jsonl", "line 4", "not valid JSON"]


def gen_non_utf8_prompts(c: Ctx):
    path = c.tmp / "p.jsonl"
    path.write_bytes(b'{"id": "p0", "prompt": "ok?"}\n{"id": "p1", "prompt": "na\xefve?"}\n')
    return generate_args(c, path), ["p.jsonl", "line 2", "UTF-8"]


def gen_prompt_column_missing(c: Ctx):
    path = c.tmp / "p.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "why?"}) + "\n")
    return generate_args(c, path), ["neither a `messages` nor a `prompt` column", "prompts.prompt_column"]


def gen_missing_prompt_file(c: Ctx):
    return generate_args(c, c.tmp / "none.jsonl"), ["none.jsonl"]


def gen_unreachable_endpoint(c: Ctx):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_prompts(c.tmp / "p.jsonl", ["a?", "b?"])
    return api_args(c, path, f"http://127.0.0.1:{port}/v1"), ["cannot reach", f"127.0.0.1:{port}"]


GEN_CASES = {
    f.__name__: f
    for f in (gen_empty_prompt, gen_malformed_prompt_line, gen_non_utf8_prompts, gen_prompt_column_missing,
              gen_missing_prompt_file, gen_unreachable_endpoint)
}


@pytest.mark.parametrize("case", sorted(GEN_CASES))
def test_generate_bad_input(case, ctx, capsys):
    argv, needles = GEN_CASES[case](ctx)
    code, err = invoke(argv, capsys)
    assert_one_clear_error(code, err, needles)
    out = ctx.tmp / "gen"
    assert not list(out.glob("*.filtered.jsonl")) and not list(out.glob("*.summary.json"))


def test_generate_wrong_api_key_is_401_and_never_printed(ctx, capsys, monkeypatch):
    from fault_server import FaultServer

    monkeypatch.setenv("LMDISTILL_BAD_INPUT_KEY", "sk-wrong-0123456789")
    path = write_prompts(ctx.tmp / "p.jsonl", ["a?", "b?"])
    with FaultServer(api_key="sk-right") as server:
        code, err = invoke(api_args(ctx, path, server.base_url), capsys)
    assert_one_clear_error(code, err, ["401", "LMDISTILL_BAD_INPUT_KEY"])
    assert "sk-wrong-0123456789" not in err
    assert not list((ctx.tmp / "gen").glob("*.filtered.jsonl"))


# ------------------------------------------------------------------------------------------------ onpolicy


def onpolicy_args(c: Ctx, **extra: str) -> list[str]:
    args = {"teacher.name_or_path": str(c.teacher_dir), "student.init": "pretrained",
            "student.name_or_path": str(c.student_dir), "data.source": str(c.chat_file), "data.stage": "chat",
            "data.prompt_column": "null", "data.completion_column": "null", "data.block_size": "48",
            "data.eval_documents": "0", "rollout.max_new_tokens": "8", "train.max_steps": "2",
            "train.output_dir": str(c.out), "train.progress": "false"}
    args.update(extra)
    return ["onpolicy", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def op_dense_from_a_server(c: Ctx):
    return onpolicy_args(c, **{"teacher_server.url": "http://127.0.0.1:9/v1"}), ["signal=topk or signal=sampled_token"]


def op_pretrain_data(c: Ctx):
    return onpolicy_args(c, **{"data.source": str(c.text_file), "data.stage": "pretrain"}), ["data.stage=chat"]


def op_missing_data(c: Ctx):
    return onpolicy_args(c, **{"data.source": str(c.tmp / "none.jsonl")}), ["none.jsonl", "not found"]


def op_lmbda_out_of_range(c: Ctx):
    return onpolicy_args(c, lmbda="1.5"), ["lmbda", "less than or equal to 1"]


def op_no_completions_per_prompt(c: Ctx):
    return onpolicy_args(c, **{"rollout.n": "0"}), ["rollout.n", "greater than or equal to 1"]


def op_sampled_token_off_policy(c: Ctx):
    return onpolicy_args(c, signal="sampled_token", lmbda="0.5"), ["lmbda < 1", "signal=dense or topk"]


def op_unreachable_teacher_server(c: Ctx):
    port = _dead_port()
    return onpolicy_args(c, signal="topk", **{"teacher_server.url": f"http://127.0.0.1:{port}/v1",
                                             "teacher_server.max_retries": "0"}), ["unreachable", f"127.0.0.1:{port}"]


def op_teacher_of_another_tokenizer(c: Ctx):
    return onpolicy_args(c, signal="topk", **{"loss.cross_tokenizer": "hybrid"}), ["signal=topk", "--signal dense"]


OP_CASES = {
    f.__name__: f
    for f in (op_dense_from_a_server, op_pretrain_data, op_missing_data, op_lmbda_out_of_range,
              op_no_completions_per_prompt, op_sampled_token_off_policy, op_unreachable_teacher_server,
              op_teacher_of_another_tokenizer)
}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_onpolicy_bad_input(case, ctx, capsys):
    argv, needles = OP_CASES[case](ctx)
    code, err = invoke(argv, capsys)
    assert_one_clear_error(code, err, needles)
    assert_nothing_looks_complete(ctx.out, set())


@pytest.mark.parametrize("fault", ["no_tokenizer_check", "wrong_key"])
def test_onpolicy_teacher_servers_that_cannot_serve(fault, ctx, capsys, monkeypatch):
    """A server that cannot say which tokenizer it has (here an OpenAI-compatible stand-in with no /tokenize), or
    that refuses the key, stops the run before training with one message; the key is never printed."""
    from fault_server import FaultServer

    monkeypatch.setenv("LMDISTILL_BAD_INPUT_KEY", "sk-wrong-0123456789")
    with FaultServer(api_key="sk-right" if fault == "wrong_key" else None) as server:
        argv = onpolicy_args(ctx, signal="topk", **{"teacher_server.url": server.base_url,
                                                    "teacher_server.api_key_env": "LMDISTILL_BAD_INPUT_KEY",
                                                    "teacher_server.max_retries": "0"})
        code, err = invoke(argv, capsys)
    needles = ["cannot tell its tokenizer", "lmdistill serve or vLLM"] if fault == "no_tokenizer_check" else \
        ["401", "api_key_env"]
    assert_one_clear_error(code, err, needles)
    assert "sk-wrong-0123456789" not in err
    assert_nothing_looks_complete(ctx.out, set())


# ------------------------------------------------------------------------------------ hard, codistill, eval, compare
# Each verb meets the same six mistakes at least: the missing file, the wrong type, the out-of-range number, the wrong
# model pair, the empty data, the unwritable output (a path under a regular file, which even root cannot create).


def _blocked_dir(c: Ctx) -> Path:
    """An output path nobody can create: its parent is a regular file."""
    return c.write("a_file", "not a directory") / "out"


def _other_pair(c: Ctx) -> Path:
    """A model whose tokenizer differs from the tiny teacher's."""
    other = train_tokenizer(c.tmp / "tok2", vocab_size=400, extra_text="zebra quantum xylophone " * 20)
    make_model(c.tmp / "s2", other, seed=6)
    return c.tmp / "s2"


def hard_args(c: Ctx, **extra: str) -> list[str]:
    return ["hard", *c.soft(**{"mode": "token", **extra})[1:]]


def hard_missing_data(c: Ctx):
    return hard_args(c, **{"data.source": str(c.tmp / "none.jsonl")}), ["none.jsonl", "not found"]


def hard_wrong_type(c: Ctx):
    return hard_args(c, **{"train.max_steps": "two"}), ["train.max_steps", "integer", "two"]


def hard_alpha_out_of_range(c: Ctx):
    return hard_args(c, **{"loss.alpha": "1.5"}), ["`loss.alpha`", "less than or equal to 1", "1.5"]


def hard_tokenizer_mismatch(c: Ctx):
    return hard_args(c, **{"student.name_or_path": str(_other_pair(c))}), ["tokenizers differ",
                                                                           "lmdistill hard --mode sequence"]


def hard_empty_data(c: Ctx):
    return hard_args(c, **{"data.source": str(c.write("empty.jsonl", "\n"))}), ["empty.jsonl` is empty"]


def hard_unwritable_output(c: Ctx):
    return hard_args(c, **{"train.output_dir": str(_blocked_dir(c))}), ["a_file/out", "Not a directory"]


def hard_sequence_on_pretrain_data(c: Ctx):
    return hard_args(c, mode="sequence"), ["mode=sequence", "data.stage=chat"]


def codistill_args(c: Ctx, **extra: str) -> list[str]:
    args = {"tokenizer": str(c.teacher_dir), "data.source": str(c.text_file), "data.block_size": "32",
            "data.eval_documents": "0", "teacher.arch.hidden_size": "32", "teacher.arch.intermediate_size": "64",
            "teacher.arch.num_hidden_layers": "1", "student.arch.hidden_size": "32",
            "student.arch.intermediate_size": "64", "student.arch.num_hidden_layers": "1", "train.max_steps": "2",
            "train.micro_batch_size": "2", "train.output_dir": str(c.out), "train.progress": "false",
            "train.save_every": "0", "train.eval_every": "0"}
    args.update(extra)
    return ["codistill", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def co_missing_data(c: Ctx):
    return codistill_args(c, **{"data.source": str(c.tmp / "none.jsonl")}), ["none.jsonl", "not found"]


def co_missing_tokenizer(c: Ctx):
    return codistill_args(c, tokenizer=str(c.tmp / "no_tok")), ["no_tok", "could not load"]


def co_wrong_type(c: Ctx):
    return codistill_args(c, **{"loss.mutual": "lots"}), ["loss.mutual", "number", "lots"]


def co_weight_out_of_range(c: Ctx):
    return codistill_args(c, **{"loss.weight.value": "2"}), ["loss.weight.value", "less than or equal to 1"]


def co_update_every_zero(c: Ctx):
    return codistill_args(c, **{"teacher.update_every": "0"}), ["teacher.update_every", "greater than or equal to 1"]


def co_pretrained_of_another_tokenizer(c: Ctx):
    return codistill_args(c, **{"student.init": "pretrained", "student.name_or_path": str(_other_pair(c))}), [
        "tokenizers differ", "give the student the teacher's tokenizer"]


def co_empty_data(c: Ctx):
    return codistill_args(c, **{"data.source": str(c.write("empty.jsonl", "\n"))}), ["empty.jsonl` is empty"]


def co_unwritable_output(c: Ctx):
    return codistill_args(c, **{"train.output_dir": str(_blocked_dir(c))}), ["a_file/out", "Not a directory"]


def eval_args(c: Ctx, **extra: str) -> list[str]:
    args = {"student.name_or_path": str(c.student_dir), "teacher.name_or_path": str(c.teacher_dir),
            "data.source": str(c.text_file), "data.block_size": "32", "data.eval_documents": "20",
            "max_batches": "1", "generation.n_prompts": "1", "generation.max_new_tokens": "2", "device": "cpu",
            "output": str(c.out / "eval.json")}
    args.update(extra)
    return ["eval", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def eval_missing_student(c: Ctx):
    return eval_args(c, **{"student.name_or_path": str(c.tmp / "no_student")}), ["could not load", "no_student"]


def eval_missing_data(c: Ctx):
    return eval_args(c, **{"data.source": str(c.tmp / "none.jsonl")}), ["none.jsonl", "not found"]


def eval_wrong_type(c: Ctx):
    return eval_args(c, batch_size="many"), ["batch_size", "integer", "many"]


def eval_max_batches_zero(c: Ctx):
    return eval_args(c, max_batches="0"), ["max_batches", "greater than or equal to 1"]


def eval_tokenizer_mismatch(c: Ctx):
    return eval_args(c, **{"student.name_or_path": str(_other_pair(c))}), ["tokenizers differ",
                                                                           "--with_teacher false"]


def eval_empty_data(c: Ctx):
    return eval_args(c, **{"data.source": str(c.write("empty.jsonl", "\n"))}), ["empty.jsonl` is empty"]


def eval_no_held_out_block(c: Ctx):
    return eval_args(c, **{"data.eval_documents": "0"}), ["no held-out block", "data.eval_documents"]


def eval_unwritable_output(c: Ctx):
    return eval_args(c, output=str(_blocked_dir(c) / "eval.json")), ["a_file/out", "Not a directory"]


def compare_args(c: Ctx, **extra: str) -> list[str]:
    args = {"teacher.name_or_path": str(c.teacher_dir), "student.init": "pretrained",
            "student.name_or_path": str(c.student_dir), "data.source": str(c.text_file), "data.block_size": "32",
            "data.eval_documents": "30", "train.output_dir": str(c.out), "train.max_steps": "2",
            "train.micro_batch_size": "2", "train.save_every": "0", "train.eval_every": "0",
            "train.progress": "false", "generation.n_prompts": "1", "generation.max_new_tokens": "2",
            "generation.onpolicy_prompts": "0", "arms": '[{"name": "ce", "kind": "ce"}]'}
    args.update(extra)
    return ["compare", *[x for k, v in args.items() for x in (f"--{k}", v)]]


def cmp_missing_data(c: Ctx):
    return compare_args(c, **{"data.source": str(c.tmp / "none.jsonl")}), ["none.jsonl", "not found"]


def cmp_wrong_type(c: Ctx):
    return compare_args(c, **{"generation.max_new_tokens": "lots"}), ["generation.max_new_tokens", "integer"]


def cmp_temperature_zero(c: Ctx):
    return compare_args(c, **{"generation.temperature": "0"}), ["generation.temperature", "greater than 0"]


def cmp_tokenizer_mismatch(c: Ctx):
    return compare_args(c, **{"student.name_or_path": str(_other_pair(c))}), ["tokenizers differ"]


def cmp_empty_data(c: Ctx):
    return compare_args(c, **{"data.source": str(c.write("empty.jsonl", "\n"))}), ["empty.jsonl` is empty"]


def cmp_unwritable_output(c: Ctx):
    return compare_args(c, **{"train.output_dir": str(_blocked_dir(c))}), ["a_file/out", "Not a directory"]


def cmp_unknown_arm_kind(c: Ctx):
    return compare_args(c, arms='[{"name": "x", "kind": "magic"}]'), ["unknown kind `magic`", "registered kinds"]


VERB_CASES = {
    f.__name__: f
    for f in (hard_missing_data, hard_wrong_type, hard_alpha_out_of_range, hard_tokenizer_mismatch, hard_empty_data,
              hard_unwritable_output, hard_sequence_on_pretrain_data,
              co_missing_data, co_missing_tokenizer, co_wrong_type, co_weight_out_of_range, co_update_every_zero,
              co_pretrained_of_another_tokenizer, co_empty_data, co_unwritable_output,
              eval_missing_student, eval_missing_data, eval_wrong_type, eval_max_batches_zero,
              eval_tokenizer_mismatch, eval_empty_data, eval_no_held_out_block, eval_unwritable_output,
              cmp_missing_data, cmp_wrong_type, cmp_temperature_zero, cmp_tokenizer_mismatch, cmp_empty_data,
              cmp_unwritable_output, cmp_unknown_arm_kind)
}


@pytest.mark.parametrize("case", sorted(VERB_CASES))
def test_hard_codistill_eval_compare_bad_input(case, ctx, capsys):
    argv, needles = VERB_CASES[case](ctx)
    code, err = invoke(argv, capsys)
    assert_one_clear_error(code, err, needles)
    assert_nothing_looks_complete(ctx.out, set())
    assert not (ctx.out / "eval.json").exists() and not (ctx.out / "report").exists()


# ------------------------------------------------------------------ disk full at one chosen output of each verb
#
# The kernel refuses the write part-way (RLIMIT_FSIZE -> EFBIG, as a full disk refuses with ENOSPC), but only for the
# chosen file and only from its `nth` write on, so every output written before it is finished and must stay so.


@contextmanager
def _fsize_limit(limit: int) -> Iterator[None]:
    soft_limit, hard_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (max(limit, 0), hard_limit))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft_limit, hard_limit))
        signal.signal(signal.SIGXFSZ, old_handler)


def disk_full_at(monkeypatch, name: str, nth: int = 1) -> None:
    """From the `nth` write of a file whose name ends with `name` on, the disk is full half-way through that write."""
    import lmdistill.cache.writer
    import lmdistill.generate.store
    import lmdistill.io
    import lmdistill.train.logging

    seen = [0]

    def hit(path: str | Path) -> bool:
        if str(path).endswith(name):
            seen[0] += 1
            return seen[0] >= nth
        return False

    real_write, real_append = lmdistill.io.write_bytes, lmdistill.io.append_durably

    def write_bytes(path, data, what):
        if not hit(path):
            return real_write(path, data, what)
        with _fsize_limit(len(data) // 2):
            return real_write(path, data, what)

    def append_durably(fd, data, what, path):
        if not hit(path):
            return real_append(fd, data, what, path)
        with _fsize_limit(os.fstat(fd).st_size + len(data) // 2):
            return real_append(fd, data, what, path)

    for mod in (lmdistill.io, lmdistill.cache.writer):
        monkeypatch.setattr(mod, "write_bytes", write_bytes)
    for mod in (lmdistill.train.logging, lmdistill.generate.store):
        monkeypatch.setattr(mod, "append_durably", append_durably)


def assert_no_temporaries(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".tmp")]
    assert not left, f"a failed write left its temporary behind: {left}"


def test_disk_full_at_a_label_shard_keeps_the_finished_shards(ctx, monkeypatch, capsys):
    from safetensors.torch import load_file

    out = ctx.tmp / "newcache"
    disk_full_at(monkeypatch, "shard-00001.safetensors")
    code, err = invoke(label_argv(ctx.teacher_dir, ctx.text_file, out), capsys)
    assert_one_clear_error(code, err, ["could not write the soft-label cache shard", "shard-00001", "disk may be full"])
    assert not (out / "manifest.json").exists()  # never made to look finished
    assert not (out / "train" / "shard-00001.safetensors").exists()
    journal = json.loads((out / "manifest.rank-0-of-1.json").read_text())
    assert [s["file"] for s in journal["shards"]] == ["train/shard-00000.safetensors"]
    load_file(out / "train" / "shard-00000.safetensors")  # the finished shard is whole, and kept
    assert_no_temporaries(out)


def test_disk_full_at_a_generate_append_keeps_whole_records(ctx, monkeypatch, capsys):
    from lmdistill.generate.store import read_records

    prompts = write_prompts(ctx.tmp / "p.jsonl", ["What is 2 + 2?", "Name a colour.", "Say hi."])
    store = ctx.tmp / "gen" / "out.jsonl"
    disk_full_at(monkeypatch, "gen/out.jsonl", nth=2)
    code, err = invoke(generate_args(ctx, prompts), capsys)
    assert_one_clear_error(code, err, ["could not write the generated records", "out.jsonl", "disk may be full"])
    records, good = read_records(store)
    assert good == store.stat().st_size, "a half-written record was left at the end of the store"
    assert len(records) == 1  # the first append finished and stays
    assert not list(store.parent.glob("*.filtered.jsonl")) and not list(store.parent.glob("*.summary.json"))
    monkeypatch.undo()  # space again: the same command resumes and finishes the rest
    code, err = invoke(generate_args(ctx, prompts), capsys)
    assert code == 0, err
    records, _ = read_records(store)
    assert sorted(r["id"] for r in records) == ["p0", "p1", "p2"]


def test_disk_full_at_the_training_log_keeps_whole_lines(ctx, monkeypatch, capsys):
    disk_full_at(monkeypatch, "log.jsonl", nth=2)
    code, err = invoke(ctx.soft(), capsys)
    assert_one_clear_error(code, err, ["could not write the training log", "log.jsonl", "disk may be full"])
    lines = (ctx.out / "log.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n")
    json.loads(lines[0])
    assert_nothing_looks_complete(ctx.out, set())
    assert_no_temporaries(ctx.out)


def test_disk_full_at_the_run_summary_keeps_the_student(ctx, monkeypatch, capsys):
    disk_full_at(monkeypatch, "summary.json")
    code, err = invoke(ctx.soft(), capsys)
    assert_one_clear_error(code, err, ["could not write the run summary", "summary.json", "disk may be full"])
    assert not (ctx.out / "summary.json").exists()
    assert (ctx.out / "student" / "model.safetensors").is_file()  # finished before the disk filled: kept
    assert_no_temporaries(ctx.out)


@pytest.mark.parametrize("name", ["report.md", "report.html", "results.json"])
def test_disk_full_at_a_compare_report_file(name, ctx, monkeypatch, capsys):
    disk_full_at(monkeypatch, f"report/{name}")
    code, err = invoke(compare_args(ctx), capsys)
    what = "comparison results" if name == "results.json" else "comparison report"
    assert_one_clear_error(code, err, [f"could not write the {what}", name, "disk may be full"])
    report = ctx.out / "report"
    assert not (report / name).exists()
    assert not (report / "results.json").exists()  # written last: a report without it is an unfinished one
    assert_no_temporaries(ctx.out)


def test_disk_full_at_the_generate_summary_keeps_every_record(ctx, monkeypatch, capsys):
    from lmdistill.generate.store import read_records

    prompts = write_prompts(ctx.tmp / "p.jsonl", ["What is 2 + 2?", "Name a colour."])
    disk_full_at(monkeypatch, "out.summary.json")
    code, err = invoke(generate_args(ctx, prompts), capsys)
    assert_one_clear_error(code, err, ["could not write the generate summary", "out.summary.json", "disk may be full"])
    out = ctx.tmp / "gen"
    assert not (out / "out.summary.json").exists()
    records, good = read_records(out / "out.jsonl")
    assert good == (out / "out.jsonl").stat().st_size and len(records) == 2  # every generated record stays
    assert_no_temporaries(out)
