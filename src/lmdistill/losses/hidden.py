"""Layer-wise distillation: match the student's hidden states to the teacher's at chosen layer pairs.

`hidden_pair_sum` is the arithmetic (a pure function of tensors); `HiddenProjections` holds the learned linear maps
(student width -> teacher width) for the pairs whose widths differ. It is attached to the student so the student's
optimizer trains it and its checkpoints carry it, and is left out of the exported model (`attach_projections`).
`layer_match` is the one set-up every recipe uses (soft, codistill, onpolicy): the checked pairs, the projections
attached to the student, and `LayerMatch.add`, which adds weight * the pairs' losses to a recipe's step loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lmdistill.errors import ConfigError
from lmdistill.losses.objective import IGNORE_INDEX, StepLoss

if TYPE_CHECKING:
    from lmdistill.config import HiddenLossConfig

HiddenKind = Literal["mse", "cosine"]
PROJECTION_ATTR = "lmdistill_hidden_projections"
CARRY = "hidden_teacher_state_"  # + i: a batch key holding the teacher's hidden state i (`LayerMatch.carry`)


def hidden_pair_sum(student: Tensor, teacher: Tensor, mask: Tensor, kind: HiddenKind) -> Tensor:
    """Sum over the positions in `mask` ([B, T] bool) of the per-token loss between `student` and `teacher` hidden
    states ([B, T, H], same H): `mse` = mean over H of the squared difference, `cosine` = 1 - cos(student, teacher).
    Computed in float32; gradients reach `student` only."""
    s, t = student[mask].float(), teacher[mask].detach().float()
    if kind == "mse":
        per_token = (s - t).pow(2).mean(dim=-1)
    elif kind == "cosine":
        per_token = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ConfigError(f"loss.hidden.kind must be mse or cosine, got {kind!r}")
    return per_token.sum()


def default_pairs(kept_layers: Sequence[int] | None) -> list[tuple[int, int]]:
    """A pruned student's layer i pairs with the teacher layer it was copied from."""
    if kept_layers is None:
        raise ConfigError(
            "loss.hidden.pairs defaults to the pruning map, which only a student.init=prune student has; set "
            "loss.hidden.pairs, e.g. `--loss.hidden.pairs '[[0, 3], [1, 7]]'` (student layer, teacher layer)"
        )
    return [(i, int(t)) for i, t in enumerate(kept_layers)]


def even_pairs(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Evenly spaced: student layer i pairs with teacher layer round((i + 1) * n_teacher / n_student) - 1 (rounded
    half up, at least 0), so the last layers pair with each other; the default of models that start untrained."""
    return [(i, max(0, (2 * (i + 1) * n_teacher + n_student) // (2 * n_student) - 1)) for i in range(n_student)]


def check_pairs(pairs: Sequence[tuple[int, int]], n_student: int, n_teacher: int) -> None:
    bad = [p for p in pairs if not (0 <= p[0] < n_student and 0 <= p[1] < n_teacher)]
    if bad or not pairs:
        raise ConfigError(
            f"loss.hidden.pairs must be non-empty [student_layer, teacher_layer] pairs with student layers in "
            f"[0, {n_student - 1}] and teacher layers in [0, {n_teacher - 1}]; got {list(pairs)}"
        )


def pair_key(pair: tuple[int, int]) -> str:
    return f"{pair[0]}_{pair[1]}"


class HiddenProjections(nn.Module):
    """One bias-free linear map per pair whose widths differ (student width -> teacher width); identity elsewhere."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int, seed: int = 0,
                 kept_channels: Sequence[int] | None = None):
        super().__init__()
        self.maps = nn.ModuleDict()
        if student_width != teacher_width:
            with torch.random.fork_rng(devices=[]):  # the run's RNG stream stays as it was without the projections
                torch.manual_seed(seed)
                for pair in pairs:
                    self.maps[pair_key(pair)] = nn.Linear(student_width, teacher_width, bias=False)
            if kept_channels is not None:
                self._start_at_the_pruning_map(kept_channels, student_width, teacher_width)

    @torch.no_grad()
    def _start_at_the_pruning_map(self, kept: Sequence[int], student_width: int, teacher_width: int) -> None:
        """A width-pruned student's channel j is the teacher's channel kept[j]: each map starts as that embedding, so
        the first steps match what pruning kept instead of chasing a random projection (measured on the embedded
        minitron student: cosine loss ~1.0 per pair from a random map, which swamped the logit loss)."""
        if len(kept) != student_width or not all(0 <= c < teacher_width for c in kept):
            raise ConfigError(f"the pruning map has {len(kept)} residual channels for a student of width "
                              f"{student_width} (teacher width {teacher_width}); set loss.hidden.pairs explicitly")
        for linear in self.maps.values():
            assert isinstance(linear, nn.Linear)
            linear.weight.zero_()
            linear.weight[torch.as_tensor(list(kept)), torch.arange(student_width)] = 1.0

    def project(self, pair: tuple[int, int], hidden: Tensor) -> Tensor:
        key = pair_key(pair)
        return self.maps[key](hidden) if key in self.maps else hidden


def attach_projections(student: nn.Module, projections: HiddenProjections) -> None:
    """Make `projections` a submodule of `student` (its optimizer and checkpoints see it) that `save_pretrained`
    leaves out, so the exported student stays a plain model of its own config."""
    setattr(student, PROJECTION_ATTR, projections)
    keys = {f"{PROJECTION_ATTR}.{name}" for name, _ in projections.named_parameters()}
    ignored = getattr(student, "_keys_to_ignore_on_save", None)
    student._keys_to_ignore_on_save = set(ignored or ()) | keys  # type: ignore[assignment]


def layer_losses(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor] | Mapping[int, Tensor],
                 pairs: Sequence[tuple[int, int]], mask: Tensor, kind: HiddenKind,
                 projections: HiddenProjections | None) -> dict[str, Tensor]:
    """`hidden_<s>_<t>` -> summed hidden loss of each pair. `*_states` are a model's `output_hidden_states` (index 0
    the embeddings, index i + 1 the output of decoder layer i; the last one after the final norm); the teacher's may
    be a mapping holding only the paired indices."""
    out = {}
    for pair in pairs:
        s = student_states[pair[0] + 1]
        if projections is not None:
            s = projections.project(pair, s)
        out[f"hidden_{pair_key(pair)}"] = hidden_pair_sum(s, teacher_states[pair[1] + 1], mask, kind)
    return out


@dataclass
class LayerMatch:
    """Layer-wise distillation as a recipe runs it: the checked pairs, the projections (attached to the student),
    the per-token loss kind and the weight."""

    pairs: list[tuple[int, int]]
    projections: HiddenProjections
    kind: HiddenKind
    weight: float

    def add(self, base: StepLoss, student_states: Sequence[Tensor],
            teacher_states: Sequence[Tensor] | Mapping[int, Tensor], labels: Tensor) -> StepLoss:
        """`base` + weight * the mean over pairs of the hidden losses summed over the target tokens of `labels`
        ([B, T]), each pair also logged as hidden_<s>_<t>. The mean keeps `weight` the share of one layer-wise term
        however many pairs there are (16 summed pairs outweighed the logit loss 3:1 on a minitron student). The
        teacher's states are detached: its gradients never see this loss."""
        parts = layer_losses(student_states, teacher_states, self.pairs, labels != IGNORE_INDEX, self.kind,
                             self.projections)
        pair_sum = sum(parts.values(), torch.zeros((), device=base.loss_sum.device))
        total = base.loss_sum + self.weight * pair_sum / max(len(parts), 1)
        return StepLoss(total, {**base.parts, **parts})

    def carry(self, teacher_states: Sequence[Tensor]) -> dict[str, Tensor]:
        """The paired teacher layers' states only, detached, keyed for a batch to carry them (`carried`)."""
        return {f"{CARRY}{t + 1}": teacher_states[t + 1].detach() for t in sorted({t for _, t in self.pairs})}

    @staticmethod
    def carried(batch: Mapping[str, Tensor]) -> dict[int, Tensor]:
        """The teacher states a batch carries (`carry`), by `output_hidden_states` index: `add`'s teacher_states."""
        return {int(k.removeprefix(CARRY)): v for k, v in batch.items() if k.startswith(CARRY)}


def layer_match(cfg: HiddenLossConfig, student: nn.Module, teacher: nn.Module | None, *, seed: int,
                info: dict[str, Any] | None = None, default: Literal["prune", "even"] = "prune") -> LayerMatch | None:
    """The layer-wise distillation of a run, None when `cfg.weight` is 0 (off).

    Checks `cfg.pairs` (or the default: `prune`, the pruning map of a student.init=prune student, refused for any
    other; `even`, `even_pairs`, for models that start untrained) against both models' depths, attaches the
    projections where widths differ to `student` (its optimizer trains them, its checkpoints carry them, its export
    leaves them out) and records the pairs as `info["hidden_pairs"]` (the run summary)."""
    if cfg.weight <= 0:
        return None
    assert teacher is not None, "layer-wise distillation needs a teacher model in this process"
    s_cfg: Any = student.config
    t_cfg: Any = teacher.config
    n_student, n_teacher = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
    if cfg.pairs is not None:
        pairs = [(int(s), int(t)) for s, t in cfg.pairs]
    elif default == "even":
        pairs = even_pairs(n_student, n_teacher)
    else:
        pairs = default_pairs(getattr(student, "lmdistill_kept_layers", None))
    check_pairs(pairs, n_student, n_teacher)
    # a width-pruned student's map (read only with the default pairs: explicit pairs may mean another teacher)
    kept_channels = getattr(student, "lmdistill_kept_channels", None) if cfg.pairs is None else None
    projections = HiddenProjections(pairs, s_cfg.hidden_size, t_cfg.hidden_size, seed=seed,
                                    kept_channels=kept_channels)
    projections.to(next(student.parameters()).dtype)
    attach_projections(student, projections)
    if info is not None:
        info["hidden_pairs"] = [list(p) for p in pairs]
    return LayerMatch(pairs, projections, cfg.kind, cfg.weight)
