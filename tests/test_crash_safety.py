"""kill -9 at chosen and at seeded-random moments; the rerun (`--train.resume true`, or the same command) finishes
with exactly what an uninterrupted run produces.

To keep this fast, one driver process (this file run as a script) imports lmdistill once and forks a child per
"life" of a run; each child runs the real CLI (`lmdistill.cli.run`) and dies by a real SIGKILL:
- at a chosen instant, from inside: just before a finished temporary checkpoint is renamed into place, or after
  half of a checkpoint file's bytes are on disk (`self-kill` points, found by wrapping the writer function);
- at a seeded-random moment, from outside: the driver watches the run's own output (log lines, records) and sends
  SIGKILL once a seeded-random count has appeared, wherever the child happens to be by then;
- or stops it on purpose the same way, with SIGTERM or SIGINT (`"signal"` in the kill spec): the run finishes the
  work in flight, saves and exits 143 / 130; a second signal while it saves stops it at once (`signal_twice`).
An unkilled reference run is one more child, so every life sees the same imported state and thread settings.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import soft_overrides
from lmdistill.train.logging import read_log

# ------------------------------------------------------------------------------------------------ the driver

KILL_EXIT = -signal.SIGKILL


def _self_kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_self_kill(spec: dict) -> None:
    """In the child: arm one self-inflicted SIGKILL at a write point named by `spec`."""
    kind, match = spec["kind"], spec["match"]
    if kind == "before_rename":  # the temporary is complete, the rename never happens
        for fn_name in ("rename", "replace"):
            real = getattr(os, fn_name)

            def renamer(src, dst, *a, _real=real, **k):
                if match in str(src):
                    _self_kill()
                return _real(src, dst, *a, **k)

            setattr(os, fn_name, renamer)
    elif kind == "torn_append":  # the n-th append of a JSONL store writes half its bytes, then the process dies
        from lmdistill.generate.store import JsonlStore

        real_append, calls = JsonlStore.append, [0]

        def append(self, records):
            calls[0] += 1
            if calls[0] == int(match):
                payload = "".join(json.dumps(r) + "\n" for r in records).encode()
                self._fh.write(payload[: len(payload) // 2])
                self._fh.flush()
                os.fsync(self._fh.fileno())
                _self_kill()
            return real_append(self, records)

        JsonlStore.append = append
    elif kind == "half_written":  # a file of the checkpoint is cut in the middle, as by a kill mid-write
        import io

        import torch as _torch

        real_save = _torch.save

        def save(obj, f, *a, **k):
            if match in str(f):
                buf = io.BytesIO()
                real_save(obj, buf, *a, **k)
                data = buf.getvalue()
                with open(f, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _self_kill()
            return real_save(obj, f, *a, **k)

        _torch.save = save
    elif kind == "during_student_save":  # the model file of the final student is being written
        import transformers

        real = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, save_directory, *a, **k):
            result = real(self, save_directory, *a, **k)
            if match in str(save_directory):
                _self_kill()
            return result

        transformers.PreTrainedModel.save_pretrained = save_pretrained
    elif kind == "torn_after_rename":  # "tmp-dir-part:file": the checkpoint is renamed, then one of its files torn
        where, name = match.split(":")
        real_rename = os.rename

        def rename_then_tear(src, dst, *a, **k):
            result = real_rename(src, dst, *a, **k)
            if where in str(src):
                f = Path(dst) / name
                data = f.read_bytes()
                with open(f, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _self_kill()
            return result

        os.rename = rename_then_tear
    elif kind == "signal_twice":  # SIGTERM during the n-th optimizer step, a second one as the checkpoint is saved
        from lmdistill.train.checkpoint import CheckpointManager
        from lmdistill.train.loop import Trainer

        real_step, real_save, calls = Trainer.train_step, CheckpointManager.save, [0]

        def train_step(self, step):
            calls[0] += 1
            if calls[0] == int(match):
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(self, step)

        def save(self, *a, **k):
            if calls[0] >= int(match):
                os.kill(os.getpid(), signal.SIGTERM)
            return real_save(self, *a, **k)

        Trainer.train_step, CheckpointManager.save = train_step, save
    elif kind == "nth_call":  # "module:function:n": the n-th call of that function (as the module sees it) dies
        import importlib

        module_name, fn_name, n = match.split(":")
        module = importlib.import_module(module_name)
        real_fn, calls = getattr(module, fn_name), [0]

        def dying(*a, **k):
            calls[0] += 1
            if calls[0] == int(n):
                _self_kill()
            return real_fn(*a, **k)

        setattr(module, fn_name, dying)
    else:
        raise ValueError(kind)


def _count(path: Path, what: str, since: float = 0.0) -> int:
    """How much of the run's output exists: log rows written since `since` (a resumed run first keeps the earlier
    rows), lines of a JSONL file, or files matching a glob."""
    if what.startswith("files:"):
        return len(list(path.glob(what.removeprefix("files:")))) if path.exists() else 0
    if not path.exists():
        return 0
    if what == "train_log_rows":
        return sum(1 for r in read_log(path) if "loss" in r and r.get("time", 0) >= since)
    if what.startswith("log_rows_with:"):
        key = what.removeprefix("log_rows_with:")
        return sum(1 for r in read_log(path) if key in r and r.get("time", 0) >= since)
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def _live(life: dict) -> dict:
    """Fork a child that runs the CLI with `life["argv"]`; kill it as `life["kill"]` says; report how it ended."""
    kill = life.get("kill") or {}
    output = Path(life["output"])
    born = round(time.time(), 3) - 0.001
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)  # this life's stdout and stderr (warnings included) go to its own file
        os.dup2(fd, 2)
        try:
            if kill.get("kind") not in (None, "external"):
                _install_self_kill(kill)
            from lmdistill.cli import run

            sys.argv = ["lmdistill", *life["argv"]]
            run()
        except SystemExit as e:
            code = int(e.code or 0)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    waited_for = None
    if kill.get("kind") == "external":
        watch, n = Path(kill["watch"]), int(kill["after"])
        deadline = time.time() + 120
        while time.time() < deadline:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                waited_for = _
                break
            if _count(watch, kill["count"], since=born) >= n:
                os.kill(pid, getattr(signal, kill.get("signal", "SIGKILL")))
                break
            time.sleep(0.005)
    if waited_for is None:
        _, waited_for = os.waitpid(pid, 0)
    if os.WIFSIGNALED(waited_for):
        return {"signal": os.WTERMSIG(waited_for)}
    return {"exit": os.WEXITSTATUS(waited_for)}


def outputs(tmp: Path, n: int) -> list[str]:
    """What each life printed (stdout and stderr), in order."""
    return [(tmp / f"life-{i}.txt").read_text(errors="replace") for i in range(n)]


def drive(plan_path: str) -> None:
    # Imports happen here, once, before any fork, including the ones transformers and the recipes would otherwise
    # do lazily in every child (most of a tiny run's cost). No tensor op runs in the parent: forking after OpenMP
    # started is not safe.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401

    import lmdistill.cli  # noqa: F401
    import lmdistill.generate.hf  # noqa: F401
    import lmdistill.generate.run  # noqa: F401
    import lmdistill.recipes.codistill  # noqa: F401
    import lmdistill.recipes.hard  # noqa: F401
    import lmdistill.recipes.label  # noqa: F401
    import lmdistill.recipes.onpolicy  # noqa: F401
    import lmdistill.recipes.soft  # noqa: F401

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "PreTrainedTokenizerFast"):
        getattr(transformers, name)

    plan = json.loads(Path(plan_path).read_text())
    results = []
    for life in plan["lives"]:
        results.append(_live(life))
    Path(plan["results"]).write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    drive(sys.argv[1])
    sys.exit(0)


# ------------------------------------------------------------------------------------------------ test helpers

def run_plan(tmp: Path, lives: list[dict]) -> list[dict]:
    for i, life in enumerate(lives):
        life["output"] = str(tmp / f"life-{i}.txt")
    plan = {"lives": lives, "results": str(tmp / "results.json")}
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, str(tmp / "plan.json")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    for text in [proc.stderr, *outputs(tmp, len(lives))]:
        assert "Traceback" not in text, text[-4000:]
    return results


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ------------------------------------------------------------------------------------------------ soft

SOFT_STEPS = 6


def soft_argv(teacher_dir: Path, student_dir: Path, data: Path, out: Path, resume: bool) -> list[str]:
    extra = {"train.max_steps": str(SOFT_STEPS), "train.save_every": "2", "train.grad_accum": "2",
             "train.micro_batch_size": "2", "loss.alpha": "0.5", "data.eval_documents": "20", "train.eval_every": "2",
             "train.eval_batches": "1", "train.keep_checkpoints": "3"}
    if resume:
        extra["train.resume"] = "true"
    return ["soft", *soft_overrides(teacher_dir, student_dir, data, out, **extra)]


def test_soft_killed_at_five_moments_resumes_to_the_uninterrupted_student(teacher_dir, student_dir, text_file,
                                                                          tmp_path):
    rng = random.Random(8)  # the seeded choice of the random moments
    ref, run = tmp_path / "ref", tmp_path / "run"

    def argv(resume: bool) -> list[str]:
        return soft_argv(teacher_dir, student_dir, text_file, run, resume)

    random_moment = rng.randint(1, 3)  # killed once this life has logged this many steps (mid-way into the next)
    lives = [
        {"argv": soft_argv(teacher_dir, student_dir, text_file, ref, False)},
        # 1: the step-4 checkpoint is complete under its temporary name, the rename never happens
        {"argv": argv(False), "kill": {"kind": "before_rename", "match": ".tmp-step-00000004"}},
        # 2: at a seeded-random moment of training, from outside
        {"argv": argv(True), "kill": {"kind": "external", "watch": str(run / "log.jsonl"),
                                      "count": "train_log_rows", "after": random_moment}},
        # 3: the final checkpoint's optimizer file is half on disk
        {"argv": argv(True), "kill": {"kind": "half_written",
                                      "match": f".tmp-step-{SOFT_STEPS:08d}/optimizer-student.pt"}},
        # 4: while the final student is being saved (after its last checkpoint)
        {"argv": argv(True), "kill": {"kind": "during_student_save", "match": ".tmp-student"}},
        # 5: runs to the end
        {"argv": argv(True)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0}
    assert results[1:5] == [{"signal": signal.SIGKILL}] * 4, results
    assert results[5] == {"exit": 0}, results
    said = outputs(tmp_path, len(lives))
    # The complete-but-unrenamed step-4 and the half-written step-6 are both skipped, and the user is told.
    assert "ignoring half-written checkpoint" in said[2] and ".tmp-step-00000004" in said[2], said[2][-2000:]
    assert "ignoring half-written checkpoint" in said[4] and ".tmp-step-00000006" in said[4], said[4][-2000:]
    assert "resumed from step 4" in said[4]

    assert_bitwise(weights(ref / "student" / "model.safetensors"), weights(run / "student" / "model.safetensors"))
    ref_rows, run_rows = read_log(ref / "log.jsonl"), read_log(run / "log.jsonl")
    assert [r["step"] for r in run_rows if "loss" in r] == list(range(1, SOFT_STEPS + 1))
    assert [r["loss"] for r in run_rows if "loss" in r] == [r["loss"] for r in ref_rows if "loss" in r]
    ref_eval = [r for r in ref_rows if "eval/kl_to_teacher" in r]
    run_eval = [r for r in run_rows if "eval/kl_to_teacher" in r]
    assert [(r["step"], r["eval/kl_to_teacher"]) for r in run_eval] == [
        (r["step"], r["eval/kl_to_teacher"]) for r in ref_eval]
    assert json.loads((run / "summary.json").read_text())["final_train_loss"] == json.loads(
        (ref / "summary.json").read_text())["final_train_loss"]
    # What the kills left behind is never taken for a checkpoint, and the final one equals the reference's.
    complete = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert complete[-1] == f"step-{SOFT_STEPS:08d}"
    assert_bitwise(weights(ref / "checkpoints" / complete[-1] / "model-student.safetensors"),
                   weights(run / "checkpoints" / complete[-1] / "model-student.safetensors"))
    assert not (run / ".tmp-student").exists()


def test_half_written_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
    """What life 3 above leaves, checked directly: resume picks the newest *complete* checkpoint and says why."""
    from lmdistill.train.checkpoint import CheckpointManager

    root = tmp_path / "checkpoints"
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / "state.json").write_text("{}")
    (root / ".tmp-step-00000004").mkdir()
    (root / ".tmp-step-00000004" / "model-student.safetensors").write_bytes(b"\0" * 10)
    with caplog.at_level("WARNING"):
        latest = CheckpointManager(tmp_path).latest()
    assert latest == root / "step-00000002"
    assert "ignoring half-written checkpoint" in caplog.text and ".tmp-step-00000004" in caplog.text


def _stopped_at(said: str) -> int:
    """The step an on-purpose stop reports (`stopped by SIGTERM after step N of M`)."""
    import re

    found = re.search(r"stopped by SIG(?:TERM|INT) after step (\d+) of", said)
    assert found, said[-2000:]
    return int(found.group(1))


def test_soft_stopped_by_sigterm_and_sigint_loses_no_step_and_resumes_bitwise(teacher_dir, student_dir, text_file,
                                                                              tmp_path):
    """SIGTERM and SIGINT at seeded moments finish the step, checkpoint it, print the resume command and exit
    143 / 130; a second SIGTERM while saving stops at once; a torn file inside a renamed (complete-looking) newest
    checkpoint is reported and the previous one used. The run still ends bitwise-equal to an uninterrupted one."""
    rng = random.Random(21)
    ref, run = tmp_path / "ref", tmp_path / "run"

    def argv(resume: bool) -> list[str]:
        return soft_argv(teacher_dir, student_dir, text_file, run, resume)

    watch = {"kind": "external", "watch": str(run / "log.jsonl"), "count": "train_log_rows"}
    lives = [
        {"argv": soft_argv(teacher_dir, student_dir, text_file, ref, False)},
        {"argv": argv(False), "kill": {**watch, "signal": "SIGTERM", "after": rng.randint(1, 2)}},
        {"argv": argv(True), "kill": {**watch, "signal": "SIGINT", "after": 1}},
        {"argv": argv(True), "kill": {"kind": "signal_twice", "match": "1"}},
        {"argv": argv(True), "kill": {"kind": "torn_after_rename",
                                      "match": f".tmp-step-{SOFT_STEPS:08d}:model-student.safetensors"}},
        {"argv": argv(True)},
    ]
    results = run_plan(tmp_path, lives)
    said = outputs(tmp_path, len(lives))
    assert results == [{"exit": 0}, {"exit": 143}, {"exit": 130}, {"signal": signal.SIGTERM},
                       {"signal": signal.SIGKILL}, {"exit": 0}], (results, [t[-1500:] for t in said])
    first, second = _stopped_at(said[1]), _stopped_at(said[2])
    assert 1 <= first < second < SOFT_STEPS, (first, second)
    for text, step in ((said[1], first), (said[2], second)):
        assert f"step-{step:08d}" in text  # the checkpoint written at the step reached
        assert "Resume with:" in text and "lmdistill soft" in text and "--train.resume true" in text
    assert text.count("--train.resume") == 1  # the printed command sets it once, not twice
    # Each stop's checkpoint is where the next life starts: no finished step was lost.
    assert f"resumed from step {first} " in said[2], said[2][-2000:]
    assert f"resumed from step {second} " in said[3], said[3][-2000:]
    # The second SIGTERM, as the checkpoint was about to be written, stopped the process at once: nothing of that
    # life was kept, the next one starts where the last stop left the run.
    assert "finishing the optimizer step in flight" in said[3] and "again to stop at once" in said[3]
    assert f"resumed from step {second} " in said[4], said[4][-2000:]
    assert f"checkpoint {run / 'checkpoints' / f'step-{SOFT_STEPS:08d}'} is damaged" in said[5], said[5][-2000:]
    assert "model-student.safetensors` does not match its checksum" in said[5]

    assert_bitwise(weights(ref / "student" / "model.safetensors"), weights(run / "student" / "model.safetensors"))
    ref_rows, run_rows = read_log(ref / "log.jsonl"), read_log(run / "log.jsonl")
    assert [r["step"] for r in run_rows if "loss" in r] == list(range(1, SOFT_STEPS + 1))
    assert [r["loss"] for r in run_rows if "loss" in r] == [r["loss"] for r in ref_rows if "loss" in r]
    assert_bitwise(weights(ref / "checkpoints" / f"step-{SOFT_STEPS:08d}" / "model-student.safetensors"),
                   weights(run / "checkpoints" / f"step-{SOFT_STEPS:08d}" / "model-student.safetensors"))


# ------------------------------------------------------------------------------------------------ hard (token mode)

def test_hard_token_mode_killed_three_times_resumes_bitwise(teacher_dir, student_dir, text_file, tmp_path):
    rng = random.Random(11)
    ref, run = tmp_path / "ref", tmp_path / "run"
    extra = {"mode": "token", "train.max_steps": "4", "train.save_every": "2", "loss.alpha": "0.7",
             "data.eval_documents": "20", "train.eval_every": "2", "train.eval_batches": "1",
             "train.micro_batch_size": "2"}

    def argv(out: Path, resume: bool) -> list[str]:
        return ["hard", *soft_overrides(teacher_dir, student_dir, text_file, out,
                                        **extra, **({"train.resume": "true"} if resume else {}))]

    lives = [
        {"argv": argv(ref, False)},
        # killed before any checkpoint is complete: the resumed run must start afresh, log included
        {"argv": argv(run, False), "kill": {"kind": "before_rename", "match": ".tmp-step-00000002"}},
        {"argv": argv(run, True), "kill": {"kind": "external", "watch": str(run / "log.jsonl"),
                                            "count": "train_log_rows", "after": rng.randint(1, 3)}},
        {"argv": argv(run, True), "kill": {"kind": "half_written", "match": ".tmp-step-00000004/optimizer-"}},
        {"argv": argv(run, True)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0} and results[-1] == {"exit": 0}, results
    assert results[1] == {"signal": signal.SIGKILL} and results[3] == {"signal": signal.SIGKILL}, results
    assert_bitwise(weights(ref / "student" / "model.safetensors"), weights(run / "student" / "model.safetensors"))
    assert [stable(r) for r in read_log(run / "log.jsonl")] == [stable(r) for r in read_log(ref / "log.jsonl")]


def stable(row: dict) -> dict:
    """A log row without its wall-clock fields (they differ between any two runs)."""
    return {k: v for k, v in row.items() if k != "time" and not k.endswith("per_s")}


# ------------------------------------------------------------------------------------------------ codistill

CODISTILL = {"teacher.arch": "{model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2}",
             "student.arch": "{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1}",
             "data.block_size": "32", "data.eval_documents": "20", "train.max_steps": "4", "train.save_every": "2",
             "train.micro_batch_size": "2", "train.lr": "3e-3", "train.warmup_steps": "1", "train.eval_every": "2",
             "train.eval_batches": "1", "train.progress": "false", "loss.weight.schedule": "linear"}


def test_codistill_killed_three_times_resumes_both_models_bitwise(tokenizer_dir, text_file, tmp_path):
    rng = random.Random(12)
    ref, run = tmp_path / "ref", tmp_path / "run"

    def argv(out: Path, resume: bool) -> list[str]:
        args = {"tokenizer": str(tokenizer_dir), "data.source": str(text_file), "train.output_dir": str(out),
                **CODISTILL, **({"train.resume": "true"} if resume else {})}
        return ["codistill", *[x for k, v in args.items() for x in (f"--{k}", v)]]

    lives = [
        {"argv": argv(ref, False)},
        {"argv": argv(run, False), "kill": {"kind": "before_rename", "match": ".tmp-step-00000002"}},
        {"argv": argv(run, True), "kill": {"kind": "external", "watch": str(run / "log.jsonl"),
                                            "count": "log_rows_with:ce_student", "after": rng.randint(1, 3)}},
        {"argv": argv(run, True), "kill": {"kind": "during_student_save", "match": ".tmp-student"}},
        {"argv": argv(run, True)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0} and results[-1] == {"exit": 0}, results
    assert results[1:4] == [{"signal": signal.SIGKILL}] * 3, results
    for model in ("student", "teacher"):
        assert_bitwise(weights(ref / model / "model.safetensors"), weights(run / model / "model.safetensors"))
    ref_rows, run_rows = read_log(ref / "log.jsonl"), read_log(run / "log.jsonl")
    assert [stable(r) for r in run_rows] == [stable(r) for r in ref_rows]
    ref_final = json.loads((ref / "summary.json").read_text())["final"]
    run_final = json.loads((run / "summary.json").read_text())["final"]
    assert stable(run_final) == stable(ref_final)


# ------------------------------------------------------------------------------------------------ label

def test_label_killed_at_three_moments_gives_the_same_cache_bytes(teacher_dir, text_file, tmp_path):
    import hashlib

    rng = random.Random(13)
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = {"teacher.name_or_path": str(teacher_dir), "data.source": str(text_file), "data.block_size": "16",
              "data.max_documents": "24", "data.eval_documents": "6", "cache.encoding": "sampled",
              "cache.draws": "16", "cache.shard_blocks": "8", "cache.batch_size": "4", "progress": "false"}

    def argv(out: Path) -> list[str]:
        return ["label", *[x for k, v in {**common, "cache.output_dir": str(out)}.items() for x in (f"--{k}", v)]]

    lives = [
        {"argv": argv(ref)},
        {"argv": argv(run), "kill": {"kind": "before_rename", "match": ".shard-00002.safetensors.tmp"}},
        {"argv": argv(run), "kill": {"kind": "external", "watch": str(run), "count": "files:train/shard-*",
                                     "after": rng.randint(4, 6)}},
        {"argv": argv(run), "kill": {"kind": "before_rename", "match": ".manifest.json.tmp"}},
        {"argv": argv(run)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0} and results[-1] == {"exit": 0}, results
    assert results[1] == {"signal": signal.SIGKILL} and results[3] == {"signal": signal.SIGKILL}, results

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    ref_files = digests(ref)
    assert len([f for f in ref_files if f.startswith("train/shard-")]) >= 6
    assert digests(run) == ref_files  # every shard, journal and the manifest, byte for byte; no temporaries left


# ------------------------------------------------------------------------------------------------ generate

def test_generate_killed_mid_record_and_mid_filter_ends_with_the_same_records(teacher_dir, tmp_path):
    rng = random.Random(14)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about the river number {i}."})
                               + "\n" for i in range(10)))
    ref, run = tmp_path / "ref" / "out.jsonl", tmp_path / "run" / "out.jsonl"

    def argv(out: Path) -> list[str]:
        args = {"teacher.backend": "hf", "teacher.model.name_or_path": str(teacher_dir), "teacher.device": "cpu",
                "teacher.batch_size": "2", "sampling.temperature": "0", "sampling.max_new_tokens": "6",
                "prompts.source": str(prompts), "output": str(out), "progress": "false",
                "filters.drop_truncated": "false", "filters.dedup": "none"}
        return ["generate", *[x for k, v in args.items() for x in (f"--{k}", v)]]

    lives = [
        {"argv": argv(ref)},
        {"argv": argv(run), "kill": {"kind": "torn_append", "match": "2"}},  # the 2nd batch's records are torn
        {"argv": argv(run), "kill": {"kind": "external", "watch": str(run), "count": "lines",
                                     "after": rng.randint(5, 8)}},
        {"argv": argv(run), "kill": {"kind": "before_rename", "match": ".out.filtered.jsonl.tmp"}},
        {"argv": argv(run)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0} and results[-1] == {"exit": 0}, results
    assert results[1] == {"signal": signal.SIGKILL} and results[3] == {"signal": signal.SIGKILL}, results

    volatile = ("seconds", "created", "attempts")

    def records(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in volatile}
                for line in path.read_text().splitlines()]

    assert len(records(ref)) == 10
    assert records(run) == records(ref)  # each id once, same order, same greedy text
    filtered = ref.with_name("out.filtered.jsonl")
    assert records(run.with_name("out.filtered.jsonl")) == records(filtered)
    assert not list(run.parent.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------------ onpolicy


def test_onpolicy_killed_in_a_rollout_a_teacher_call_and_an_update_resumes_bitwise(teacher_dir, student_dir,
                                                                                   chat_file, tmp_path):
    """A resumed on-policy run samples exactly the completions the interrupted one would have (each is a function of
    the seed, the prompt, the step and its index), so it ends where an uninterrupted run ends."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = {"teacher.name_or_path": str(teacher_dir), "student.init": "pretrained",
              "student.name_or_path": str(student_dir), "data.source": str(chat_file), "data.stage": "chat",
              "data.prompt_column": "null", "data.completion_column": "null", "data.block_size": "48",
              "data.eval_documents": "4", "signal": "topk", "k": "4", "rollout.n": "2",
              "rollout.max_new_tokens": "12", "train.max_steps": "6", "train.save_every": "1",
              "train.eval_every": "2", "train.eval_batches": "1", "train.micro_batch_size": "2", "train.lr": "3e-3",
              "train.warmup_steps": "1", "train.progress": "false"}

    def argv(out: Path, resume: bool) -> list[str]:
        args = {**common, "train.output_dir": str(out), **({"train.resume": "true"} if resume else {})}
        return ["onpolicy", *[x for k, v in args.items() for x in (f"--{k}", v)]]

    at = "lmdistill.recipes.onpolicy:"
    lives = [
        {"argv": argv(ref, False)},
        {"argv": argv(run, False), "kill": {"kind": "nth_call", "match": "lmdistill.rollout:sample_completions:2"}},
        {"argv": argv(run, True), "kill": {"kind": "nth_call", "match": at + "topk_targets:2"}},
        {"argv": argv(run, True), "kill": {"kind": "nth_call", "match": at + "distill_loss:1"}},
        {"argv": argv(run, True)},
    ]
    results = run_plan(tmp_path, lives)
    assert results[0] == {"exit": 0} and results[-1] == {"exit": 0}, (results, outputs(tmp_path, len(lives)))
    assert results[1:4] == [{"signal": signal.SIGKILL}] * 3, results
    assert_bitwise(weights(ref / "student" / "model.safetensors"), weights(run / "student" / "model.safetensors"))
    assert [stable(r) for r in read_log(run / "log.jsonl")] == [stable(r) for r in read_log(ref / "log.jsonl")]


# ------------------------------------------------------------------------------------------------ stopped on purpose

def test_label_and_generate_stopped_by_signals_finish_the_work_in_flight(teacher_dir, text_file, tmp_path):
    """`label` stopped by SIGTERM keeps the shard in flight and exits 143; `generate` stopped by SIGINT writes the
    records in flight and exits 130; rerunning each ends with exactly what an uninterrupted run writes."""
    import hashlib

    rng = random.Random(22)
    common = {"teacher.name_or_path": str(teacher_dir), "data.source": str(text_file), "data.block_size": "16",
              "data.max_documents": "24", "data.eval_documents": "6", "cache.encoding": "topk", "cache.k": "4",
              "cache.shard_blocks": "4", "cache.batch_size": "4", "progress": "false"}

    def label(out: Path) -> list[str]:
        return ["label", *[x for k, v in {**common, "cache.output_dir": str(out)}.items() for x in (f"--{k}", v)]]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Tell me about the lake number {i}."})
                               + "\n" for i in range(8)))

    def generate(out: Path) -> list[str]:
        args = {"teacher.backend": "hf", "teacher.model.name_or_path": str(teacher_dir), "teacher.device": "cpu",
                "teacher.batch_size": "1", "sampling.temperature": "0", "sampling.max_new_tokens": "6",
                "prompts.source": str(prompts), "output": str(out), "progress": "false"}
        return ["generate", *[x for k, v in args.items() for x in (f"--{k}", v)]]

    cache_ref, cache_run = tmp_path / "cache-ref", tmp_path / "cache-run"
    gen_ref, gen_run = tmp_path / "gen-ref" / "out.jsonl", tmp_path / "gen-run" / "out.jsonl"
    lives = [
        {"argv": label(cache_ref)},
        {"argv": label(cache_run), "kill": {"kind": "external", "watch": str(cache_run), "signal": "SIGTERM",
                                            "count": "files:train/shard-*", "after": rng.randint(1, 3)}},
        {"argv": label(cache_run)},
        {"argv": generate(gen_ref)},
        {"argv": generate(gen_run), "kill": {"kind": "external", "watch": str(gen_run), "signal": "SIGINT",
                                             "count": "lines", "after": rng.randint(2, 4)}},
        {"argv": generate(gen_run)},
    ]
    results = run_plan(tmp_path, lives)
    said = outputs(tmp_path, len(lives))
    assert results == [{"exit": 0}, {"exit": 143}, {"exit": 0}, {"exit": 0}, {"exit": 130}, {"exit": 0}], (
        results, [t[-1500:] for t in said])
    assert "stopped by SIGTERM" in said[1] and "Resume with the same command" in said[1], said[1][-2000:]
    assert "lmdistill label" in said[1]
    assert "stopped by SIGINT" in said[4] and "lmdistill generate" in said[4], said[4][-2000:]

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digests(cache_run) == digests(cache_ref)
    volatile = ("seconds", "created", "attempts")

    def records(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k not in volatile}
                for line in path.read_text().splitlines()]

    assert len(records(gen_ref)) == 8
    assert records(gen_run.with_name("out.filtered.jsonl")) == records(gen_ref.with_name("out.filtered.jsonl"))
    assert sorted(r["id"] for r in records(gen_run)) == sorted(r["id"] for r in records(gen_ref))
