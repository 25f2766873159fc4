"""`lmdistill label` end to end: kill -9 and resume, two processes, and training from the cache with no teacher."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ce_twin import ce_twin
from conftest import soft_overrides
from lmdistill.cache import read_manifest
from lmdistill.config import LabelConfig, SoftConfig, load_config

# a sampled cache: per-shard random streams make byte-identity a real test of the sharding
COMMON = {"data.block_size": "16", "data.max_documents": "24", "data.eval_documents": "6",
          "cache.encoding": "sampled", "cache.draws": "16", "cache.shard_blocks": "32", "cache.batch_size": "8",
          "progress": "false"}
# one thread everywhere, so the float results (and thus the bytes) cannot depend on the thread count
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SLOW_LABEL = """
import sys, time
import lmdistill.cache.writer as w
_write = w.CacheWriter._write_shard
def slow(self, *a, **k):  # pace the run so the kill lands mid-run, between shards
    time.sleep(0.3)
    return _write(self, *a, **k)
w.CacheWriter._write_shard = slow
from lmdistill.cli import run
run()
"""


def _args(teacher_dir: Path, text_file: Path, out: Path, **extra: str) -> list[str]:
    merged = {"teacher.name_or_path": str(teacher_dir), "data.source": str(text_file), "cache.output_dir": str(out),
              **COMMON, **extra}
    return [a for k, v in merged.items() for a in (f"--{k}", v)]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(teacher_dir, text_file, tmp_path_factory) -> Path:
    """An uninterrupted single-process run, the cache the others must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    proc = subprocess.run([sys.executable, "-m", "lmdistill", "label", *_args(teacher_dir, text_file, out)],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "bytes/target token" in proc.stdout
    manifest = read_manifest(out)
    assert len(manifest.shards_of("train")) >= 4 and manifest.shards_of("eval")
    return out


def test_kill9_mid_run_then_resume_gives_the_same_bytes(reference, teacher_dir, text_file, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_LABEL, "label", *_args(teacher_dir, text_file, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 180
    while len(list((out / "train").glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "labelling made no progress"
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert not (out / "manifest.json").exists()
    first = out / "train" / "shard-00000.safetensors"
    mtime = first.stat().st_mtime_ns
    # what a crash can leave besides finished shards: a half-written temp file, and a shard file the journal never
    # recorded (killed between rename and journal update); both must be redone, not trusted
    (out / "train" / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    (out / "train" / "shard-00003.safetensors").write_bytes(b"not a finished shard")
    done = subprocess.run([sys.executable, "-m", "lmdistill", "label", *_args(teacher_dir, text_file, out)],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert _digests(out) == _digests(reference)
    assert first.stat().st_mtime_ns == mtime  # resumed after the finished shards, did not redo them


def test_two_processes_write_disjoint_shards_that_read_back_as_one_cache(reference, teacher_dir, text_file, tmp_path):
    out = tmp_path / "cache"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmdistill",
         "-v", "label", *_args(teacher_dir, text_file, out)],
        capture_output=True, text=True, env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = re.findall(r"rank (\d) of 2 wrote (\S+)", proc.stderr)
    by_rank = {r: {f for rr, f in written if rr == r} for r in ("0", "1")}
    assert by_rank["0"] and by_rank["1"] and not by_rank["0"] & by_rank["1"]
    assert all(int(re.search(r"(\d+)\.safetensors", f).group(1)) % 2 == int(r) for r, f in written)
    assert _digests(out) == _digests(reference)  # every shard and the merged manifest


def test_soft_trains_from_the_cache_without_a_teacher_and_lowers_heldout_kl(teacher_dir, student_dir, text_file,
                                                                           tmp_path, monkeypatch):
    from lmdistill.evaluate import evaluate_blocks
    from lmdistill.models import load_causal_lm, load_teacher, load_tokenizer
    from lmdistill.recipes import common
    from lmdistill.recipes.label import run_label
    from lmdistill.recipes.soft import run_soft
    from lmdistill.teachers import HFTeacher

    data = {"data.block_size": "32", "data.eval_documents": "20", "data.max_documents": "40"}
    label = load_config(LabelConfig, None, _args(teacher_dir, text_file, tmp_path / "cache", **data, **{
        "cache.encoding": "topk", "cache.k": "8"}))
    summary = run_label(label)
    assert summary["bytes_per_token"] < 8 * 4 + 2 + 2  # top-8 fp16 + tail, plus digests/offsets/headers

    def no_teacher(*_: object, **__: object) -> None:
        raise AssertionError("soft --teacher_cache must not load the teacher model")

    monkeypatch.setattr(common, "load_teacher", no_teacher)
    soft = load_config(SoftConfig, None, soft_overrides(teacher_dir, student_dir, text_file, tmp_path / "run", **{
        "teacher_cache": str(tmp_path / "cache"), "train.max_steps": "30", **data}))
    result = run_soft(soft)
    monkeypatch.undo()
    first, last = result["eval_first"], result["eval_last"]  # measured against the cache's eval split
    assert last["kl_to_teacher"] < 0.5 * first["kl_to_teacher"], (first, last)

    # the real held-out KL, with the real teacher: the student learned the teacher, not just the cache
    tok = load_tokenizer(str(teacher_dir))
    teacher = HFTeacher(load_teacher(soft.teacher), len(tok))
    from lmdistill.data import build_splits

    held = build_splits(soft.data, tok).eval
    kl = {}
    # the honest baseline: the CE twin (same init, data, steps, seed) scored the same way
    twin = ce_twin(teacher_dir, student_dir, text_file, tmp_path / "ce", **{"train.max_steps": "30", **data})
    for name, path in (("before", student_dir), ("after", Path(result["student_dir"])),
                       ("ce_twin", Path(twin["student_dir"]))):
        kl[name] = evaluate_blocks(load_causal_lm(str(path)), held, n_vocab=len(tok), batch_size=4, max_batches=8,
                                   teacher_logits_fn=teacher.logits)["kl_to_teacher"]
    print(f"cached top-8 soft vs CE twin, held-out KL to the teacher: {kl['after']:.4f} vs {kl['ce_twin']:.4f}")
    assert kl["after"] < 0.5 * kl["before"], kl
    assert kl["after"] < kl["ce_twin"], kl
    assert torch.isfinite(torch.tensor(list(kl.values()))).all()


def test_label_topk_sampled_then_soft_trains_from_it(teacher_dir, student_dir, text_file, tmp_path):
    from lmdistill.cache import read_manifest
    from lmdistill.recipes.label import run_label
    from lmdistill.recipes.soft import run_soft

    data = {"data.block_size": "32", "data.eval_documents": "20", "data.max_documents": "40"}
    label = load_config(LabelConfig, None, _args(teacher_dir, text_file, tmp_path / "cache", **data, **{
        "cache.encoding": "topk_sampled", "cache.k": "4", "cache.draws": "12", "cache.values": "int8"}))
    summary = run_label(label)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest.header["version"] == 2 and manifest.encoding["kind"] == "topk_sampled"
    assert summary["bytes_per_token"] < 4 * 3 + 2 + 12 * 2 + 2  # plus digests/offsets/headers
    soft = load_config(SoftConfig, None, soft_overrides(teacher_dir, student_dir, text_file, tmp_path / "run", **{
        "teacher_cache": str(tmp_path / "cache"), "train.max_steps": "12", **data}))
    result = run_soft(soft)
    first, last = result["eval_first"], result["eval_last"]  # the RS-KD estimate against the cache's eval split
    assert last["kl_to_teacher"] < first["kl_to_teacher"], (first, last)


def test_a_missing_cache_fails_before_any_model_is_loaded(teacher_dir, student_dir, text_file, tmp_path, monkeypatch):
    from lmdistill.errors import CacheError
    from lmdistill.recipes import soft

    def no_setup(*_: object, **__: object) -> None:
        raise AssertionError("models were loaded before the cache was checked")

    monkeypatch.setattr(soft, "build_setup", no_setup)
    cfg = load_config(SoftConfig, None, soft_overrides(teacher_dir, student_dir, text_file, tmp_path,
                                                       teacher_cache=str(tmp_path / "nope")))
    with pytest.raises(CacheError, match=r"soft-label cache `.*nope` does not exist; write one with `lmdistill label"):
        soft.run_soft(cfg)


def test_shipped_label_configs_validate_and_match_soft_yaml_data():
    """`lmdistill soft --config configs/soft.yaml --teacher_cache DIR` needs the cache labelled on the same blocks."""
    root = Path(__file__).parent.parent / "configs"
    soft = load_config(SoftConfig, root / "soft.yaml")
    paths = sorted(root.glob("label*.yaml"))
    assert paths, "configs/ should ship label examples"
    for path in paths:
        cfg = load_config(LabelConfig, path)
        assert cfg.data == soft.data, path
        assert cfg.teacher.name_or_path == soft.teacher.name_or_path, path


def _label_cmd(nproc: int, script: Path | None) -> list[str]:
    """`lmdistill label` as 1 plain process or `nproc` torchrun processes on CPU; `script` paces it (SLOW_LABEL)."""
    entry = [str(script)] if script is not None else ["-m", "lmdistill"]
    if nproc == 1:
        return [sys.executable, *entry, "label"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *entry,
            "label"]


@pytest.mark.parametrize(("killed", "resumed"), [(2, 1), (1, 2)], ids=["2-killed-then-1", "1-killed-then-2"])
def test_kill9_then_resume_with_another_number_of_processes_gives_the_same_bytes(
        killed, resumed, reference, teacher_dir, text_file, tmp_path):
    out = tmp_path / "cache"
    script = tmp_path / "slow_label.py"
    script.write_text(SLOW_LABEL)
    # its own session, so the SIGKILL reaches torchrun's workers too, as when a node is lost
    proc = subprocess.Popen([*_label_cmd(killed, script), *_args(teacher_dir, text_file, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list((out / "train").glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "labelling made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # SIGKILL: no cleanup code runs, in any process of the job
    proc.wait()
    assert not (out / "manifest.json").exists()
    journals = sorted(p.name for p in out.glob("manifest.rank-*.json"))
    assert journals and all(name.endswith(f"-of-{killed}.json") for name in journals)
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("shard-*.safetensors")
                if any(p.name in (out / j).read_text() for j in journals)}
    assert finished, "no shard was recorded before the kill"
    done = subprocess.run([*_label_cmd(resumed, None), *_args(teacher_dir, text_file, out)],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(out) == _digests(reference)  # every shard and the merged manifest; no journal of either run left
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # the shards recorded before the kill were kept
