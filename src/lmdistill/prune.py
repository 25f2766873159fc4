"""Students cut from a teacher: which decoder layers they keep, and how wide they are.

`student.prune.method`:
- `keep_layers`: exactly student.keep_layers (DistilBERT style, every k-th layer by default);
- `influence` (ShortGPT): the len(keep_layers) layers whose output differs most from their input on calibration text;
- `minitron` (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"): the layers
  as `influence` chooses them, then width pruning by activation importance on the same text: attention heads (the L2
  norm of each head's output), MLP channels (mean |act(gate) * up|) and embedding channels (mean |RMSNorm output|,
  summed over every norm of the model) shrink by one common fraction until the model has at most `target_params`.

Every result is a plain Hugging Face model of the reduced config: `save_pretrained` writes it and
`AutoModelForCausalLM` reloads it. Models never import this module's internals; `models.build_student` calls
`prune_student`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdistill.config import PruneConfig, StudentConfig
from lmdistill.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

# The architectures whose width minitron knows how to cut: q/k/v/o_proj, gate/up/down_proj, RMSNorm, GQA.
WIDTH_MODEL_TYPES = ("llama", "qwen2", "mistral")
Batches = list[dict[str, Tensor]]


# ---------------------------------------------------------------------------------------------------------------------
# depth: which layers


def prune_layers(model: Any, keep_layers: list[int]) -> nn.Module:
    """A copy of `model` that keeps only the decoder layers `keep_layers` (in that order), Minitron/DistilBERT style."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    n_layers = int(config.num_hidden_layers)
    bad = [i for i in keep_layers if not 0 <= i < n_layers]
    if bad or not keep_layers or len(set(keep_layers)) != len(keep_layers):
        raise ConfigError(
            f"student.keep_layers must be distinct indices in [0, {n_layers - 1}] (the teacher has {n_layers} layers), "
            f"got {keep_layers}"
        )
    config.num_hidden_layers = len(keep_layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    student = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    src, dst = model.state_dict(), {}
    for key, value in src.items():
        parts = key.split(".")
        if "layers" in parts:
            idx = parts.index("layers") + 1
            old = int(parts[idx])
            if old not in keep_layers:
                continue
            parts[idx] = str(keep_layers.index(old))
        dst[".".join(parts)] = value.clone()
    _load_exact(student, dst, "pruning")
    for i, layer in enumerate(decoder_layers(student)):
        attention: Any = getattr(layer, "self_attn", None)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = i  # KV-cache slots follow the new numbering
    student.generation_config = copy.deepcopy(model.generation_config)
    return student


def _load_exact(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied lm_head weights appear as missing in some architectures; anything else means the copy is wrong.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{what} could not map weights: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _run_calibration(model: Any, batches: Iterable[dict[str, Tensor]], mask: list[Tensor], handles: list[Any],
                     method: str) -> float:
    """One no-grad forward per batch in eval mode; `mask[0]` holds the current batch's [B, T] float attention mask for
    the caller's hooks, which are removed afterwards. Returns the number of real tokens seen (refuses none)."""
    was_training, tokens = model.training, 0.0
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                attn = batch.get("attention_mask")
                attn = torch.ones_like(ids) if attn is None else attn.to(device)
                mask[:] = [attn.float()]
                tokens += float(attn.sum())
                model(input_ids=ids, attention_mask=attn, use_cache=False)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ConfigError(f"student.prune.method={method}: the calibration text gave no tokens")
    return tokens


@torch.no_grad()
def layer_influence(model: Any, batches: Iterable[dict[str, Tensor]]) -> list[float]:
    """Per decoder layer, 1 - cos(input, output) of its hidden states, averaged over the real tokens of `batches`
    (ShortGPT's block influence): ~0 for a layer that passes its input on unchanged, larger the more it changes it."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    mask: list[Tensor] = []

    def hook(i: int) -> Any:
        def fn(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, T]
            sums[i] += float(((1.0 - cos) * mask[0]).sum())
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    tokens = _run_calibration(model, batches, mask, handles, "influence")
    return [float(v) / tokens for v in sums]


def most_influential(scores: list[float], n_keep: int) -> list[int]:
    """The indices of the `n_keep` highest scores, in layer order (ties: the earlier layer)."""
    if not 1 <= n_keep <= len(scores):
        raise ConfigError(f"student.keep_layers asks for {n_keep} layers; the teacher has {len(scores)}")
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n_keep])


def calibration_batches(cfg: PruneConfig, tokenizer: Any) -> Batches:
    """The batches of student.prune.calibration_source that method=influence|minitron scores layers and widths on."""
    from lmdistill.config import DataConfig
    from lmdistill.data import build_splits

    n = cfg.calibration_batches * cfg.calibration_batch_size
    data = DataConfig(source=cfg.calibration_source, block_size=cfg.calibration_block_size, eval_documents=0,
                      max_documents=max(8, 4 * n))
    blocks = build_splits(data, tokenizer).train
    if len(blocks) == 0:
        raise ConfigError(f"student.prune.calibration_source `{cfg.calibration_source}` gave no text to score on")
    out = []
    for b in range(cfg.calibration_batches):
        idx = list(range(b * cfg.calibration_batch_size, min((b + 1) * cfg.calibration_batch_size, len(blocks))))
        if idx:
            out.append(blocks.batch(idx))
    return out


def choose_layers(teacher: nn.Module, cfg: StudentConfig, tokenizer: Any, batches: Batches | None = None) -> list[int]:
    """The teacher layers an init=prune student keeps: student.keep_layers, or with prune.method=influence|minitron the
    len(keep_layers) most influential ones on the calibration text (`batches`, read from the config when None)."""
    if cfg.prune.method == "keep_layers":
        return list(cfg.keep_layers)
    if batches is None:
        batches = calibration_batches(cfg.prune, tokenizer)
    scores = layer_influence(teacher, batches)
    keep = most_influential(scores, len(cfg.keep_layers))
    log.info("influence pruning keeps teacher layers %s (1 - cos per layer: %s)", keep,
             ", ".join(f"{s:.4f}" for s in scores))
    return keep


def decoder_layers(model: Any) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ModelLoadError(f"{type(model).__name__} has no `.layers` in its decoder; pruning is not supported for it")
    return layers


def prune_student(teacher: nn.Module, cfg: StudentConfig, tokenizer: Any) -> tuple[nn.Module, list[int]]:
    """The init=prune student as `cfg.prune` asks, and the teacher layers it kept (in order).

    Raises:
        ConfigError: minitron on an architecture it cannot cut, or a target_params it cannot reach.
    """
    batches = None
    if cfg.prune.method == "minitron":
        check_width_prunable(teacher)
        teacher_params = count_unique_parameters(teacher)
        target = _target(cfg.prune)
        if target >= teacher_params:
            raise ConfigError(
                f"student.prune.target_params={cfg.prune.target_params:g} (million) is not below the teacher's "
                f"{teacher_params / 1e6:.2f} million parameters; minitron only makes models smaller"
            )
        batches = calibration_batches(cfg.prune, tokenizer)
    kept = choose_layers(teacher, cfg, tokenizer, batches)
    model = prune_layers(teacher, kept)
    if cfg.prune.method == "minitron":
        assert batches is not None
        importance = width_importance(model, batches)
        plan = plan_width(model, importance, _target(cfg.prune), cfg.prune.width_axes, len(kept))
        model = prune_width(model, plan)
        # which teacher channel each residual channel is: where layer-wise distillation's projections start
        model.lmdistill_kept_channels = plan.hidden.tolist()  # type: ignore[assignment]
        log.info("minitron: %d layers %s, hidden %d, heads %d (kv %d), intermediate %d: %.2f M parameters",
                 len(kept), kept, plan.hidden_size, plan.n_heads, plan.n_kv_heads, plan.intermediate_size,
                 count_unique_parameters(model) / 1e6)
    return model, kept


def _target(cfg: PruneConfig) -> int:
    assert cfg.target_params is not None  # PruneConfig refuses method=minitron without it
    return round(cfg.target_params * 1e6)


def count_unique_parameters(model: nn.Module) -> int:
    """Parameters of `model`, a tied embedding / lm_head counted once."""
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


# ---------------------------------------------------------------------------------------------------------------------
# width: Minitron's activation importance


@dataclass
class WidthImportance:
    """Minitron's activation-based importance, averaged over the real tokens of the calibration batches.

    hidden: [H] mean |output| of each residual channel after every RMSNorm (each layer's two, the final one), summed.
    heads: per layer, [n_heads] mean L2 norm of each query head's attention output (its slice of o_proj's input).
    mlp: per layer, [I] mean |act(gate) * up| of each intermediate channel (down_proj's input).
    """

    hidden: Tensor
    heads: list[Tensor]
    mlp: list[Tensor]


def check_width_prunable(model: Any) -> None:
    """Refuse (ConfigError) a model minitron cannot cut: not Llama-style, or missing the projections it slices."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in WIDTH_MODEL_TYPES:
        raise ConfigError(
            f"student.prune.method=minitron prunes the width of Llama-style models ({', '.join(WIDTH_MODEL_TYPES)}: "
            f"q/k/v/o_proj, gate/up/down_proj, RMSNorm); the teacher is model_type `{model_type}`. Use "
            "prune.method=influence (depth only) for it"
        )
    layer = decoder_layers(model)[0]
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
        try:
            layer.get_submodule(path)
        except AttributeError:
            raise ConfigError(f"student.prune.method=minitron: the `{model_type}` layer has no `{path}`; its width "
                              "cannot be pruned (use prune.method=influence)") from None


def _dims(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, query heads, kv heads, head_dim) of a Llama-style config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return int(config.hidden_size), int(config.intermediate_size), heads, kv, head_dim


@torch.no_grad()
def width_importance(model: Any, batches: Iterable[dict[str, Tensor]]) -> WidthImportance:
    """Score every width channel of `model` (Llama-style) on `batches`; see `WidthImportance`."""
    check_width_prunable(model)
    hidden, inter, n_heads, _, head_dim = _dims(model.config)
    layers = decoder_layers(model)
    h_sum = torch.zeros(hidden, dtype=torch.float64)
    head_sums = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    mlp_sums = [torch.zeros(inter, dtype=torch.float64) for _ in layers]
    mask: list[Tensor] = []

    def masked_sum(x: Tensor) -> Tensor:  # x [B, T, C] -> [C], padded positions left out
        return (x.float() * mask[0].unsqueeze(-1)).sum(dim=(0, 1)).double().cpu()

    def on_norm(_: nn.Module, __: tuple[Any, ...], out: Tensor) -> None:
        h_sum.add_(masked_sum(out.abs()))

    def on_o_proj(i: int) -> Callable[..., None]:
        def fn(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0]  # [B, T, n_heads * head_dim]
            head_sums[i].add_(masked_sum(x.unflatten(-1, (n_heads, head_dim)).float().norm(dim=-1)))
        return fn

    def on_down_proj(i: int) -> Callable[..., None]:
        def fn(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            mlp_sums[i].add_(masked_sum(args[0].abs()))
        return fn

    handles = [model.get_decoder().norm.register_forward_hook(on_norm)]
    layer: Any
    for i, layer in enumerate(layers):
        handles += [layer.input_layernorm.register_forward_hook(on_norm),
                    layer.post_attention_layernorm.register_forward_hook(on_norm),
                    layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)),
                    layer.mlp.down_proj.register_forward_pre_hook(on_down_proj(i))]
    tokens = _run_calibration(model, batches, mask, handles, "minitron")
    return WidthImportance(hidden=h_sum / tokens, heads=[s / tokens for s in head_sums],
                           mlp=[s / tokens for s in mlp_sums])


def top_indices(scores: Tensor, k: int) -> Tensor:
    """The indices of the `k` highest scores, ascending (ties: the earlier index)."""
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return order.sort().values


@dataclass
class WidthPlan:
    """What a width-pruned model keeps: residual channels (shared by every layer), and per layer its query heads
    (grouped by their kept KV head, which keeps GQA's contiguous layout), its KV heads and its MLP channels."""

    hidden: Tensor
    heads: list[Tensor]
    kv_heads: list[Tensor]
    mlp: list[Tensor]
    head_dim: int

    @property
    def hidden_size(self) -> int:
        return len(self.hidden)

    @property
    def n_heads(self) -> int:
        return len(self.heads[0])

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_heads[0])

    @property
    def intermediate_size(self) -> int:
        return len(self.mlp[0])


def choose_heads(scores: Tensor, n_kv: int, groups: int, per_group: int) -> tuple[Tensor, Tensor, float]:
    """Keep `groups` KV groups of `per_group` query heads each, from one layer's `scores` [n_heads] (query heads of
    group g are g * R ... g * R + R - 1, R = n_heads // n_kv): each group's best `per_group` heads, then the groups
    whose kept heads score most. Returns (query heads, KV heads, their total score)."""
    ratio = len(scores) // n_kv
    grouped = scores.view(n_kv, ratio)
    within = [top_indices(grouped[g], per_group) for g in range(n_kv)]
    group_score = torch.stack([grouped[g, within[g]].sum() for g in range(n_kv)])
    kv = top_indices(group_score, groups)
    heads = torch.cat([within[int(g)] + int(g) * ratio for g in kv])
    return heads, kv, float(group_score[kv].sum())


# the width axes of each parameter's dimensions, by (module name, parameter name); None: a dimension that stays
_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "hidden"), "lm_head.weight": (None, "hidden"),
    "q_proj.weight": ("q", "hidden"), "q_proj.bias": ("q",),
    "k_proj.weight": ("kv", "hidden"), "k_proj.bias": ("kv",),
    "v_proj.weight": ("kv", "hidden"), "v_proj.bias": ("kv",),
    "o_proj.weight": ("hidden", "q"), "o_proj.bias": ("hidden",),
    "gate_proj.weight": ("mlp", "hidden"), "gate_proj.bias": ("mlp",),
    "up_proj.weight": ("mlp", "hidden"), "up_proj.bias": ("mlp",),
    "down_proj.weight": ("hidden", "mlp"), "down_proj.bias": ("hidden",),
}


def _axes_of(name: str, model_type: str) -> tuple[str | None, ...]:
    module, _, param = name.rpartition(".")
    leaf = module.rpartition(".")[2]
    if leaf.endswith("norm") and param == "weight":
        return ("hidden",)
    axes = _AXES.get(f"{leaf}.{param}")
    if axes is None:
        raise ConfigError(f"student.prune.method=minitron does not know how to cut `{name}` of a `{model_type}` model; "
                          "use prune.method=influence (depth only)")
    return axes


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def plan_width(model: Any, importance: WidthImportance, target: int, axes: Sequence[str],
               n_layers: int | None = None) -> WidthPlan:
    """The widest plan (one common fraction f of every axis in `axes`, f from 1 down in steps of 1/1000) whose model
    has at most `target` parameters, keeping the most important channels and heads.

    Heads: the largest count g * r <= round(f * n_heads) with g <= n_kv groups and r <= n_heads / n_kv query heads
    each, the (g, r) split with the most total importance over the layers. The hidden size is a multiple of the head
    count (transformers' Llama config checks it), and of 8 when 256 or more, as is the intermediate size, which then
    grows into whatever budget the rounding of the other axes left.

    Raises:
        ConfigError: `target` is above the full-width model (width pruning cannot reach it from above: keep more
            layers) or below the narrowest model the axes allow.
    """
    hidden, inter, n_heads, n_kv, head_dim = _dims(model.config)
    ratio = n_heads // n_kv
    model_type = str(model.config.model_type)
    n_layers = n_layers if n_layers is not None else len(importance.heads)
    shapes = [(name, _axes_of(name, model_type), tuple(p.shape)) for name, p in model.named_parameters()]

    def size(full: int, f: float, axis: str, multiple_of: int = 1) -> int:
        if axis not in axes:
            return full
        step = math.lcm(8 if full >= 256 else 1, multiple_of)
        return min(full // step * step, max(step, round(f * full / step) * step))

    def count(h: int, q: int, kv: int, m: int) -> int:
        new = {"hidden": h, "q": q * head_dim, "kv": kv * head_dim, "mlp": m}
        total = 0
        for _, dims, shape in shapes:
            n = 1
            for axis, full in zip(dims, shape, strict=True):
                n *= full if axis is None else new[axis]
            total += n
        return total

    splits: dict[int, tuple[int, int]] = {}

    def split(n: int) -> tuple[int, int]:
        """(groups, heads per group) for `n` query heads: the valid split whose heads carry the most importance."""
        if n not in splits:
            options = [(g, n // g) for g in range(n_kv, 0, -1) if n % g == 0 and n // g <= ratio]
            splits[n] = max(options, key=lambda gr: sum(choose_heads(s, n_kv, *gr)[2] for s in importance.heads))
        return splits[n]

    valid_counts = sorted({g * r for g in range(1, n_kv + 1) for r in range(1, ratio + 1)})
    full = count(hidden, n_heads, n_kv, inter)
    if target > full:
        raise ConfigError(
            f"student.prune.target_params={target / 1e6:g} (million) is more than the {n_layers} kept layers have at "
            f"full width ({full / 1e6:.2f} million): keep more layers (more entries in student.keep_layers) or lower "
            "student.prune.target_params"
        )
    smallest = None
    for step in range(1000, 0, -1):
        f = step / 1000
        want = max(1, round(f * n_heads)) if "heads" in axes else n_heads
        # transformers' Llama config wants hidden_size to be a multiple of num_attention_heads
        n = max(c for c in valid_counts if c <= want and ("hidden" in axes or hidden % c == 0))
        groups, per = split(n)
        h, m = size(hidden, f, "hidden", multiple_of=n), size(inter, f, "mlp")
        smallest = count(h, groups * per, groups, m)
        if smallest <= target:
            break
    else:
        raise ConfigError(
            f"student.prune.target_params={target / 1e6:g} (million) is below the smallest model minitron can cut from "
            f"{n_layers} layers along width_axes {list(axes)}: {smallest / 1e6 if smallest else 0:.3f} million; raise "
            "target_params, add width axes, or keep fewer layers"
        )
    if "mlp" in axes:  # the rounding of the other axes left some budget: the MLP takes what fits
        step = 8 if inter >= 256 else 1
        while m + step <= inter and count(h, groups * per, groups, m + step) <= target:
            m += step
    chosen = [choose_heads(s, n_kv, groups, per) for s in importance.heads]
    return WidthPlan(
        hidden=top_indices(importance.hidden, h),
        heads=[c[0] for c in chosen], kv_heads=[c[1] for c in chosen],
        mlp=[top_indices(s, m) for s in importance.mlp], head_dim=head_dim,
    )


def _rows(units: Tensor, width: int) -> Tensor:
    """The rows (or columns) of a projection that belong to the kept `units` (heads) of `width` each."""
    return (units[:, None] * width + torch.arange(width)).flatten()


@torch.no_grad()
def prune_width(model: Any, plan: WidthPlan) -> nn.Module:
    """A plain HF model of the reduced config (hidden_size, intermediate_size, num_attention_heads,
    num_key_value_heads; head_dim unchanged) holding the kept slices of `model`'s weights. Tied embeddings stay tied."""
    from transformers import AutoModelForCausalLM

    check_width_prunable(model)
    config = copy.deepcopy(model.config)
    config.hidden_size = plan.hidden_size
    config.intermediate_size = plan.intermediate_size
    config.num_attention_heads = plan.n_heads
    config.num_key_value_heads = plan.n_kv_heads
    config.head_dim = plan.head_dim
    student = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    model_type = str(config.model_type)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False):
            continue  # tied: the embedding's slice is the head's
        layer = _layer_of(name)
        index = {"hidden": plan.hidden}
        if layer is not None:
            index |= {"q": _rows(plan.heads[layer], plan.head_dim), "kv": _rows(plan.kv_heads[layer], plan.head_dim),
                      "mlp": plan.mlp[layer]}
        sliced = value
        for dim, axis in enumerate(_axes_of(name, model_type)):
            if axis is not None:
                sliced = sliced.index_select(dim, index[axis].to(value.device))
        state[name] = sliced.clone()
    _load_exact(student, state, "minitron width pruning")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = copy.deepcopy(model.generation_config)
    return student
