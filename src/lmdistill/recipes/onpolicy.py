"""On-policy distillation: the student writes, the teacher grades the student's own tokens.

Every step has three phases, on the one loop: **rollout** (the student samples `rollout.n` completions per prompt of
each micro-batch, `lmdistill.rollout`), **scoring** (the teacher, in this process or behind a server, on the
student's tokens only) and **update**. The teacher's signal is one of

- `dense`: its whole distribution at every sampled position; any `loss.kind` through the fused loss (reverse KL is
  the usual choice, generalized JSD with `beta` is GKD);
- `topk`: its top-k log-probs + tail mass per position (what a server returns cheaply), the sparse divergence;
- `sampled_token`: only its log-prob of each sampled token; the reward log p_T - log p_S drives a policy gradient
  (`lmdistill.losses.reverse_kl_policy_gradient`).

Rollout reuse: with `rollout.reuse` > 1 one batch of rollouts (and its teacher scores) is trained on for that many
steps; the `sampled_token` loss is then PPO's clipped ratio against the sampling policy's log-probs, stored at
rollout time. A run resumed inside a window samples again from the current weights (with a warning).

GKD's mix: a step is on-policy with probability `lmbda` (a coin seeded by the step); the other steps train on the
data's responses (or, with `seq_kd`, on answers the teacher writes) exactly as `soft` does, so `lmbda=0` is `soft`.

`loss.hidden` (signal `dense`, local teacher only) adds layer-wise distillation on the same tokens, as in `soft`: the
teacher's scoring forward also gives the hidden states of its paired layers, which ride in the batch.

A teacher of another tokenizer (`loss.cross_tokenizer hybrid|uld`; signal `dense` or `sampled_token` locally,
`sampled_token` behind a server) reads each prompt through its own chat template and the completion's bytes in its
own tokens, scored by byte spans: `lmdistill.onpolicy_cross_tokenizer`.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

from lmdistill.api_targets import InBatchTeacher
from lmdistill.config import OnPolicyConfig
from lmdistill.cross_tokenizer_teacher import CrossTokenizerTeacher, cross_tokenizer_teacher
from lmdistill.evaluate import evaluate_blocks
from lmdistill.generate.seeded_sampling import derive_seed
from lmdistill.losses import Hidden, distill_loss, reverse_kl_policy_gradient, token_logprobs
from lmdistill.losses.chunked_ce import chunked_token_logprobs
from lmdistill.losses.hidden import layer_match
from lmdistill.models import lm_head
from lmdistill.onpolicy_cross_tokenizer import CrossTokenizerOnPolicy, ServedSpanTeacher
from lmdistill.recipes.common import Recipe, build_setup, describe, print_main, run_recipe
from lmdistill.rollout import PhaseClock, ReusedRollouts, eos_ids_of, onpolicy_metrics, rollout_batch
from lmdistill.served_teacher import ServedTeacher
from lmdistill.teachers import HFTeacher, model_layers, model_outputs, topk_targets
from lmdistill.train.loop import StepInfo, StepLoss, Trained, TrainResult


def run_onpolicy(cfg: OnPolicyConfig) -> dict[str, Any]:
    """Distil on the student's own completions; returns the run summary (also output_dir/summary.json)."""
    served = cfg.teacher_server.url is not None
    across = cfg.loss.cross_tokenizer != "refuse"
    setup = build_setup(cfg, teacher=not served, cross_tokenizer=across, teacher_tokenizer=served and across)
    assert setup.splits is not None
    train, held, n_vocab, tok = setup.splits.train, setup.splits.eval, setup.n_vocab, setup.tokenizer
    cross = None
    if setup.teacher_tokenizer is not None:  # a teacher of another tokenizer: scored by byte spans
        t_tok = setup.teacher_tokenizer
        scorer = cross_tokenizer_teacher(setup.teacher, t_tok, tok, cfg, train, held) if setup.teacher is not None \
            else ServedSpanTeacher(ServedTeacher(cfg.teacher_server, t_tok, f"`{cfg.teacher.name_or_path}`'s"),
                                   t_tok, tok, [train, held], n_vocab)
        cross = CrossTokenizerOnPolicy(scorer, cfg, n_vocab)
    teacher = HFTeacher(setup.teacher, n_vocab) if setup.teacher is not None and cross is None else None
    server = ServedTeacher(cfg.teacher_server, tok) if served and cross is None else None
    pad, eos, block = tok.pad_token_id, eos_ids_of(setup.student, tok), cfg.data.block_size
    clock, info = PhaseClock(), describe(setup, train, held)
    # the config allows it with signal=dense and a local teacher only: the teacher's forward gives the states anyway
    hidden = layer_match(cfg.loss.hidden, setup.student, setup.teacher, seed=cfg.train.seed, info=info)

    def on_policy(step: int) -> bool:
        return random.Random(derive_seed(cfg.train.seed, step)).random() < cfg.lmbda

    def teacher_logprobs(batch: dict[str, Tensor]) -> Tensor:
        if server is not None:
            return server.token_logprobs(batch)
        assert teacher is not None
        t = teacher.targets(batch)
        return chunked_token_logprobs(t.hidden, t.head, batch["labels"])

    def score(batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if cross is not None:
            return cross.score(batch)
        if cfg.signal == "sampled_token":
            return {"teacher_logprob": teacher_logprobs(batch)}
        if server is not None:  # topk
            t = server.topk(batch, cfg.k)
        else:
            assert teacher is not None
            if hidden is not None:  # signal=dense: the paired layers' states ride in the batch too
                states = teacher.layers(batch, fused=True)[1]  # the last one is `teacher_hidden`, after the final norm
                return {"teacher_hidden": states[-1], **hidden.carry(states)}
            dense = teacher.targets(batch)
            if cfg.signal == "dense":
                return {"teacher_hidden": dense.hidden}
            t = topk_targets(dense, batch["labels"], cfg.k)
        assert t.tail_logprob is not None
        return {"target_ids": t.ids, "target_logprobs": t.logprobs, "target_tail": t.tail_logprob}

    def fresh_rollout(models: dict[str, nn.Module], batch: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        on = on_policy(step)
        writer = models["student"] if on else teacher.model if cfg.seq_kd and teacher else None
        if writer is not None:
            with clock.phase("rollout"):
                batch, r = rollout_batch(writer, batch, step=step, seed=cfg.train.seed, cfg=cfg.rollout,
                                         block_size=block, pad_id=pad, eos_ids=eos)
            clock.count(r)
            if cfg.rollout.reuse > 1 and on and cfg.signal == "sampled_token":
                # the sampling policy's log-probs (temperature 1), which later updates' ratios are taken against;
                # with reuse 1 the update's own forward gives them (the weights are the sampling ones)
                with torch.no_grad():
                    out = model_outputs(models["student"], batch, n_vocab, cfg.loss.fused)
                    batch["sample_logprob"] = token_logprobs(out, batch["labels"]).float()
        with clock.phase("teacher"):
            batch.update(score(batch))
        batch["on_policy"] = torch.tensor(on)
        return batch

    def loss(models: dict[str, nn.Module], batch: dict[str, Tensor], step: StepInfo) -> dict[str, StepLoss]:
        student = models["student"]
        if cross is not None:  # on the student's own tokens the divergence alone, as below
            return {"student": cross.loss(student, batch, 1.0 if bool(batch["on_policy"]) else cfg.loss.alpha)}
        out, states = model_layers(student, batch, n_vocab, cfg.loss.fused) if hidden else \
            (model_outputs(student, batch, n_vocab, cfg.loss.fused), ())
        if cfg.signal == "sampled_token":
            return {"student": reverse_kl_policy_gradient(token_logprobs(out, batch["labels"]),
                                                          batch["teacher_logprob"], batch["labels"], cfg.discount,
                                                          batch.get("sample_logprob"), cfg.rollout.clip)}
        if cfg.signal == "dense":
            assert teacher is not None
            targets: Any = Hidden(batch["teacher_hidden"], lm_head(teacher.model, n_vocab))
        else:
            targets = InBatchTeacher().targets(batch)
        # on the student's own tokens the divergence alone: a CE there would teach the student its own samples
        alpha = 1.0 if bool(batch["on_policy"]) else cfg.loss.alpha
        step_loss = distill_loss(out, targets, batch["labels"], alpha, cfg.loss)
        if hidden is not None:
            step_loss = hidden.add(step_loss, states, hidden.carried(batch), batch["labels"])
        return {"student": step_loss}

    def evaluate(models: dict[str, nn.Module]) -> dict[str, float]:
        student = models["student"]
        kw: dict[str, Any] = {"n_vocab": n_vocab, "batch_size": cfg.train.micro_batch_size,
                              "max_batches": cfg.train.eval_batches, "byte_lengths": setup.byte_lengths}
        metrics = evaluate_blocks(student, held, teacher_logits_fn=teacher.logits if teacher else None, **kw)
        if cross is not None:
            spans = cross.teacher.evaluate(student, held, cfg.loss, **kw) if isinstance(
                cross.teacher, CrossTokenizerTeacher) else {}  # held-out span_kd needs the teacher's distributions
            return {**metrics, **spans,
                    **cross.metrics(student, held, cfg=cfg.rollout, seed=cfg.train.seed, pad_id=pad, eos_ids=eos,
                                    max_prompts=cfg.train.eval_batches * cfg.train.micro_batch_size)}
        metrics.update(onpolicy_metrics(student, held, teacher_logprobs, n_vocab=n_vocab, cfg=cfg.rollout,
                                        seed=cfg.train.seed, pad_id=pad, eos_ids=eos,
                                        max_prompts=cfg.train.eval_batches * cfg.train.micro_batch_size))
        return metrics

    where = (f"server {cfg.teacher_server.url}" if served else "local teacher") + (
        f" of another tokenizer ({cfg.loss.cross_tokenizer} spans)" if cross else "")
    print_main(f"on-policy distillation ({cfg.signal}, {where}, lmbda {cfg.lmbda}): student "
               f"{sum(p.numel() for p in setup.student.parameters()) / 1e6:.1f}M, {len(train)} prompts, "
               f"{cfg.rollout.n} completion(s) each of <= {cfg.rollout.max_new_tokens} tokens, {cfg.train.max_steps} steps")

    def finish(result: TrainResult) -> dict[str, Any]:
        """Where the training time went (this session's steps), and what the rollouts produced."""
        update = result.step_seconds - sum(clock.seconds.values())
        return {"phases_s": {**clock.seconds, "update": update}, "rollouts": dict(clock.counts)}

    return run_recipe(Recipe(f"onpolicy-{cfg.signal}", cfg, tok, train, {"student": Trained(setup.student)}, loss,
                             evaluate if len(held) else None,
                             teachers=[teacher] if teacher else [cross.teacher.teacher] if cross and isinstance(
                                 cross.teacher, CrossTokenizerTeacher) else [],
                             info=info, rollout=ReusedRollouts(fresh_rollout, cfg.rollout.reuse, cfg.train.max_steps),
                             finish=finish,
                             fused=cfg.loss.fused, lora=cfg.student.lora.enabled))
