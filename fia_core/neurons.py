"""Concept-sensitive neurons (Eq. 3-6): from per-step saliency to one concept mask.

Counting follows the reference code: every "top fraction" size is
max(1, floor(ratio * count)); tau_t is the k1-th largest S_t and the frequency indicator
is strict (S_t > tau_t); the strength term is rescaled by its per-layer maximum. Ties at
a top-k boundary go to the lower flat index, so results never depend on a sort's
internals. Entries with zero sensitivity are never selected.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .masks import ConceptMask, LayerMask

ProgressFn = Callable[[int, int], None]


def top_fraction_count(ratio: float, count: int) -> int:
    """max(1, floor(ratio * count)), with ratio taken as the decimal the user typed.

    Fraction(repr(ratio)) keeps 0.29 * 100 at 29 where float arithmetic gives 28.999...
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {ratio}")
    return max(1, math.floor(Fraction(repr(float(ratio))) * count))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of ``values`` (all dims flattened), as a 0-d tensor.

    Same value as ``kthvalue(n - k + 1)`` over everything, found faster on large inputs:
    a random sample gives a bound below the k-th largest, and the selection runs on the
    entries not below it (NaN, which kthvalue ranks highest, always among them). When the
    bound turns out too high, the plain selection runs instead.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n < _PRUNE_MIN or k > n // 4:
        return flat.kthvalue(n - k + 1).values
    bound = _sampled_bound(flat, k)
    keep = ~(flat < bound)  # NaN stays
    count = int(keep.sum())
    if count < k:
        return flat.kthvalue(n - k + 1).values
    cand = flat[keep]
    return cand.kthvalue(count - k + 1).values


_PRUNE_MIN = 1 << 18  # below this, a plain kthvalue is as fast
_SAMPLE = 1 << 16


def _sampled_bound(flat: torch.Tensor, k: int) -> torch.Tensor:
    """A value that, with overwhelming probability, is not above the k-th largest of ``flat``
    (a little below it). Only speed depends on it, never the result."""
    n = flat.numel()
    g = torch.Generator(device=flat.device).manual_seed(0x5EED)
    sample = flat[torch.randint(n, (_SAMPLE,), generator=g, device=flat.device)]
    expected = k * _SAMPLE / n
    j = min(_SAMPLE, math.ceil(expected + 6.0 * math.sqrt(expected) + 8))
    return sample.kthvalue(_SAMPLE - j + 1).values


def _first_ties(values: torch.Tensor, thr: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Entries above ``thr`` plus the first tied ones along ``dim`` up to k per slice."""
    above = values > thr
    ge = values >= thr  # above or tied (thr is not NaN here)
    need = k - above.sum(dim=dim, keepdim=True)
    tied_count = ge.sum(dim=dim, keepdim=True) - (k - need)
    over = tied_count > need  # slices where the tie rule has to drop some tied entries
    if not bool(over.any()):
        return ge
    tied = ge & ~above
    return above | (tied & (tied.cumsum(dim) <= need))


def _reference_ties(values: torch.Tensor, thr: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    above = values > thr
    tied = values == thr
    need = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (tied.cumsum(dim) <= need))


def top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; ties to the lower index."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    thr = kth_largest(values, k)
    if bool(thr.isnan()):
        return _reference_ties(values, thr, k, 0)
    return _first_ties(values, thr, k, 0)


def top_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of every row (Eq. 4); ties to the lower index."""
    rows, cols = values.shape
    if k >= cols:
        return torch.ones_like(values, dtype=torch.bool)
    thr = None
    if k <= cols // 8:  # the k-th largest of a row is the smallest of its top k: much faster
        thr = values.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    if thr is None or bool(thr.isnan().any()):  # (a NaN among a row's top k: kthvalue decides)
        thr = values.kthvalue(cols - k + 1, dim=1, keepdim=True).values
    if bool(thr.isnan().any()):
        return _reference_ties(values, thr, k, 1)
    return _first_ties(values, thr, k, 1)


class SensitivityIntegrator:
    """Eq. 3, streamed over saliency steps: keeps two layer-size tensors per layer.

    A = 1/2 * mean_t S_t / max(mean_t S_t) + 1/2 * mean_t 1[S_t > tau_t].
    """

    def __init__(self, r1: float):
        if not 0.0 < r1 <= 1.0:
            raise ValueError(f"r1 (temporal sparsity) must be in (0, 1], got {r1}")
        self.r1 = r1
        self._sum: dict[str, torch.Tensor] = {}
        self._hits: dict[str, torch.Tensor] = {}
        self._steps: dict[str, int] = {}

    @torch.no_grad()
    def add(self, key: str, saliency_t: torch.Tensor) -> None:
        """Fold S_t (non-negative, [C_out, C_in]) of one step into the running terms."""
        s = saliency_t.float()
        tau = kth_largest(s, top_fraction_count(self.r1, s.numel()))
        if key not in self._sum:
            self._sum[key] = s.clone()
            self._hits[key] = (s > tau).to(torch.int16)
            self._steps[key] = 1
        else:
            self._sum[key].add_(s)
            self._hits[key].add_(s > tau)
            self._steps[key] += 1

    def keys(self) -> list[str]:
        return list(self._sum)

    @torch.no_grad()
    def sensitivity(self, key: str, release: bool = False) -> torch.Tensor:
        """A_ij of Eq. 3 for one layer (float32, in [0, 1])."""
        total, hits, steps = self._sum[key], self._hits[key], self._steps[key]
        if release:
            del self._sum[key], self._hits[key], self._steps[key]
        peak = total.max()
        strength = total / peak if peak > 0 else torch.zeros_like(total)
        return 0.5 * strength + 0.5 * (hits.float() / steps)


@torch.no_grad()
def select_from_sensitivity(sensitivity: torch.Tensor, r2: float) -> torch.Tensor:
    """Eq. 4-6 for one layer: sorted flat indices of Q_l = rows' top-k ∩ layer's top-K, A > 0."""
    if not 0.0 < r2 <= 1.0:
        raise ValueError(f"r2 (spatial sparsity) must be in (0, 1], got {r2}")
    a = sensitivity.float()
    c_out, c_in = a.shape
    channel = top_k_rows(a, top_fraction_count(r2, c_in))  # Eq. 4
    layer = top_k_flat(a.reshape(-1), top_fraction_count(r2, c_out * c_in)).view_as(a)  # Eq. 5
    selected = channel & layer & (a > 0)  # Eq. 6, and no zero-evidence entries
    return selected.reshape(-1).nonzero().squeeze(1).cpu()


def _per_layer_steps(saliency) -> tuple[list[str], Callable[[str], Iterable[torch.Tensor]]]:
    if isinstance(saliency, Sequence) and not isinstance(saliency, (str, bytes)):
        if not saliency:
            raise ValueError("saliency has no steps")
        keys = list(saliency[0])
        for t, step in enumerate(saliency):
            if list(step) != keys:
                raise ValueError(f"saliency step {t} has other layers than step 0")
        return keys, lambda key: (step[key] for step in saliency)
    raise TypeError(f"expected a list of {{layer key: tensor}} per step, got {type(saliency).__name__}")


@torch.no_grad()
def select_concept_neurons(
    saliency,
    r1: float | None,
    r2: float,
    concept: str = "",
    target: str = "ffn2",
    architecture: str = "",
    fingerprint: str = "",
    params: Mapping | None = None,
    progress: ProgressFn | None = None,
) -> ConceptMask:
    """Concept mask Q^(c) (Eq. 3-6) from contrastive saliency.

    ``saliency`` is either a list over saliency steps of {layer key: S_t [C_out, C_in]}
    (non-negative, Eq. 2) or a saliency.ConceptSaliency (whose r1 is used when r1 is None).
    Works one layer at a time, so at most one layer's dense tensors are alive.
    """
    from .saliency import ConceptSaliency  # local: saliency imports this module

    if isinstance(saliency, ConceptSaliency):
        return saliency.select(r2=r2, r1=r1, progress=progress)
    if r1 is None:
        raise ValueError("r1 is required with a per-step saliency list")
    keys, steps_of = _per_layer_steps(saliency)
    layers: dict[str, LayerMask] = {}
    for i, key in enumerate(keys):
        integrator = SensitivityIntegrator(r1)
        for s_t in steps_of(key):
            integrator.add(key, s_t)
        a = integrator.sensitivity(key, release=True)
        layers[key] = LayerMask(tuple(a.shape), select_from_sensitivity(a, r2))
        if progress:
            progress(i + 1, len(keys))
    return ConceptMask(
        concepts=(concept,),
        target=target,
        layers=layers,
        architecture=architecture,
        fingerprint=fingerprint,
        params={"r1": r1, "r2": r2, **(params or {})},
    )
