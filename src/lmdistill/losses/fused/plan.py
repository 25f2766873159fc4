"""`Plan`: everything the chunk loop needs besides the student's differentiable tensors (shared by the torch and
Triton row arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from lmdistill.losses.head import Head
from lmdistill.losses.sparse import SparseTargets


@dataclass(frozen=True)
class Plan:
    """One call's arguments, checked, cut to the valid rows and detached where no gradient flows.

    The gradient handed out is that of ``kd_weight * T^2 * KD + ce_weight * CE``.
    """

    rows: Tensor | None  # [N_valid] indices of the valid tokens in the flattened [N, Hs] hidden, None = all valid
    student_scale: float
    student_softcap: float | None
    teacher: Head | None  # detached
    teacher_hidden: Tensor | None  # [N_valid, Ht], valid rows only, detached
    sparse: SparseTargets | None  # valid rows only, [N_valid, K]
    kind: str  # the effective kind (endpoints of jsd/skew resolved), or "zero"
    beta: float
    temperature: float
    chunk_size: int
    backend: str  # "torch" or "triton"
    # the ground-truth cross-entropy folded into the same pass (one projection of the student instead of two)
    ce_labels: Tensor | None = None  # [N_valid] int64 targets of the valid rows, ignore_index where CE skips a row
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    ignore_index: int = -100
