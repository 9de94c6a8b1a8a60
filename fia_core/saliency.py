"""Contrastive concept saliency (Eq. 1-2): the statistics and the saliency types.

Both modes share one fact: the weight magnitude factors out of Eq. 1,
U_{t,i,j} = |W_ij| * q_{t,i,j}, and |W_ij| is the same for every prompt, so

    mean(U) = |W| * mean(q),  std(U) = |W| * std(q),
    S_t = |W| * max(0, mean_c q - mean_b q - std_b q)          (Eq. 2)

and only statistics of q need recording (recorder.py records them from live activations):
- ``fast`` (the reference code's statistic, default): q_ij = ||X̂_j||_2, the column norm of
  the layer input with every token row L2-normalised; it does not depend on i, so S_t is
  |W| times one C_in vector per step: FastSaliency holds T * C_in floats per layer.
- ``exact`` (Eq. 1 with the cosine term): q_ij = ||X_j|| |<X_j, Y_i>| / (||X_j|| ||Y_i|| + eps),
  full-size per step, folded into Eq. 3 as each step ends: ExactSaliency holds A of Eq. 3.

std_b is the population standard deviation (divide by the count), as in the reference
code; Eq. 2 still needs at least two base prompts (with one, std_b would be 0 and every
difference from a single base prompt would count as concept evidence).

The saliency types are data only; Stage 2 (Eq. 3-6) is neurons.select_concept_mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence, Union

import torch

from .prompts import PromptPair

CONCEPT = "concept"
BASE = "base"
MODES = ("fast", "exact")
EXACT_EPS = 1e-8


# --------------------------------------------------------------------------- Eq. 1
def column_norm_statistic(x: torch.Tensor) -> torch.Tensor:
    """fast mode's q: [B, N, C_in] layer input -> [B, C_in] ||X̂_j||_2 with X̂ token-normalised.

    Two reductions and one float32 temporary of x's size (the normalised copy): row norms
    are accumulated in float32 without converting x first.
    """
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12).reciprocal_()
    return torch.linalg.vector_norm(x * inv, dim=1)  # zero token rows stay zero


def energy_statistic(x: torch.Tensor, y: torch.Tensor, eps: float = EXACT_EPS) -> torch.Tensor:
    """exact mode's q of Eq. 1: [B, N, C_in], [B, N, C_out] -> [B, C_out, C_in]."""
    x = x.float()
    y = y.float()
    x_norm = x.norm(dim=1)  # [B, C_in]   ||X_j||
    y_norm = y.norm(dim=1)  # [B, C_out]  ||Y_i||
    inner = torch.bmm(y.transpose(1, 2), x).abs_()  # [B, C_out, C_in]  |<X_j, Y_i>|
    return inner.mul_(x_norm[:, None, :]).div_(x_norm[:, None, :] * y_norm[:, :, None] + eps)


# --------------------------------------------------------------------------- Eq. 2
class RunningMoments:
    """Count, mean and sum of squared deviations over rows, merged one batch at a time
    (Chan et al.), on the rows' device without host synchronisation."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        m = rows.shape[0]
        if m == 0:
            return
        batch_mean = rows.mean(0)
        batch_m2 = (rows - batch_mean).square_().sum(0)
        if self.n == 0:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            n = self.n + m
            delta = batch_mean - self.mean
            self.mean.add_(delta, alpha=m / n)
            self.m2.add_(batch_m2).add_(delta.square_(), alpha=self.n * m / n)
        self.n += m

    def std(self) -> torch.Tensor:
        """Population standard deviation (ddof = 0), as the reference code's sigma_b."""
        return (self.m2 / self.n).sqrt()


def contrast(concept: RunningMoments, base: RunningMoments) -> torch.Tensor:
    """Eq. 2 without the |W| factor: max(0, mu_c - mu_b - sigma_b)."""
    if concept.n < 1 or base.n < 2:
        raise ValueError(
            f"Eq. 2 needs at least one concept and two base prompts per step, got {concept.n} and {base.n}"
        )
    return (concept.mean - base.mean - base.std()).clamp_min_(0)


# --------------------------------------------------------------------------- types
def _check_layers(kind: str, tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]]) -> None:
    if list(tensors) != list(shapes):
        raise ValueError(f"{kind}: its tensors' layers {list(tensors)[:3]}... differ from layer_shapes {list(shapes)[:3]}...")


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class FastSaliency:
    """One concept's fast-mode saliency: S_t = |W| * columns[key][t][None, :].

    ``columns[key]`` is [T, C_in] float32; ``weight_abs`` maps every layer key to |W| and is
    not owned (it is the model's, shared by all concepts: a column_order.SharedAbsWeights keeps
    the per-model column order with it).
    """

    concept: str
    target: str
    layer_shapes: dict[str, tuple[int, int]]
    num_steps: int
    r1: float
    columns: dict[str, torch.Tensor]
    weight_abs: Mapping[str, torch.Tensor] | None
    prompts: tuple[PromptPair, ...] = ()
    architecture: str = ""
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    mode: ClassVar[str] = "fast"

    def __post_init__(self) -> None:
        _check_layers("FastSaliency", self.columns, self.layer_shapes)

    def nbytes(self) -> int:
        """Memory this saliency owns (|W| excluded: it is shared)."""
        return _nbytes(self.columns)


@dataclass
class ExactSaliency:
    """One concept's exact-mode saliency: ``sensitivity[key]`` is A of Eq. 3 [C_out, C_in],
    already integrated with ``r1`` while recording."""

    concept: str
    target: str
    layer_shapes: dict[str, tuple[int, int]]
    num_steps: int
    r1: float
    sensitivity: dict[str, torch.Tensor]
    prompts: tuple[PromptPair, ...] = ()
    architecture: str = ""
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    mode: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        _check_layers("ExactSaliency", self.sensitivity, self.layer_shapes)

    def nbytes(self) -> int:
        return _nbytes(self.sensitivity)


@dataclass
class StepSaliency:
    """Dense per-step saliency given directly (library use): ``steps[t][key]`` = S_t
    [C_out, C_in], non-negative (Eq. 2), every step with the same layers in the same order.
    ``r1`` is the default temporal sparsity for Eq. 3."""

    steps: Sequence[Mapping[str, torch.Tensor]]
    r1: float
    concept: str = ""
    target: str = "ffn2"
    architecture: str = ""
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    mode: ClassVar[str] = "steps"

    def __post_init__(self) -> None:
        if not isinstance(self.r1, (int, float)) or isinstance(self.r1, bool) or not 0.0 < self.r1 <= 1.0:
            raise ValueError(f"r1 (temporal sparsity) must be a number in (0, 1], got {self.r1!r}")
        if not isinstance(self.steps, Sequence) or isinstance(self.steps, (str, bytes)):
            raise TypeError(f"expected a list of {{layer key: tensor}} per step, got {type(self.steps).__name__}")
        if not self.steps:
            raise ValueError("saliency has no steps")
        keys = list(self.steps[0])
        for t, step in enumerate(self.steps):
            if not isinstance(step, Mapping):
                raise TypeError(f"saliency step {t} is a {type(step).__name__}, expected {{layer key: tensor}}")
            if list(step) != keys:
                raise ValueError(f"saliency step {t} has other layers than step 0")

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {k: tuple(v.shape) for k, v in self.steps[0].items()}

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def nbytes(self) -> int:
        return sum(_nbytes(step) for step in self.steps)


#: what SaliencyRecorder.result returns and the nodes pass around
ConceptSaliency = Union[FastSaliency, ExactSaliency]
