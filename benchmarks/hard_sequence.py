"""Sequence-level hard distillation end to end on the embedded default, through the user's commands:

    lmdistill serve      SmolLM2-135M-Instruct behind an OpenAI-compatible API (a real subprocess, 127.0.0.1,
                         free port, bearer key from an environment variable)
    lmdistill generate   teacher answers to questions derived from the offline Wikipedia summaries, through the
                         `openai` backend, then the length (truncated, too short) and duplicate filters
    lmdistill hard       --mode sequence: a student pruned from the teacher is fine-tuned on the kept completions

and prints one table: generation throughput, what each filter dropped, and the student's held-out top-1 agreement
with the teacher, KL(teacher || student) and perplexity before and after training, the teacher's perplexity as the
reference.

Held out means held-out prompts: the kept completions of `--eval-prompts` prompts (a seeded choice) are set aside
before training, all samples of a prompt on the same side, so the student never saw the question, let alone another
sample of its answer. The same blocks score the pruned student before training and the trained one after, with one
teacher pass, on the completion tokens only (`lmdistill.evaluate.evaluate_models`).

    python benchmarks/hard_sequence.py              # 8-9 min on a 2-core CPU at load average 7-10 (most of it generating)
    python benchmarks/hard_sequence.py --prompts 48 --steps 40 --keep-layers 0,6,12,18,24,29

`--n` samples per prompt go in one request, which the server decodes as one batch: on a CPU, where decoding one
sequence is bound by reading the weights, that is most of the throughput there is (requests from several clients are
served one at a time). Every process runs on `--threads` threads, default 1: on a loaded 2-core machine two OpenMP
threads decode ~10x slower than one (measured: 3.3 vs 0.35 s per step at load ~10). The server is stopped as soon as
generation is done, and on any error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "LMDISTILL_BENCH_KEY"
SERVED = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def cli(verb: str, *args: str, env: dict[str, str], log_path: Path) -> float:
    """`python -m lmdistill VERB ARGS`, output to `log_path`; returns wall seconds. Raises with the log's tail."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, "-m", "lmdistill", verb, *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"`lmdistill {verb}` exited with {rc}; last lines of {log_path}:\n{tail}")
    return time.perf_counter() - t0


class Server:
    """`lmdistill serve` on the embedded teacher in a subprocess; `stop()` is idempotent."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self._log = open(self.log_path, "w")  # a file, not a pipe: a full pipe would stall the server
        cmd = [sys.executable, "-m", "lmdistill", "serve", "--config", "configs/serve.yaml", "--port", str(self.port),
               "--api_key_env", KEY_ENV, "--device", "cpu", "--log_level", "warning"]
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout_s: float) -> float:
        t0 = time.perf_counter()
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early ({self.proc.returncode}):\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"serve did not answer /health within {timeout_s:.0f} s (log: {self.log_path})")
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._log.close()


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def split_by_prompt(records: list[dict[str, Any]], n_eval: int, seed: int) -> tuple[list[dict], list[dict], int]:
    """(train, held-out, held-out prompt count): all samples of one prompt land on the same side."""
    ids = sorted({str(r["id"]) for r in records})
    held = set(random.Random(seed).sample(ids, min(n_eval, max(len(ids) - 1, 0))))
    return ([r for r in records if str(r["id"]) not in held], [r for r in records if str(r["id"]) in held],
            len(held))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def evaluate_before_after(student_dir: str, keep_layers: list[int], held: list[dict[str, Any]], block: int,
                          batch: int, threads: int) -> tuple[dict[str, dict[str, float]], float]:
    """Metrics of the pruned student (what `hard` starts from) and of the trained one on the same held-out blocks."""
    import torch

    from lmdistill.assets import EMBEDDED_TEACHER
    from lmdistill.config import DataConfig, ModelConfig, StudentConfig
    from lmdistill.data import chat_blocks
    from lmdistill.evaluate import evaluate_models
    from lmdistill.models import build_student, load_causal_lm, load_teacher, load_tokenizer, shared_vocab_size

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(EMBEDDED_TEACHER)
    teacher = load_teacher(ModelConfig(name_or_path=EMBEDDED_TEACHER))
    # the same construction `hard` used (pruning copies teacher layers, so it is deterministic)
    before = build_student(StudentConfig(init="prune", keep_layers=keep_layers), tokenizer, teacher=teacher)
    after = load_causal_lm(student_dir)
    n_vocab = shared_vocab_size(tokenizer, tokenizer, teacher, after)
    blocks = chat_blocks(held, DataConfig(stage="chat", block_size=block), tokenizer)
    with torch.no_grad():
        metrics = evaluate_models({"before": before, "after": after}, blocks, n_vocab=n_vocab, teacher=teacher,
                                  batch_size=batch, device="cpu")
    return metrics, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=24, help="Wikipedia-derived questions sent to the teacher")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt (one request, decoded as one batch)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--system-prompt", default=None, help="system message of every prompt (default: the chat "
                    "template's own)")
    ap.add_argument("--concurrency", type=int, default=4, help="requests in flight (the server runs one at a time)")
    ap.add_argument("--min-chars", type=int, default=20, help="length filter: drop completions shorter than this")
    ap.add_argument("--keep-truncated", action="store_true", help="keep completions cut off at --max-new-tokens")
    ap.add_argument("--eval-prompts", type=int, default=6, help="prompts whose completions are held out")
    ap.add_argument("--keep-layers", default="0,10,20,29", help="teacher layers the student keeps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--block", type=int, default=96, help="tokens per conversation (system + question + answer)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads of the server, `hard` and the evaluation: on a loaded machine one thread"
                    " is many times faster than two (spinning OpenMP barriers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where outputs go (default: a new temporary directory)")
    args = ap.parse_args()
    keep_layers = [int(i) for i in args.keep_layers.split(",")]
    # `kill <pid>` of this script unwinds through the `finally` that stops the server, as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lmdistill-hard-seq-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, KEY_ENV: secrets.token_hex(16), "OMP_NUM_THREADS": str(args.threads)}
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load_start = load_average()
    t_total = time.perf_counter()
    print(f"workdir {workdir}; load average (1/5/15 min) {load_start}", flush=True)

    # ---- serve + generate --------------------------------------------------------------------------------------
    raw = workdir / "completions.jsonl"
    server = Server(workdir, env)
    try:
        ready_s = server.wait_ready(timeout_s=300)
        print(f"serve: up on port {server.port} after {ready_s:.1f} s", flush=True)
        system = ["--prompts.system_prompt", args.system_prompt] if args.system_prompt else []
        gen_s = cli(
            "generate", "--config", "configs/generate-api.yaml",
            "--teacher.base_url", f"{server.base}/v1", "--teacher.api_model", SERVED, "--teacher.api_key_env", KEY_ENV,
            "--teacher.concurrency", str(args.concurrency), "--teacher.timeout_s", "600",
            "--sampling.n", str(args.n), "--sampling.max_new_tokens", str(args.max_new_tokens),
            "--sampling.temperature", str(args.temperature), "--sampling.seed", str(args.seed),
            # per-sample token counts: an API reports only their sum over the n samples, log-probs have one per token
            "--sampling.logprobs", "true", "--sampling.top_logprobs", "0",
            "--prompts.max_prompts", str(args.prompts), *system,
            "--filters.min_chars", str(args.min_chars), "--filters.drop_truncated", str(not args.keep_truncated).lower(),
            "--filters.dedup", "per_prompt",
            "--output", str(raw), "--overwrite", "true", "--progress", "false",
            env=env, log_path=workdir / "generate.log",
        )
    finally:
        server.stop()
    summary = json.loads((workdir / "completions.summary.json").read_text())
    records = [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]
    completion_tokens = sum(r.get("completion_tokens") or 0 for r in records)
    filters = summary["filters"]
    print(f"generate: {summary['records']} samples in {summary['seconds']:.1f} s, kept {filters['kept']}", flush=True)

    # ---- held-out split by prompt, then hard --mode sequence ---------------------------------------------------
    kept = [json.loads(line) for line in Path(summary["filtered_output"]).read_text().splitlines() if line.strip()]
    train, held, held_prompts = split_by_prompt(kept, args.eval_prompts, args.seed)
    if len(train) < args.batch or not held:
        raise SystemExit(f"only {len(kept)} completions survived the filters: too few to hold out {args.eval_prompts} "
                         "prompts and train on the rest; raise --prompts or --max-new-tokens, or --keep-truncated")
    write_jsonl(workdir / "train.jsonl", train)
    write_jsonl(workdir / "heldout.jsonl", held)
    out_dir = workdir / "hard"
    hard_s = cli(
        "hard", "--config", "configs/hard-sequence.yaml",
        "--data.source", str(workdir / "train.jsonl"), "--data.block_size", str(args.block),
        "--data.eval_documents", "0", "--eval_teacher", "false",
        "--student.keep_layers", f"[{args.keep_layers}]",
        "--train.output_dir", str(out_dir), "--train.max_steps", str(args.steps), "--train.seed", str(args.seed),
        "--train.micro_batch_size", str(args.batch), "--train.lr", str(args.lr),
        "--train.warmup_steps", str(max(1, args.steps // 10)), "--train.eval_every", "0",
        "--train.save_every", "0", "--train.progress", "false",
        env=env, log_path=workdir / "hard.log",
    )
    hard = json.loads((out_dir / "summary.json").read_text())
    print(f"hard: {hard['steps']} steps in {hard_s:.1f} s; evaluating before/after", flush=True)
    metrics, eval_s = evaluate_before_after(hard["student_dir"], keep_layers, held, args.block, args.batch,
                                            args.threads)
    before, after, teacher = metrics["before"], metrics["after"], metrics["teacher"]
    total_s = time.perf_counter() - t_total

    # ---- table ---------------------------------------------------------------------------------------------------
    print()
    print(f"load average (1/5/15 min) at start {load_start}; at end {load_average()}")
    print(f"teacher {SERVED} via lmdistill serve, {args.threads} thread(s) per process: {args.prompts} prompts x "
          f"n={args.n}, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, concurrency "
          f"{args.concurrency}, system prompt {args.system_prompt or 'the chat template default'!r}")
    print()
    print("| generation (lmdistill serve -> generate) | value |")
    print("| --- | ---: |")
    print(f"| server start-up to /health (s) | {ready_s:.1f} |")
    print(f"| samples generated | {summary['records']} |")
    print(f"| generation wall time (s) | {summary['seconds']:.1f} |")
    print(f"| samples/s | {fmt(summary['samples_per_second'])} |")
    print(f"| completion tokens/s | {completion_tokens / summary['seconds']:.1f} |")
    print(f"| mean completion tokens | {completion_tokens / max(len(records), 1):.1f} |")
    print(f"| `generate` wall time, start-up included (s) | {gen_s:.1f} |")
    print()
    print("| filter | dropped |")
    print("| --- | ---: |")
    for name, count in filters["dropped"].items():
        print(f"| {name} | {count} |")
    print(f"| **kept** | **{filters['kept']} of {filters['total']}** ({filters['prompts_without_sample']} prompts "
          "left without a sample) |")
    print()
    print(f"student: teacher layers [{args.keep_layers}] ({hard['student_parameters'] / 1e6:.1f}M params), "
          f"{hard['train_blocks']} train conversations ({hard['train_target_tokens']} completion tokens), "
          f"{hard['steps']} steps x {args.batch}, lr {args.lr}; held out: {len(held)} conversations of "
          f"{held_prompts} unseen prompts ({int(after['tokens'])} completion tokens)")
    print()
    print("| held-out metric | pruned (before) | trained (after) | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for key, name in (("agreement", "top-1 agreement with teacher"), ("kl_to_teacher", "KL(teacher || student)"),
                      ("perplexity", "perplexity"), ("ce", "CE (nats/token)")):
        b, a = before[key], after[key]
        print(f"| {name} | {b:.4g} | {a:.4g} | {format(a / b, '.3g') if b else '-'} |")
    print(f"| teacher perplexity (reference) | {teacher['perplexity']:.4g} | {teacher['perplexity']:.4g} | - |")
    print()
    print(f"train {hard['train_tokens_per_s']:.1f} completion tokens/s, final train loss {hard['final_train_loss']:.3f};"
          f" `hard` {hard_s:.1f} s, before/after eval {eval_s:.1f} s, total {total_s:.1f} s")
    print(f"outputs: {workdir}")


if __name__ == "__main__":
    main()
