"""Layer-wise distillation: match the student's hidden states to the teacher's at chosen layer pairs.

`hidden_pair_sum` is the arithmetic (a pure function of tensors); `HiddenProjections` holds the learned linear maps
(student width -> teacher width) for the pairs whose widths differ. It is attached to the student so the student's
optimizer trains it and its checkpoints carry it, and is left out of the exported model (`attach_projections`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lmdistill.errors import ConfigError

HiddenKind = Literal["mse", "cosine"]
PROJECTION_ATTR = "lmdistill_hidden_projections"


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

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int, seed: int = 0):
        super().__init__()
        self.maps = nn.ModuleDict()
        if student_width != teacher_width:
            with torch.random.fork_rng(devices=[]):  # the run's RNG stream stays as it was without the projections
                torch.manual_seed(seed)
                for pair in pairs:
                    self.maps[pair_key(pair)] = nn.Linear(student_width, teacher_width, bias=False)

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


def layer_losses(student_states: Sequence[Tensor], teacher_states: Sequence[Tensor], pairs: Sequence[tuple[int, int]],
                 mask: Tensor, kind: HiddenKind, projections: HiddenProjections | None) -> dict[str, Tensor]:
    """`hidden_<s>_<t>` -> summed hidden loss of each pair. `*_states` are a model's `output_hidden_states` (index 0
    the embeddings, index i + 1 the output of decoder layer i; the last one after the final norm)."""
    out = {}
    for pair in pairs:
        s = student_states[pair[0] + 1]
        if projections is not None:
            s = projections.project(pair, s)
        out[f"hidden_{pair_key(pair)}"] = hidden_pair_sum(s, teacher_states[pair[1] + 1], mask, kind)
    return out
