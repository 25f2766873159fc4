"""`lmdistill generate`: prompts -> teacher completions (raw JSONL, resumable) -> filtered JSONL + a filter report.

Read top to bottom: load prompts, open the output and see what is finished, ask the teacher for the rest (each record
is durable once written), then filter the whole raw file into a separate file. Filtering never touches the raw file,
so a rerun with other filter settings is exact and costs no teacher calls.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from lmdistill.errors import ConfigError, Interrupted, TeacherAPIError
from lmdistill.generate.base import Backend, Completion, Job, JobResult, sampling_record
from lmdistill.generate.config import GenerateConfig, TeacherBackendConfig
from lmdistill.generate.filters import filter_records
from lmdistill.generate.prompts import Prompt, load_prompts
from lmdistill.generate.store import JsonlStore, read_records
from lmdistill.io import StopFlag, resume_command, stop_on_signals, write_json, write_text
from lmdistill.train.logging import make_progress

log = logging.getLogger(__name__)


def output_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """(raw, filtered, summary) paths for an output file: `x.jsonl` -> `x.filtered.jsonl`, `x.summary.json`."""
    raw = Path(output)
    stem = raw.name.removesuffix(".jsonl")
    return raw, raw.with_name(f"{stem}.filtered.jsonl"), raw.with_name(f"{stem}.summary.json")


def make_backend(cfg: TeacherBackendConfig, seed: int | None = None) -> Backend:
    """The configured teacher; an HTTP teacher is checked for reachability and a valid key before any work."""
    if cfg.backend == "openai":
        from lmdistill.generate.openai_api import OpenAIBackend

        backend = OpenAIBackend(cfg, seed=seed)
        backend.check()
        return backend
    if cfg.backend == "vllm":
        from lmdistill.generate.vllm import VLLMBackend

        return VLLMBackend(cfg)
    from lmdistill.generate.hf import HFBackend

    return HFBackend.from_config(cfg)


def make_record(prompt: Prompt, sample: int, completion: Completion, result: JobResult, teacher: dict[str, Any],
                sampling: dict[str, Any]) -> dict[str, Any]:
    """One output line. `messages` is the prompt conversation plus the completion as the assistant turn (ready for
    chat-template SFT); raw-text prompts have `messages: null` and are trained on prompt + completion. `seconds` is
    the wall time of this prompt's request(s), retries included (HTTP), or its share of the batch (local)."""
    messages = None
    if prompt.messages is not None:
        messages = [*prompt.messages, {"role": "assistant", "content": completion.text}]
    record: dict[str, Any] = {
        "id": prompt.id,
        "sample": sample,
        "prompt": prompt.prompt,
        "messages": messages,
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "teacher": teacher,
        "sampling": sampling,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "seconds": round(result.seconds, 4),
        "attempts": result.attempts,
        "created": round(time.time(), 3),
    }
    if prompt.reference is not None:
        record["reference"] = prompt.reference
    if completion.logprobs is not None:
        record["logprobs"] = completion.logprobs
    return record


def _check_resumable(records: list[dict[str, Any]], teacher: dict[str, Any], sampling: dict[str, Any],
                     path: Path) -> None:
    """Refuse to mix teachers or sampling settings in one file (n may grow: that only adds sample indices)."""
    if not records:
        return
    first = records[0]
    old_teacher = {k: first.get("teacher", {}).get(k) for k in ("backend", "model")}
    new_teacher = {k: teacher.get(k) for k in ("backend", "model")}
    problems = []
    if old_teacher != new_teacher:
        problems.append(f"teacher {old_teacher} (this run: {new_teacher})")
    if first.get("sampling") != sampling:
        problems.append(f"sampling {first.get('sampling')} (this run: {sampling})")
    if problems:
        raise ConfigError(
            f"`{path}` already holds {len(records)} records written with " + " and ".join(problems) + ". Resuming "
            "would mix them: use a new output path, or overwrite=true to start over"
        )


def _jobs(prompts: list[Prompt], done: set[tuple[str, int]], n: int) -> list[Job]:
    jobs = []
    for prompt in prompts:
        missing = [i for i in range(n) if (prompt.id, i) not in done]
        if missing:
            jobs.append(Job(prompt=prompt, samples=missing))
    return jobs


class _JobFeed(Sequence[Job]):
    """The jobs, handed out lazily: once a stop is requested no new job is handed out, so a backend that takes jobs
    as it goes (HTTP) finishes and yields only the requests in flight. `drained` tells whether the backend had taken
    every job before the stop (local backends batch them all up front), in which case the caller stops itself."""

    def __init__(self, jobs: list[Job], stop: StopFlag) -> None:
        self.jobs, self.stop, self.drained = jobs, stop, False

    def __len__(self) -> int:
        return len(self.jobs)

    @overload
    def __getitem__(self, i: int) -> Job: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Job]: ...

    def __getitem__(self, i: int | slice) -> Job | Sequence[Job]:
        return self.jobs[i]

    def __iter__(self) -> Iterator[Job]:
        for job in self.jobs:
            if self.stop:
                return
            yield job
        self.drained = True


def run_generate(cfg: GenerateConfig, backend: Backend | None = None) -> dict[str, Any]:
    """Generate the missing completions, then filter (see `_run_generate`). A first SIGTERM/SIGINT finishes the
    records in flight, writes them and raises `Interrupted` (exit 143/130); a second one stops at once."""
    with stop_on_signals("records") as stop:
        return _run_generate(cfg, backend, stop)


def _run_generate(cfg: GenerateConfig, backend: Backend | None, stop: StopFlag) -> dict[str, Any]:
    """Generate the missing completions, then filter. Returns the summary that is also written to <stem>.summary.json.

    Args:
        cfg: the validated config.
        backend: a ready teacher (tests, or a caller reusing a loaded model); default: built from `cfg.teacher`.

    Raises:
        TeacherAPIError: an HTTP teacher is unreachable, refuses the key, or a prompt failed after all retries
            (everything finished before that is written; rerun the same command to resume).
    """
    raw_path, filtered_path, summary_path = output_paths(cfg.output)
    if raw_path.suffix != ".jsonl":
        raise ConfigError(f"output `{raw_path}` must end in .jsonl")
    prompts = load_prompts(cfg.prompts, cfg.teacher.api)
    n = cfg.sampling.n
    with JsonlStore(raw_path) as store:
        existing = store.open(overwrite=cfg.overwrite)
        done = {(str(r.get("id")), int(r.get("sample", 0))) for r in existing}
        jobs = _jobs(prompts, done, n)
        todo = sum(len(j.samples) for j in jobs)
        if cfg.progress:
            print(f"generate: {len(prompts)} prompts x {n} samples: {len(prompts) * n - todo} in `{raw_path}` already, "
                  f"{todo} to generate", file=sys.stderr, flush=True)
        generated, t0 = 0, time.perf_counter()
        if jobs:
            backend = backend or make_backend(cfg.teacher, seed=cfg.sampling.seed)
            teacher, sampling = backend.teacher_info(), sampling_record(cfg.sampling)
            _check_resumable(existing, teacher, sampling, raw_path)
            try:
                with make_progress(cfg.progress) as progress:
                    task = progress.add_task("generate", total=todo, stats="")
                    feed = _JobFeed(jobs, stop)
                    for result in backend.generate(feed, cfg.sampling):
                        store.append(
                            [
                                make_record(result.job.prompt, sample, completion, result, teacher, sampling)
                                for sample, completion in zip(result.job.samples, result.completions, strict=True)
                            ]
                        )
                        generated += len(result.completions)
                        per_s = generated / max(time.perf_counter() - t0, 1e-9)
                        progress.update(task, advance=len(result.completions), stats=f"{per_s:.2f} samples/s")
                        if stop and feed.drained:  # the backend took every job at once: stop after this record
                            break
            except TeacherAPIError as e:
                raise TeacherAPIError(
                    f"{e}\n{generated} new samples were written to `{raw_path}` before this; rerun the same command "
                    "to resume (finished prompts are skipped)"
                ) from None
            finally:
                backend.close()
            if stop:
                raise Interrupted(
                    f"stopped by {stop.name}: {generated} new samples were written to `{raw_path}` (no filtered file "
                    f"yet). Resume with the same command (finished prompts are skipped):\n  {resume_command()}",
                    stop.signum or 15)
    seconds = time.perf_counter() - t0
    records, _ = read_records(raw_path)
    # The filtered file follows prompt order, so it does not depend on which request happened to finish first.
    order = {p.id: i for i, p in enumerate(prompts)}
    records.sort(key=lambda r: (order.get(str(r.get("id")), len(order)), int(r.get("sample", 0))))
    kept, report = filter_records(records, cfg.filters)
    write_text(filtered_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), "filtered samples")
    missing = len(_jobs(prompts, {(str(r.get("id")), int(r.get("sample", 0))) for r in records}, n))
    summary = {
        "output": str(raw_path),
        "filtered_output": str(filtered_path),
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "records": len(records),
        "prompts_incomplete": missing,
        "generated_this_run": generated,
        "seconds": round(seconds, 3),
        "samples_per_second": round(generated / seconds, 3) if generated and seconds > 0 else None,
        "filters": report.as_dict(),
    }
    write_json(summary_path, summary, "generate summary")
    rate = f" ({summary['samples_per_second']} samples/s)" if generated else ""
    print(f"generate: {generated} new samples in {seconds:.1f}s{rate}; {len(records)} in `{raw_path}`")
    for line in report.lines():
        print(f"generate: {line}")
    print(f"generate: kept samples -> `{filtered_path}`, report -> `{summary_path}`")
    return summary
