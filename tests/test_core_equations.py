"""Eq. 1, 3, 4-6 of the FIA method against the slow references of devkit/oracles.py
(written from the method page, not from fia_core's code: python loops and float64 numpy).

Eq. 2 and the recorder's batch merging are covered in test_core_saliency.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fia_core import StepSaliency, select_concept_mask, top_fraction_count
from fia_core.neurons import select_from_sensitivity
from fia_core.sensitivity import SensitivityIntegrator
from fia_core.saliency import column_norm_statistic, energy_statistic
from devkit import oracles as O


def indices_of(mask_layer) -> list[int]:
    idx = mask_layer.indices
    assert idx.dtype == torch.int64
    return idx.tolist()


# --------------------------------------------------------------------------- Eq. 1
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eq1_exact_statistic_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    b, n, c_in, c_out = 3, 6, 5, 4
    x = torch.randn(b, n, c_in, generator=g)
    w = torch.randn(c_out, c_in, generator=g)
    y = x @ w.T
    q = energy_statistic(x, y)  # without |W|
    assert q.shape == (b, c_out, c_in)
    for p in range(b):
        ref = O.eq1_exact(x[p].numpy(), w.numpy())
        np.testing.assert_allclose((q[p] * w.abs()).numpy(), ref, rtol=1e-5, atol=1e-7)


def test_eq1_exact_zero_output_row_is_zero_not_nan():
    x = torch.randn(1, 4, 3)
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    q = energy_statistic(x, x @ w.T)
    assert torch.isfinite(q).all()
    assert (q[0, 0] == 0).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_statistic_matches_loops(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, 6, generator=g) * torch.rand(4, 7, 1, generator=g) * 10
    q = column_norm_statistic(x)
    assert q.shape == (4, 6)
    for p in range(4):
        np.testing.assert_allclose(q[p].numpy(), O.eq1_fast_columns(x[p].numpy()), rtol=1e-5, atol=1e-7)
    # every token row has unit norm after normalisation, so sum_j q_j^2 = N
    np.testing.assert_allclose(q.square().sum(1).numpy(), np.full(4, 7.0), rtol=1e-5)


def test_fast_statistic_ignores_token_scale():
    x = torch.randn(2, 5, 4)
    scale = torch.tensor([1e-3, 2.0, 50.0, 1.0, 7.0])[None, :, None]
    torch.testing.assert_close(column_norm_statistic(x * scale), column_norm_statistic(x), rtol=1e-5, atol=1e-6)


def test_fast_statistic_zero_token_row_contributes_nothing():
    x = torch.randn(1, 3, 4)
    x0 = torch.cat([x, torch.zeros(1, 1, 4)], dim=1)
    q = column_norm_statistic(x0)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, column_norm_statistic(x))


# --------------------------------------------------------------------------- counts
@pytest.mark.parametrize(
    "ratio,count,expected",
    [(0.05, 100, 5), (0.01, 50, 1), (0.001, 50, 1), (0.0, 10, 1), (1.0, 7, 7), (0.29, 100, 29),
     (0.57, 100, 57), (0.3, 10, 3), (0.07, 409600, 28672), (0.5, 3, 1)],
)
def test_top_fraction_count(ratio, count, expected):
    # 0.29 * 100 and 0.57 * 100 are 28.999.. and 56.999.. in floats: the count follows the decimal
    assert top_fraction_count(ratio, count) == expected == O.count(ratio, count)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_top_fraction_count_rejects_out_of_range(ratio):
    with pytest.raises(ValueError):
        top_fraction_count(ratio, 10)


# --------------------------------------------------------------------------- Eq. 3
def integrate(steps, r1, key="l"):
    integ = SensitivityIntegrator(r1)
    for s in steps:
        integ.add(key, torch.as_tensor(np.asarray(s), dtype=torch.float32))
    return integ.sensitivity(key).numpy()


@pytest.mark.parametrize("seed,r1", [(0, 0.05), (1, 0.2), (2, 0.5), (3, 1.0)])
def test_eq3_random(seed, r1):
    rng = np.random.default_rng(seed)
    # non-negative, with exact zeros as Eq. 2's clamp produces
    steps = [np.maximum(0, rng.normal(size=(6, 9))).astype(np.float32) for _ in range(5)]
    np.testing.assert_allclose(integrate(steps, r1), O.eq3(steps, r1), rtol=1e-6, atol=1e-7)


def test_eq3_tiny_r1_k1_is_one_marks_nothing():
    # k1 = max(1, floor(0.001 * 12)) = 1: tau is the maximum and S > tau is never true
    steps = [np.arange(12, dtype=np.float32).reshape(3, 4) + t for t in range(3)]
    a = integrate(steps, 0.001)
    ref = O.eq3(steps, 0.001)
    np.testing.assert_allclose(a, ref, rtol=1e-6)
    mean = sum(np.asarray(s, np.float64) for s in steps) / 3
    np.testing.assert_allclose(a, 0.5 * mean / mean.max(), rtol=1e-6)


def test_eq3_kth_largest_zero_marks_all_positive_entries():
    # 3 positive entries, k1 = floor(0.5 * 12) = 6: the 6th largest is 0 -> all 3 are marked
    s = np.zeros((3, 4), np.float32)
    s[0, 1], s[1, 3], s[2, 0] = 0.5, 2.0, 1.0
    a = integrate([s], 0.5)
    expected = np.zeros((3, 4))
    for (i, j) in [(0, 1), (1, 3), (2, 0)]:
        expected[i, j] = 0.5 * s[i, j] / 2.0 + 0.5
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    np.testing.assert_allclose(a, O.eq3([s], 0.5), rtol=1e-6)


def test_eq3_indicator_is_strict_with_ties_at_tau():
    # values 5,4,4,4,1,... with k1 = 3: tau = 4 and only the 5 is strictly above it
    s = np.array([[5, 4, 4, 4], [1, 0, 0, 0]], np.float32)
    a = integrate([s], 3 / 8)  # k1 = 3
    freq = (a - 0.5 * s / 5.0) * 2
    np.testing.assert_allclose(freq, (s > 4).astype(np.float64), atol=1e-6)
    np.testing.assert_allclose(a, O.eq3([s], 3 / 8), rtol=1e-6)


def test_eq3_distinct_values_mark_k1_minus_one_per_step():
    rng = np.random.default_rng(5)
    steps = [rng.permutation(20).astype(np.float32).reshape(4, 5) + 1 for _ in range(4)]
    r1 = 0.25  # k1 = 5 -> 4 marked per step
    integ = SensitivityIntegrator(r1)
    total_hits = 0
    for s in steps:
        integ.add("l", torch.from_numpy(s))
        total_hits += 4
    a = integ.sensitivity("l").numpy()
    freq_sum = ((a - 0.5 * (sum(steps) / 4) / (sum(steps) / 4).max()) * 2 * 4).sum()
    assert round(float(freq_sum)) == total_hits


def test_eq3_all_zero_layer_is_zero_not_nan():
    steps = [np.zeros((3, 5), np.float32)] * 3
    a = integrate(steps, 0.1)
    assert np.isfinite(a).all() and (a == 0).all()


def test_eq3_integrator_layers_independent_and_release():
    rng = np.random.default_rng(9)
    s1 = [rng.random((3, 4)).astype(np.float32) for _ in range(3)]
    s2 = [rng.random((2, 6)).astype(np.float32) * 100 for _ in range(3)]
    integ = SensitivityIntegrator(0.25)
    for a, b in zip(s1, s2):
        integ.add("a", torch.from_numpy(a))
        integ.add("b", torch.from_numpy(b))
    assert sorted(integ.keys()) == ["a", "b"]
    np.testing.assert_allclose(integ.sensitivity("a", release=True).numpy(), O.eq3(s1, 0.25), rtol=1e-6)
    np.testing.assert_allclose(integ.sensitivity("b").numpy(), O.eq3(s2, 0.25), rtol=1e-6)
    assert integ.keys() == ["b"]


@pytest.mark.parametrize("r1", [0.0, -0.5, 1.5])
def test_eq3_rejects_bad_r1(r1):
    with pytest.raises(ValueError):
        SensitivityIntegrator(r1)


# --------------------------------------------------------------------------- Eq. 4-6
def select(a: np.ndarray, r2: float) -> list[int]:
    return select_from_sensitivity(torch.as_tensor(a, dtype=torch.float32), r2).tolist()


@pytest.mark.parametrize("seed,r2", [(0, 0.1), (1, 0.25), (2, 0.5), (3, 0.05), (4, 1.0), (5, 0.01)])
def test_eq456_random(seed, r2):
    rng = np.random.default_rng(seed)
    a = rng.random((7, 12)).astype(np.float32)
    a[rng.random(a.shape) < 0.3] = 0
    got = select(a, r2)
    assert got == sorted(O.eq456(a, r2))


def test_eq456_row_ties_go_to_lower_column():
    a = np.array([[3, 5, 5, 5, 1],
                  [2, 2, 2, 2, 2]], np.float32)
    # r2 = 0.4: k = 2 per row, K = 4 in the layer (values 5,5,5 then the tie at 3 / 2s)
    got = select(a, 0.4)
    # row 0 keeps columns 1, 2 (ties to the lower column); layer top-4 = flat 1,2,3 and then 0 (value 3)
    # -> intersection = {1, 2}; row 1's entries (value 2) are not in the layer top 4
    assert got == [1, 2] == sorted(O.eq456(a, 0.4))


def test_eq456_layer_ties_go_to_lower_flat_index():
    a = np.full((3, 4), 7.0, np.float32)
    # r2 = 0.5: k = 2 per row (columns 0, 1), K = 6 -> flat 0..5 -> rows 0 and 1 only
    got = select(a, 0.5)
    assert got == [0, 1, 4, 5] == sorted(O.eq456(a, 0.5))


def test_eq456_all_zero_row_never_selected():
    a = np.array([[0, 0, 0, 0],
                  [1, 2, 3, 4],
                  [0, 0, 0, 0]], np.float32)
    got = select(a, 1.0)  # k = C_in, K = all: still only the positive row
    assert got == [4, 5, 6, 7] == sorted(O.eq456(a, 1.0))


def test_eq456_all_zero_layer_selects_nothing():
    assert select(np.zeros((4, 6), np.float32), 0.5) == []


def test_eq456_r2_below_one_entry_keeps_single_max():
    rng = np.random.default_rng(3)
    a = rng.random((5, 8)).astype(np.float32)
    # floor(0.01 * 8) = 0 and floor(0.01 * 40) = 0 -> k = K = 1 by max(1, .)
    got = select(a, 0.01)
    assert got == [int(np.argmax(a))] == sorted(O.eq456(a, 0.01))


def test_eq456_k_one_per_row_from_r2():
    # C_in = 10, r2 = 0.1 -> k = 1 per row; C_out = 3 -> K = max(1, floor(3)) = 3
    a = np.array([[1, 9, 0, 0, 0, 0, 0, 0, 0, 8],
                  [0, 0, 5, 0, 0, 0, 0, 0, 0, 0],
                  [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.float32)
    got = select(a, 0.1)
    # row tops: flat 1 (9), 12 (5), row 2 has no positive; layer top-3: 1 (9), 9 (8), 12 (5)
    assert got == [1, 12] == sorted(O.eq456(a, 0.1))


def test_eq456_row_limit_binds():
    # one hot row: the layer budget would take all of it, the row budget caps it at k
    a = np.zeros((4, 10), np.float32)
    a[2] = np.arange(10, 0, -1)
    got = select(a, 0.3)  # k = 3, K = 12
    assert got == [20, 21, 22] == sorted(O.eq456(a, 0.3))


@pytest.mark.parametrize("r2", [0.0, 1.5, -0.1])
def test_eq456_rejects_bad_r2(r2):
    with pytest.raises(ValueError):
        select_from_sensitivity(torch.ones(2, 2), r2)


# --------------------------------------------------------------------------- Eq. 3-6 public API
def random_steps(seed, shapes, t=4, zero_frac=0.4):
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(t):
        d = {}
        for key, shape in shapes.items():
            s = rng.random(shape).astype(np.float32)
            s[rng.random(shape) < zero_frac] = 0
            d[key] = s
        steps.append(d)
    return steps


@pytest.mark.parametrize("seed,r1,r2", [(0, 0.05, 0.1), (1, 0.3, 0.25), (2, 0.001, 0.01), (3, 0.5, 0.5)])
def test_select_concept_mask_matches_reference(seed, r1, r2):
    shapes = {"blocks.0.ff.net.2": (6, 10), "blocks.1.ff.net.2": (4, 16), "blocks.2.ff.net.2": (3, 3)}
    steps = random_steps(seed, shapes)
    mask = select_concept_mask(
        StepSaliency([{k: torch.from_numpy(v) for k, v in s.items()} for s in steps], r1=r1, concept="golf ball"), r2
    )
    assert mask.concepts == ("golf ball",)
    assert list(mask.layers) == list(shapes)
    assert mask.layer_shapes == shapes
    assert mask.params["r1"] == r1 and mask.params["r2"] == r2
    for key in shapes:
        a = O.eq3([s[key] for s in steps], r1)
        assert indices_of(mask.layers[key]) == sorted(O.eq456(a, r2)), key


def test_select_concept_mask_ties_across_steps():
    # identical values everywhere: A is constant, every choice is decided by the tie rule
    s = np.ones((3, 5), np.float32)
    mask = select_concept_mask(StepSaliency([{"l": torch.from_numpy(s)}] * 3, r1=0.2), 0.4)
    # k = 2 per row (columns 0, 1); K = 6 (flat 0..5 = all of row 0 and row 1's column 0)
    # -> intersection: flat 0, 1, 5
    assert indices_of(mask.layers["l"]) == [0, 1, 5] == sorted(O.eq456(O.eq3([s] * 3, 0.2), 0.4))


def test_step_saliency_rejects_bad_input():
    with pytest.raises(ValueError):
        StepSaliency([], r1=0.1)
    with pytest.raises(ValueError):
        StepSaliency([{"a": torch.ones(2, 2)}, {"b": torch.ones(2, 2)}], r1=0.1)
    with pytest.raises(ValueError):
        StepSaliency([{"a": torch.ones(2, 2)}], r1=None)
    with pytest.raises(TypeError):
        StepSaliency({"a": torch.ones(2, 2)}, r1=0.1)
    with pytest.raises(TypeError):
        select_concept_mask([{"a": torch.ones(2, 2)}], 0.1)
    with pytest.raises(ValueError):
        select_concept_mask(StepSaliency([{"a": torch.ones(2, 2)}], r1=0.1), 0.0)
