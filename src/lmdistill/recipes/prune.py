"""`lmdistill prune`: cut a student from the teacher (student.prune: keep_layers, influence or minitron), write it with
save_pretrained, and score it on held-out text before any training next to keep-every-k-th-layer with as many layers.

The written directory is a plain Hugging Face model (AutoModelForCausalLM.from_pretrained) plus the tokenizer and
`prune.json` (the table, and the teacher layers the student kept: pass them as loss.hidden.pairs when it trains with
init=pretrained, where the pruning map is not known).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from torch import nn

from lmdistill.config import BaseConfig, DataConfig, ModelConfig, StudentConfig
from lmdistill.data import build_splits, check_block_size
from lmdistill.errors import DataError
from lmdistill.evaluate import evaluate_models, resolve_device
from lmdistill.io import atomic_dir, write_json
from lmdistill.models import build_student, count_parameters, load_teacher, load_tokenizer, shared_vocab_size
from lmdistill.prune import decoder_layers, prune_layers


class PruneRunConfig(BaseConfig):
    """`lmdistill prune`: the teacher, how the student is cut from it, the held-out text it is scored on."""

    teacher: ModelConfig = Field(default_factory=ModelConfig)
    student: StudentConfig = Field(
        default_factory=StudentConfig,
        description="init must be `prune`; keep_layers (their number, for influence/minitron) and prune.* as in soft.",
    )
    data: DataConfig = Field(
        default_factory=lambda: DataConfig(block_size=128, eval_documents=100, max_documents=50),
        description="The held-out split of this data is scored (the same settings as a training run give the same "
        "held-out documents; max_documents only trims the training side, which is not used here).",
    )
    output_dir: str = Field("runs/prune/student", description="Where the pruned student is written (save_pretrained).")
    batch_size: int = Field(4, ge=1, description="Held-out blocks per forward pass.")
    max_batches: int | None = Field(16, ge=1, description="Score at most this many held-out batches (null: all).")
    device: str = Field("auto", description="`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ...")
    seed: int = Field(0, description="Seed of the student build.")

    @model_validator(mode="after")
    def _a_pruned_plain_model(self) -> PruneRunConfig:
        if self.student.init != "prune":
            raise ValueError(f"lmdistill prune needs student.init=prune, got `{self.student.init}`")
        if self.student.lora.enabled:
            raise ValueError("lmdistill prune writes a plain model: set student.lora.enabled false (LoRA is for training)")
        return self


def every_kth_layer(n_layers: int, n_keep: int) -> list[int]:
    """`n_keep` evenly spaced layers of `n_layers`, the first and the last included (round half up)."""
    if n_keep == 1:
        return [0]
    return [int(i * (n_layers - 1) / (n_keep - 1) + 0.5) for i in range(n_keep)]


def _shape(model: nn.Module) -> dict[str, Any]:
    c: Any = model.config
    heads = int(c.num_attention_heads)
    return {"layers": int(c.num_hidden_layers), "hidden": int(c.hidden_size), "heads": heads,
            "kv_heads": int(getattr(c, "num_key_value_heads", None) or heads),
            "intermediate": int(getattr(c, "intermediate_size", 0) or 0), "params": count_parameters(model)}


def same_size_layer_count(teacher: Any, n_params: int) -> int:
    """How many full-width teacher layers make a model of about `n_params` parameters (at least 1)."""
    layers = decoder_layers(teacher)
    per_layer = count_parameters(layers[0])
    rest = count_parameters(teacher) - len(layers) * per_layer  # embeddings, final norm, an untied head
    return min(len(layers), max(1, round((n_params - rest) / per_layer)))


def run_prune(cfg: PruneRunConfig) -> dict[str, Any]:
    """Prune, score the student, the teacher and keep-every-k-th-layer with as many layers (and, when the student is
    narrower than the teacher, with about as many parameters) on the same held-out blocks, write the student.

    Returns {"rows": [...], "student_dir", "kept_layers", ...}, as also written to <output_dir>/prune.json.
    """
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path, revision=cfg.teacher.revision,
                               trust_remote_code=cfg.teacher.trust_remote_code)
    teacher: Any = load_teacher(cfg.teacher)
    check_block_size(cfg.data.block_size, teacher.config)
    held = build_splits(cfg.data, tokenizer).eval
    if len(held) == 0:
        raise DataError(f"no held-out block of {cfg.data.block_size} tokens in `{cfg.data.source}`: raise "
                        "data.eval_documents or lower data.block_size")
    student: Any = build_student(cfg.student, tokenizer, teacher=teacher, seed=cfg.seed)
    kept = list(getattr(student, "lmdistill_kept_layers", cfg.student.keep_layers))
    n_vocab = shared_vocab_size(tokenizer, tokenizer, teacher, student)
    n_teacher = int(teacher.config.num_hidden_layers)
    layer_sets = {"every k-th layer (same depth)": every_kth_layer(n_teacher, len(kept))}
    same_size = every_kth_layer(n_teacher, same_size_layer_count(teacher, count_parameters(student)))
    if same_size not in layer_sets.values():
        layer_sets["every k-th layer (same size)"] = same_size
    models = {name: prune_layers(teacher, layers).to(device) for name, layers in layer_sets.items()}
    method = cfg.student.prune.method
    models[method] = student.to(device)
    metrics = evaluate_models(models, held, n_vocab=n_vocab, teacher=teacher.to(device), batch_size=cfg.batch_size,
                              max_batches=cfg.max_batches, device=device)
    rows = [{"model": "teacher", **_shape(teacher), "perplexity": metrics["teacher"]["perplexity"],
             "kl_to_teacher": 0.0, "teacher_layers": list(range(n_teacher))}]
    for name, model in models.items():
        rows.append({"model": name, **_shape(model), "perplexity": metrics[name]["perplexity"],
                     "kl_to_teacher": metrics[name]["kl_to_teacher"], "teacher_layers": layer_sets.get(name, kept)})
    out = Path(cfg.output_dir)
    result = {"student_dir": str(out), "method": method, "kept_layers": kept,
              "held_out_tokens": int(metrics[method].get("tokens", 0)), "rows": rows,
              "config": cfg.model_dump(mode="json")}
    student.eval()
    with atomic_dir(out, "pruned student") as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "prune.json", result, "prune summary")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The rows of `run_prune` as a fixed-width table."""
    width = max(len(r["model"]) for r in result["rows"])
    lines = [f"{'model':<{width}} {'layers':>6} {'hidden':>6} {'heads/kv':>8} {'mlp':>6} {'params (M)':>10} "
             f"{'perplexity':>12} {'KL':>7}  teacher layers"]
    for r in result["rows"]:
        heads = f"{r['heads']}/{r['kv_heads']}"
        kept = "all" if r["model"] == "teacher" else str(r["teacher_layers"])
        lines.append(f"{r['model']:<{width}} {r['layers']:>6} {r['hidden']:>6} {heads:>8} {r['intermediate']:>6} "
                     f"{r['params'] / 1e6:>10.2f} {r['perplexity']:>12.2f} {r['kl_to_teacher']:>7.3f}  {kept}")
    return "\n".join(lines)


def prune_command(cfg: PruneRunConfig) -> dict[str, Any]:
    """`lmdistill prune`: run, print the held-out table (before any training) and where the student went."""
    result = run_prune(cfg)
    print(f"held-out perplexity and KL(teacher||model) before any training ({result['held_out_tokens']:,} tokens of "
          f"{cfg.data.source}):")
    print(format_table(result))
    print(f"student: {result['student_dir']}")
    return result
