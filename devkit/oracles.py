"""Slow reference implementations of the FIA equations, written from the method page
(shared/docs/fia-method.md), not from fia_core's code: plain Python loops and float64
numpy. Tests compare fia_core against these; nothing here imports fia_core.

Counting convention of the reference code, in one place (``count``): every "top
fraction" size is max(1, floor(ratio * count)), the ratio read as the decimal it was
written as (0.29 * 100 = 29, not 28.999...).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np

EPS = 1e-8


def count(ratio: float, n: int) -> int:
    """max(1, floor(ratio * n)) with ratio taken as its decimal."""
    return max(1, math.floor(Fraction(str(ratio)) * n))


# --------------------------------------------------------------------------- Eq. 1
def eq1_exact(x: np.ndarray, w: np.ndarray, eps: float = EPS) -> np.ndarray:
    """U_ij = |W_ij| ||X_j|| |<X_j, Y_i>| / (||X_j|| ||Y_i|| + eps), Y = X W^T (no bias).
    x: [N, C_in] tokens of one prompt, w: [C_out, C_in] -> [C_out, C_in]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    n, c_in = x.shape
    c_out = w.shape[0]
    y = [[sum(w[i, j] * x[t, j] for j in range(c_in)) for i in range(c_out)] for t in range(n)]
    u = np.zeros((c_out, c_in))
    for i in range(c_out):
        yi = [y[t][i] for t in range(n)]
        yn = math.sqrt(sum(v * v for v in yi))
        for j in range(c_in):
            xj = x[:, j]
            xn = math.sqrt(sum(v * v for v in xj))
            dot = sum(a * b for a, b in zip(xj, yi))
            u[i, j] = abs(w[i, j]) * xn * abs(dot) / (xn * yn + eps)
    return u


def eq1_fast_columns(x: np.ndarray) -> np.ndarray:
    """The reference code's statistic: ||X̂_j||_2 with every token row of X ([N, C_in])
    L2-normalised -> [C_in]; U = |W_ij| times it."""
    x = np.asarray(x, np.float64)
    rows = [row / math.sqrt(sum(v * v for v in row)) for row in x]
    return np.array([math.sqrt(sum(r[j] ** 2 for r in rows)) for j in range(x.shape[1])])


# --------------------------------------------------------------------------- Eq. 2
def population_std(values: Sequence[np.ndarray]) -> np.ndarray:
    """Standard deviation over prompts dividing by the count (as the reference)."""
    b = [np.asarray(v, np.float64) for v in values]
    mean = sum(b) / len(b)
    return np.sqrt(sum((v - mean) ** 2 for v in b) / len(b))


def eq2(concept_values: Sequence[np.ndarray], base_values: Sequence[np.ndarray]) -> np.ndarray:
    """S = max(0, mu_c - mu_b - sigma_b) over prompts, sigma_b the population std."""
    if len(base_values) < 2:
        raise ValueError("Eq. 2 needs at least two base prompts")
    c = [np.asarray(v, np.float64) for v in concept_values]
    b = [np.asarray(v, np.float64) for v in base_values]
    return np.maximum(0.0, sum(c) / len(c) - sum(b) / len(b) - population_std(b))


# --------------------------------------------------------------------------- Eq. 3
def eq3(steps: Iterable[np.ndarray], r1: float) -> np.ndarray:
    """A = 1/2 mean_t S / max(mean_t S) + 1/2 mean_t 1[S_t > tau_t], tau_t the k1-th
    largest S_t of the layer, k1 = count(r1, C_out * C_in)."""
    steps = [np.asarray(s, np.float64) for s in steps]
    k1 = count(r1, steps[0].size)
    mean = sum(steps) / len(steps)
    peak = mean.max()
    strength = mean / peak if peak > 0 else np.zeros_like(mean)
    freq = np.zeros_like(mean)
    for s in steps:
        tau = sorted(s.reshape(-1).tolist(), reverse=True)[k1 - 1]
        freq += (s > tau).astype(np.float64)
    return 0.5 * strength + 0.5 * freq / len(steps)


# --------------------------------------------------------------------------- Eq. 4-6
def eq456(a: np.ndarray, r2: float) -> list[int]:
    """Sorted flat indices of (per-row top k) ∩ (layer top K) with A > 0; ties to the
    lower index; k = count(r2, C_in), K = count(r2, C_out * C_in)."""
    a = np.asarray(a, np.float64)
    c_out, c_in = a.shape
    k, big_k = count(r2, c_in), count(r2, c_out * c_in)
    rows = set()
    for i in range(c_out):
        order = sorted(range(c_in), key=lambda j: (-a[i, j], j))
        rows |= {i * c_in + j for j in order[:k]}
    flat = a.reshape(-1).tolist()
    layer = set(sorted(range(len(flat)), key=lambda f: (-flat[f], f))[:big_k])
    return sorted(f for f in rows & layer if flat[f] > 0)


# --------------------------------------------------------------------------- Eq. 7-8
def tau_ca(alpha: float, num_concepts: int) -> int:
    """The project's concept-agnostic threshold: max(3, ceil(alpha * C)), alpha as a decimal."""
    return max(3, math.ceil(Fraction(str(alpha)) * num_concepts))


def eq78(selected: Sequence[np.ndarray], alpha: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Fusion of dense boolean concept masks of one layer: (prune, keep) boolean arrays.
    s = sum_c Mask^(c); keep s >= tau_ca (concept-agnostic), prune 0 < s < tau_ca;
    alpha None: prune every selected connection (union)."""
    s = sum(np.asarray(m, bool).astype(int) for m in selected)
    if alpha is None:
        return s > 0, np.zeros(s.shape, bool)
    tau = tau_ca(alpha, len(selected))
    return (s > 0) & (s < tau), s >= tau
