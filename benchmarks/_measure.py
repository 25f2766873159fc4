"""Shared timing and peak-memory helpers for the benchmark scripts (not a benchmark itself).

Peak memory, and how it is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was allocated before
  the call (the inputs). Exact for tensors; excludes the caching allocator's reserve and cuBLAS workspaces.
- CPU: the kernel's resident-set high-water mark. Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` to
  the current RSS (Linux >= 4.0), so ``VmHWM`` after the call minus ``VmRSS`` before it is the peak extra memory
  the call touched: every tensor, temporaries included, as the OS saw it. ``tracemalloc`` cannot do this job (it
  only sees Python's allocator, not torch's), and torch has no CPU peak counter. Each measurement runs in a fresh
  process that does nothing else, after a tiny run of the same code (so paged-in library code and thread pools are
  not counted), with ``MALLOC_MMAP_THRESHOLD_`` fixed so that glibc maps and unmaps every large block instead of
  keeping freed ones in its heap. Where ``clear_refs`` is missing (not Linux) the
  fallback is ``ru_maxrss`` of that fresh process minus its RSS before the call, an upper bound.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak extra resident memory while ``fn()`` runs (see the module docstring for the method)."""
    gc.collect()
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    fn()
    if reset and before is not None:
        peak = _status_kib("VmHWM")
        assert peak is not None
        return max(0, peak - before) * 1024
    # ru_maxrss is KiB on Linux, bytes on macOS
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss_bytes = maxrss if sys.platform == "darwin" else maxrss * 1024
    return max(0, maxrss_bytes - (before or 0) * 1024)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak extra CUDA memory allocated while ``fn()`` runs."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def in_fresh_process(script: str, args: list[str]) -> dict:
    """Run ``python script args`` and parse the last stdout line as JSON (how CPU memory is measured)."""
    env = dict(os.environ)
    # A fixed mmap threshold turns off glibc's adaptive one, under which freed blocks of up to 32 MiB stay in the
    # heap and would then be reused unseen by RSS (or counted twice); with it every large tensor is mapped and
    # unmapped, so the resident set follows the live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-200:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(fns: dict[str, Callable[[], object]], reps: int, warmup: int, cuda: bool) -> dict[str, float]:
    """Median wall time of each function, interleaving them run by run so drifting machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join([line, sep, *body])
