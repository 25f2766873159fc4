"""`models.lm_head`: the one reader of an output layer, for every model family's logit post-processing."""

from __future__ import annotations

import pytest
import torch

from lmdistill.config import LossConfig
from lmdistill.errors import ConfigError
from lmdistill.models import decoder_hidden, lm_head
from lmdistill.recipes.soft import soft_step_loss
from lmdistill.teachers import HFTeacher

V = 64


def _granite(logits_scaling: float, seed: int):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    config = GraniteConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, logits_scaling=logits_scaling,
                           tie_word_embeddings=False)
    return GraniteForCausalLM(config)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[1, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_head_reproduces_the_models_own_logits_granite_scaling_included():
    model = _granite(4.0, seed=0).eval()
    batch = _batch()
    head = lm_head(model, V)
    assert head.scale == pytest.approx(0.25)
    with torch.no_grad():
        h = decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(head.logits(h), model(input_ids=batch["input_ids"]).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_and_reference_paths_agree_on_a_model_with_logits_scaling(kind):
    """The fused loss reads the head through `lm_head`; the reference path through the model's forward. A head reader
    that missed Granite's `logits_scaling` would score the student differently on the two paths."""
    student, teacher = _granite(4.0, seed=0), _granite(0.5, seed=1).eval().requires_grad_(False)
    batch = _batch()
    out = {}
    for fused in (True, False):
        student.zero_grad(set_to_none=True)
        t = HFTeacher(teacher, V)
        loss = LossConfig(kind=kind, alpha=0.6, temperature=1.5, fused=fused)
        step = soft_step_loss(student, batch, t.targets(batch) if fused else t.logits(batch), loss, V)
        step.loss_sum.backward()
        out[fused] = (step.loss_sum.detach(), {n: p.grad.clone() for n, p in student.named_parameters()})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for name, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert out[True][1]["lm_head.weight"].abs().sum() > 0


def test_lora_on_the_head_and_a_short_head_are_refused():
    from peft import LoraConfig, get_peft_model

    model = _granite(1.0, seed=0)
    with pytest.raises(Exception, match="fewer than the shared vocabulary"):
        lm_head(model, V + 1)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ConfigError, match="LoRA on lm_head"):
        lm_head(wrapped, V)
