"""Sampling with one random stream per row, so a seeded prompt gets the same answer in any batch.

`transformers` samples every row of a batch from the one global generator: the tokens a row draws depend on how many
rows came before it. A server that batches strangers' requests (`lmdistill serve`) would then break a seeded
request's reproducibility. `RowSeededSampler` is a logits processor that does the sampling itself (temperature, top-p,
then a multinomial draw from the row's own `torch.Generator`) and hands `generate` a one-hot score, which its greedy
step turns into exactly that token. `generate` must therefore run with `do_sample=False`; the raw logits it returns
(`output_logits`) are untouched, so reported log-probs are the model's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

_MIX = 1_000_003  # combines a seed with an index into a new seed; any odd constant far from small ints does


def derive_seed(seed: int, index: int) -> int:
    """A seed for the `index`-th item under `seed` (distinct items get distinct, reproducible streams)."""
    return (int(seed) * _MIX + int(index)) % (2**63 - 1)


def row_seeds(text_seeds: Sequence[int | None], n: int) -> list[int | None]:
    """Seeds of the `len(text_seeds) * n` rows of a batch (text-major, as `num_return_sequences` lays them out)."""
    return [None if s is None else derive_seed(s, j) for s in text_seeds for j in range(n)]


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A seed for one prompt under a run's seed, from its id (stable across processes, unlike `hash`)."""
    digest = hashlib.sha256(prompt_id.encode("utf-8")).digest()
    return derive_seed(seed, int.from_bytes(digest[:8], "big"))


class RowSeededSampler(LogitsProcessor):
    """A `transformers` logits processor: temperature, nucleus (top-p) filter, and a per-row seeded draw.

    Args:
        temperature: > 0.
        top_p: in (0, 1]; the smallest set of tokens whose probability reaches it is kept (at least one).
        seeds: one seed per row; None draws that row's seed from the global generator (unseeded requests).
        device: where the generators live (CPU generators for CUDA tensors are not allowed by torch).
    """

    def __init__(self, temperature: float, top_p: float, seeds: Sequence[int | None], device: torch.device) -> None:
        if temperature <= 0:
            raise ValueError(f"RowSeededSampler needs temperature > 0, got {temperature}")
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(int(torch.randint(0, 2**62, ()).item()) if s is None else int(s))
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} seeds")
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            ordered_probs = ordered.softmax(dim=-1)
            # drop a token when the tokens before it already reach top_p (so the first token always stays)
            drop_sorted = (ordered_probs.cumsum(dim=-1) - ordered_probs) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        chosen = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)
