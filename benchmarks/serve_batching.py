"""Throughput of `lmdistill serve` under concurrent clients: cross-request batching against one request at a time.

    python benchmarks/serve_batching.py                       # embedded SmolLM2-135M-Instruct, 16 clients
    python benchmarks/serve_batching.py --clients 32 --max-tokens 64 --model Qwen/Qwen2.5-0.5B-Instruct

Each of `--clients` threads sends one chat request at once through the app's `RequestBatcher` (the component that
serves every HTTP request; HTTP itself is left out so the table measures the model's use). The baseline is the same
batcher with `max_batch=1`, i.e. one `generate` call per request, measured in the same run. Both arms run the same
prompts; unseeded requests sample with temperature 0.7, seeded ones (`--seeded`) through the per-row sampler.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from lmdistill.assets import EMBEDDED_TEACHER, wikipedia_dataset
from lmdistill.config import ModelConfig
from lmdistill.generate.hf import HFGenerator
from lmdistill.request_batcher import RequestBatcher, SamplingKey


def run_arm(generator: HFGenerator, prompts: list[str], key: SamplingKey, max_batch: int, seeded: bool) -> dict:
    batcher = RequestBatcher(generator, max_batch=max_batch, wait_s=0.01)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(batcher.generate, [p], key, i if seeded else None) for i, p in enumerate(prompts)]
        outs = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(c.completion_tokens or 0 for out in outs for group in out for c in group)
    return {"wall": wall, "tokens": tokens, "calls": batcher.stats.calls, "largest": batcher.stats.largest_batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED_TEACHER)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--seeded", action="store_true", help="every request carries a seed (per-row sampling)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = HFGenerator.load(ModelConfig(name_or_path=args.model))
    titles = [r["title"] for r in wikipedia_dataset().select(range(args.clients))]
    prompts = [generator.render([{"role": "user", "content": f"In one sentence, what is {t}?"}]) for t in titles]
    key = SamplingKey(n=1, temperature=0.7, top_p=0.95, max_new_tokens=args.max_tokens, stop=(), top_logprobs=None,
                      add_special_tokens=False)
    run_arm(generator, prompts[:2], key, args.max_batch, args.seeded)  # warm-up
    arms = {"one request per call": run_arm(generator, prompts, key, 1, args.seeded),
            f"batched (max {args.max_batch})": run_arm(generator, prompts, key, args.max_batch, args.seeded)}
    base = arms["one request per call"]
    print(f"model {args.model} on {generator.device}, {args.clients} concurrent chat requests, max_tokens "
          f"{args.max_tokens}, temperature 0.7, {'seeded' if args.seeded else 'unseeded'}")
    print(f"{'arm':<24}{'wall s':>9}{'requests/s':>12}{'tokens/s':>10}{'calls':>7}{'largest':>9}{'speed-up':>10}")
    for name, r in arms.items():
        print(f"{name:<24}{r['wall']:>9.2f}{args.clients / r['wall']:>12.2f}{r['tokens'] / r['wall']:>10.1f}"
              f"{r['calls']:>7}{r['largest']:>9}{base['wall'] / r['wall']:>10.2f}")


if __name__ == "__main__":
    main()
