"""Where distillation targets come from, separate from how they are scored (lmdistill.losses).

A teacher turns a batch into targets: dense logits [B, T, V] or the hidden states + output layer that produce them
(online, `HFTeacher`), or sparse top-k / sampled targets (any `SparseTeacher`: a soft-label cache,
`lmdistill.cache.reader.CachedTeacher`, or API log-probs riding in the batch, `lmdistill.api_targets.InBatchTeacher`).
The student's loss takes whichever the teacher gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lmdistill.errors import NonFiniteError
from lmdistill.losses.fused import SparseTargets
from lmdistill.models import decoder_hidden, lm_head_of


class SparseTeacher(Protocol):
    """A teacher that gives sparse targets (top-k ids + log-probs [+ tail], or sampled ids + weights) per batch."""

    def targets(self, batch: dict[str, Tensor]) -> SparseTargets:
        """Targets [B, T, K] for the batch's positions (the batch is the student's: input_ids, labels, ...)."""
        ...


@dataclass
class HiddenTargets:
    """What the fused loss needs from an online teacher: hidden [B, T, H_t] and the output layer, rows = shared vocab."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    logit_scale: float
    softcap: float | None


def project_logits(t: HiddenTargets) -> Tensor:
    """[B, T, V] logits from hidden states, exactly as the model's own head computes them."""
    logits = torch.nn.functional.linear(t.hidden, t.weight, t.bias) * t.logit_scale
    if t.softcap is not None:
        logits = t.softcap * torch.tanh(logits / t.softcap)
    return logits


class HFTeacher:
    """A frozen Hugging Face causal LM running online in the training step."""

    def __init__(self, model: nn.Module, n_vocab: int) -> None:
        self.model = model
        self.n_vocab = n_vocab

    @torch.no_grad()
    def hidden(self, batch: dict[str, Tensor]) -> HiddenTargets:
        h = decoder_hidden(self.model, batch["input_ids"], batch.get("attention_mask"))
        check_finite(h, "hidden states", batch.get("attention_mask"))
        weight, bias, scale, softcap = lm_head_of(self.model)
        return HiddenTargets(
            hidden=h, weight=weight[: self.n_vocab], bias=None if bias is None else bias[: self.n_vocab],
            logit_scale=scale, softcap=softcap,
        )

    @torch.no_grad()
    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        logits = out.logits[..., : self.n_vocab]
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
