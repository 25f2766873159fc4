"""`lmdistill generate` against an OpenAI-compatible endpoint that misbehaves on purpose (tests/fault_server.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from fault_server import FaultServer, answer_for
from lmdistill.config import load_config
from lmdistill.errors import TeacherAPIError
from lmdistill.generate import GenerateConfig, run_generate
from lmdistill.generate.openai_api import OpenAIBackend, RetryPolicy
from lmdistill.generate.store import read_records

REPO = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int, text=lambda i: f"Question number {i}: what is {i} + {i}?") -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i:03d}", "prompt": text(i), "reference": str(2 * i)}) + "\n")
    return path


def api_args(base_url: str, prompts: Path, out: Path, **overrides: str) -> list[str]:
    args = {
        "teacher.backend": "openai",
        "teacher.base_url": base_url,
        "teacher.api_model": "fault-model",
        "teacher.api_key_env": "LMDISTILL_TEST_KEY",
        "teacher.concurrency": "3",
        "teacher.timeout_s": "0.5",
        "teacher.max_retries": "4",
        "teacher.backoff_base_s": "0.01",
        "teacher.backoff_max_s": "0.05",
        "prompts.source": str(prompts),
        "sampling.max_new_tokens": "16",
        "output": str(out),
        "progress": "false",
        "filters.dedup": "none",
    }
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", v)]


def api_config(*args, **overrides) -> GenerateConfig:
    return load_config(GenerateConfig, None, api_args(*args, **overrides))


def assert_complete(out: Path, prompts: Path, n: int) -> list[dict]:
    """Every (prompt id, sample) exactly once, every line a full record with the server's answer."""
    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses: nothing torn, nothing malformed
    expected = {json.loads(line)["id"]: json.loads(line)["prompt"] for line in prompts.read_text().splitlines()}
    keys = [(r["id"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert set(keys) == {(pid, s) for pid in expected for s in range(n)}
    for r in records:
        assert r["completion"] == answer_for(expected[r["id"]])
        assert r["finish_reason"] == "stop" and r["teacher"]["backend"] == "openai"
    return records


def test_faults_are_retried_and_the_output_ends_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_TEST_KEY", "sk-test-secret-123")
    faults = {1: "429", 3: "500", 5: "hang", 7: "drop", 9: "malformed", 11: "empty", 12: "503", 14: "drop"}
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out.jsonl"
    with FaultServer(faults, retry_after=0.4, hang_s=3.0, api_key="sk-test-secret-123") as server:
        summary = run_generate(api_config(server.base_url, prompts, out, **{"sampling.n": "2"}))
    records = assert_complete(out, prompts, n=2)
    assert summary["generated_this_run"] == 24 and summary["records"] == 24
    # Each injected fault cost one extra attempt somewhere; n=2 arrives as one request per prompt.
    assert sum(r["attempts"] for r in records if r["sample"] == 0) == 12 + len(faults)
    # Retry-After was honoured: the 429'd prompt came back no sooner than the server asked.
    n429, t429, _, prompt429 = server.log[0]
    assert n429 == 1
    retry = next(t for _, t, _, p in server.log[1:] if p == prompt429)
    assert retry - t429 >= 0.4
    # The key reached the server (it checks it) but no file.
    for path in tmp_path.iterdir():
        assert "sk-test-secret-123" not in path.read_text()


def test_logprobs_and_completions_api_are_stored(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    with FaultServer({2: "500"}) as server:
        run_generate(api_config(server.base_url, prompts, tmp_path / "chat.jsonl",
                                **{"sampling.logprobs": "true", "sampling.top_logprobs": "4"}))
        run_generate(api_config(server.base_url, prompts, tmp_path / "text.jsonl", **{"teacher.api": "completions"}))
    chat = assert_complete(tmp_path / "chat.jsonl", prompts, n=1)
    lp = chat[0]["logprobs"]
    assert "".join(e["token"] for e in lp) == chat[0]["completion"]
    assert all(len(e["top_logprobs"]) == 4 and e["logprob"] == -0.5 for e in lp)
    assert chat[0]["completion_tokens"] == len(lp)
    text = assert_complete(tmp_path / "text.jsonl", prompts, n=1)
    assert text[0]["messages"] is None and text[0]["prompt"].startswith("Question number")


def test_think_handling_and_verifier_end_to_end(tmp_path):
    """The fault server echoes the prompt's tail, so prompts choose what the 'teacher' answers."""
    answers = {0: "0", 1: "5", 2: "4", 3: "9"}  # references are 2*i: right for 0 and 2, wrong for 1 and 3
    prompts = write_prompts(tmp_path / "p.jsonl", 4, text=lambda i: f"<think>i={i}</think> {answers[i]}")
    with FaultServer() as server:
        for think in ("keep", "strip"):
            run_generate(api_config(server.base_url, prompts, tmp_path / f"{think}.jsonl",
                                    **{"filters.think": think, "filters.verifier": "numeric"}))
    for think in ("keep", "strip"):
        kept = [json.loads(x) for x in (tmp_path / f"{think}.filtered.jsonl").read_text().splitlines()]
        assert [r["id"] for r in kept] == ["q000", "q002"]
        summary = json.loads((tmp_path / f"{think}.summary.json").read_text())
        assert summary["filters"]["dropped"]["verifier"] == 2
        if think == "keep":
            assert kept[1]["completion"] == "Answer: <think>i=2</think> 4"
        else:
            assert kept[1]["completion"] == "4" and kept[1]["messages"][-1]["content"] == "4"
    raw = [json.loads(x) for x in (tmp_path / "strip.jsonl").read_text().splitlines()]
    assert all("<think>" in r["completion"] for r in raw)  # the raw file keeps what the teacher wrote


def test_kill_9_mid_run_then_rerun_gives_every_id_once(tmp_path):
    n_prompts = 30
    prompts = write_prompts(tmp_path / "p.jsonl", n_prompts)
    out = tmp_path / "out.jsonl"
    with FaultServer(delay_s=0.05) as server:
        args = api_args(server.base_url, prompts, out, **{"teacher.concurrency": "2"})
        proc = subprocess.Popen([sys.executable, "-m", "lmdistill", "generate", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") >= 6:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, f"generate ended before it could be killed: {proc.stderr.read().decode()}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        written = out.read_bytes().count(b"\n")
        assert 6 <= written < n_prompts
        # What a kill during a write leaves behind: a partial line. The rerun must drop it.
        with open(out, "ab") as fh:
            fh.write(b'{"id": "q999", "sample": 0, "prompt": "torn')
        summary = run_generate(load_config(GenerateConfig, None, args))
    records = assert_complete(out, prompts, n=1)
    assert len(records) == n_prompts and summary["generated_this_run"] == n_prompts - written


def test_wrong_key_is_a_clear_401_error_without_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LMDISTILL_TEST_KEY", "sk-wrong-key-456")
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with FaultServer(api_key="sk-right") as server:
        with pytest.raises(TeacherAPIError) as info:
            run_generate(api_config(server.base_url, prompts, tmp_path / "o.jsonl"))
    message = str(info.value)
    assert "HTTP 401" in message and "LMDISTILL_TEST_KEY" in message and server.base_url in message
    assert "sk-wrong-key-456" not in message
    # A key file works the same way and is named in the message.
    key_file = tmp_path / "key.txt"
    key_file.write_text("sk-right\n")
    with FaultServer(api_key="sk-right") as server:
        run_generate(api_config(server.base_url, prompts, tmp_path / "o.jsonl", **{"teacher.api_key_file": str(key_file)}))
    assert_complete(tmp_path / "o.jsonl", prompts, n=1)


def test_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    with pytest.raises(TeacherAPIError, match=rf"cannot reach the teacher endpoint http://127.0.0.1:{port}/v1"):
        run_generate(api_config(f"http://127.0.0.1:{port}/v1", prompts, tmp_path / "o.jsonl"))


def test_a_prompt_that_keeps_failing_stops_the_run_and_keeps_what_was_written(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 6)
    out = tmp_path / "o.jsonl"
    faults = dict.fromkeys(range(3, 100), "500")
    with FaultServer(faults) as server:
        cfg = api_config(server.base_url, prompts, out, **{"teacher.concurrency": "1", "teacher.max_retries": "2"})
        with pytest.raises(TeacherAPIError, match=r"(?s)failed after 3 attempts.*HTTP 500: injected server error.*rerun the same command"):
            run_generate(cfg)
    assert [r["id"] for r in read_records(out)[0]] == ["q000", "q001"]
    with FaultServer() as server:
        run_generate(api_config(server.base_url, prompts, out, **{"teacher.concurrency": "1"}))
    assert_complete(out, prompts, n=1)


def test_retry_after_parsing_and_backoff_bounds():
    """The openai client reads Retry-After (seconds, milliseconds, an HTTP date) and refuses one over two minutes;
    RetryPolicy waits what was asked (plus jitter) or backs off exponentially within its bounds."""
    cfg = api_config("http://127.0.0.1:9/v1", Path("p.jsonl"), Path("o.jsonl")).teacher
    backend = OpenAIBackend(cfg)
    parse = backend.client._parse_retry_after_header
    assert parse({"retry-after": "3"}) == 3.0
    assert parse({"retry-after-ms": "250"}) == 0.25
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse({"retry-after": future}) <= 31
    assert parse({}) is None and parse(None) is None
    assert not backend.client._should_retry(types.SimpleNamespace(status_code=429, headers={"retry-after": "999"}))
    backend.close()
    policy = RetryPolicy(base_s=1.0, max_s=8.0, seed=0)
    for attempt in range(6):
        cap = min(8.0, 2.0**attempt)
        assert all(cap / 2 <= policy.delay(attempt) <= cap for _ in range(50))
    assert 3.0 <= policy.delay(0, 3.0) <= 3.3


def test_closing_the_backend_ends_a_retry_wait(tmp_path):
    """A 429 asking for 30 s: the openai client's retry waits in our hook, which `close()` (an interrupted run) ends."""
    import threading

    import openai

    from lmdistill.generate.base import Job
    from lmdistill.generate.prompts import Prompt

    assert callable(getattr(openai.OpenAI, "_sleep_for_retry", None)), "the openai client's retry hook moved"
    with FaultServer({1: "429"}, retry_after=30) as server:
        cfg = api_config(server.base_url, tmp_path / "p.jsonl", tmp_path / "o.jsonl")
        backend = OpenAIBackend(cfg.teacher)
        job = Job(prompt=Prompt(id="q0", prompt="hi", messages=[{"role": "user", "content": "hi"}]), samples=[0])
        threading.Timer(0.3, backend.close).start()
        t0 = time.monotonic()
        with pytest.raises(TeacherAPIError, match="stopped before prompt `q0` finished"):
            list(backend.generate([job], cfg.sampling))
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------------------------------------------------
# issue 17: final client errors, unusable 200s, a reset mid-body, a stall after headers


@pytest.mark.parametrize("status", ["400", "404", "413", "422"])
def test_a_final_client_error_fails_fast_with_the_servers_message(tmp_path, status):
    from fault_server import STATUS_MESSAGES

    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    out = tmp_path / "o.jsonl"
    with FaultServer({3: status}) as server:
        cfg = api_config(server.base_url, prompts, out, **{"teacher.concurrency": "1", "teacher.max_retries": "4"})
        t0 = time.monotonic()
        with pytest.raises(TeacherAPIError) as info:
            run_generate(cfg)
        elapsed = time.monotonic() - t0
    message = str(info.value)
    assert f"HTTP {status}" in message and STATUS_MESSAGES[status] in message and server.base_url in message
    assert "prompt `q002`" in message and "Traceback" not in message
    # Not retried: the third request was the last one, and no backoff was waited.
    assert server.count == 3 and [f for _, _, f, _ in server.log] == ["ok", "ok", status]
    assert elapsed < 5
    # What finished before the refusal is kept, whole; a rerun adds the rest, each id once.
    assert [r["id"] for r in read_records(out)[0]] == ["q000", "q001"]
    with FaultServer() as server:
        summary = run_generate(api_config(server.base_url, prompts, out, **{"teacher.concurrency": "1"}))
    assert summary["generated_this_run"] == 3 and server.count == 3
    assert_complete(out, prompts, n=1)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_unusable_200s_resets_and_stalls_are_retried_without_loss_or_duplicates(tmp_path, api):
    faults = {1: "null_content", 3: "few_choices", 5: "reset_mid_body", 7: "stall_after_headers", 8: "few_choices",
              10: "null_content"}
    prompts = write_prompts(tmp_path / "p.jsonl", 8)
    out = tmp_path / "o.jsonl"
    with FaultServer(faults, hang_s=3.0) as server:
        summary = run_generate(api_config(server.base_url, prompts, out,
                                          **{"sampling.n": "3", "teacher.api": api, "sampling.seed": "1"}))
    records = assert_complete(out, prompts, n=3)
    assert summary["generated_this_run"] == 24 and len(records) == 24
    # Each fault cost exactly one more request: a retry, or (few_choices) one request for the missing sample.
    assert server.count == 8 + len(faults)
    kinds = [f for _, _, f, _ in server.log]
    assert sorted(k for k in kinds if k != "ok") == sorted(faults.values())
    # few_choices kept the samples that came and asked again for only the missing one.
    retried = [p for _, _, f, p in server.log if f == "few_choices"]
    assert all(sum(1 for _, _, _, q in server.log if q == p) >= 2 for p in retried)


def test_a_prompt_that_always_gets_null_content_fails_cleanly(tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = tmp_path / "o.jsonl"
    with FaultServer(dict.fromkeys(range(2, 50), "null_content")) as server:
        cfg = api_config(server.base_url, prompts, out, **{"teacher.concurrency": "1", "teacher.max_retries": "2"})
        with pytest.raises(TeacherAPIError, match=r"(?s)prompt `q001` failed after 3 attempts.*no message content"):
            run_generate(cfg)
    assert server.count == 4
    assert [r["id"] for r in read_records(out)[0]] == ["q000"]
