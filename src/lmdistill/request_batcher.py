"""Cross-request batching for `lmdistill serve`: concurrent requests that ask for the same sampling settings share
one `generate` call.

A generation step costs about the same for 1 sequence as for 16 on a GPU (decoding is memory-bound), so a server
that runs one request at a time leaves most of the device idle while clients queue. One worker thread owns the model:
request threads enqueue their prompts and wait; the worker takes the oldest request, gathers queued requests with the
same settings (up to `max_batch` sequences, waiting at most `wait_s` for more to arrive), runs them as one batch and
hands each request its own rows. While a batch runs, new requests queue up, so under load batches fill without any
waiting.

What is batched: requests whose `generate` keyword arguments are equal (n, temperature, top_p, max_tokens, stop,
logprobs, raw vs chat), because one HF `generate` call takes one set of them. A seeded request must give the same
answer however many strangers arrive with it, while `transformers` samples all rows of a batch from one random
stream; so a batch that holds a seeded request samples every row from its own stream
(`lmdistill.generate.seeded_sampling`), seeded from the request's seed and the row's place in that request. (Its
logits can still differ in the last bits with the batch's padding, as in any batching server.) If a batch fails,
each of its requests is retried alone, so one bad request cannot fail the others.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lmdistill.generate.base import Completion
from lmdistill.generate.seeded_sampling import derive_seed, row_seeds


@dataclass(frozen=True)
class SamplingKey:
    """The `generate` keyword arguments that every request in one batch must share."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]
    top_logprobs: int | None
    add_special_tokens: bool


@dataclass
class _Request:
    texts: list[str]
    key: SamplingKey
    seed: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[Completion]] | None = None
    error: BaseException | None = None

    @property
    def rows(self) -> int:
        return len(self.texts) * self.key.n


@dataclass
class BatchStats:
    """Counters for logs and tests: how many generate calls served how many requests."""

    calls: int = 0
    requests: int = 0
    largest_batch: int = 0  # requests in one call


class RequestBatcher:
    """Serialises all access to `generator` through one worker thread, batching compatible requests.

    Args:
        generator: an `HFGenerator` (anything with its `generate(texts, n=..., ..., row_seeds=...)`).
        max_batch: most sequences (prompts x n) per call; a single larger request still runs, alone. 1 disables
            cross-request batching.
        wait_s: how long the worker waits for companions after the first request of a batch arrives.
    """

    def __init__(self, generator: Any, max_batch: int = 32, wait_s: float = 0.01) -> None:
        self.generator = generator
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_s))
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="lmdistill-batcher", daemon=True)
        self._worker.start()

    def generate(self, texts: list[str], key: SamplingKey, seed: int | None = None) -> list[list[Completion]]:
        """One list of `key.n` completions per text, as `generator.generate` returns them; blocks until done."""
        req = _Request(list(texts), key, seed)
        with self._cv:
            self._queue.append(req)
            self._cv.notify_all()
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    # ------------------------------------------------------------------------------------------------------------
    # the worker

    def _take(self) -> list[_Request]:
        """Wait for work, then remove and return one batch from the queue (called with the lock held)."""
        while not self._queue:
            self._cv.wait()
        first = self._queue[0]
        if self.max_batch == 1:
            return [self._queue.popleft()]
        deadline = time.monotonic() + self.wait_s
        while self._rows_like(first) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            self._cv.wait(left)
        batch = [self._queue.popleft()]
        rows, keep = first.rows, deque[_Request]()
        while self._queue:
            req = self._queue.popleft()
            if req.key == first.key and rows + req.rows <= self.max_batch:
                batch.append(req)
                rows += req.rows
            else:
                keep.append(req)
        self._queue.extendleft(reversed(keep))  # the others keep their place in line
        return batch

    def _rows_like(self, first: _Request) -> int:
        return sum(r.rows for r in self._queue if r.key == first.key)

    def _call(self, batch: list[_Request]) -> list[list[Completion]]:
        texts = [t for r in batch for t in r.texts]
        kwargs = dataclasses.asdict(batch[0].key)
        if any(r.seed is not None for r in batch):
            # sample j of text k of a request with seed s draws from derive_seed(derive_seed(s, k), j): a list of
            # prompts in one request gets distinct streams, and the same request gets the same ones in any batch
            text_seeds = [None if r.seed is None else derive_seed(r.seed, k) for r in batch for k in range(len(r.texts))]
            kwargs["row_seeds"] = row_seeds(text_seeds, batch[0].key.n)
        out = self.generator.generate(texts, **kwargs)
        self.stats.calls += 1
        return out

    def _run(self) -> None:
        while True:
            with self._cv:
                batch = self._take()
            self.stats.requests += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            try:
                out = self._call(batch)
                start = 0
                for r in batch:
                    r.result, start = out[start : start + len(r.texts)], start + len(r.texts)
            except BaseException as e:  # noqa: BLE001  (handed to the waiting request thread, never lost)
                if len(batch) == 1:
                    batch[0].error = e
                else:  # find the culprit: everyone else still gets an answer
                    for r in batch:
                        try:
                            r.result = self._call([r])
                        except BaseException as solo:  # noqa: BLE001
                            r.error = solo
            for r in batch:
                r.done.set()
