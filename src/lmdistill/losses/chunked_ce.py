"""Cross-entropy from hidden states without holding [tokens, vocab] logits: chunk tokens, recompute in backward."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lmdistill.losses.head import Head


def _chunk_ce_multi(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, scale: float,
                    softcap: float | None, ignore_index: int) -> Tensor:
    """Summed CE of one chunk for each label set: labels [n, S] -> [S] (one projection, one log-softmax)."""
    logits = torch.nn.functional.linear(h, weight, bias).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    counted = labels != ignore_index
    picked = logp.gather(1, labels.clamp_min(0))
    return -(picked * counted).sum(0)


def chunked_ce_sums(hidden: Tensor, head: Head, label_sets: list[Tensor], *, ignore_index: int = -100,
                    chunk_size: int = 1024) -> Tensor:
    """Summed cross-entropy against several label sets over the same positions, projecting the hidden states once.

    Hard-label distillation with ground truth mixed in scores each position against the teacher's token and the
    data's token; two `chunked_ce_sum_and_count` calls would run the [tokens, H] x [H, V] projection (and its
    recompute and gradients) twice.

    Args:
        hidden: [..., H]. head: the output layer (weight [V, H], rows = the shared real vocab). label_sets: S tensors
            shaped like `hidden` without H, `ignore_index` where a set has no target.

    Returns:
        [S] fp32 sums (differentiable w.r.t. `hidden` and the head's weight and bias), one per label set.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = torch.stack([labels.reshape(-1) for labels in label_sets], dim=-1)  # [N, S]
    keep = (y != ignore_index).any(-1)
    h, y = h[keep], y[keep]
    args = (head.weight, head.bias)
    total = hidden.new_zeros((len(label_sets),), dtype=torch.float32)
    for start in range(0, y.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            total = total + checkpoint(_chunk_ce_multi, h[sl], *args, y[sl], head.scale, head.softcap, ignore_index,
                                       use_reentrant=False)
        else:
            total = total + _chunk_ce_multi(h[sl], *args, y[sl], head.scale, head.softcap, ignore_index)
    return total


def chunked_ce_sum_and_count(hidden: Tensor, head: Head, labels: Tensor, *, ignore_index: int = -100,
                             chunk_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies over labelled positions and their number.

    Args:
        hidden: [..., H] final hidden states. head: the output layer (weight [V, H], rows = the shared real vocab).
        labels: [...] target ids, `ignore_index` where nothing is learned.

    Only `chunk_size` rows of logits exist at once: each chunk's logits are recomputed in backward (activation
    checkpointing), trading one extra [chunk, H] x [H, V] matmul for never storing [N, V] fp32 logits.
    """
    total = chunked_ce_sums(hidden, head, [labels], ignore_index=ignore_index, chunk_size=chunk_size)[0]
    return total, (labels != ignore_index).sum()


def _chunk_token_logprobs(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, scale: float,
                          softcap: float | None) -> Tensor:
    logits = torch.nn.functional.linear(h, weight, bias).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


def chunked_token_logprobs(hidden: Tensor, head: Head, labels: Tensor, *, ignore_index: int = -100,
                           chunk_size: int = 1024) -> Tensor:
    """log p(label) at every labelled position, 0 elsewhere, shaped like `labels` (fp32; differentiable w.r.t.
    `hidden` and the head, each chunk's logits recomputed in backward as in `chunked_ce_sums`).

    What a per-token weighted objective needs (a policy gradient weights each sampled token by its advantage), and
    the teacher's log-prob of given tokens.
    """
    flat = labels.reshape(-1)
    rows = (flat != ignore_index).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    y = flat.index_select(0, rows)
    parts = []
    for start in range(0, y.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (h[sl], head.weight, head.bias, y[sl], head.scale, head.softcap)
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            parts.append(checkpoint(_chunk_token_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_token_logprobs(*args))
    out = torch.zeros(flat.shape, dtype=torch.float32, device=hidden.device)
    if parts:
        out = out.index_put((rows,), torch.cat(parts))
    return out.reshape(labels.shape)
