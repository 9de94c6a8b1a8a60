"""Eq. 3, time-integrated sensitivity, streamed over saliency steps.

A_ij = 1/2 * mean_t S_t / max(mean_t S_t) + 1/2 * mean_t 1[S_t > tau_t], with tau_t the
k1-th largest S_t of the layer, k1 = max(1, floor(r1 * C_out * C_in)) (counting.py). The
indicator is strict and the strength term is rescaled by its per-layer maximum, as in the
reference code. Leaf module: imports only the counting helpers.
"""
from __future__ import annotations

import torch

from .counting import kth_largest, top_fraction_count


def check_r1(r1: float) -> None:
    if not 0.0 < r1 <= 1.0:
        raise ValueError(f"r1 (temporal sparsity) must be in (0, 1], got {r1}")


def combine_terms(total: torch.Tensor, hits: torch.Tensor, steps: int) -> torch.Tensor:
    """A of Eq. 3 from the running sum of S_t and the hit counts over ``steps`` steps.

    Every division has a tensor divisor on the data's device: a CUDA division by a Python
    scalar multiplies by its reciprocal, which would change the last bit against the CPU.
    """
    peak = total.max()
    strength = total / peak if peak > 0 else torch.zeros_like(total)
    return 0.5 * strength + 0.5 * (hits.float() / torch.full((), float(steps), device=hits.device))


class SensitivityIntegrator:
    """Eq. 3 over any number of layers: keeps two layer-size tensors per layer (the sum of
    S_t in float32 and the hit count in int16), on the device S_t arrives on."""

    def __init__(self, r1: float):
        check_r1(r1)
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

    def steps(self, key: str) -> int:
        """How many steps were folded into layer ``key`` (0 if none)."""
        return self._steps.get(key, 0)

    @torch.no_grad()
    def sensitivity(self, key: str, release: bool = False) -> torch.Tensor:
        """A_ij of Eq. 3 for one layer (float32, in [0, 1]); ``release`` frees its state."""
        total, hits, steps = self._sum[key], self._hits[key], self._steps[key]
        if release:
            del self._sum[key], self._hits[key], self._steps[key]
        return combine_terms(total, hits, steps)
