"""Rollouts: the student's own completions to a batch of chat prompts, as a batch of its own tokens to train on.

A chat block (`lmdistill.data.chat_blocks`) holds a prompt and a response; its prompt is every token up to and
including the input position that predicts the first response token. The student samples `n` completions per prompt
with a KV cache (transformers `generate`). Every completion is drawn from its own random stream, seeded from
(run seed, prompt id, step, sample index) only (`RowSeededSampler`), so the same step of a resumed run draws exactly
what the interrupted one would have, at any batch size.

The result has the layout of a chat block: `input_ids` = prompt + completion minus its last token, `labels` = the
completion tokens at the positions that predict them (IGNORE on the prompt and the padding). A completion ends at the
first end-of-sequence token (kept: the student learns to stop) or at `max_new_tokens`, or where the block ends.

`ReusedRollouts` trains several optimizer steps on one batch of rollouts (`rollout.reuse`); `PhaseClock` times the
phases of an on-policy step and counts what the rollouts produced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmdistill.config import RolloutConfig
from lmdistill.data import IGNORE, TokenBlocks
from lmdistill.generate.seeded_sampling import RowSeededSampler, derive_seed

if TYPE_CHECKING:
    from lmdistill.train.loop import StepInfo

log = logging.getLogger(__name__)


def prompt_ids(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each row's prompt: the tokens up to and including the position that predicts its first response token. A row
    without a response token (its prompt filled the block) gives an empty prompt."""
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        first = next((t for t, y in enumerate(labels) if y != IGNORE), None)
        out.append([] if first is None else ids[: first + 1])
    return out


def sample_seed(seed: int, prompt_id: int, step: int, sample: int) -> int:
    return derive_seed(derive_seed(derive_seed(seed, prompt_id), step), sample)


@dataclass
class Rollout:
    """`n` completions per prompt (prompt-major), with what they are made of."""

    prompts: list[list[int]]  # one per completion
    completions: list[list[int]]
    truncated: int  # completions cut at max_new_tokens or the block end (no end-of-sequence token)
    skipped: int  # prompts that filled the block: nothing to write
    keys: list[int] = field(default_factory=list)  # each completion's prompt key (the row index of its batch)


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: Sequence[list[int]], prompt_keys: Sequence[int], *, step: int,
                       seed: int, cfg: RolloutConfig, block_size: int, pad_id: int, eos_ids: set[int],
                       greedy: bool = False) -> Rollout:
    """Sample `cfg.n` completions of each prompt from `model` (left-padded batch, KV cache, one stream per row);
    `greedy`: one most-probable completion per prompt instead."""
    n = 1 if greedy else cfg.n
    rows = [(p, key, j) for p, key in zip(prompts, prompt_keys, strict=True) for j in range(n)]
    live = [r for r in rows if 0 < len(r[0]) <= block_size]
    skipped = (len(rows) - len(live)) // n
    if not live:
        return Rollout([], [], 0, skipped)
    device = next(model.parameters()).device
    width = max(len(p) for p, _, _ in live)
    ids = torch.full((len(live), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, _, _) in enumerate(live):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    room = block_size + 1 - min(len(p) for p, _, _ in live)
    processors = [] if greedy else [RowSeededSampler(cfg.temperature, cfg.top_p,
                                                     [sample_seed(seed, key, step, j) for _, key, j in live], device)]
    was = model.training
    model.eval()
    # with sharded weights (FSDP) every rank must run every decoding step, however early its own rows finish
    synced = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    generate: Any = model.generate
    out = generate(synced_gpus=synced, input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                         max_new_tokens=min(cfg.max_new_tokens, room), logits_processor=processors,
                         pad_token_id=pad_id, eos_token_id=sorted(eos_ids), temperature=None, top_p=None, top_k=None)
    model.train(was)
    completions, truncated = [], 0
    for r, (p, _, _) in enumerate(live):
        new = out[r, width:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), None)
        limit = min(cfg.max_new_tokens, block_size + 1 - len(p))
        completion = new[: min(end or len(new), limit)]
        truncated += end is None or end > limit
        completions.append(completion)
    return Rollout([p for p, _, _ in live], completions, truncated, skipped, [key for _, key, _ in live])


def as_batch(rollout: Rollout, block_size: int, pad_id: int) -> dict[str, Tensor]:
    """The completions as training rows [N, block_size]: loss on the completion tokens only."""
    n = len(rollout.prompts)
    ids = torch.full((n, block_size), pad_id, dtype=torch.long)
    labels = torch.full((n, block_size), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, block_size), dtype=torch.long)
    for r, (p, c) in enumerate(zip(rollout.prompts, rollout.completions, strict=True)):
        seq = (p + c)[: block_size + 1]
        length = len(seq) - 1
        ids[r, :length] = torch.tensor(seq[:-1])
        mask[r, :length] = 1
        labels[r, len(p) - 1 : length] = torch.tensor(seq[len(p):])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def rollout_batch(model: nn.Module, batch: dict[str, Tensor], *, step: int, seed: int, cfg: RolloutConfig,
                  block_size: int, pad_id: int, eos_ids: set[int]) -> tuple[dict[str, Tensor], Rollout]:
    """`sample_completions` of the prompts of `batch` (a chat batch, its rows keyed by `index`) as training rows on
    the batch's device, and the rollout they were made of."""
    r = sample_completions(model, prompt_ids(batch), batch["index"].tolist(), step=step, seed=seed, cfg=cfg,
                           block_size=block_size, pad_id=pad_id, eos_ids=eos_ids)
    device = batch["input_ids"].device
    rows = as_batch(r, block_size, pad_id)
    tag_completions(rows, r, batch)
    return {k: v.to(device) for k, v in rows.items()}, r


def tag_completions(rows: dict[str, Tensor], rollout: Rollout, batch: dict[str, Tensor]) -> None:
    """Give the rows of `rollout` (made from the prompts of chat `batch`) the key of their prompt's conversation
    and `completion` = True, so a teacher of another tokenizer can read the same prompt through its own chat template
    (lmdistill.chat_align). A batch without conversation keys gives none."""
    if "conversation" not in batch:
        return
    by_index = dict(zip(batch["index"].tolist(), batch["conversation"].tolist(), strict=True))
    rows["conversation"] = torch.tensor([by_index[k] for k in rollout.keys], dtype=torch.long)
    rows["completion"] = torch.ones(len(rollout.keys), dtype=torch.bool)


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a completion: the generation config's end-of-sequence ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def onpolicy_metrics(student: nn.Module, blocks: TokenBlocks, teacher_logprobs: Callable[[dict[str, Tensor]], Tensor],
                     *, n_vocab: int, cfg: RolloutConfig, seed: int, pad_id: int, eos_ids: set[int],
                     max_prompts: int = 16, batch_size: int = 8) -> dict[str, float]:
    """What on-policy distillation optimises, on held-out prompts the student answers itself.

    onpolicy_reverse_kl: mean over the student's sampled tokens of log p_S(y) - log p_T(y) (an unbiased estimate of
    the per-token reverse KL on the student's own distribution); teacher_nll_greedy: the teacher's mean NLL of the
    tokens of the student's greedy answers; answer_length: their mean length in tokens.
    """
    from lmdistill.losses import token_logprobs

    n = min(len(blocks), max_prompts)
    if n == 0:
        return {}
    device = next(student.parameters()).device
    block_size = int(blocks.input_ids.shape[1])
    sums = {"kl": 0.0, "kl_tokens": 0.0, "nll": 0.0, "nll_tokens": 0.0, "answers": 0.0}
    for lo in range(0, n, batch_size):
        batch = blocks.batch(list(range(lo, min(lo + batch_size, n))))
        prompts = prompt_ids(batch)
        for greedy in (False, True):
            r = sample_completions(student, prompts, list(range(lo, lo + len(prompts))), step=-1, seed=seed, cfg=cfg,
                                   block_size=block_size, pad_id=pad_id, eos_ids=eos_ids, greedy=greedy)
            if not r.completions:
                continue
            rows = {k: v.to(device) for k, v in as_batch(r, block_size, pad_id).items()}
            t_lp = teacher_logprobs(rows)
            tokens = float((rows["labels"] != IGNORE).sum())
            if greedy:
                sums["nll"] -= float(t_lp.sum())
                sums["nll_tokens"] += tokens
                sums["answers"] += len(r.completions)
            else:
                was = student.training
                student.eval()
                logits = student(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
                student.train(was)
                s_lp = token_logprobs(logits[..., :n_vocab], rows["labels"])
                sums["kl"] += float((s_lp - t_lp).sum())
                sums["kl_tokens"] += tokens
    return {"onpolicy_reverse_kl": sums["kl"] / max(sums["kl_tokens"], 1.0),
            "teacher_nll_greedy": sums["nll"] / max(sums["nll_tokens"], 1.0),
            "answer_length": sums["nll_tokens"] / max(sums["answers"], 1.0)}


class PhaseClock:
    """Seconds spent in each named phase (rollout, teacher scoring), and what the rollouts produced."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"rollout": 0.0, "teacher": 0.0}
        self.counts: dict[str, int] = {"completions": 0, "completion_tokens": 0, "truncated": 0, "skipped_prompts": 0}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - t0

    def count(self, r: Rollout) -> None:
        for key, value in (("completions", len(r.completions)), ("truncated", r.truncated),
                           ("skipped_prompts", r.skipped), ("completion_tokens", sum(map(len, r.completions)))):
            self.counts[key] += value


FreshRollout = Callable[[dict[str, nn.Module], dict[str, Tensor], int], dict[str, Tensor]]


class ReusedRollouts:
    """A rollout function (`lmdistill.train.loop.RolloutFn`) that trains `reuse` optimizer steps on one batch of
    rollouts: micro-batch i of every step of the window [w, w + reuse) (w a multiple of `reuse`) gets a copy of the
    batch `fresh(models, batch, w)` made for micro-batch i at the window's first step, teacher scores included.
    `reuse` = 1: every micro-batch is fresh. The rollouts are not checkpointed, so a run resumed inside a window
    samples again at the resumed step from the current weights (with a warning)."""

    def __init__(self, fresh: FreshRollout, reuse: int, max_steps: int) -> None:
        self.fresh, self.reuse, self.max_steps = fresh, reuse, max_steps
        self.window: int | None = None  # the first step of the cached window
        self.sampled_at: int | None = None  # the step whose micro-batches filled the cache
        self.batches: list[dict[str, Tensor]] = []  # micro-batch i of every step in the window trains on batches[i]
        self.step: int | None = None  # the step being served, and its next micro-batch
        self.i = 0

    def __call__(self, models: dict[str, nn.Module], batch: dict[str, Tensor], step: StepInfo) -> dict[str, Tensor]:
        s = step.step
        if self.reuse == 1:
            return self.fresh(models, batch, s)
        if self.step != s:
            self.step, self.i = s, 0
        i = self.i
        self.i += 1
        window = s - s % self.reuse
        if self.window == window and self.sampled_at != s:
            return dict(self.batches[i])
        if i == 0:
            if s != window:
                log.warning("resumed at step %d, inside the rollout reuse window that began at step %d: its rollouts "
                            "were not checkpointed, so they are sampled again at step %d from the current weights: "
                            "steps %d to %d train on other samples than an uninterrupted run's", s, window, s, s,
                            min(window + self.reuse, self.max_steps) - 1)
            self.window, self.sampled_at, self.batches = window, s, []
        self.batches.append(self.fresh(models, batch, s))
        return dict(self.batches[i])
