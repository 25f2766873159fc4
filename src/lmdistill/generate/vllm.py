"""vLLM in-process teacher (optional: `pip install vllm`, GPU). Not exercised by the test suite; the HTTP route to a
vLLM server (`vllm serve`, then teacher.backend=openai) is the tested way to use vLLM."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from lmdistill.errors import ConfigError
from lmdistill.generate.base import Completion, Job, JobResult
from lmdistill.generate.config import SamplingConfig, TeacherBackendConfig

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMBackend:
    """`generate` backend on `vllm.LLM`. Jobs go to vLLM `batch_size` prompts at a time (vLLM schedules within a call,
    so use hundreds); results are written after each call."""

    def __init__(self, cfg: TeacherBackendConfig) -> None:
        try:
            import vllm
        except ImportError:
            raise ConfigError(
                "teacher.backend=vllm needs vLLM installed (`pip install vllm`, on a CUDA machine); or run `vllm serve` "
                "and use teacher.backend=openai"
            ) from None
        from lmdistill.models import resolve_model_path

        self._vllm = vllm
        self.cfg = cfg
        self.llm = vllm.LLM(
            model=resolve_model_path(cfg.model.name_or_path),
            revision=cfg.model.revision,
            dtype=_DTYPES[cfg.model.dtype],
            trust_remote_code=cfg.model.trust_remote_code,
        )

    def teacher_info(self) -> dict[str, Any]:
        return {"backend": "vllm", "model": self.cfg.model.name_or_path, "revision": self.cfg.model.revision}

    def generate(self, jobs: Sequence[Job], sampling: SamplingConfig) -> Iterator[JobResult]:
        groups: dict[int, list[Job]] = {}
        for job in jobs:
            groups.setdefault(len(job.samples), []).append(job)
        k = sampling.top_logprobs
        for n, group in groups.items():
            params = self._vllm.SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.seed,
                stop=list(sampling.stop) or None,
                logprobs=k if sampling.logprobs else None,
            )
            for start in range(0, len(group), self.cfg.batch_size):
                batch = group[start : start + self.cfg.batch_size]
                t0 = time.perf_counter()
                if self.cfg.api == "chat":
                    outputs = self.llm.chat([job.prompt.messages for job in batch], params, use_tqdm=False)
                else:
                    outputs = self.llm.generate([job.prompt.text for job in batch], params, use_tqdm=False)
                share = (time.perf_counter() - t0) / len(batch)
                for job, output in zip(batch, outputs, strict=True):
                    completions = [
                        Completion(
                            text=o.text,
                            finish_reason=str(o.finish_reason or "unknown"),
                            prompt_tokens=len(output.prompt_token_ids or []),
                            completion_tokens=len(o.token_ids),
                            logprobs=_logprobs(o, k) if sampling.logprobs else None,
                        )
                        for o in output.outputs
                    ]
                    yield JobResult(job=job, completions=completions, seconds=share)

    def close(self) -> None:
        pass


def _logprobs(output: Any, k: int) -> list[dict[str, Any]] | None:
    if output.logprobs is None:
        return None
    entries = []
    for token_id, by_id in zip(output.token_ids, output.logprobs, strict=False):
        chosen = by_id[token_id]
        # vLLM returns the top k plus the sampled token when it is outside them; rank is 1-based.
        tops = sorted((lp.rank, i, lp) for i, lp in by_id.items() if lp.rank is not None and lp.rank <= k)
        entries.append(
            {
                "token": chosen.decoded_token,
                "id": token_id,
                "logprob": chosen.logprob,
                "top_logprobs": [{"token": lp.decoded_token, "id": i, "logprob": lp.logprob} for _, i, lp in tops],
            }
        )
    return entries
