"""`lmdistill serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) around a local Hugging Face model.

Endpoints: `GET /v1/models` (each model lists its `tokenizer_fingerprint`), `POST /v1/chat/completions`,
`POST /v1/completions` (with `n`, `temperature`, `top_p`, `max_tokens`, `stop`, `seed`, `logprobs`/`top_logprobs`),
`POST /tokenize` and `GET /health`. Each log-prob entry also carries `token_id`, an extra field that `lmdistill
generate` stores so API soft labels keep exact token ids.

Scoring (on-policy distillation, vLLM's protocol): `/v1/completions` with a token-id prompt (or a list of them),
`echo=true`, `max_tokens` 0 or 1, `temperature=0` and `logprobs=k` returns, for every position, the prompt token's
log-prob and the k most probable tokens there (`return_tokens_as_token_ids=true` names them `token_id:<id>`). The
prompts of one request are scored in one padded forward pass.

Concurrency: one model, one worker thread that owns it (`lmdistill.request_batcher`). Concurrent requests with the
same sampling settings are batched into one `generate` call (up to `max_batch_size` sequences; seeded requests run
alone so their answers stay reproducible); one request's `n` samples and a list of prompts on /v1/completions are
always batched together.

Binds 127.0.0.1 unless told otherwise; with `api_key_env`/`api_key_file` every request needs `Authorization: Bearer
<key>` (401 otherwise).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from lmdistill.errors import ConfigError
from lmdistill.generate.base import Completion
from lmdistill.generate.config import ServeConfig
from lmdistill.models import tokenizer_fingerprint
from lmdistill.request_batcher import RequestBatcher, SamplingKey

log = logging.getLogger(__name__)


class _Request(BaseModel):
    # Unknown OpenAI fields (user, presence_penalty, ...) are accepted and ignored, as most servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # the OpenAI default for /v1/completions; 0 only to score an echoed prompt
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension: tokens named `token_id:<id>`


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class APIError(Exception):
    """Answered as OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"message content parts of type `{part.get('type')}` are not supported (text only)")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _chat_logprobs(completion: Completion) -> dict[str, Any]:
    def entry(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes", list(e["token"].encode())),
                "token_id": e["id"]}

    return {
        "content": [{**entry(e), "top_logprobs": [entry(t) for t in e["top_logprobs"]]} for e in completion.logprobs or []]
    }


def _text_logprobs(completion: Completion) -> dict[str, Any]:
    entries = completion.logprobs or []
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
        "token_ids": [e["id"] for e in entries],
    }


def _usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    generated = sum(c.completion_tokens or 0 for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes (by its Content-Length, or counted while it streams in
    chunked) is answered 413 in OpenAI's error shape before any handler parses it; at most `limit` bytes are buffered."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def _too_large(self, send: Any, size: str) -> None:
        message = (f"request body of {size} is larger than this server's limit of {self.limit} bytes "
                   "(max_request_bytes); send fewer or shorter prompts per request")
        payload = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                        "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._too_large(send, f"{int(declared)} bytes")
            return
        messages: list[Any] = []
        size = 0
        while True:  # buffer the body (at most `limit` bytes), then replay it to the app
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send, f"more than {self.limit} bytes")
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed() -> Any:
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


def create_app(generator: Any, cfg: ServeConfig, api_key: str | None = None) -> Any:
    """The FastAPI app around an `HFGenerator` (or anything with its `render`/`generate`).

    Args:
        generator: the model wrapper; one worker thread makes every call into it (see RequestBatcher).
        cfg: limits, served name.
        api_key: the bearer token every request must send; None disables auth.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    served = cfg.served_model_name or served_name(cfg.model.name_or_path)
    batcher = RequestBatcher(generator, max_batch=cfg.max_batch_size, wait_s=cfg.batch_wait_ms / 1000)
    app = FastAPI(title="lmdistill serve", docs_url=None, redoc_url=None)
    score_lock = threading.Lock()  # scoring forwards run in the request's thread, one at a time

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        body = {"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        body = {"error": {"message": f"invalid request: {msgs}", "type": "invalid_request_error", "param": None,
                          "code": None}}
        return JSONResponse(body, status_code=400)

    app.add_middleware(_BodyLimit, limit=cfg.max_request_bytes)

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path != "/health":
            sent = request.headers.get("authorization", "")
            if not secrets.compare_digest(sent.encode(), f"Bearer {api_key}".encode()):
                body = {"error": {"message": "missing or wrong API key (send `Authorization: Bearer <key>`)",
                                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    def check_common(req: _Request, max_tokens: int) -> list[str]:
        if req.model != served:
            raise APIError(404, f"model `{req.model}` is not served here; this server serves `{served}`",
                           code="model_not_found")
        if req.stream:
            raise APIError(400, "stream=true is not supported by lmdistill serve")
        if req.n > cfg.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {cfg.max_n} (max_n)")
        if max_tokens > cfg.max_new_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {cfg.max_new_tokens_limit}")
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def run(texts: list[str], req: _Request, max_tokens: int, stop: list[str], top: int | None,
            raw: bool) -> list[list[Completion]]:
        key = SamplingKey(n=req.n, temperature=req.temperature, top_p=req.top_p, max_new_tokens=max_tokens,
                          stop=tuple(stop), top_logprobs=top, add_special_tokens=raw)
        return batcher.generate(texts, key, seed=req.seed)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    fingerprint: list[str] = []  # computed on the first /v1/models (hashing a large vocabulary takes a moment)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        entry: dict[str, Any] = {"id": served, "object": "model", "created": 0, "owned_by": "lmdistill"}
        tokenizer = getattr(generator, "tokenizer", None)
        if tokenizer is not None:
            if not fingerprint:
                fingerprint.append(tokenizer_fingerprint(tokenizer))
            entry["tokenizer_fingerprint"] = fingerprint[0]
        return {"object": "list", "data": [entry]}

    @app.post("/tokenize")
    def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None and req.model != served:
            raise APIError(404, f"model `{req.model}` is not served here; this server serves `{served}`",
                           code="model_not_found")
        tokens = generator.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        return {"tokens": tokens, "count": len(tokens), "max_model_len": cfg.max_new_tokens_limit}

    def score(req: CompletionRequest) -> dict[str, Any]:
        """Echo with max_tokens 0 or 1 on token ids: the scoring call of on-policy distillation (vLLM's protocol)."""
        raw: list[Any] = req.prompt if isinstance(req.prompt, list) and req.prompt and \
            isinstance(req.prompt[0], list) else [req.prompt]
        prompts = [[int(t) for t in p] for p in raw if isinstance(p, list) and p and all(isinstance(t, int) for t in p)]
        if len(prompts) != len(raw):
            raise APIError(400, "echo=true scores token-id prompts: send prompt as a list of token ids (or of lists)")
        vocab = len(generator.tokenizer)
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise APIError(400, f"prompt holds token ids outside this tokenizer's vocabulary [0, {vocab})")
        if req.max_tokens > 1 or req.n != 1 or req.temperature != 0:
            raise APIError(400, "scoring an echoed prompt takes max_tokens 0 or 1, n=1 and temperature=0")
        with score_lock:
            choices = score_prompts(generator.model, generator.tokenizer, prompts, req.logprobs or 0, req.max_tokens,
                                    req.return_tokens_as_token_ids)
        n_prompt = sum(c.pop("prompt_tokens") for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": req.max_tokens * len(choices),
                          "total_tokens": n_prompt + req.max_tokens * len(choices)}}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        stop = check_common(req, max_tokens)
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in req.messages]
        try:
            text = generator.render(messages)
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        top = (req.top_logprobs or 0) if req.logprobs else None
        t0 = time.perf_counter()
        completions = run([text], req, max_tokens, stop, top, raw=False)[0]
        log.info("chat: %d completions in %.2fs", len(completions), time.perf_counter() - t0)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": _chat_logprobs(c) if top is not None else None,
            }
            for i, c in enumerate(completions)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": choices,
            "usage": _usage(completions[0].prompt_tokens or 0, completions),
        }

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        stop = check_common(req, req.max_tokens)
        if req.echo:
            return score(req)
        if req.max_tokens == 0:
            raise APIError(400, "max_tokens=0 only scores an echoed prompt (echo=true)")
        given = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        prompts = [p for p in given if isinstance(p, str)]
        if len(prompts) != len(given):
            raise APIError(400, "token-id prompts are scored with echo=true; send text to generate")
        if not prompts:
            raise APIError(400, "prompt is empty")
        outputs = run(prompts, req, req.max_tokens, stop, req.logprobs, raw=True)
        choices: list[dict[str, Any]] = []
        flat: list[Completion] = []
        for group in outputs:
            for c in group:
                choices.append(
                    {
                        "index": len(choices),
                        "text": c.text,
                        "finish_reason": c.finish_reason,
                        "logprobs": _text_logprobs(c) if req.logprobs is not None else None,
                    }
                )
                flat.append(c)
        prompt_tokens = sum(group[0].prompt_tokens or 0 for group in outputs)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served,
            "choices": choices,
            "usage": _usage(prompt_tokens, flat),
        }

    app.state.served_model_name = served
    app.state.batcher = batcher
    return app


@torch.no_grad()
def score_prompts(model: Any, tokenizer: Any, prompts: list[list[int]], k: int, max_tokens: int,
                  token_ids: bool) -> list[dict[str, Any]]:
    """Completions-API choices that echo each token-id prompt with log p of every token given those before it and the
    k most probable tokens there (the first token has none); `max_tokens=1` appends the greedy next token."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, : len(p)], mask[r, : len(p)] = torch.tensor(p), 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()

    def name(t: int) -> str:
        return f"token_id:{t}" if token_ids else tokenizer.decode([t])

    choices = []
    for r, p in enumerate(prompts):
        lp = logprobs[r, : len(p)]
        tokens = list(p)
        token_lps: list[float | None] = [None] + [float(lp[j - 1, p[j]]) for j in range(1, len(p))]
        positions = list(range(len(p) - 1))
        if max_tokens >= 1:  # the greedy next token (temperature 0)
            nxt = int(lp[-1].argmax())
            tokens.append(nxt)
            token_lps.append(float(lp[-1, nxt]))
            positions.append(len(p) - 1)
        tops: list[dict[str, float] | None] = [None]
        for j, pos in enumerate(positions, start=1):
            top = lp[pos].topk(k) if k else None
            entry = {} if top is None else {name(int(i)): float(v) for v, i in zip(top.values, top.indices, strict=True)}
            entry[name(tokens[j])] = float(lp[pos, tokens[j]])  # the scored token itself, as vLLM includes it
            tops.append(entry)
        text = tokenizer.decode(tokens)
        choices.append({"index": r, "text": text, "finish_reason": "length",
                        "logprobs": {"tokens": [name(t) for t in tokens], "token_logprobs": token_lps,
                                     "top_logprobs": tops, "text_offset": [0] * len(tokens)},
                        "prompt_tokens": len(p)})
    return choices


def served_name(name_or_path: str) -> str:
    """`/data/models/my-teacher/` -> `my-teacher`; `org/model` -> `org/model` (hub ids stay as they are)."""
    stripped = name_or_path.rstrip("/")
    if stripped.startswith(("/", ".", "~")):
        return stripped.rsplit("/", 1)[-1]
    return stripped


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(cfg: ServeConfig) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    from lmdistill.generate.hf import HFGenerator
    from lmdistill.generate.openai_api import read_api_key

    api_key, source = read_api_key(cfg.api_key_env, cfg.api_key_file)
    if (cfg.api_key_env or cfg.api_key_file) and api_key is None:
        raise ConfigError(f"serve was asked to require a key but has {source}; set it, or drop api_key_env")
    if not _is_loopback(cfg.host) and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the model", cfg.host)
    generator = HFGenerator.load(cfg.model, cfg.device)
    app = create_app(generator, cfg, api_key)
    name = app.state.served_model_name
    print(f"serve: `{name}` at http://{cfg.host}:{cfg.port}/v1 (auth: {'bearer token' if api_key else 'none'})",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
