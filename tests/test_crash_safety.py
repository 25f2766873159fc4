"""kill -9 at chosen and at seeded-random moments; the rerun (`--train.resume true`, or the same command) finishes
with exactly what an uninterrupted run produces.

To keep this fast, one driver process (this file run as a script) imports lmdistill once and forks a child per
"life" of a run; each child runs the real CLI (`lmdistill.cli.run`) and dies by a real SIGKILL:
- at a chosen instant, from inside: just before a finished temporary checkpoint is renamed into place, or after
  half of a checkpoint file's bytes are on disk (`self-kill` points, found by wrapping the writer function);
- at a seeded-random moment, from outside: the driver watches the run's own output (log lines, records) and sends
  SIGKILL once a seeded-random count has appeared, wherever the child happens to be by then.
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
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if match in str(src):
                _self_kill()
            return real_rename(src, dst, *a, **k)

        os.rename = rename
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
    else:
        raise ValueError(kind)


def _count(path: Path, what: str) -> int:
    if not path.exists():
        return 0
    if what == "train_log_rows":
        return sum(1 for r in read_log(path) if "loss" in r)
    return sum(1 for line in path.read_text(errors="replace").splitlines() if line.strip())


def _live(life: dict) -> dict:
    """Fork a child that runs the CLI with `life["argv"]`; kill it as `life["kill"]` says; report how it ended."""
    kill = life.get("kill") or {}
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            if kill.get("kind") in ("before_rename", "half_written", "during_student_save"):
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
            if _count(watch, kill["count"]) >= n:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    if waited_for is None:
        _, waited_for = os.waitpid(pid, 0)
    if os.WIFSIGNALED(waited_for):
        return {"signal": os.WTERMSIG(waited_for)}
    return {"exit": os.WEXITSTATUS(waited_for)}


def drive(plan_path: str) -> None:
    # Imports happen here, once, before any fork; no tensor op runs in the parent (forking after OpenMP started
    # is not safe), every child sets its own threads.
    import lmdistill.cli  # noqa: F401

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
    plan = {"lives": lives, "results": str(tmp / "results.json")}
    (tmp / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, str(tmp / "plan.json")], capture_output=True, text=True,
                          env=env, timeout=600, cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
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

    random_moment = rng.randint(3, 5)  # killed once this many training log rows exist (mid-way into the next step)
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
