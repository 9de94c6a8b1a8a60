"""Counting conventions of Eq. 3-6: top-fraction sizes, k-th largest values, top-k masks.

Leaf module (imports only torch). Follows the reference code: every "top fraction" size
is max(1, floor(ratio * count)). Ties at a top-k boundary go to the lower flat index, so
results never depend on a sort's internals.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

#: entries drawn to bracket quantiles (kth_largest here, tau_t and Eq. 5 in rank_one);
#: only speed depends on the sample, never a result
SAMPLE_SIZE = 1 << 16
_PRUNE_MIN = 1 << 18  # below this many entries a plain kthvalue is as fast
_SEED = 0x5EED


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
    keep = ~(flat < _sampled_bound(flat, k))  # NaN stays
    count = int(keep.sum())
    if count < k:
        return flat.kthvalue(n - k + 1).values
    return flat[keep].kthvalue(count - k + 1).values


def _sampled_bound(flat: torch.Tensor, k: int) -> torch.Tensor:
    """A value that, with overwhelming probability, is not above the k-th largest of ``flat``
    (a little below it)."""
    n = flat.numel()
    g = torch.Generator(device=flat.device).manual_seed(_SEED)
    sample = flat[torch.randint(n, (SAMPLE_SIZE,), generator=g, device=flat.device)]
    expected = k * SAMPLE_SIZE / n
    j = min(SAMPLE_SIZE, math.ceil(expected + 6.0 * math.sqrt(expected) + 8))
    return sample.kthvalue(SAMPLE_SIZE - j + 1).values


def _first_ties(values: torch.Tensor, thr: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Entries above ``thr`` plus the first tied ones along ``dim`` up to k per slice."""
    above = values > thr
    ge = values >= thr  # above or tied (thr is not NaN here)
    need = k - above.sum(dim=dim, keepdim=True)
    tied_count = ge.sum(dim=dim, keepdim=True) - (k - need)
    if not bool((tied_count > need).any()):  # no slice has to drop tied entries
        return ge
    tied = ge & ~above
    return above | (tied & (tied.cumsum(dim) <= need))


def _nan_ties(values: torch.Tensor, thr: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The tie rule where a threshold may be NaN (kthvalue ranks NaN highest)."""
    above = values > thr
    tied = values == thr
    need = k - above.sum(dim=dim, keepdim=True)
    return above | (tied & (tied.cumsum(dim) <= need))


def top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor; ties to the lower index."""
    if k >= values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    thr = kth_largest(values, k)
    if bool(thr.isnan()):
        return _nan_ties(values, thr, k, 0)
    return _first_ties(values, thr, k, 0)


def top_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of every row (Eq. 4); ties to the lower index."""
    cols = values.shape[1]
    if k >= cols:
        return torch.ones_like(values, dtype=torch.bool)
    thr = None
    if k <= cols // 8:  # the k-th largest of a row is the smallest of its top k: much faster
        thr = values.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    if thr is None or bool(thr.isnan().any()):  # (a NaN among a row's top k: kthvalue decides)
        thr = values.kthvalue(cols - k + 1, dim=1, keepdim=True).values
    if bool(thr.isnan().any()):
        return _nan_ties(values, thr, k, 1)
    return _first_ties(values, thr, k, 1)
