"""On-policy vs off-policy distillation on the embedded default (issue #13), every arm through `lmdistill onpolicy`.

Teacher SmolLM2-135M-Instruct; student pruned from it (the demo's layers); prompts = the embedded Wikipedia questions
(reference answer = the summary's extract). The same student init, prompts, steps, batch and seed for every arm:

    soft (off-policy)      lmbda=0: KL to the teacher on the dataset's reference answers (forward KL)
    hard_sequence          lmbda=0, seq_kd, alpha=0: SFT on answers the teacher writes to the same prompts
    onpolicy_dense         lmbda=1, reverse KL on the student's own samples, the teacher's whole distribution
    onpolicy_topk          lmbda=1, top-k log-probs from the teacher behind `lmdistill serve` (a real subprocess)
    onpolicy_topk_local    the same signal from the teacher in this process (tells the server apart from the signal)
    onpolicy_token         lmbda=1, sampled_token: the teacher's log-prob of each sampled token, policy gradient
    gkd_lmbda0.5           lmbda=0.5, dense reverse KL: half the steps on-policy, half on the dataset's answers

Scored on held-out prompts none of them trained on: the on-policy reverse KL per token (the student's samples scored
by the teacher) and the teacher's NLL of the student's greedy answers, before and after, with the wall-clock of the
training steps split into rollout / teacher scoring / update and the tokens each arm trained on. With `--seeds 0,1`
every arm runs once per seed and the table gives mean and half-range.

    python benchmarks/onpolicy.py                         # ~15 min on an idle 2-core CPU
    python benchmarks/onpolicy.py --steps 40 --seeds 0,1  # larger
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
ARMS: dict[str, dict[str, str]] = {
    "soft": {"lmbda": "0", "loss.kind": "forward_kl", "loss.alpha": "1.0"},
    "hard_sequence": {"lmbda": "0", "seq_kd": "true", "loss.alpha": "0.0"},
    "onpolicy_dense": {"signal": "dense"},
    "onpolicy_topk": {"signal": "topk", "k": "20", "teacher_server.url": "SERVER"},
    "onpolicy_topk_local": {"signal": "topk", "k": "20"},
    "onpolicy_token": {"signal": "sampled_token"},
    "gkd_lmbda0.5": {"lmbda": "0.5"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "lmdistill", "serve", "--model.name_or_path",
                             "embedded:smollm2-135m-instruct", "--device", "cpu", "--port", str(port),
                             "--log_level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit("lmdistill serve exited before answering /health")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("lmdistill serve did not start in 180 s")
        time.sleep(0.5)


def run_arm(name: str, overrides: dict[str, str], args: argparse.Namespace, seed: int, url: str) -> dict[str, Any]:
    from lmdistill.config import OnPolicyConfig, load_config
    from lmdistill.recipes.onpolicy import run_onpolicy

    base = {
        "student.keep_layers": f"[{args.keep_layers}]", "data.max_documents": str(args.prompts),
        "data.eval_documents": str(args.eval_prompts), "data.block_size": str(args.block_size),
        "rollout.n": "1", "rollout.max_new_tokens": str(args.max_new_tokens), "train.max_steps": str(args.steps),
        "train.micro_batch_size": str(args.batch), "train.lr": str(args.lr), "train.seed": str(seed),
        "train.eval_every": "0", "train.save_every": "0", "train.eval_batches": str(args.eval_prompts // args.batch),
        "train.progress": "false", "train.output_dir": str(args.out / f"{name}-seed{seed}"),
    }
    base.update({k: (url if v == "SERVER" else v) for k, v in overrides.items()})
    flat = [x for k, v in base.items() for x in (f"--{k}", v)]
    cfg = load_config(OnPolicyConfig, REPO / "configs" / "onpolicy.yaml", flat)
    t0 = time.perf_counter()
    summary = run_onpolicy(cfg)
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--prompts", type=int, default=400, help="question records read (held-out ones included)")
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--block-size", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--keep-layers", default="0,6,12,18,24,29")
    p.add_argument("--seeds", default="0")
    p.add_argument("--arms", default=",".join(a for a in ARMS if a != "onpolicy_topk_local"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-onpolicy"))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    server, url = start_server(1) if "onpolicy_topk" in arms else (None, "")
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for name in arms:
            for seed in seeds:
                print(f"[{name} seed {seed}] ...", flush=True)
                results.setdefault(name, []).append(run_arm(name, ARMS[name], args, seed, url))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    table(results, args, seeds)


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace, seeds: list[int]) -> None:
    first = next(iter(results.values()))[0]["eval_first"]
    print(f"\n{args.steps} steps x {args.batch} prompts, completions <= {args.max_new_tokens} tokens, seeds {seeds}; "
          f"held-out: {args.eval_prompts} prompts. Before training: on-policy reverse KL "
          f"{first['onpolicy_reverse_kl']:.3f}, teacher NLL of greedy answers {first['teacher_nll_greedy']:.3f}\n")
    cols = ("arm", "on-policy rev. KL", "teacher NLL (greedy)", "answer len", "tokens trained", "rollout s",
            "teacher s", "update s", "rollout share")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = {}
    for name, runs in results.items():
        kl = [r["eval_last"]["onpolicy_reverse_kl"] for r in runs]
        nll = [r["eval_last"]["teacher_nll_greedy"] for r in runs]
        length = [r["eval_last"]["answer_length"] for r in runs]
        ph = {k: statistics.mean(r["phases_s"][k] for r in runs) for k in ("rollout", "teacher", "update")}
        tokens = statistics.mean(_trained_tokens(r) for r in runs)
        share = ph["rollout"] / max(sum(ph.values()), 1e-9)
        rows[name] = {"kl": kl, "nll": nll, "phases": ph, "tokens": tokens}
        print(f"| {name} | {_stat(kl)} | {_stat(nll)} | {_stat(length)} | {tokens:,.0f} | {ph['rollout']:.1f} | "
              f"{ph['teacher']:.1f} | {ph['update']:.1f} | {share:.0%} |")
    off = [n for n in ("soft", "hard_sequence") if n in rows]
    for name in (n for n in rows if n.startswith(("onpolicy", "gkd"))):
        beats = all(statistics.mean(rows[name]["kl"]) < statistics.mean(rows[o]["kl"]) for o in off)
        print(f"{name}: {'beats' if beats else 'does NOT beat'} {' and '.join(off)} on held-out on-policy reverse KL")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))


def _trained_tokens(summary: dict[str, Any]) -> float:
    """Target tokens the student trained on: its completions on on-policy steps, else the dataset's (or teacher's)."""
    from lmdistill.train.logging import read_log

    return float(sum(r.get("target_tokens", 0) for r in read_log(Path(summary["log"]))))


if __name__ == "__main__":
    main()
