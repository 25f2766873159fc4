"""Configs of `lmdistill generate` (teacher completions for sequence-level distillation) and `lmdistill serve`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmdistill.config import BaseConfig, ModelConfig, SourceConfig


class TeacherBackendConfig(BaseConfig):
    """Which teacher writes the completions, and how it is reached."""

    backend: Literal["hf", "openai", "vllm"] = Field(
        "hf",
        description="`hf`: a local Hugging Face model (batched generate); `openai`: any OpenAI-compatible HTTP "
        "endpoint (hosted APIs, `lmdistill serve`, vLLM's server, Ollama, llama.cpp); `vllm`: vLLM in-process "
        "(needs `pip install vllm`).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="backend=hf/vllm: the local teacher model.")
    api: Literal["chat", "completions"] = Field(
        "chat",
        description="`chat`: prompts are conversations rendered with the teacher's chat template (/v1/chat/completions);"
        " `completions`: the raw prompt text is continued (/v1/completions).",
    )
    batch_size: int = Field(8, ge=1, description="backend=hf: prompts per generate call.")
    device: str = Field("auto", description="backend=hf: `auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ...")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="backend=openai: the endpoint, ending in /v1.")
    api_model: str | None = Field(
        None, description="backend=openai: the model name the endpoint serves (required for backend=openai)."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="backend=openai: name of the environment variable holding the API key (the key itself never "
        "goes in a config, a log or an output file).",
    )
    api_key_file: str | None = Field(
        None, description="backend=openai: a file whose first line is the API key (used when set; wins over the env var)."
    )
    concurrency: int = Field(8, ge=1, description="backend=openai: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="backend=openai: seconds one request may take before a retry.")
    max_retries: int = Field(
        8, ge=0, description="backend=openai: retries of one request on 408/409/429/5xx, timeouts, dropped connections "
        "and malformed replies, all together.",
    )
    backoff_base_s: float = Field(
        1.0, gt=0, description="backend=openai: first retry waits about this long, doubling each time (with jitter)."
    )
    backoff_max_s: float = Field(
        60.0, gt=0, description="backend=openai: cap of one backoff wait. A server's Retry-After wins; one over two "
        "minutes is not waited for (the openai client's rule): the prompt fails, and a rerun resumes.",
    )

    @model_validator(mode="after")
    def _needs_api_model(self) -> TeacherBackendConfig:
        if self.backend == "openai" and not self.api_model:
            raise ValueError(
                "teacher.backend=openai needs teacher.api_model, the model name the endpoint serves "
                "(see GET <base_url>/models)"
            )
        return self


class SamplingConfig(BaseConfig):
    """How the teacher samples. Recorded with every completion."""

    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, description="Longest completion in tokens.")
    n: int = Field(1, ge=1, description="Completions per prompt (one output record each).")
    seed: int | None = Field(0, description="Sampling seed (null: not seeded). Endpoints may ignore it.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (not included in it).")
    logprobs: bool = Field(False, description="Store per-token log-probs of each completion (soft labels from text).")
    top_logprobs: int = Field(
        0, ge=0, le=20, description="With logprobs: also store the k most likely tokens at each position (max 20)."
    )

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> SamplingConfig:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("sampling.top_logprobs > 0 needs sampling.logprobs=true")
        return self


class PromptsConfig(SourceConfig):
    """Where prompts come from."""

    source: str = Field(
        "embedded:wikipedia-questions",
        description="A local .jsonl/.json/.parquet/.csv file, a directory of them, a hub dataset name, or "
        "`embedded:wikipedia-questions` (questions about the offline Wikipedia summaries, extract as reference).",
    )
    prompt_column: str = Field("prompt", description="Column with the prompt text (used when no messages column).")
    messages_column: str = Field("messages", description="Column with a list of {role, content} (wins when present).")
    id_column: str = Field(
        "id", description="Column with a unique prompt id; when absent the id is a hash of the prompt (duplicates merge)."
    )
    reference_column: str = Field(
        "reference", description="Column with a reference answer, copied into records for the verifier (optional)."
    )
    system_prompt: str | None = Field(None, description="A system message put before every prompt that has none.")
    max_prompts: int | None = Field(None, ge=1, description="Use only the first N prompts.")


class FilterConfig(BaseConfig):
    """Post-processing of the raw completions into the filtered file (the raw file is kept unchanged)."""

    think: Literal["keep", "strip"] = Field(
        "keep", description="`strip` removes <think>...</think> reasoning blocks from completions; `keep` leaves them."
    )
    drop_truncated: bool = Field(True, description="Drop completions cut off by max_new_tokens (finish_reason=length).")
    min_chars: int = Field(1, ge=0, description="Drop completions shorter than this (after think handling).")
    max_chars: int | None = Field(None, ge=1, description="Drop completions longer than this (after think handling).")
    dedup: Literal["none", "per_prompt", "global"] = Field(
        "per_prompt",
        description="Drop repeated completions (whitespace- and case-insensitive): among the samples of one prompt, "
        "or across the whole file.",
    )
    verifier: str | None = Field(
        None,
        description="Keep only completions whose answer matches the reference: `exact`, `numeric`, or a dotted path "
        "`package.module:function` / `package.module.function` taking (answer, reference) and returning bool.",
    )
    reference_field: str = Field("reference", description="Record field the verifier compares against.")


class GenerateConfig(BaseConfig):
    """`lmdistill generate`: teacher completions for sequence-level (hard-label) distillation, as resumable JSONL."""

    teacher: TeacherBackendConfig = Field(default_factory=TeacherBackendConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    prompts: PromptsConfig = Field(default_factory=PromptsConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    output: str = Field(
        "runs/generate/completions.jsonl",
        description="Raw records, appended per completion; rerunning skips finished (prompt id, sample) pairs. The "
        "filtered file is <stem>.filtered.jsonl and the filter report <stem>.summary.json beside it.",
    )
    overwrite: bool = Field(False, description="Delete an existing output file first instead of resuming it.")
    progress: bool = Field(True, description="Show a progress bar while generating.")


class ServeConfig(BaseConfig):
    """`lmdistill serve`: an OpenAI-compatible HTTP server around a local Hugging Face model."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to serve.")
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model` (default: the last path component of model.name_or_path)."
    )
    host: str = Field(
        "127.0.0.1", description="Interface to bind; 127.0.0.1 keeps it local, 0.0.0.0 exposes it (set a key then)."
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding a bearer token every request must send (none: no auth)."
    )
    api_key_file: str | None = Field(None, description="A file whose first line is the required bearer token.")
    device: str = Field("auto", description="`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ...")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens of a chat request that sets none.")
    max_new_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(16, ge=1, description="Largest n (completions per request) a request may ask for.")
    max_request_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body (bytes) the server reads; a larger one gets HTTP 413 "
        "before it is parsed, so one client cannot make the server buffer or tokenize an unbounded payload."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences (prompts x n) that concurrent requests share in one generate call; 1 "
        "runs requests one at a time."
    )
    batch_wait_ms: float = Field(
        10.0, ge=0.0, description="How long a batch waits for more requests after its first arrives (under load "
        "batches fill while the previous one runs, without waiting)."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="uvicorn log level."
    )
