"""`lmdistill serve`: started as a real subprocess on 127.0.0.1 and driven with the official `openai` client, plus
in-process checks of its error answers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import make_model
from lmdistill.config import ModelConfig, load_config
from lmdistill.errors import TeacherAPIError
from lmdistill.generate import GenerateConfig, run_generate
from lmdistill.generate.config import ServeConfig
from lmdistill.generate.hf import HFGenerator
from lmdistill.generate.store import read_records
from lmdistill.serve import create_app, served_name

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-serve-test-789"


@pytest.fixture(scope="module")
def served_teacher(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("serve") / "teacher"
    make_model(d, tokenizer, hidden=32, layers=2, seed=7)
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served_teacher):
    """`lmdistill serve` in a subprocess with a required bearer token; yields its base URL."""
    port = _free_port()
    # One thread: the tiny model gains nothing from more, and a busy 2-core machine punishes spinning OpenMP threads.
    env = {**os.environ, "LMDISTILL_SERVE_KEY": KEY, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmdistill", "serve", "--model.name_or_path", str(served_teacher), "--port", str(port),
           "--served_model_name", "tiny", "--api_key_env", "LMDISTILL_SERVE_KEY", "--device", "cpu",
           "--log_level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a loaded 2-core machine can take this long to import torch twice
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{proc.stdout.read().decode()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not come up within 120 s")
            time.sleep(0.1)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=30)


def test_models_and_chat_with_top_logprobs(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "The cat sees the ball."}], n=2, temperature=0.9,
        max_tokens=6, logprobs=True, top_logprobs=3, seed=1,
    )
    assert len(reply.choices) == 2 and reply.usage.prompt_tokens > 0
    for choice in reply.choices:
        content = choice.logprobs.content
        assert choice.finish_reason in ("stop", "length") and 1 <= len(content) <= 6
        # a token's text can be part of a character; its bytes are exact (OpenAI's `bytes` field; a random model
        # may also emit invalid UTF-8, which the text shows as U+FFFD)
        assert b"".join(bytes(e.bytes) for e in content).decode(errors="replace") == choice.message.content
        for e in content:
            assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
            assert isinstance(e.token_id, int)  # lmdistill's extra field: exact ids for soft labels


def test_completions_endpoint_with_logprobs_and_stop(client):
    greedy = client.completions.create(model="tiny", prompt="The river", max_tokens=8, temperature=0, logprobs=2)
    choice = greedy.choices[0]
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.top_logprobs)
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    stop = choice.text[2:4]
    cut = client.completions.create(model="tiny", prompt="The river", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == choice.text[: choice.text.index(stop)]
    batch = client.completions.create(model="tiny", prompt=["a", "b c"], max_tokens=3, temperature=0, n=2)
    assert len(batch.choices) == 4 and [c.index for c in batch.choices] == [0, 1, 2, 3]


def test_wrong_key_wrong_model_and_bad_requests(server, client):
    with pytest.raises(openai.AuthenticationError, match="wrong API key"):
        openai.OpenAI(base_url=server, api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="this server serves `tiny`"):
        client.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=True,
                                       top_logprobs=25)


def test_generate_end_to_end_through_serve(server, served_teacher, tmp_path, monkeypatch):
    """generate (openai backend) -> lmdistill serve -> the same greedy text a local HF backend writes."""
    monkeypatch.setenv("LMDISTILL_SERVE_KEY", KEY)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Tell me about a dog {i}."}) + "\n"
                               for i in range(4)))

    def run(out: Path, *extra: str):
        common = ["--prompts.source", str(prompts), "--output", str(out), "--progress", "false",
                  "--sampling.temperature", "0", "--sampling.max_new_tokens", "6", "--sampling.logprobs", "true",
                  "--sampling.top_logprobs", "3", "--filters.dedup", "none", "--filters.drop_truncated", "false"]
        return run_generate(load_config(GenerateConfig, None, common + list(extra)))

    run(tmp_path / "api.jsonl", "--teacher.backend", "openai", "--teacher.base_url", server, "--teacher.api_model",
        "tiny", "--teacher.api_key_env", "LMDISTILL_SERVE_KEY", "--teacher.concurrency", "2")
    run(tmp_path / "local.jsonl", "--teacher.model.name_or_path", str(served_teacher), "--teacher.device", "cpu")
    api = {r["id"]: r for r in read_records(tmp_path / "api.jsonl")[0]}
    local = {r["id"]: r for r in read_records(tmp_path / "local.jsonl")[0]}
    assert sorted(api) == sorted(local) == [f"p{i}" for i in range(4)]
    for pid, r in api.items():
        assert r["completion"] == local[pid]["completion"]
        assert [e["id"] for e in r["logprobs"]] == [e["id"] for e in local[pid]["logprobs"]]
        assert [e["logprob"] for e in r["logprobs"]] == pytest.approx([e["logprob"] for e in local[pid]["logprobs"]],
                                                                      abs=1e-4)
        assert r["prompt_tokens"] == local[pid]["prompt_tokens"]
        assert r["teacher"] == {"backend": "openai", "model": "tiny", "base_url": server, "api": "chat"}
    monkeypatch.setenv("LMDISTILL_SERVE_KEY", "wrong")
    with pytest.raises(TeacherAPIError, match="HTTP 401"):
        run(tmp_path / "denied.jsonl", "--teacher.backend", "openai", "--teacher.base_url", server,
            "--teacher.api_model", "tiny", "--teacher.api_key_env", "LMDISTILL_SERVE_KEY")


def test_in_process_error_shapes_and_limits(served_teacher):
    from fastapi.testclient import TestClient

    generator = HFGenerator.load(ModelConfig(name_or_path=str(served_teacher)), "cpu")
    cfg = ServeConfig(model=ModelConfig(name_or_path=str(served_teacher)), max_n=2, max_new_tokens_limit=8)
    app = create_app(generator, cfg)
    name = served_name(str(served_teacher))
    assert name == "teacher"
    with TestClient(app) as http:
        ok = http.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["logprobs"] is None
        for body, status, words in [
            ({"n": 3}, 400, "limit of 2"),
            ({"max_tokens": 9}, 400, "limit of 8"),
            ({"stream": True}, 400, "stream=true is not supported"),
            ({"temperature": -1}, 400, "invalid request: temperature"),
            ({"model": "other"}, 404, "not served here"),
        ]:
            payload = {"model": name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **body}
            reply = http.post("/v1/chat/completions", json=payload)
            assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text
        parts = http.post("/v1/chat/completions", json={
            "model": name, "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
        assert parts.status_code == 200
    assert served_name("org/model") == "org/model" and served_name("/a/b/") == "b"
