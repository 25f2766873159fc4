"""Load teacher and student causal LMs, check their vocabularies agree, build students by pruning or from a config."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmdistill.assets import EMBEDDED_TEACHERS, teacher_dir
from lmdistill.config import CoModelConfig, LoraConfig, ModelConfig, Precision, StudentConfig
from lmdistill.errors import ConfigError, ModelLoadError, VocabMismatchError
from lmdistill.losses.head import Head
from lmdistill.prune import prune_layers, prune_student  # noqa: F401  (prune_layers: re-exported, its old home)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """`embedded:...` -> the converted local directory; anything else is passed to from_pretrained as is."""
    if name_or_path in EMBEDDED_TEACHERS:
        return str(teacher_dir(name_or_path))
    if name_or_path.startswith("embedded:"):
        raise ConfigError(
            f"unknown embedded model `{name_or_path}`; the embedded ones are {', '.join(EMBEDDED_TEACHERS)}"
        )
    return name_or_path


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()


def _load_error(what: str, name_or_path: str, err: Exception) -> ModelLoadError:
    if _looks_local(name_or_path):
        p = Path(name_or_path).expanduser()
        found = sorted(x.name for x in p.iterdir())[:12] if p.is_dir() else []
        where = f"found: {', '.join(found)}" if p.is_dir() else "the path does not exist"
        return ModelLoadError(
            f"could not load the {what} from `{name_or_path}` ({where}); point it at a directory written by "
            f"save_pretrained (config.json + weights). Cause: {err}"
        )
    return ModelLoadError(
        f"could not load the {what} `{name_or_path}` from the hub (no such repo, no network, or it needs a token / "
        f"trust_remote_code); download it or give a local path. Cause: {err}"
    )


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad (pad = eos when the tokenizer has no pad token)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (every cause becomes one readable message)
        raise _load_error("tokenizer", name_or_path, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: ModelConfig | str, *, dtype: Precision | None = None) -> nn.Module:
    """from_pretrained on a hub id or local directory (or the embedded default)."""
    from transformers import AutoModelForCausalLM

    if isinstance(cfg, str):
        cfg = ModelConfig(name_or_path=cfg)
    path = resolve_model_path(cfg.name_or_path)
    local = Path(str(path)).expanduser()
    if not cfg.allow_pickle and local.is_dir() and not any(local.glob("*.safetensors")):
        pickles = sorted(x.name for x in local.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles:
            raise ModelLoadError(
                f"the model `{cfg.name_or_path}` has only pickle weights ({', '.join(pickles[:5])}), which run "
                "arbitrary code when loaded; lmdistill loads safetensors only. Convert it once (load it and "
                "`save_pretrained(..., safe_serialization=True)`), or set allow_pickle=true on this model (e.g. "
                "`--teacher.allow_pickle true`) if you trust where the file came from"
            )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=cfg.revision,
            dtype=DTYPES[dtype or cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            # safetensors only, unless the user opted in to pickle checkpoints (None: prefer safetensors, else .bin)
            use_safetensors=None if cfg.allow_pickle else True,
        )
    except Exception as e:  # noqa: BLE001
        raise _load_error("model", cfg.name_or_path, e) from None
    return model


def load_teacher(cfg: ModelConfig) -> nn.Module:
    """A frozen teacher: eval mode, no grads (optionally in a lower precision than the student)."""
    model = load_causal_lm(cfg)
    model.eval()
    model.requires_grad_(False)
    return model


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the token -> id map and special tokens: equal fingerprints mean interchangeable token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((k, str(v)) for k, v in (tokenizer.special_tokens_map or {}).items())
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()


def embedding_rows(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def shared_vocab_size(teacher_tokenizer: Any, student_tokenizer: Any, teacher: nn.Module | None = None,
                      student: nn.Module | None = None) -> int:
    """Size of the real vocabulary both models score, or a VocabMismatchError.

    Models of one family often pad their embedding matrices differently (Qwen2.5: 151,936 vs 152,064 rows for a
    151,665-token tokenizer). What matters is the tokenizers: equal token->id maps mean position-wise comparable
    distributions, and logits are sliced to `len(tokenizer)`; the padded rows are never real tokens.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        t_only = sorted(set(t_vocab) - set(s_vocab))[:5]
        s_only = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sum(1 for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])
        raise VocabMismatchError(
            f"teacher and student tokenizers differ (teacher {len(t_vocab)} tokens, student {len(s_vocab)}; "
            f"teacher-only e.g. {t_only}, student-only e.g. {s_only}, {moved} shared tokens with other ids), so their "
            "distributions cannot be compared token by token. Distil across tokenizers with `--loss.cross_tokenizer "
            "hybrid` (or `uld`: the two tokenizations are aligned by bytes), use hard-label distillation on teacher "
            "text (`lmdistill generate` then `lmdistill hard --mode sequence`), or give the student the teacher's "
            "tokenizer."
        )
    n_vocab = len(teacher_tokenizer)
    for name, model in (("teacher", teacher), ("student", student)):
        if model is not None and embedding_rows(model) < n_vocab:
            raise VocabMismatchError(
                f"the {name} scores {embedding_rows(model)} tokens but its tokenizer has {n_vocab}; "
                "resize its embeddings (model.resize_token_embeddings(len(tokenizer))) and save it again"
            )
    return n_vocab


def model_from_arch(arch: dict[str, Any], base_config: Any, tokenizer: Any, what: str = "student") -> nn.Module:
    """A randomly initialised causal LM from transformers config fields `arch`.

    With `base_config` (the teacher's) the fields replace those of that config; without one `arch` names the whole
    architecture (`model_type` included) and the special-token ids come from `tokenizer`. The vocab size is the
    tokenizer's unless set.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = base_config.to_dict() if base_config is not None else {}
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    fields.update(arch)
    model_type = fields.pop("model_type")
    fields.setdefault("vocab_size", len(tokenizer))
    if base_config is None:
        eos = tokenizer.eos_token_id
        fields.setdefault("eos_token_id", eos)
        fields.setdefault("bos_token_id", tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos)
        fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # noqa: BLE001  (transformers raises several kinds for a bad field)
        raise ConfigError(f"{what}.arch is not a valid `{model_type}` config: {e}") from None
    check_arch_fields(config, {k: v for k, v in (fields if base_config is None else arch).items()
                               if k != "model_type"}, what)
    return AutoModelForCausalLM.from_config(config)


def check_arch_fields(config: Any, fields: dict[str, Any], what: str) -> None:
    """Refuse arch fields the config class does not know: transformers would store them silently and ignore them."""
    import inspect

    known = set(inspect.signature(type(config).__init__).parameters) | set(type(config)().to_dict())
    known |= set(getattr(config, "attribute_map", {})) | {"rope_theta", "rope_scaling"}
    unknown = sorted(k for k in fields if k not in known)
    if unknown:
        hint = " (in a YAML flow mapping put a space after each colon: `{hidden_size: 64}`)" if any(
            ":" in k for k in unknown) else ""
        raise ConfigError(
            f"{what}.arch has field(s) {unknown} that a `{config.model_type}` config does not have{hint}; known fields "
            f"include: {', '.join(sorted(k for k in known if not k.startswith('_'))[:40])}"
        )


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap with peft LoRA adapters; refuse target modules the model does not have."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    absent = [m for m in cfg.target_modules if m not in names]
    if absent:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"student.lora.target_modules {absent} do not exist in {type(model).__name__}; its linear modules are: "
            f"{', '.join(linear)}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def build_student(cfg: StudentConfig | CoModelConfig, tokenizer: Any, *, teacher: nn.Module | None = None,
                  teacher_config: Any = None, seed: int = 0, what: str = "student") -> nn.Module:
    """A trainable model as `cfg` asks: a pretrained checkpoint, random init from `arch` (on top of the teacher's config
    when there is one), or pruned from the teacher (lmdistill.prune: its layers, and its width with
    prune.method=minitron); then its dtype, and LoRA adapters when configured.

    Every recipe builds its student here (co-distillation its co-trained teacher too, from a `CoModelConfig`).
    """
    torch.manual_seed(seed)
    if cfg.init == "pretrained":
        model = load_causal_lm(
            ModelConfig(name_or_path=cfg.name_or_path or "", dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        )
    elif cfg.init == "config":
        model = model_from_arch(cfg.arch, teacher_config, tokenizer, what)
    else:
        if teacher is None or not isinstance(cfg, StudentConfig):
            raise ConfigError("student.init=prune needs the teacher model; with a teacher cache use init=pretrained")
        model, kept = prune_student(teacher, cfg, tokenizer)
        # the pruning map, the default pairs of layer-wise distillation (a plain attribute: not exported)
        model.lmdistill_kept_layers = kept  # type: ignore[assignment]
    model = model.to(DTYPES[cfg.dtype])
    model.requires_grad_(True)
    model.train()
    if isinstance(cfg, StudentConfig) and cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states [B, T, H] (after the last norm), without computing the [B, T, V] logits.

    Goes through the model's own forward (so DDP/FSDP wrappers and peft adapters see the call) and asks for logits at
    no position (`logits_to_keep` = empty index tensor).
    """
    return decoder_hidden_states(model, input_ids, attention_mask)[-1]


def decoder_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Every hidden state [B, T, H] of one forward without logits: the embeddings, then the output of each decoder
    layer (the last one after the final norm), as `decoder_hidden` computes the last."""
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=none,
                use_cache=False)
    return tuple(out.hidden_states)


def lm_head(model: Any, n_vocab: int) -> Head:
    """A causal LM's output layer (tied or not) as a `Head`, sliced to the first `n_vocab` rows: the only way any code
    reads an lm_head, for the student and the teacher.

    Embedding matrices are often padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens); only the first
    `n_vocab` rows are real tokens. The logit post-processing is the model's own: Cohere's `logit_scale` multiplies
    the linear output, Granite's `logits_scaling` divides it, Gemma 2's `final_logit_softcapping` caps it.

    Raises:
        ConfigError: the model has no output layer, its lm_head carries a (LoRA) adapter whose delta the fused losses
            would ignore, or it has fewer than `n_vocab` rows.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ConfigError(f"{type(base).__name__} has no lm_head (get_output_embeddings() returned {head!r}); "
                          "lmdistill distils *ForCausalLM models")
    if hasattr(head, "base_layer"):
        raise ConfigError(
            "the lm_head carries an adapter (LoRA on lm_head): the fused losses read its base weight and would ignore "
            "the adapter. Leave lm_head out of student.lora.target_modules, or set --loss.fused false"
        )
    if head.weight.shape[0] < n_vocab:
        raise VocabMismatchError(f"{type(base).__name__} scores {head.weight.shape[0]} tokens, fewer than the shared "
                                 f"vocabulary of {n_vocab}; resize its embeddings to its tokenizer")
    cfg = base.config.get_text_config() if callable(getattr(base.config, "get_text_config", None)) else base.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)
    if getattr(cfg, "logits_scaling", None):
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    # Under FSDP2 a weight read outside its unit's forward is this rank's shard (a DTensor): `gathered` all-gathers it
    # differentiably (its gradient is reduce-scattered back). A trained model's head is read after its forward, which
    # accelerate leaves unsharded until backward: a plain tensor, nothing gathered twice. The frozen teacher's is
    # resharded after forward and gathered here, which measured less memory than keeping it unsharded (V = 151,936:
    # 2,112 vs 3,000 MiB peak per rank; benchmarks/fsdp_loss_memory.py, numbers in prepare_frozen).
    from lmdistill.train.distributed import gathered

    weight, bias = gathered(head.weight), getattr(head, "bias", None)
    bias = None if bias is None else gathered(bias)
    return Head(weight[:n_vocab], None if bias is None else bias[:n_vocab], scale, float(softcap) if softcap else None)
