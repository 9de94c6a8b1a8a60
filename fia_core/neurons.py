"""Stage 2, concept-sensitive neurons (Eq. 3-6): from a concept's saliency to its concept
mask Q^(c). ``select_concept_mask`` is the one public entry point.

Counting follows the reference code (counting.py): every "top fraction" size is
max(1, floor(ratio * count)); tau_t is the k1-th largest S_t and the frequency indicator
is strict; the strength term is rescaled by its per-layer maximum (sensitivity.py). Ties
at a top-k boundary go to the lower flat index. Entries with zero sensitivity are never
selected.

Where the work runs: on the device of |W| (fast mode) or of the saliency tensors. On a
GPU the dense definition (S_t built one step at a time) takes well under a second per
concept; on the CPU the rank-one fast path (rank_one.py) reads Eq. 3-6 off |W|'s sorted
columns instead. Both give bit-identical indices (tests/test_perf_equivalence.py), so the
choice is made automatically and only affects speed. No process-wide torch setting is
touched.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch

from .counting import top_fraction_count, top_k_flat, top_k_rows
from .masks import ConceptMask, LayerMask
from .column_order import column_order_of
from .rank_one import select_rank_one
from .saliency import ConceptSaliency, ExactSaliency, FastSaliency, StepSaliency
from .sensitivity import SensitivityIntegrator, check_r1

ProgressFn = Callable[[int, int], None]
PATHS = ("auto", "rank_one", "dense")


def check_r2(r2: float) -> None:
    if not 0.0 < r2 <= 1.0:
        raise ValueError(f"r2 (spatial sparsity) must be in (0, 1], got {r2}")


@torch.no_grad()
def select_from_sensitivity(sensitivity: torch.Tensor, r2: float) -> torch.Tensor:
    """Eq. 4-6 for one layer: sorted flat indices (CPU, int64) of
    Q_l = rows' top-k ∩ layer's top-K, with A > 0. Runs on the tensor's device."""
    check_r2(r2)
    a = sensitivity.float()
    c_out, c_in = a.shape
    channel = top_k_rows(a, top_fraction_count(r2, c_in))  # Eq. 4
    layer = top_k_flat(a.reshape(-1), top_fraction_count(r2, c_out * c_in)).view_as(a)  # Eq. 5
    selected = channel & layer & (a > 0)  # Eq. 6, and no zero-evidence entries
    return selected.reshape(-1).nonzero().squeeze(1).cpu()


@torch.no_grad()
def integrate_steps(steps: Iterable[torch.Tensor], r1: float) -> torch.Tensor:
    """Eq. 3 of one layer from its dense S_t, one step at a time (two layer-size tensors)."""
    integrator = SensitivityIntegrator(r1)
    for s_t in steps:
        integrator.add("layer", s_t)
    if not integrator.keys():
        raise ValueError("saliency has no steps")
    return integrator.sensitivity("layer", release=True)


@torch.no_grad()
def fast_layer_indices(
    weight_abs: Mapping[str, torch.Tensor], key: str, columns: torch.Tensor, r1: float, r2: float,
    path: str = "auto",
) -> torch.Tensor:
    """Eq. 3-6 for one layer of fast-mode saliency, S_t = |W| * columns[t]: sorted flat indices.

    ``path``: "auto" takes the rank-one path when |W| is on the CPU (its ColumnOrder is
    cached when ``weight_abs`` is a SharedAbsWeights) and the dense definition elsewhere;
    "rank_one" / "dense" force one (rank-one still falls back to dense wherever its
    argument does not apply). Every path gives the same indices.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    check_r1(r1)
    check_r2(r2)
    w = weight_abs[key]
    if path == "rank_one" or (path == "auto" and w.device.type == "cpu"):
        idx = select_rank_one(column_order_of(weight_abs, key), columns, r1, r2)
        if idx is not None:
            return idx
    w = w.float()
    cols = columns.to(w.device, torch.float32)
    return select_from_sensitivity(integrate_steps((w * col[None, :] for col in cols), r1), r2)


def _fast_layers(saliency: FastSaliency, r1: float, r2: float) -> Callable[[str], torch.Tensor]:
    if saliency.weight_abs is None:
        raise ValueError("fast-mode saliency needs weight_abs (|W| of the model) to build S_t = |W| * s_t")
    return lambda key: fast_layer_indices(saliency.weight_abs, key, saliency.columns[key], r1, r2)


def _resolve_r1(saliency, r1: float | None) -> float:
    """The r1 actually used: the recorded one by default; exact mode cannot change it."""
    if r1 is None:
        return saliency.r1
    if isinstance(saliency, ExactSaliency) and not math.isclose(r1, saliency.r1):
        raise ValueError(f"exact-mode saliency was integrated with r1={saliency.r1}; recompute it to use r1={r1}")
    return r1


@torch.no_grad()
def select_concept_mask(
    saliency: ConceptSaliency | StepSaliency,
    r2: float,
    r1: float | None = None,
    progress: ProgressFn | None = None,
) -> ConceptMask:
    """Concept mask Q^(c) of Eq. 3-6 from one concept's saliency.

    ``saliency``: a FastSaliency or ExactSaliency (SaliencyRecorder.result), or a
    StepSaliency of dense per-step S_t. ``r1`` defaults to the saliency's own; exact mode
    fixed it while recording. Works one layer at a time, so at most one layer's dense
    tensors are alive; ``progress(done, total)`` after each layer. The mask's params record
    every setting used (r1 included).
    """
    if not isinstance(saliency, (FastSaliency, ExactSaliency, StepSaliency)):
        raise TypeError(f"expected a FastSaliency, ExactSaliency or StepSaliency, got {type(saliency).__name__}")
    check_r2(r2)
    r1 = _resolve_r1(saliency, r1)
    check_r1(r1)
    if isinstance(saliency, FastSaliency):
        indices_of = _fast_layers(saliency, r1, r2)
    elif isinstance(saliency, ExactSaliency):
        indices_of = lambda key: select_from_sensitivity(saliency.sensitivity[key], r2)  # noqa: E731
    else:
        indices_of = lambda key: select_from_sensitivity(  # noqa: E731
            integrate_steps((step[key] for step in saliency.steps), r1), r2)
    shapes = saliency.layer_shapes
    layers: dict[str, LayerMask] = {}
    for i, key in enumerate(shapes):
        layers[key] = LayerMask(tuple(shapes[key]), indices_of(key))
        if progress:
            progress(i + 1, len(shapes))
    return ConceptMask(
        concepts=(saliency.concept,),
        target=saliency.target,
        layers=layers,
        architecture=saliency.architecture,
        fingerprint=saliency.fingerprint,
        params={**saliency.settings, "r1": r1, "r2": r2, "mode": saliency.mode, "saliency_steps": saliency.num_steps},
    )
