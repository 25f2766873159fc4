"""Errors a user can cause. The CLI prints their message alone (no traceback) and exits non-zero."""

from __future__ import annotations


class LmdistillError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code: int = 2


class ConfigError(LmdistillError):
    """A config file or a command-line override is invalid."""


class DataError(LmdistillError):
    """A dataset is missing, empty, malformed or lacks a needed column."""


class ModelLoadError(LmdistillError):
    """A model or tokenizer could not be found or loaded."""


class VocabMismatchError(LmdistillError):
    """Teacher and student tokenizers differ, so their distributions cannot be compared position by position."""


class CheckpointError(LmdistillError):
    """A checkpoint is missing, incomplete or from an incompatible version."""


class CacheError(LmdistillError):
    """A soft-label cache is corrupt, truncated or does not match the student's data/tokenizer/settings."""


class AssetError(LmdistillError):
    """The embedded default (teacher GGUF, Wikipedia text) is not installed."""


class TeacherAPIError(LmdistillError):
    """An OpenAI-compatible teacher endpoint is unreachable or refused the request.

    `status` is the HTTP status of the last reply (None: no reply), `transport` whether the connection itself failed,
    `attempts` and `last` how many tries were made and what the last one said (set once retries are exhausted).
    """

    status: int | None = None
    transport: bool = False
    attempts: int = 0
    last: str = ""


class TeacherUnavailableError(TeacherAPIError):
    """The teacher server stayed unreachable (or kept failing) past its retries in the middle of a training run."""


class NonFiniteError(LmdistillError):
    """A model produced NaN or inf (teacher outputs, or a diverged training loss)."""


class OutputWriteError(LmdistillError):
    """An output (checkpoint, student, summary, log) could not be written: disk full, quota, permissions."""


def write_failure(what: str, path: object, err: BaseException) -> OutputWriteError:
    """One message for any failed write. Writers raise different types for a full disk (OSError ENOSPC/EFBIG,
    safetensors' SafetensorError, torch.save's RuntimeError), so the cause is quoted and the likely fix named."""
    cause = f"{type(err).__name__}: {err}".strip()
    return OutputWriteError(
        f"could not write the {what} `{path}` ({cause}). The disk may be full or over quota, or the directory not "
        "writable: free space (df -h) or point the output elsewhere, then rerun (training runs: add "
        "--train.resume true to continue from the newest complete checkpoint). Nothing half-written was kept."
    )


class Interrupted(LmdistillError):
    """The run was stopped on purpose (SIGTERM: exit 143, SIGINT/Ctrl-C: exit 130) after finishing the work in
    flight; the message says what was kept and how to resume."""

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)

    def __reduce__(self) -> tuple[type[Interrupted], tuple[str, int]]:  # survives pickling (child processes)
        return (Interrupted, (str(self), self.signum))
