"""OpenAI-compatible HTTP teacher (hosted APIs, `lmdistill serve`, vLLM's server, Ollama, llama.cpp's server).

Requests run in a thread pool of `concurrency` workers with the official `openai` client, whose own retries handle
HTTP: a 408/409/429/5xx reply, a timeout or a dropped connection is retried after the server's `Retry-After` (the
client does not retry when that asks for more than two minutes) or else an exponential backoff with jitter
(`RetryPolicy`, set by teacher.backoff_base_s/backoff_max_s; a closed backend ends the wait). A 200 reply that cannot
be used (bad JSON, no choices, no content) is retried here, with the same backoff; it is logged and never written.
A reply with fewer choices than `n` keeps what came and asks again for the rest. Any other 4xx (400, 404, 413, 422,
...) is final: the run stops at once with the server's own message, keeping every record already written.
teacher.max_retries bounds all retries of one request together.

The API key is read from an env var or a key file named in the config; it is never logged, written, or put in an error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pydantic

from lmdistill.errors import ConfigError, TeacherAPIError
from lmdistill.generate.base import Completion, Job, JobResult
from lmdistill.generate.config import SamplingConfig, TeacherBackendConfig
from lmdistill.generate.prompts import Prompt

log = logging.getLogger(__name__)

# Statuses under 500 that the openai client retries (5xx are all retried); any other error status is final.
RETRYABLE_STATUS = {408, 409, 429}
# The reachability check before a run gives up sooner than a prompt does: nothing is lost by failing early.
PREFLIGHT_RETRIES = 2
# The log-prob OpenAI returns for tokens it will not score; JSON has no -inf.
MIN_LOGPROB = -9999.0


class MalformedReply(Exception):
    """A 200 reply that cannot be used (no choices, no content, wrong shape)."""


class _Stopped(Exception):
    """The backend was closed while a request waited to be retried."""


class RetryPolicy:
    """How long to wait before a retry (thread-safe; `seed` seeds the jitter).

    A server-sent Retry-After is waited plus up to 10%, so clients told the same time do not return together.
    Otherwise "equal jitter": with cap = min(max_s, base_s * 2**retry), half of cap is fixed so the wait really grows
    and half is random so clients spread out.
    """

    def __init__(self, base_s: float = 1.0, max_s: float = 60.0, seed: int | None = None) -> None:
        self.base_s, self.max_s = base_s, max_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry + 1`; `retry_after`: what the server asked for, if anything."""
        with self._lock:
            if retry_after is not None and retry_after > 0:
                return retry_after + self._rng.uniform(0, 0.1 * retry_after)
            cap = min(self.max_s, self.base_s * 2.0 ** min(retry, 64))
            return cap / 2 + self._rng.uniform(0, cap / 2)


class _Client(openai.OpenAI):
    """The openai client, waiting between its retries as `policy` says; setting `stop` ends a wait with `_Stopped`."""

    def __init__(self, *, policy: RetryPolicy, stop: threading.Event, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.policy, self.stop = policy, stop

    def copy(self, **kwargs: Any) -> _Client:
        """`with_options(...)`: a client on the same connections, with the same policy and stop event."""
        client: _Client = super().copy(**kwargs, _extra_kwargs={"policy": self.policy, "stop": self.stop})
        return client

    with_options = copy

    def _sleep_for_retry(self, *, retries_taken: int, max_retries: int, options: Any, response: Any) -> None:
        """The client's wait before each of its retries (`response`: the failed reply; None after no reply)."""
        headers = response.headers if response is not None else None
        delay = self.policy.delay(retries_taken, self._parse_retry_after_header(headers))
        reason = f"HTTP {response.status_code}" if response is not None else "no reply (timeout or dropped connection)"
        log.warning("%s %s: %s (attempt %d of %d); retrying in %.2fs", options.method.upper(), options.url, reason,
                    retries_taken + 1, max_retries + 1, delay)
        if self.stop.wait(delay):
            raise _Stopped


def _tries(request: Any) -> int:
    """Attempts the openai client made for a request, from the retry count it sends with each try."""
    return int(request.headers.get("x-stainless-retry-count", 0)) + 1


def read_api_key(env_name: str | None, key_file: str | None) -> tuple[str | None, str]:
    """(key or None, where it came from, in words that never include the key)."""
    if key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"API key file `{path}` does not exist (teacher.api_key_file / api_key_file)")
        lines = path.read_text(encoding="utf-8").strip().splitlines()
        if not lines or not lines[0].strip():
            raise ConfigError(f"API key file `{path}` is empty; put the key on its first line")
        return lines[0].strip(), f"the key from file `{path}`"
    if env_name:
        key = os.environ.get(env_name)
        if key:
            return key, f"the key from env var `{env_name}`"
        return None, f"no key (env var `{env_name}` is not set)"
    return None, "no key (neither an env var nor a key file is configured)"


class OpenAIBackend:
    """`generate` backend for an OpenAI-compatible endpoint.

    Args:
        cfg: the teacher section (base_url, api_model, key source, concurrency, timeout, retry settings).
        seed: seeds the backoff jitter (not the teacher).
    """

    def __init__(self, cfg: TeacherBackendConfig, seed: int | None = None) -> None:
        self.cfg = cfg
        self.base_url = cfg.base_url.rstrip("/")
        self._key, self._key_source = read_api_key(cfg.api_key_env, cfg.api_key_file)
        self.policy = RetryPolicy(cfg.backoff_base_s, cfg.backoff_max_s, seed)
        self._stop = threading.Event()
        self.client = _Client(
            policy=self.policy,
            stop=self._stop,
            base_url=self.base_url,
            # Local servers take any key; the client insists on one.
            api_key=self._key or "EMPTY",
            max_retries=cfg.max_retries,
            timeout=cfg.timeout_s,
        )

    def teacher_info(self) -> dict[str, Any]:
        return {"backend": "openai", "model": self.cfg.api_model, "base_url": self.base_url, "api": self.cfg.api}

    def close(self) -> None:
        self._stop.set()
        self.client.close()

    # ------------------------------------------------------------------ errors and retries

    def _redact(self, text: str) -> str:
        if self._key and len(self._key) >= 4:
            text = text.replace(self._key, "***")
        return text

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, openai.APIStatusError):
            return self._redact(f"HTTP {error.status_code}: {_server_message(error)}")
        if isinstance(error, openai.APITimeoutError):
            return f"no reply within {self.cfg.timeout_s:g}s (timeout)"
        if isinstance(error, openai.APIConnectionError):
            cause = error.__cause__ or error.__context__
            return self._redact(f"connection failed ({type(cause).__name__ if cause else 'error'}: {cause or error})")
        if isinstance(error, json.JSONDecodeError | pydantic.ValidationError):
            return f"malformed reply ({type(error).__name__}: {error})"
        return self._redact(f"{type(error).__name__}: {error}")

    def _fatal(self, error: openai.APIStatusError, what: str) -> TeacherAPIError:
        status = error.status_code
        if status in (401, 403):
            return _api_error(
                status,
                f"teacher endpoint {self.base_url} refused the request (HTTP {status}) with {self._key_source}: "
                f"{self._redact(_server_message(error))}. Check the key (teacher.api_key_env names the env var, "
                "teacher.api_key_file a key file)"
            )
        if status == 404:
            return _api_error(
                status,
                f"teacher endpoint {self.base_url} answered HTTP 404 for {what}: {self._redact(_server_message(error))}. Check "
                f"teacher.base_url (it usually ends in /v1) and teacher.api_model (`{self.cfg.api_model}`)"
            )
        if status == 413:
            return _api_error(
                status,
                f"teacher endpoint {self.base_url} refused {what} as too large (HTTP 413): "
                f"{self._redact(_server_message(error))}. Shorten the prompt, or lower sampling.n / "
                "sampling.max_new_tokens, or raise the server's request size limit"
            )
        return _api_error(
            status,
            f"teacher endpoint {self.base_url} rejected {what} (HTTP {status}): {self._redact(_server_message(error))}. "
            "Check the sampling settings against what the endpoint supports"
        )

    def _failure(self, error: Exception, what: str, attempts: int) -> TeacherAPIError:
        """The TeacherAPIError for an error that ends `what`: a refusal as it is, anything else with its attempts."""
        if isinstance(error, openai.APIStatusError) and error.status_code < 500 \
                and error.status_code not in RETRYABLE_STATUS:
            return self._fatal(error, what)
        failure = _api_error(
            getattr(error, "status_code", None),
            f"{what} failed after {attempts} attempts at {self.base_url}; last error: {self._describe(error)}",
            transport=isinstance(error, openai.APIConnectionError),
        )
        failure.attempts, failure.last = attempts, self._describe(error)
        return failure

    def _call(self, send: Callable[[_Client], Any], parse: Callable[[Any], Any], what: str,
              max_retries: int) -> tuple[Any, int]:
        """(parse(reply), attempts) for `send(client)`, a `with_raw_response` call. The client retries HTTP errors,
        timeouts and dropped connections; a malformed reply (parse raises) is retried here, within the same budget.

        Raises:
            TeacherAPIError: `what` failed for good, or the backend was closed.
        """
        attempts = 0
        while True:
            if self._stop.is_set():
                raise TeacherAPIError(f"stopped before {what} finished")
            budget = max_retries - attempts
            client = self.client if budget == self.client.max_retries else self.client.with_options(max_retries=budget)
            try:
                raw = send(client)
            except _Stopped:
                raise TeacherAPIError(f"stopped before {what} finished") from None
            except openai.APIError as e:
                raise self._failure(e, what, attempts + _tries(e.request)) from None
            attempts += _tries(raw.http_request)
            try:
                return parse(raw.parse()), attempts
            except (MalformedReply, json.JSONDecodeError, pydantic.ValidationError) as e:
                if attempts > max_retries:
                    raise self._failure(e, what, attempts) from None
                delay = self.policy.delay(attempts - 1)
                log.warning("%s: %s (attempt %d of %d); retrying in %.2fs",
                            what, self._describe(e), attempts, max_retries + 1, delay)
                self._stop.wait(delay)

    # ------------------------------------------------------------------ requests

    def check(self) -> None:
        """Fail fast with a clear message when the endpoint is unreachable or refuses the key.

        Servers without `/v1/models` (404) are accepted; a model list without `api_model` only warns, since some
        servers answer under any name.
        """
        try:
            models, _ = self._call(lambda client: client.models.with_raw_response.list(), lambda reply: reply,
                                   "listing models", min(self.cfg.max_retries, PREFLIGHT_RETRIES))
        except TeacherAPIError as e:
            if getattr(e, "status", None) == 404:
                return
            if getattr(e, "transport", False):
                raise TeacherAPIError(
                    f"cannot reach the teacher endpoint {self.base_url}: {e.last} ({e.attempts} attempts). Is the "
                    "server running, and is teacher.base_url right (scheme, host, port, ending in /v1)?"
                ) from None
            raise
        names = [m.id for m in getattr(models, "data", None) or []]
        if names and self.cfg.api_model not in names:
            log.warning("teacher endpoint %s does not list model `%s` (it lists: %s)",
                        self.base_url, self.cfg.api_model, ", ".join(names[:10]))

    def _send(self, client: _Client, prompt: Prompt, sampling: SamplingConfig, n: int) -> Any:
        common: dict[str, Any] = {
            "model": self.cfg.api_model,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
        }
        if sampling.seed is not None:
            common["seed"] = sampling.seed
        if sampling.stop:
            common["stop"] = list(sampling.stop)
        if self.cfg.api == "chat":
            if sampling.logprobs:
                common["logprobs"] = True
                common["top_logprobs"] = sampling.top_logprobs
            messages: Any = prompt.messages or []  # {role, content} dicts, as the API takes them
            return client.chat.completions.with_raw_response.create(messages=messages, **common)
        if sampling.logprobs:
            common["logprobs"] = sampling.top_logprobs
        return client.completions.with_raw_response.create(prompt=prompt.text or "", **common)

    def _no_logprobs(self) -> TeacherAPIError:
        return TeacherAPIError(
            f"teacher endpoint {self.base_url} returned no logprobs although sampling.logprobs=true; it may not "
            "support them (set sampling.logprobs=false, or use an endpoint that returns them)"
        )

    def _parse_chat(self, reply: Any, sampling: SamplingConfig) -> list[Completion]:
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedReply("the reply has no choices")
        out = []
        for choice in choices:
            message = getattr(choice, "message", None)
            content = getattr(message, "content", None)
            # Reasoning servers (vLLM's reasoning parser, DeepSeek) return the trace beside the answer.
            reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
            if not isinstance(content, str) and not isinstance(reasoning, str):
                raise MalformedReply("a choice has no message content")
            text = content or ""
            if isinstance(reasoning, str) and reasoning and "<think>" not in text:
                text = f"<think>\n{reasoning}\n</think>\n\n{text}"
            logprobs = None
            if sampling.logprobs:
                content_lp = getattr(getattr(choice, "logprobs", None), "content", None)
                if content_lp is None:
                    raise self._no_logprobs()
                logprobs = [_chat_logprob(entry) for entry in content_lp]
            out.append(Completion(text=text, finish_reason=str(choice.finish_reason or "unknown"), logprobs=logprobs))
        self._counts(reply, out)
        return out

    def _parse_text(self, reply: Any, sampling: SamplingConfig) -> list[Completion]:
        choices = getattr(reply, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise MalformedReply("the reply has no choices")
        out = []
        for choice in choices:
            text = getattr(choice, "text", None)
            if not isinstance(text, str):
                raise MalformedReply("a choice has no text")
            logprobs = None
            if sampling.logprobs:
                lp = getattr(choice, "logprobs", None)
                if lp is None or lp.tokens is None or lp.token_logprobs is None:
                    raise self._no_logprobs()
                tops = lp.top_logprobs or [None] * len(lp.tokens)
                logprobs = [
                    {
                        "token": token,
                        "id": None,
                        "logprob": _finite(value),
                        "top_logprobs": [{"token": t, "id": None, "logprob": _finite(v)} for t, v in (top or {}).items()],
                    }
                    for token, value, top in zip(lp.tokens, lp.token_logprobs, tops, strict=False)
                ]
            out.append(Completion(text=text, finish_reason=str(choice.finish_reason or "unknown"), logprobs=logprobs))
        self._counts(reply, out)
        return out

    @staticmethod
    def _counts(reply: Any, completions: list[Completion]) -> None:
        usage = getattr(reply, "usage", None)
        prompt_tokens = getattr(usage, "prompt_tokens", None)
        total = getattr(usage, "completion_tokens", None)
        for c in completions:
            c.prompt_tokens = prompt_tokens
            # usage sums over the n choices; per choice it is only known for n=1 or from the log-probs.
            if len(completions) == 1:
                c.completion_tokens = total
            elif c.logprobs is not None:
                c.completion_tokens = len(c.logprobs)

    def _run_job(self, job: Job, sampling: SamplingConfig) -> JobResult:
        got: list[Completion] = []
        attempts, t0 = 0, time.perf_counter()
        parse = partial(self._parse_chat if self.cfg.api == "chat" else self._parse_text, sampling=sampling)
        # Some servers ignore n and send one choice: ask again for the rest.
        while len(got) < len(job.samples):
            missing = len(job.samples) - len(got)
            send = partial(self._send, prompt=job.prompt, sampling=sampling, n=missing)
            completions, tries = self._call(send, parse, f"prompt `{job.prompt.id}`", self.cfg.max_retries)
            got.extend(completions[:missing])
            attempts += tries
        return JobResult(job=job, completions=got, seconds=time.perf_counter() - t0, attempts=attempts)

    def generate(self, jobs: Sequence[Job], sampling: SamplingConfig) -> Iterator[JobResult]:
        """Yield results as requests finish. After a job fails for good, no new job starts; the ones in flight finish
        and are yielded, then the first failure is raised (a rerun resumes where this stopped)."""
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="lmdistill-api")
        queue = iter(jobs)
        pending: set[Future[JobResult]] = set()
        failure: TeacherAPIError | None = None

        def refill() -> None:
            while len(pending) < self.cfg.concurrency:
                job = next(queue, None)
                if job is None:
                    return
                pending.add(pool.submit(self._run_job, job, sampling))

        try:
            refill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.discard(future)
                    try:
                        result = future.result()
                    except TeacherAPIError as e:
                        failure = failure or e
                        continue
                    yield result
                if failure is None:
                    refill()
        finally:
            # On an interrupt: stop retry sleeps and queued jobs; in-flight requests end within the timeout.
            if pending:
                self._stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        if failure is not None:
            raise failure


def _server_message(error: openai.APIStatusError) -> str:
    """The server's own words: `{"error": {"message": ...}}` (OpenAI's shape), else the client's summary."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(inner, str):
            return inner
    return str(error.message)


def _api_error(status: int | None, message: str, transport: bool = False) -> TeacherAPIError:
    """A TeacherAPIError that remembers the HTTP status (None: no reply) and whether the transport failed."""
    error = TeacherAPIError(message)
    error.status = status
    error.transport = transport
    return error


def _finite(value: float | None) -> float:
    if value is None or not math.isfinite(value):
        return MIN_LOGPROB
    return float(value)


def _chat_logprob(entry: Any) -> dict[str, Any]:
    # `token_id` is an extra field `lmdistill serve` sends; other servers give token strings only.
    return {
        "token": entry.token,
        "id": getattr(entry, "token_id", None),
        "logprob": _finite(entry.logprob),
        "top_logprobs": [
            {"token": t.token, "id": getattr(t, "token_id", None), "logprob": _finite(t.logprob)}
            for t in (entry.top_logprobs or [])
        ],
    }
