"""Distillation loss sums computed straight from hidden states, never holding ``[N, V]`` logits for all tokens.

Over a 150k vocabulary the loss, not the model, decides memory: the fp32 logits of teacher and student for 16k tokens
take tens of GiB. :func:`fused_loss` folds the lm_head projections into the loss and walks the tokens in chunks, so
at any time only ``[chunk, V]`` logits exist. It computes the same values and the same gradients (w.r.t. the
student's hidden states, lm_head weight and bias) as :func:`lmdistill.losses.divergence` (or
:func:`~lmdistill.losses.sparse_divergence`) and the cross-entropy on the projected logits, which stay the reference
it is tested against.

How it works, per chunk of valid tokens (masked tokens are dropped before anything is projected):

1. Project both models' hidden states to logits (``h @ W.T + b``, then the head's scale and softcap, then ``/T``).
2. Get each side's log-softmax, the per-token value and, in closed form, the gradient w.r.t. the student's logits
   (e.g. reverse KL's gradient ``p_S * (log p_S - log p_T - KL)`` needs the per-token KL itself).
3. Push that gradient through the projection at once: ``grad_h[chunk] = g @ W`` and ``grad_W += g.T @ h``.

Gradients are therefore computed *during the forward* (as Liger's fused losses do) and the backward only scales them
by the incoming gradient; each projection and each gradient matmul runs exactly once, as in the naive path. Two
consequences: calling the loss with grad enabled but never calling ``backward`` wastes the gradient work, and
activation checkpointing that re-runs this forward would do it twice. With no input requiring grad (evaluation) the
gradient work is skipped. The teacher never receives a gradient (its side is detached here).

The ground-truth cross-entropy of the untempered student logits runs inside the same chunk loop, so the student's
projection serves both terms; at ``T = 1`` it also shares the divergence's log-softmax and its gradient
``p_S - onehot`` is added into the same buffer. A separate chunked CE would re-project the student (forward,
recompute, two gradient matmuls), which on a 49k-vocab, 6-layer student is most of a step's lm_head work.

Memory: fp32 gradient accumulators ``[V, Hs]`` and ``[N, Hs]`` (summing bf16 partial products over many chunks would
drop small contributions), plus a few ``[chunk, V]`` fp32 buffers for the chunk in flight; ``chunk_size`` trades those
against matmul efficiency. Sparse targets (a soft-label cache, API log-probs) take the same chunk loop: each chunk's
student logits go through the reference :func:`lmdistill.losses.sparse_divergence` and autograd on that chunk alone,
so every estimator and tail convention is the reference's by construction.

Modules: :mod:`.function` (checks, plan, chunk loop, autograd function, :func:`fused_loss`), :mod:`.plan` (the
checked arguments the loop reads), :mod:`.rows` (the torch arithmetic of a chunk), :mod:`.triton` (a Triton kernel
for the element-wise part of a dense chunk, used with ``backend="triton"``; the matmuls stay in cuBLAS).

Sharded training (FSDP, ZeRO-3): the lm_head weights must be whole when this runs (e.g. inside
``summon_full_params``), as the naive path's ``F.linear`` would need them; gathering them is left to the trainer.
"""

from lmdistill.losses.fused.function import FusedLossSums, fused_loss

__all__ = ["FusedLossSums", "fused_loss"]
