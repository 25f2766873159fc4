"""Soft-label distillation from a black-box teacher: the top-k log-probs an API returned with its completions.

    loss = alpha * sparse_divergence(student, API top-k [+ tail bucket]) + (1 - alpha) * CE(student, teacher's text)

`lmdistill soft --api_logprobs FILE.jsonl`: the records of FILE (`lmdistill generate` with sampling.logprobs=true
and top_logprobs=k) are both the data and the targets; `lmdistill.api_targets` aligns them with the student's
tokens. No teacher model runs, so the teacher can be any endpoint that returns `top_logprobs` (OpenAI allows 20),
as long as the student uses its tokenizer (`teacher` is read only to prune or configure the student from it). The
loss and the held-out metrics are the cached-teacher ones of `soft --teacher_cache`, with the targets carried by the
batch instead of read from a cache.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lmdistill.api_targets import InBatchTeacher, load_api_splits
from lmdistill.cache.reader import evaluate_with_cache
from lmdistill.config import SoftConfig
from lmdistill.data import check_block_size
from lmdistill.recipes.common import finish_run
from lmdistill.recipes.hard import student_only
from lmdistill.recipes.soft import cached_step_loss
from lmdistill.train.distributed import check_supported
from lmdistill.train.loop import StepLoss, Trainer, make_accelerator


def run_soft_api(cfg: SoftConfig) -> dict[str, Any]:
    """Train a student on the top-k log-probs stored in `cfg.api_logprobs`; returns the run summary.

    Held-out `kl_to_teacher` and `agreement` are measured against the same targets, over every learned position
    (the API-scored completion tokens and the one-hot end-of-turn tokens); see `evaluate_with_cache`.
    """
    assert cfg.api_logprobs is not None
    accelerator = make_accelerator(cfg.train)
    check_supported(accelerator, fused_loss=cfg.loss.fused, lora=cfg.student.lora.enabled)
    tokenizer, student, n_vocab = student_only(cfg.student, cfg.train.seed, cfg.teacher)
    check_block_size(cfg.data.block_size, student.config)
    train, held, report = load_api_splits(cfg.api_logprobs, cfg.data, tokenizer, n_vocab,
                                          tail=cfg.api_logprobs_tail)
    teacher = InBatchTeacher()
    accelerator.print(
        f"soft distillation from API log-probs `{cfg.api_logprobs}` (top-{train.k - 1} + the sampled token"
        f"{', tail bucket' if cfg.api_logprobs_tail else ''}): {report.line()}; {len(train)} train / {len(held)} "
        f"held-out records, {cfg.train.max_steps} steps"
    )

    trainer: Trainer | None = None

    def loss_fn(batch: dict[str, Tensor]) -> StepLoss:
        assert trainer is not None
        return cached_step_loss(trainer.model, teacher, batch, cfg.loss, n_vocab)

    def eval_fn(step: int) -> dict[str, float]:
        assert trainer is not None
        return evaluate_with_cache(trainer.unwrapped, teacher, held, n_vocab=n_vocab,
                                   batch_size=cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches)

    trainer = Trainer(cfg.train, model=student, data=train, loss_fn=loss_fn, eval_fn=eval_fn if len(held) else None,
                      accelerator=accelerator, run_info={"recipe": "soft-api"})
    result = trainer.fit()
    summary: dict[str, Any] = {"recipe": "soft-api", "api_logprobs": cfg.api_logprobs, "alignment": report.as_dict(),
                               "train_blocks": len(train), "eval_blocks": len(held), "vocab": n_vocab,
                               "steps": result.step, "final_train_loss": result.last_loss,
                               "train_tokens_per_s": result.tokens_per_s}
    return finish_run(trainer, tokenizer, cfg, summary)
