"""Where distillation targets come from, separate from how they are scored (lmdistill.losses).

A teacher turns a batch into targets: the hidden states + `Head` that produce its logits (online, `HFTeacher`;
its [B, T, V] logits on the reference path), or sparse top-k / sampled targets (any `SparseTeacher`: a soft-label cache,
`lmdistill.cache.reader.CachedTeacher`, or API log-probs riding in the batch, `lmdistill.api_targets.InBatchTeacher`).
The student's loss takes whichever the teacher gives.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from lmdistill.data import IGNORE
from lmdistill.errors import NonFiniteError
from lmdistill.losses.divergences import LOGPROB_FLOOR
from lmdistill.losses.head import Hidden
from lmdistill.losses.sparse import SparseTargets
from lmdistill.models import decoder_hidden, decoder_hidden_states, lm_head


class SparseTeacher(Protocol):
    """A teacher that gives sparse targets (top-k ids + log-probs [+ tail], or sampled ids + weights) per batch."""

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Targets [B, T, K] for the batch's positions (the batch is the student's: input_ids, labels, ...)."""
        ...


def model_outputs(model: nn.Module, batch: dict[str, Tensor], n_vocab: int, fused: bool) -> Hidden | Tensor:
    """What a loss takes from `model` on `batch`: its hidden states and head (fused losses, no [B, T, V] logits), or
    its [B, T, V] logits from its own forward (the reference path, and the one that works where weights are shards)."""
    if fused:
        return Hidden(decoder_hidden(model, batch["input_ids"], batch.get("attention_mask")), lm_head(model, n_vocab))
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return out.logits[..., :n_vocab]


def model_layers(model: nn.Module, batch: dict[str, Tensor], n_vocab: int,
                 fused: bool) -> tuple[Hidden | Tensor, tuple[Tensor, ...]]:
    """`model_outputs` and, from the same forward, every hidden state (the embeddings, then each decoder layer's
    output; the last after the final norm): what layer-wise distillation takes."""
    if fused:
        states = decoder_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))
        return Hidden(states[-1], lm_head(model, n_vocab)), states
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                output_hidden_states=True)
    return out.logits[..., :n_vocab], tuple(out.hidden_states)


class HFTeacher:
    """A frozen Hugging Face causal LM running online in the training step.

    `model` is replaced by its engine-placed copy (device, FSDP shards, ZeRO-3 engine) once the student is prepared.
    """

    def __init__(self, model: nn.Module, n_vocab: int) -> None:
        self.model = model
        self.n_vocab = n_vocab

    @torch.no_grad()
    def targets(self, batch: dict[str, Tensor]) -> Hidden:
        out = model_outputs(self.model, batch, self.n_vocab, fused=True)
        assert isinstance(out, Hidden)
        check_finite(out.hidden, "hidden states", batch.get("attention_mask"))
        return out

    @torch.no_grad()
    def layers(self, batch: dict[str, Tensor], fused: bool) -> tuple[Hidden | Tensor, tuple[Tensor, ...]]:
        """`targets` (fused) or `logits`, and every hidden state of the same forward (layer-wise distillation)."""
        out, states = model_layers(self.model, batch, self.n_vocab, fused)
        for i, state in enumerate(states):
            check_finite(state, f"hidden states (layer output {i})", batch.get("attention_mask"))
        return out, states

    @torch.no_grad()
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """[B, T, V] logits from the model's own forward (the path that works where its weights are shards)."""
        logits = model_outputs(self.model, batch, self.n_vocab, fused=False)
        assert isinstance(logits, Tensor)
        check_finite(logits, "logits", batch.get("attention_mask"))
        return logits


def check_finite(x: Tensor, what: str, attention_mask: Tensor | None) -> None:
    """Refuse NaN/inf teacher outputs at real positions: otherwise the loss turns NaN with no hint of the cause.

    One reduction per batch; padded positions are skipped (some models emit NaN there on fully masked rows).
    """
    bad = ~torch.isfinite(x)
    if attention_mask is not None:
        bad = bad & attention_mask.bool().unsqueeze(-1)
    if bool(bad.any()):
        n_pos = int(bad.any(dim=-1).sum())
        raise NonFiniteError(
            f"the teacher produced NaN/inf {what} at {n_pos} token positions. Its weights are broken or its dtype "
            "overflows: load it in bf16 or fp32 (teacher.dtype; fp16 overflows in many models) or check the "
            "checkpoint"
        )


@torch.no_grad()
def topk_targets(targets: Hidden, labels: Tensor, k: int, chunk_size: int = 1024) -> SparseTargets:
    """The teacher's k most probable ids, their log-probs and the tail log(1 - their mass) at every labelled position
    ([B, T, K], ids -1 elsewhere): what a teacher server returns, computed from a local teacher chunk by chunk."""
    mask = labels != IGNORE
    ids = torch.full((*labels.shape, k), -1, dtype=torch.long, device=labels.device)
    logprobs = torch.zeros((*labels.shape, k), dtype=torch.float32, device=labels.device)
    tail = torch.full(labels.shape, LOGPROB_FLOOR, dtype=torch.float32, device=labels.device)
    rows = targets.hidden[mask]
    top_ids, top_lps, tails = [], [], []
    for start in range(0, rows.shape[0], chunk_size):
        lp = torch.log_softmax(targets.head.logits(rows[start : start + chunk_size]).float(), dim=-1)
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        top_ids.append(top.indices)
        top_lps.append(top.values)
        tails.append(lp.scatter(1, top.indices, float("-inf")).logsumexp(-1).clamp_min(LOGPROB_FLOOR))
    if top_ids:
        ids[mask], logprobs[mask], tail[mask] = torch.cat(top_ids), torch.cat(top_lps), torch.cat(tails)
    return SparseTargets(ids=ids, logprobs=logprobs, tail_logprob=tail)
