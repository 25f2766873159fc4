"""Fused chunked divergence vs naive (materialised logits), and TRL / Liger when installed: time and peak memory.

    python benchmarks/fused_loss.py          # CUDA sweep: N in {4k, 16k, 64k}, V = 151,936, Hs 896, Ht 1536, bf16
    python benchmarks/fused_loss.py --cpu    # small CPU shapes: N 2048, V in {32k, 49k}, Hs 256, Ht 512, fp32

Each row is one loss computed forward + backward (gradients w.r.t. the student's hidden states and lm_head) from
the hidden states of both models:

- ``naive``: ``divergence(hs @ Ws.T, ht @ Wt.T)``, the reference on full ``[N, V]`` logits (teacher under no_grad).
- ``ours``: :func:`lmdistill.losses.fused_loss` with the torch chunk loop (``backend="torch"``, what ``auto`` runs).
- ``ours_triton``: the same with ``backend="triton"`` (CUDA with the ``triton`` package only).
- ``trl``: ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (TRL 1.16; what its DistillationTrainer's
  ``_chunked_divergence_loss`` runs), the per-token divergence averaged (CUDA only, if importable).
- ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (Liger 0.8.5) with the hard loss off (if
  importable).

Columns: median wall time over ``--reps`` runs (runs of all variants interleaved), peak extra memory of one run
(see ``benchmarks/_measure.py`` for how it is measured on each device), and both as ratios to ``naive`` from the
same run. On CUDA, ``x floor`` divides the time by the matmul floor: ``2 N V (3 Hs + Ht)`` FLOPs (student
projection, its two gradient matmuls, teacher projection) at the bf16 GEMM rate measured at the start of the run.
``agree`` is the relative difference of the loss value to ``naive``'s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import cpu_peak_bytes, cuda_peak_bytes, fmt_table, in_fresh_process, median_seconds  # noqa: E402

from lmdistill.losses import Head, divergence, fused_loss  # noqa: E402

BETA = {"forward_kl": 0.0, "jsd": 0.5}  # how TRL and Liger (generalized JSD) express each kind


def make_inputs(n: int, vocab: int, hs: int, ht: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype)

    # lm_head std 2/sqrt(H): logits of std ~2, the spread of a trained model's
    return {
        "hs": rnd(n, hs, std=1.0).requires_grad_(),
        "ws": rnd(vocab, hs, std=2 / math.sqrt(hs)).requires_grad_(),
        "ht": rnd(n, ht, std=1.0),
        "wt": rnd(vocab, ht, std=2 / math.sqrt(ht)),
    }


def variants(x: dict, kind: str, chunk_size: int | None) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function that runs forward + backward once and returns the (detached) loss."""

    def clear() -> None:
        x["hs"].grad = None
        x["ws"].grad = None

    def naive() -> torch.Tensor:
        clear()
        with torch.no_grad():
            t_logits = x["ht"] @ x["wt"].t()
        loss = divergence(x["hs"] @ x["ws"].t(), t_logits, kind, beta=0.5)
        loss.backward()
        return loss.detach()

    def ours(backend: str = "torch") -> torch.Tensor:
        clear()
        sums = fused_loss(x["hs"], Head(x["ws"]), teacher_hidden=x["ht"], teacher_head=Head(x["wt"]), kind=kind,
                          beta=0.5, chunk_size=chunk_size, backend=backend)  # fmt: skip
        loss = sums.total / sums.tokens  # the mean, as naive's
        loss.backward()
        return loss.detach()

    out = {"naive": naive, "ours": ours}
    if x["hs"].device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        out["ours_triton"] = lambda: ours("triton")
    trl = _trl_variant(x, kind, clear)
    if trl is not None:
        out["trl"] = trl
    liger = _liger_variant(x, kind, clear)
    if liger is not None:
        out["liger"] = liger
    return out


def import_trl_chunked_divergence() -> type:
    """TRL's ``ChunkedDivergenceFunction`` (``trl/kernels/chunked_divergence.py``, TRL >= 1.16).

    That module imports ``trl.trainer.utils`` for one function, ``maybe_gather_lm_head_ctx`` (a null context outside
    DeepSpeed ZeRO-3), and ``trl.trainer.utils`` imports pandas and datasets (pyarrow). Where those are missing (the
    GPU check does not carry them: benchmarks/gpu/wheels.txt), a module holding only that function stands in.
    """
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    except ModuleNotFoundError as e:
        if e.name not in ("datasets", "pandas", "pyarrow"):
            raise
        import contextlib
        import types

        for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")]:
            del sys.modules[name]  # the half-imported package
        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()  # type: ignore[attr-defined]
        sys.modules["trl.trainer.utils"] = stub
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    return ChunkedDivergenceFunction


def _trl_variant(x: dict, kind: str, clear: Callable[[], None]) -> Callable[[], torch.Tensor] | None:
    if x["hs"].device.type != "cuda":
        return None
    try:
        ChunkedDivergenceFunction = import_trl_chunked_divergence()
    except Exception:  # noqa: BLE001 - absent, or a version without the kernel
        return None

    def run() -> torch.Tensor:
        clear()
        per_token, _entropy = ChunkedDivergenceFunction.apply(
            x["hs"], x["ws"], None, x["ht"], x["wt"], None, BETA[kind], 1.0
        )
        loss = per_token.mean()
        loss.backward()
        return loss.detach()

    return run


def _liger_variant(x: dict, kind: str, clear: Callable[[], None]) -> Callable[[], torch.Tensor] | None:
    if x["hs"].device.type != "cuda":
        return None
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception:  # noqa: BLE001
        return None
    # Liger 0.8.5: beta weights the teacher in the mixture as ours does (0 = forward KL); the loss is the mean over
    # the tokens whose label is not ignore_index, without T^2
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA[kind], temperature=1.0)
    labels = torch.zeros(x["hs"].shape[0], dtype=torch.long, device=x["hs"].device)

    def run() -> torch.Tensor:
        clear()
        loss = loss_fn(x["hs"], x["ws"], x["ht"], x["wt"], labels)
        loss.backward()
        return loss.detach()

    return run


def bf16_tflops(n: int, vocab: int, h: int) -> float:
    a = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(vocab, h, device="cuda", dtype=torch.bfloat16)
    sec = median_seconds({"mm": lambda: a @ b.t()}, reps=10, warmup=3, cuda=True)["mm"]
    return 2 * n * vocab * h / sec / 1e12


# ----------------------------------------------------------------------------------------------------------------


def measure_memory_child(argv: list[str]) -> None:
    """Fresh-process CPU memory measurement of one variant (called by the parent through in_fresh_process)."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    # a tiny run first: the first call of each op pages in library code and sets up thread pools, which RSS would
    # otherwise count as the variant's memory
    tiny = make_inputs(64, 512, spec["hs"], spec["ht"], dtype, "cpu")
    variants(tiny, spec["kind"], spec["chunk_size"])[spec["variant"]]()
    del tiny
    x = make_inputs(spec["n"], spec["vocab"], spec["hs"], spec["ht"], dtype, "cpu")
    fn = variants(x, spec["kind"], spec["chunk_size"])[spec["variant"]]
    print(json.dumps({"peak": cpu_peak_bytes(fn)}))


def run_config(args: argparse.Namespace, n: int, vocab: int, kind: str, device: str, floor_rate: float | None) -> list:
    dtype = getattr(torch, args.dtype)
    cpu = device == "cpu"
    x = make_inputs(n, vocab, args.hs, args.ht, dtype, device)
    values: dict[str, float] = {}

    def recording(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            out = fn()
            values[name] = float(out)
            return out

        return run

    fns = {name: recording(name, fn) for name, fn in variants(x, kind, args.chunk_size).items()}
    peaks: dict[str, int | str] = {}
    if not cpu:
        for name, fn in fns.items():  # compile / autotune / cuBLAS heuristics before anything is measured
            try:
                fn()
            except torch.cuda.OutOfMemoryError:
                peaks[name] = "OOM"
            torch.cuda.empty_cache()
    for name, fn in fns.items():
        if name in peaks:
            continue
        if not cpu:
            try:
                peaks[name] = cuda_peak_bytes(fn)
            except torch.cuda.OutOfMemoryError:
                peaks[name] = "OOM"
        else:
            spec = dict(n=n, vocab=vocab, hs=args.hs, ht=args.ht, dtype=args.dtype, kind=kind, variant=name,
                        chunk_size=args.chunk_size, threads=torch.get_num_threads())  # fmt: skip
            res = in_fresh_process(__file__, ["--_child", json.dumps(spec)])
            peaks[name] = res.get("peak", res.get("error", "?"))
    runnable = {k: v for k, v in fns.items() if peaks[k] != "OOM"}
    # no warm-up run on CPU (nothing to compile; each run is seconds): the first timed run is as good as any
    times = median_seconds(runnable, reps=args.reps, warmup=0, cuda=not cpu)

    rows = []
    base_t, base_m = times.get("naive"), peaks.get("naive")
    floor = 2 * n * vocab * (3 * args.hs + args.ht) / (floor_rate * 1e12) if floor_rate else None
    for name in fns:
        t = times.get(name)
        m = peaks[name]
        row = [kind, str(n), str(vocab), name]
        row.append("OOM" if t is None else f"{t * 1e3:.1f}")
        row.append(f"{m / 2**20:.0f}" if isinstance(m, int) else str(m))
        row.append(f"{t / base_t:.2f}" if t and base_t else "-")
        row.append(f"{m / base_m:.3f}" if isinstance(m, int) and isinstance(base_m, int) and base_m else "-")
        if floor is not None:
            row.append(f"{t / floor:.2f}" if t else "-")
        agree = None
        if name in values and "naive" in values:
            agree = abs(values[name] - values["naive"]) / max(abs(values["naive"]), 1e-12)
        row.append(f"{agree:.1e}" if agree is not None else "-")
        rows.append(row)
        print("  " + " ".join(row), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        measure_memory_child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="small CPU shapes: ours vs naive (runs anywhere)")
    p.add_argument("--n", type=int, nargs="+", help="token counts (default: CUDA 4096 16384 65536, CPU 2048)")
    p.add_argument("--vocab", type=int, nargs="+", help="vocab sizes (default: CUDA 151936, CPU 32768 49152)")
    p.add_argument("--hs", type=int, help="student width (default: CUDA 896, CPU 256)")
    p.add_argument("--ht", type=int, help="teacher width (default: CUDA 1536, CPU 512)")
    p.add_argument("--kinds", nargs="+", default=["forward_kl", "jsd"], choices=list(BETA))
    p.add_argument("--dtype", help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--reps", type=int, help="timed runs per variant (default: CUDA 10, CPU 3)")
    p.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for ours (default: automatic)")
    args = p.parse_args()

    if not args.cpu and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu for the CPU comparison")
    device = "cpu" if args.cpu else "cuda"
    cpu = device == "cpu"
    args.n = args.n or ([2048] if cpu else [4096, 16384, 65536])
    args.vocab = args.vocab or ([32768, 49152] if cpu else [151936])
    args.hs = args.hs or (256 if cpu else 896)
    args.ht = args.ht or (512 if cpu else 1536)
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    args.reps = args.reps or (3 if cpu else 10)

    rate = None if cpu else bf16_tflops(max(args.n), max(args.vocab), args.hs)
    where = f"CPU, {torch.get_num_threads()} threads" if cpu else torch.cuda.get_device_name()
    print(f"# fused_loss on {where}, torch {torch.__version__}, {args.dtype}, Hs={args.hs}, Ht={args.ht}, "
          f"median of {args.reps}" + (f", bf16 GEMM {rate:.0f} TFLOP/s" if rate else ""))  # fmt: skip
    header = ["kind", "N", "V", "variant", "ms", "peak MiB", "time/naive", "mem/naive"]
    header += ([] if cpu else ["x floor"]) + ["agree"]
    rows = []
    for kind in args.kinds:
        for vocab in args.vocab:
            for n in args.n:
                rows += run_config(args, n, vocab, kind, device, rate)
    print(fmt_table(header, rows))


if __name__ == "__main__":
    main()
