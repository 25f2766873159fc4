"""Resuming safely: a changed config is refused (safe fields aside), a damaged newest checkpoint falls back to the
previous good one, and two runs cannot write one directory (the lock dies with its process, kill -9 included)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import soft_overrides
from lmdistill.config import LabelConfig, SoftConfig, load_config
from lmdistill.errors import CheckpointError, ConfigError
from lmdistill.io import lock_dir
from lmdistill.train.checkpoint import CheckpointManager, config_changes, config_fingerprint

# ------------------------------------------------------------------------------------------------ config changes


def test_config_changes_name_the_fields_that_differ_and_skip_the_safe_ones():
    old = {"train": {"lr": 0.001, "max_steps": 10, "eval_every": 5, "output_dir": "a", "resume": False},
           "loss": {"kind": "kl", "alpha": 0.5}, "data": {"source": "x.txt"}, "cache": {"output_dir": "c"}}
    new = {"train": {"lr": 0.002, "max_steps": 20, "eval_every": 2, "output_dir": "b", "resume": True},
           "loss": {"kind": "jsd", "alpha": 0.5}, "data": {"source": "y.txt"}, "cache": {"output_dir": "d"}}
    assert config_changes(old, new) == ['data.source: "x.txt" -> "y.txt"', 'loss.kind: "kl" -> "jsd"',
                                        "train.lr: 0.001 -> 0.002"]
    safe_only = json.loads(json.dumps(old))
    safe_only["train"].update(max_steps=99, eval_every=1, output_dir="z", resume=True)
    assert config_changes(old, safe_only) == []
    assert config_fingerprint(old) == config_fingerprint(safe_only) != config_fingerprint(new)
    assert config_changes({"a": 1}, {"a": 1, "b": {"c": 2}}) == ["b.c: (absent) -> 2"]


def _soft(teacher_dir, student_dir, text_file, out, **extra):
    from lmdistill.recipes.soft import run_soft

    cfg = load_config(SoftConfig, None, soft_overrides(teacher_dir, student_dir, text_file, out, **extra))
    return run_soft(cfg)


def test_resume_with_a_changed_config_is_refused_naming_the_fields(teacher_dir, student_dir, text_file, tmp_path):
    out = tmp_path / "run"
    base = {"train.max_steps": "2", "train.save_every": "1"}
    _soft(teacher_dir, student_dir, text_file, out, **base)
    with pytest.raises(CheckpointError) as err:
        _soft(teacher_dir, student_dir, text_file, out, **base,
              **{"train.resume": "true", "train.lr": "0.01", "loss.alpha": "0.5"})
    msg = str(err.value)
    assert "loss.alpha: 1.0 -> 0.5" in msg and "train.lr: 0.003 -> 0.01" in msg, msg
    assert "step-00000002" in msg and "fresh output_dir" in msg
    # Another global batch is another run; the same global batch split differently (as for another number of
    # processes) is not.
    with pytest.raises(CheckpointError, match="train.grad_accum: 1 -> 2"):
        _soft(teacher_dir, student_dir, text_file, out, **base, **{"train.resume": "true", "train.grad_accum": "2"})
    resplit = {"train.micro_batch_size": "2", "train.grad_accum": "2", "train.resume": "true"}
    assert _soft(teacher_dir, student_dir, text_file, out, **base, **resplit)["steps"] == 2
    # The safe fields may change: more steps, another eval/log/save cadence, progress.
    summary = _soft(teacher_dir, student_dir, text_file, out,
                    **{"train.max_steps": "3", "train.save_every": "2", "train.eval_every": "3",
                       "train.log_every": "1", "train.keep_checkpoints": "4", "train.resume": "true"})
    assert summary["steps"] == 3
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["extra"]["run"]["config"]["train"]["max_steps"] == 3
    assert len(state["extra"]["config_fingerprint"]) == 64
    assert set(state["files"]) == {"model-student.safetensors", "optimizer-student.pt", "rng.safetensors"}


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def _manager_with_three(tmp_path: Path) -> tuple[CheckpointManager, nn.Linear]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (1, 2, 3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        manager.save(step, models={"student": model}, optimizers={"student": opt}, schedulers={})
    return manager, model


def _tear(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    manager, _ = _manager_with_three(tmp_path)
    root = manager.root
    assert manager.latest_good() == root / "step-00000003"
    _tear(root / "step-00000003" / "optimizer-student.pt")  # torn inside a renamed, complete-looking checkpoint
    (root / "step-00000002" / "rng.safetensors").unlink()  # a file missing from the one before
    with caplog.at_level("WARNING"):
        assert manager.latest_good() == root / "step-00000001"
    assert "step-00000003 is damaged: `optimizer-student.pt` does not match its checksum" in caplog.text
    assert "step-00000002 is damaged: `rng.safetensors` is missing" in caplog.text
    # The fallback really loads.
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    assert manager.load(root / "step-00000001", models={"student": model}, optimizers={"student": opt},
                        schedulers={})["step"] == 1
    # Same-size corruption (a flipped byte) is caught by the checksum too; with none intact it is an error.
    f = root / "step-00000001" / "model-student.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="no intact checkpoint") as err:
        manager.latest_good()
    assert "step-00000001" in str(err.value) and "step-00000003" in str(err.value)


def test_an_unreadable_state_json_is_damage_too(tmp_path):
    manager, _ = _manager_with_three(tmp_path)
    (manager.root / "step-00000003" / "state.json").write_text('{"step": 3, "fi')
    assert manager.latest_good() == manager.root / "step-00000002"


# ------------------------------------------------------------------------------------------------ one writer


def _holder(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s lock (it prints `locked` once it does, then waits)."""
    code = ("import sys, time; from lmdistill.io import lock_dir; l = lock_dir(sys.argv[1], 'test'); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_busy_directory_is_refused_naming_the_pid_and_the_lock_dies_with_kill_9(tmp_path):
    holder = _holder(tmp_path / "out")
    try:
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            lock_dir(tmp_path / "out", "training run")
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 5
    while True:  # the kernel drops an flock with its process
        try:
            lock = lock_dir(tmp_path / "out", "training run")
            break
        except ConfigError:
            assert time.time() < deadline
            time.sleep(0.01)
    assert (tmp_path / "out" / ".lock").read_text().strip() == str(os.getpid())
    lock.close()
    assert (tmp_path / "out" / ".lock").read_text() == ""  # released: no pid left behind


def test_training_and_labelling_into_a_busy_directory_fail_with_one_clear_error(teacher_dir, student_dir,
                                                                                  text_file, tmp_path):
    from lmdistill.recipes.label import run_label

    train_out, cache_out = tmp_path / "train", tmp_path / "cache"
    holders = [_holder(train_out), _holder(cache_out)]
    try:
        with pytest.raises(ConfigError, match=f"in use by another lmdistill run \\(pid {holders[0].pid}\\)"):
            _soft(teacher_dir, student_dir, text_file, train_out, **{"train.max_steps": "1"})
        cfg = load_config(LabelConfig, None, ["--teacher.name_or_path", str(teacher_dir), "--data.source",
                                              str(text_file), "--data.max_documents", "8", "--cache.output_dir",
                                              str(cache_out), "--progress", "false"])
        with pytest.raises(ConfigError, match=f"pid {holders[1].pid}"):
            run_label(cfg)
    finally:
        for h in holders:
            os.kill(h.pid, signal.SIGKILL)
            h.wait()
    assert not (train_out / "checkpoints").exists() and not (cache_out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------ signal handling


def test_stop_on_signals_sets_a_flag_and_restores_the_previous_handlers():
    import threading

    from lmdistill.io import stop_on_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals("unit") as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGINT)  # a real signal: handled, the process goes on
        deadline = time.time() + 5
        while not stop and time.time() < deadline:
            time.sleep(0.001)
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"
    assert {s: signal.getsignal(s) for s in before} == before
    seen = []

    def elsewhere() -> None:  # outside the main thread nothing is installed (Python would refuse)
        with stop_on_signals("unit") as flag:
            seen.append((bool(flag), signal.getsignal(signal.SIGTERM)))

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert seen == [(False, before[signal.SIGTERM])]


def test_the_resume_command_sets_the_resume_flag_once(monkeypatch):
    from lmdistill.io import resume_command

    monkeypatch.setattr(sys, "argv", ["/x/bin/lmdistill", "soft", "--train.resume", "false", "--train.lr", "1e-3"])
    assert resume_command("--train.resume") == "lmdistill soft --train.lr 1e-3 --train.resume true"
    monkeypatch.setattr(sys, "argv", ["lmdistill", "label", "--cache.output_dir", "a b"])
    assert resume_command() == "lmdistill label --cache.output_dir 'a b'"


def test_generate_stopped_by_sigint_finishes_the_requests_in_flight_and_starts_no_new_one(tmp_path):
    """A backend that takes jobs as it goes (like the HTTP one, two requests in flight): after a real SIGINT no new
    job is taken, the two in flight are written, and the run ends with exit code 130; rerunning completes the file."""
    from lmdistill.errors import Interrupted
    from lmdistill.generate import GenerateConfig, run_generate
    from lmdistill.generate.base import Completion, JobResult

    class TwoInFlight:
        taken: list[str] = []
        fire = True

        def teacher_info(self):
            return {"backend": "openai", "model": "fake"}

        def generate(self, jobs, sampling):
            queue, flight = iter(jobs), []
            for job in queue:
                self.taken.append(job.prompt.id)
                flight.append(job)
                if len(flight) < 2:
                    continue
                if len(self.taken) == 3 and self.fire:  # the stop arrives while two requests are out
                    os.kill(os.getpid(), signal.SIGINT)
                done = flight.pop(0)
                yield JobResult(done, [Completion(f"about {done.prompt.id}", "stop")], 0.0)
            for done in flight:
                yield JobResult(done, [Completion(f"about {done.prompt.id}", "stop")], 0.0)

        def close(self):
            pass

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"p{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out.jsonl"
    cfg = load_config(GenerateConfig, None, ["--teacher.backend", "openai", "--teacher.api_model", "fake",
                                             "--prompts.source", str(prompts), "--output", str(out),
                                             "--progress", "false", "--filters.dedup", "none"])
    with pytest.raises(Interrupted) as err:
        run_generate(cfg, backend=TwoInFlight())
    assert err.value.exit_code == 130 and "stopped by SIGINT" in str(err.value)
    assert TwoInFlight.taken == ["q0", "q1", "q2"]  # no job was taken after the signal
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q0", "q1", "q2"]
    TwoInFlight.taken, TwoInFlight.fire = [], False
    summary = run_generate(cfg, backend=TwoInFlight())
    assert TwoInFlight.taken == [f"q{i}" for i in range(3, 8)] and summary["records"] == 8
