"""The straightforward dense Eq. 3-6: the pack's original implementation (fia_core's
neurons.py before the performance work), kept verbatim as the oracle that the optimised
paths (rank-one, sampled k-th largest, tie rules) must reproduce bit for bit
(tests/test_perf_equivalence.py) and that the benchmarks' reference procedure uses
(benchmarks/reference_fia.py). Every S_t is a dense layer-size tensor; tau_t by kthvalue.
"""
from __future__ import annotations

import torch

from fia_core.counting import top_fraction_count  # one definition of the rounding


def straightforward_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat.kthvalue(flat.numel() - k + 1).values


def straightforward_top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    thr = straightforward_kth_largest(values, k)
    above = values > thr
    tied = values == thr
    need = k - above.sum()
    return above | (tied & (tied.cumsum(0) <= need))


def straightforward_top_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    rows, cols = values.shape
    if k >= cols:
        return torch.ones_like(values, dtype=torch.bool)
    thr = values.kthvalue(cols - k + 1, dim=1, keepdim=True).values
    above = values > thr
    tied = values == thr
    need = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= need))


def straightforward_sensitivity(steps, r1: float) -> torch.Tensor:
    """Eq. 3 as the original SensitivityIntegrator computed it, one dense S_t at a time."""
    total = hits = None
    count = 0
    for s_t in steps:
        s = s_t.float()
        tau = straightforward_kth_largest(s, top_fraction_count(r1, s.numel()))
        if total is None:
            total, hits = s.clone(), (s > tau).to(torch.int16)
        else:
            total.add_(s)
            hits.add_(s > tau)
        count += 1
    peak = total.max()
    strength = total / peak if peak > 0 else torch.zeros_like(total)
    return 0.5 * strength + 0.5 * (hits.float() / count)


def straightforward_select(a: torch.Tensor, r2: float) -> torch.Tensor:
    """Eq. 4-6 as the original select_from_sensitivity computed it."""
    a = a.float()
    c_out, c_in = a.shape
    channel = straightforward_top_k_rows(a, top_fraction_count(r2, c_in))
    layer = straightforward_top_k_flat(a.reshape(-1), top_fraction_count(r2, c_out * c_in)).view_as(a)
    return (channel & layer & (a > 0)).reshape(-1).nonzero().squeeze(1).cpu()


def straightforward_fast_mode(w_abs: torch.Tensor, columns: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """One layer of a fast-mode concept: S_t = |W| * s_t built densely for every step."""
    return straightforward_select(
        straightforward_sensitivity((w_abs.float() * col[None, :] for col in columns), r1), r2)


def straightforward_masks(weights: dict, columns: dict, r1: float, r2: float) -> dict:
    """{layer key: sorted flat indices} for a whole model, dense path."""
    return {key: straightforward_fast_mode(weights[key], columns[key], r1, r2) for key in weights}
