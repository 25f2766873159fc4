"""Batches prepared ahead of the step in forked workers (lmdistill.train.prefetch): the same batches as in the step,
errors that reach the step, and workers that end when told to, even under the loop's signal handler."""

from __future__ import annotations

import os
import time

import pytest
import torch

from lmdistill.data import TokenBlocks
from lmdistill.io import stop_on_signals
from lmdistill.train.prefetch import Prefetcher, prefetch_workers


def _blocks(n: int = 12, t: int = 8) -> TokenBlocks:
    ids = torch.arange(n * t).view(n, t)
    return TokenBlocks(ids, ids + 1, torch.ones_like(ids))


def _prepare(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if int(batch["index"][0]) == 11:
        raise ValueError("block 11 cannot be prepared")
    return {**batch, "pid": torch.tensor(os.getpid()), "twice": batch["input_ids"] * 2}


def _micro(step: int) -> list[list[int]]:
    return [[(2 * step) % 11, (2 * step + 1) % 11], [(2 * step + 2) % 11]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_prepared_ahead_is_what_the_step_would_prepare_and_workers_end_on_close(capfd):
    data = _blocks()
    with stop_on_signals("optimizer step") as stop:  # the loop's handler, which forked workers inherit
        ahead = Prefetcher(data, _prepare, workers=2, lookahead=3)
        inline = Prefetcher(data, _prepare, workers=0)
        pids = set()
        for step in range(6):
            got, want = ahead.batches(step, _micro, 6), inline.batches(step, _micro, 6)
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g["twice"], w["twice"]) and torch.equal(g["index"], w["index"])
                pids.add(int(g["pid"]))
        assert os.getpid() not in pids and len(pids) >= 1  # made in the workers
        workers = [p.pid for p in ahead._pool._pool]  # type: ignore[union-attr]
        start = time.monotonic()
        ahead.close()
        assert time.monotonic() - start < 10 and not any(_alive(pid) for pid in workers)
        assert stop.signum is None  # ending the workers is no stop request for the parent
    # the workers end by SIGTERM's default action, not by the parent's finish-then-stop handler they inherited
    assert "finishing the optimizer step" not in capfd.readouterr().err


def test_a_workers_error_reaches_the_step_that_needs_the_batch():
    ahead = Prefetcher(_blocks(), _prepare, workers=1, lookahead=1)
    try:
        with pytest.raises(ValueError, match="block 11 cannot be prepared"):
            for step in range(8):  # step 3 asks for block 11
                ahead.batches(step, lambda s: [[11]] if s == 3 else _micro(s), 8)
    finally:
        ahead.close()


def test_auto_workers_leave_small_machines_alone(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert prefetch_workers(3) == 3 and prefetch_workers(0) == 0
    assert prefetch_workers(-1) == (0 if cores < 4 else min(4, cores // 2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one core per rank: no room for helpers
    assert prefetch_workers(-1) == 0
