"""Batches prepared ahead of the step, in worker processes: CPU work a recipe does on each data micro-batch before
the device sees it (today: aligning the student's text with a teacher of another tokenizer, lmdistill.align), taken
off the step's critical path.

The loop's batch schedule is a function of the step (lmdistill.data.BatchSchedule), so the micro-batches of the next
`lookahead` steps are known in advance: they are handed to a pool of forked processes, which inherit the data and the
prepare function (nothing is pickled but the indices and the prepared tensors), and the step takes its own when it
comes. A prepared batch is the same whichever process made it (the function is deterministic), so the number of
workers never changes what is trained. A worker's error reaches the step that needs its batch.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import torch
from torch import Tensor

from lmdistill.data import TokenBlocks
from lmdistill.io import worker_signals
from lmdistill.train.distributed import local_cpu_cores

PrepareFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]

# What the forked workers read (inherited, set in the parent before the pool starts).
_SOURCE: tuple[TokenBlocks, PrepareFn] | None = None


def _prepare_in_worker(indices: list[int]) -> dict[str, Tensor]:
    assert _SOURCE is not None
    torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would take the step's cores
    data, prepare = _SOURCE
    return prepare(data.batch(indices))


class Prefetcher:
    """`data`'s micro-batches through `prepare`, computed by `workers` forked processes for the next `lookahead`
    steps (0 workers: in the caller, when asked)."""

    def __init__(self, data: TokenBlocks, prepare: PrepareFn, workers: int, lookahead: int = 2) -> None:
        self.data, self.prepare, self.workers, self.lookahead = data, prepare, workers, lookahead
        self._pool: Pool | None = None
        self._pending: dict[tuple[int, int], AsyncResult[dict[str, Tensor]]] = {}

    def _start(self) -> Pool:
        global _SOURCE
        if self._pool is None:
            _SOURCE = (self.data, self.prepare)
            try:
                self._pool = mp.get_context("fork").Pool(self.workers, initializer=worker_signals)
            finally:
                _SOURCE = None  # the workers hold their copy; the parent needs none
        return self._pool

    def batches(self, step: int, micro: Callable[[int], Sequence[list[int]]], last_step: int) -> list[dict[str, Any]]:
        """Step `step`'s prepared micro-batches (`micro(s)`: step s's block indices), having queued those of the
        steps after it up to `lookahead` (and before `last_step`)."""
        if self.workers <= 0:
            return [self.prepare(self.data.batch(idx)) for idx in micro(step)]
        pool = self._start()
        for s in range(step, min(step + 1 + self.lookahead, last_step)):
            for i, idx in enumerate(micro(s)):
                if (s, i) not in self._pending:
                    self._pending[(s, i)] = pool.apply_async(_prepare_in_worker, (list(idx),))
        for key in [k for k in self._pending if k[0] < step]:  # a resume or a skipped step: never needed
            del self._pending[key]
        return [self._pending.pop((step, i)).get() for i in range(len(micro(step)))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._pending.clear()


def prefetch_workers(requested: int) -> int:
    """`requested`, or (-1, auto) one worker per two free cores of this process's share of the node, at most 4, and
    none with fewer than 4 cores (there the workers would only take the step's cores); 0 where processes cannot be
    forked."""
    if "fork" not in mp.get_all_start_methods():
        return 0
    if requested >= 0:
        return requested
    cores = local_cpu_cores()
    return 0 if cores < 4 else min(4, cores // 2)
