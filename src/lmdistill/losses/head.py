"""`Head`: a causal LM's projection from hidden states to logits, as every loss in lmdistill takes it.

    logits = softcap(scale * (hidden @ weight.T + bias))          softcap(y) = c * tanh(y / c)

`lmdistill.models.lm_head(model, n_vocab)` reads one from any model (student or teacher), sliced to the shared vocab;
the losses take `Head`s and never read a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Head:
    """The output layer of one model, rows = the shared real vocabulary.

    Attributes:
        weight: ``[V, H]`` lm_head weight rows of the shared vocab (a view: gradients reach the parameter, tied input
            embeddings included).
        bias: ``[V]`` or None.
        scale: multiplier of the linear output (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``).
        softcap: ``final_logit_softcapping`` (Gemma 2) or None.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., V]`` logits of ``hidden`` ``[..., H]``, exactly as the model's own forward computes them."""
        out = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = self.softcap * torch.tanh(out / self.softcap)
        return out

    def detached(self) -> Head:
        """The same head with its tensors cut from the graph (a target side never receives gradients)."""
        return Head(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.scale, self.softcap)


@dataclass
class Hidden:
    """A model's last hidden states [B, T, H] and the `Head` that projects them to logits (rows = the shared vocab):
    what the fused losses take from a student, and from an online teacher as its targets."""

    hidden: Tensor
    head: Head

    def logits(self) -> Tensor:
        """[B, T, V] logits, exactly as the model's own head computes them."""
        return self.head.logits(self.hidden)

    def detached(self) -> Hidden:
        return Hidden(self.hidden.detach(), self.head.detached())
