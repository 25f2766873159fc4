"""The one interface every teacher backend implements, and the values that cross it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lmdistill.generate.config import SamplingConfig
from lmdistill.generate.prompts import Prompt


@dataclass
class Completion:
    """One sampled completion.

    `logprobs`, when requested, has one entry per completion token:
    `{"token": str, "id": int | None, "logprob": float, "top_logprobs": [{"token", "id", "logprob"}, ...]}`.
    Token ids are known for local models and for `lmdistill serve`; other endpoints send token strings only.
    """

    text: str
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Job:
    """A prompt and the sample indices still missing for it (all of 0..n-1 on a fresh run)."""

    prompt: Prompt
    samples: list[int]


@dataclass
class JobResult:
    """Completions for every index of `job.samples`, in that order."""

    job: Job
    completions: list[Completion]
    seconds: float
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """A teacher that turns prompts into completions.

    `generate` yields results as they finish (not necessarily in job order), so the caller can write each one
    durably before the next arrives. A backend that cannot finish a job raises `TeacherAPIError` after yielding
    everything it did finish.
    """

    def teacher_info(self) -> dict[str, Any]:
        """Provenance written into every record: backend, model, and where it was reached."""
        ...

    def generate(self, jobs: Sequence[Job], sampling: SamplingConfig) -> Iterator[JobResult]: ...

    def close(self) -> None: ...


def sampling_record(sampling: SamplingConfig) -> dict[str, Any]:
    """The sampling parameters as written into records (n is implicit in the sample index)."""
    return sampling.model_dump(mode="json", exclude={"n"})
