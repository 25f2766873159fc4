"""Cross-request batching in `lmdistill serve`: who shares a generate call, who never does, and that every request
gets its own rows back (a recording stand-in generator), then the real app with a tiny model under concurrent
clients."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lmdistill.generate.base import Completion
from lmdistill.generate.seeded_sampling import derive_seed
from lmdistill.request_batcher import RequestBatcher, SamplingKey


class RecordingGenerator:
    """Answers `text` with `text#i` for its i-th sample; records every call; the first call can be made slow so that
    requests pile up behind it (what happens under load)."""

    def __init__(self, first_call_s: float = 0.0) -> None:
        self.calls: list[tuple[list[str], dict]] = []
        self.first_call_s = first_call_s
        self.lock = threading.Lock()

    def generate(self, texts, **kwargs):
        with self.lock:
            self.calls.append((list(texts), kwargs))
            first = len(self.calls) == 1
        if first:
            time.sleep(self.first_call_s)
        if "bad" in texts:
            raise RuntimeError("this prompt breaks the model")
        return [[Completion(text=f"{t}#{i}", finish_reason="stop") for i in range(kwargs["n"])] for t in texts]


def key(**changes) -> SamplingKey:
    base = {"n": 1, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "stop": (), "top_logprobs": None,
            "add_special_tokens": False}
    return SamplingKey(**{**base, **changes})


def _fire(batcher: RequestBatcher, jobs: list[tuple[list[str], SamplingKey, int | None]]) -> list:
    """Submit every job from its own thread; the first one is let in first, so the rest queue behind it."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(batcher.generate, *jobs[0])]
        time.sleep(0.05)
        futures += [pool.submit(batcher.generate, *job) for job in jobs[1:]]
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=30))
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out


def test_compatible_requests_share_calls_and_each_gets_its_own_rows():
    gen = RecordingGenerator(first_call_s=0.3)
    batcher = RequestBatcher(gen, max_batch=32, wait_s=0.0)
    jobs = [([f"p{i}", f"q{i}"], key(n=2), None) for i in range(6)]
    results = _fire(batcher, jobs)
    for (texts, _, _), res in zip(jobs, results, strict=True):
        assert [[c.text for c in group] for group in res] == [[f"{t}#0", f"{t}#1"] for t in texts]
    # the first request runs alone; the five that queued behind it share one call
    assert [len(texts) for texts, _ in gen.calls] == [2, 10]
    assert batcher.stats.calls == 2 and batcher.stats.largest_batch == 5


def test_different_settings_and_the_size_limit_keep_requests_apart_and_seeds_travel_per_text():
    gen = RecordingGenerator(first_call_s=0.3)
    batcher = RequestBatcher(gen, max_batch=4, wait_s=0.0)
    jobs = [(["first"], key(), None)]
    jobs += [([f"a{i}"], key(), None) for i in range(5)]  # 5 rows: more than max_batch=4
    jobs += [([f"t{i}"], key(temperature=0.0), None) for i in range(2)]  # other settings
    jobs += [([f"s{i}", f"z{i}"], key(top_p=0.5), 100 + i) for i in range(2)]  # seeded
    results = _fire(batcher, jobs)
    assert all(not isinstance(r, Exception) for r in results)
    by_text = {t: (texts, kw) for texts, kw in gen.calls for t in texts}
    for texts, _ in gen.calls:
        assert len(texts) <= 4
        assert len({t[0] for t in texts} - {"z"}) == 1  # one kind of request per call
    assert by_text["t0"][0] == ["t0", "t1"] and by_text["t0"][1]["temperature"] == 0.0
    assert sorted(len(texts) for texts, _ in gen.calls if texts[0].startswith("a")) == [1, 4]
    assert "row_seeds" not in by_text["a0"][1]  # no seeded request in the batch: transformers samples as usual
    # seeded requests share a call; each of their rows carries its own seed, derived from the request's
    texts, kw = by_text["s0"]
    assert texts == ["s0", "z0", "s1", "z1"]
    want = [derive_seed(derive_seed(s, k), 0) for s in (100, 101) for k in (0, 1)]  # n = 1: one row per text
    assert kw["row_seeds"] == want and len(set(want)) == 4


def test_a_failing_request_fails_alone():
    gen = RecordingGenerator(first_call_s=0.3)
    batcher = RequestBatcher(gen, max_batch=32, wait_s=0.0)
    jobs = [(["first"], key(), None), (["ok1"], key(), None), (["bad"], key(), None), (["ok2"], key(), None)]
    first, ok1, bad, ok2 = _fire(batcher, jobs)
    assert ok1[0][0].text == "ok1#0" and ok2[0][0].text == "ok2#0" and first[0][0].text == "first#0"
    assert isinstance(bad, RuntimeError) and "breaks the model" in str(bad)


def test_max_batch_1_runs_every_request_alone():
    gen = RecordingGenerator(first_call_s=0.2)
    batcher = RequestBatcher(gen, max_batch=1, wait_s=0.0)
    _fire(batcher, [([f"p{i}"], key(), None) for i in range(4)])
    assert all(len(texts) == 1 for texts, _ in gen.calls)
    assert sorted(texts[0] for texts, _ in gen.calls) == ["p0", "p1", "p2", "p3"]


@pytest.fixture(scope="module")
def tiny_server_app(tmp_path_factory, tokenizer):
    from conftest import make_model
    from lmdistill.config import ModelConfig
    from lmdistill.generate.config import ServeConfig
    from lmdistill.generate.hf import HFGenerator
    from lmdistill.serve import create_app

    d = tmp_path_factory.mktemp("batch") / "teacher"
    make_model(d, tokenizer, hidden=32, layers=2, seed=3)
    generator = HFGenerator.load(ModelConfig(name_or_path=str(d)), "cpu")
    return create_app(generator, ServeConfig(model=ModelConfig(name_or_path=str(d)), batch_wait_ms=300)), "teacher"


def test_concurrent_greedy_requests_through_the_app_are_batched_and_match_solo_answers(tiny_server_app):
    from fastapi.testclient import TestClient

    app, name = tiny_server_app
    prompts = ["the cat", "a dog sees the ball and", "blue", "one two three four five six"]

    def ask(http, prompt: str) -> dict:
        body = {"model": name, "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2}
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()

    with TestClient(app) as http:
        solo = [ask(http, p) for p in prompts]  # one at a time: each its own call
        calls_before = app.state.batcher.stats.calls
        start = threading.Barrier(len(prompts))

        def together(p: str) -> dict:
            start.wait()
            return ask(http, p)

        with ThreadPoolExecutor(len(prompts)) as pool:
            batched = list(pool.map(together, prompts))
    assert app.state.batcher.stats.calls - calls_before < len(prompts)  # some requests shared a call
    for one, many in zip(solo, batched, strict=True):
        # left padding does not change a greedy answer, nor the prompt's token count
        assert many["choices"][0]["text"] == one["choices"][0]["text"]
        assert many["usage"] == one["usage"]
        got, want = (r["choices"][0]["logprobs"]["token_logprobs"] for r in (many, one))
        assert got == pytest.approx(want, abs=1e-4)


def test_a_seeded_sampled_request_gets_the_same_answer_alone_and_in_a_batch(tiny_server_app):
    from fastapi.testclient import TestClient

    app, name = tiny_server_app
    seeded = {"model": name, "prompt": "the cat", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7,
              "n": 2}

    def ask(http, body: dict) -> list[str]:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        return [c["text"] for c in reply.json()["choices"]]

    with TestClient(app) as http:
        alone = ask(http, seeded)
        assert ask(http, seeded) == alone  # reproducible
        assert ask(http, {**seeded, "seed": 8}) != alone  # and the seed matters (8 tokens x 2 samples)
        others = [{**seeded, "prompt": p, "seed": None} for p in ("a dog", "one two three four", "blue")]
        start = threading.Barrier(1 + len(others))

        def together(body: dict) -> list[str]:
            start.wait()
            return ask(http, body)

        calls_before = app.state.batcher.stats.calls
        with ThreadPoolExecutor(1 + len(others)) as pool:
            batched = list(pool.map(together, [seeded, *others]))
    assert app.state.batcher.stats.calls - calls_before < 1 + len(others)
    assert batched[0] == alone
    assert len(alone) == 2 and alone[0] != alone[1]  # two samples, two streams
