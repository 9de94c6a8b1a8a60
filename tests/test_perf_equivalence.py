"""The fast paths of Eq. 3-6 select exactly what the straightforward definition selects.

``straightforward_*`` (benchmarks/reference_fia.py) is the original dense implementation
of fia_core/neurons.py (before the performance work), kept verbatim as the reference:
kthvalue over the whole layer for every tau_t, dense S_t per step, kthvalue per row,
cumsum tie rule. The optimised code must give the same sorted flat indices on every
input, ties and zeros included (ties go to the lower flat index), not just on "typical"
data.
"""
from __future__ import annotations

import math

import pytest
import torch

from devkit.dense_reference import (
    straightforward_fast_mode,
    straightforward_kth_largest,
    straightforward_select,
    straightforward_sensitivity,
    straightforward_top_k_flat,
    straightforward_top_k_rows,
)
from fia_core import FastSaliency, StepSaliency, select_concept_mask
from fia_core.counting import kth_largest, top_fraction_count, top_k_flat, top_k_rows
from fia_core.neurons import fast_layer_indices, select_from_sensitivity
from fia_core.column_order import ColumnOrder, SharedAbsWeights
from fia_core.rank_one import select_rank_one
from fia_core.sensitivity import SensitivityIntegrator


# --------------------------------------------------------------------------- random inputs
def make_layer(seed, c_out, c_in, steps, w_kind="smooth", zero_cols=0.5, col_kind="smooth"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, generator=g).abs() * 0.02
    if w_kind == "ties":  # few distinct values: many ties in A, also within rows
        w = torch.randint(0, 6, (c_out, c_in), generator=g).float() * 0.01
    elif w_kind == "zeros":
        w[torch.rand(c_out, c_in, generator=g) < 0.3] = 0
    elif w_kind == "constant":
        w = torch.full((c_out, c_in), 0.5)
    cols = torch.rand(steps, c_in, generator=g)
    if col_kind == "ties":
        cols = torch.randint(0, 3, (steps, c_in), generator=g).float() * 0.25
    elif col_kind == "same":  # every step identical
        cols = cols[:1].expand(steps, c_in).clone()
    elif col_kind == "subnormal":  # some products underflow to subnormals or zero
        cols[:, ::3] *= 1e-38
    cols[torch.rand(steps, c_in, generator=g) < zero_cols] = 0
    return w, cols


CASES = [
    # seed, c_out, c_in, T, w_kind, zero_cols, col_kind, r1, r2
    (0, 40, 64, 10, "smooth", 0.5, "smooth", 0.05, 0.01),
    (1, 40, 64, 10, "ties", 0.5, "smooth", 0.05, 0.1),
    (2, 33, 71, 4, "zeros", 0.2, "ties", 0.3, 0.25),
    (3, 16, 16, 1, "smooth", 0.0, "smooth", 1.0, 0.5),
    (4, 50, 80, 6, "smooth", 0.97, "smooth", 0.05, 0.05),  # most columns zero: tau_t = 0
    (5, 50, 80, 6, "constant", 0.5, "ties", 0.2, 0.1),  # everything tied
    (6, 20, 30, 3, "smooth", 1.0, "smooth", 0.05, 0.1),  # all-zero saliency: nothing selected
    (7, 30, 40, 5, "ties", 0.5, "same", 0.001, 0.003),  # k1 = 1, K = 3
    (8, 24, 48, 5, "smooth", 0.5, "subnormal", 0.05, 0.05),
    (13, 24, 48, 5, "smooth", 0.9, "subnormal", 0.3, 0.1),
    # more than 65536 connections: the sampled-bracket branch of tau and v_lo
    (9, 96, 1024, 10, "smooth", 0.6, "smooth", 0.05, 0.01),
    (10, 128, 768, 10, "ties", 0.5, "ties", 0.05, 0.01),
    (11, 200, 400, 7, "zeros", 0.9, "smooth", 0.06, 0.03),
    (12, 300, 300, 10, "smooth", 0.99, "smooth", 0.05, 0.007),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_rank_one_path_matches_straightforward(case):
    seed, c_out, c_in, steps, w_kind, zero_cols, col_kind, r1, r2 = case
    w, cols = make_layer(seed, c_out, c_in, steps, w_kind, zero_cols, col_kind)
    expected = straightforward_fast_mode(w, cols, r1, r2)
    got = select_rank_one(ColumnOrder(w), cols, r1, r2)
    assert got is not None, "the rank-one path should apply to finite data"
    assert got.dtype == torch.int64
    assert got.tolist() == expected.tolist()


def test_rank_one_many_random_layers():
    """Small random layers, every combination drawn at random (shapes, T, r1, r2, ties)."""
    g = torch.Generator().manual_seed(123)
    kinds = ["smooth", "ties", "zeros"]
    for trial in range(60):
        c_out, c_in = (int(x) for x in torch.randint(1, 60, (2,), generator=g))
        steps = int(torch.randint(1, 11, (1,), generator=g))
        r1 = [0.05, 0.3, 0.001, 1.0, 0.5][trial % 5]
        r2 = [0.01, 0.1, 0.25, 0.05, 0.5, 0.003][trial % 6]
        w, cols = make_layer(1000 + trial, c_out, c_in, steps, kinds[trial % 3],
                             [0.0, 0.5, 0.9, 0.99][trial % 4], ["smooth", "ties"][trial % 2])
        got = select_rank_one(ColumnOrder(w), cols, r1, r2)
        expected = straightforward_fast_mode(w, cols, r1, r2)
        if got is None:  # declining is only allowed where a large share of the layer is a candidate
            assert 4 * top_fraction_count(r2, c_out * c_in) >= c_out * c_in, (trial, c_out, c_in, r2)
            got = fast_layer_indices({"l": w}, "l", cols, r1, r2)
        assert got.tolist() == expected.tolist(), (trial, c_out, c_in, steps, r1, r2)


def test_fallback_to_dense_gives_the_same_result():
    w, cols = make_layer(20, 20, 30, 4)
    # r2 = 0.6: K is more than half the layer -> the rank-one path declines
    assert select_rank_one(ColumnOrder(w), cols, 0.05, 0.6) is None
    assert fast_layer_indices({"l": w}, "l", cols, 0.05, 0.6).tolist() == \
        straightforward_fast_mode(w, cols, 0.05, 0.6).tolist()
    # non-finite saliency: declined, dense path
    bad = cols.clone()
    bad[0, 3] = float("inf")
    assert select_rank_one(ColumnOrder(w), bad, 0.05, 0.1) is None
    assert fast_layer_indices({"l": w}, "l", bad, 0.05, 0.1).tolist() == \
        straightforward_fast_mode(w, bad, 0.05, 0.1).tolist()


def test_select_concept_mask_matches_straightforward_and_caches_orders():
    shapes = {"a.ff.net.2": (40, 160), "b.ff.net.2": (96, 1024)}
    weights, columns = {}, {}
    for i, (key, (c_out, c_in)) in enumerate(shapes.items()):
        weights[key], columns[key] = make_layer(30 + i, c_out, c_in, 10, "zeros", 0.6)
    shared = SharedAbsWeights(weights)
    cs = FastSaliency("golf ball", "ffn2", dict(shapes), 10, 0.05, columns=columns, weight_abs=shared)
    for r2 in (0.01, 0.03):
        mask = select_concept_mask(cs, r2)
        via_api = select_concept_mask(cs, r2, r1=None)
        plain = select_concept_mask(FastSaliency("golf ball", "ffn2", dict(shapes), 10, 0.05, columns=columns,
                                                 weight_abs=dict(weights)), r2)
        for key in shapes:
            expected = straightforward_fast_mode(weights[key], columns[key], 0.05, r2).tolist()
            assert mask.layers[key].indices.tolist() == expected
            assert via_api.layers[key].indices.tolist() == expected
            assert plain.layers[key].indices.tolist() == expected
    orders = dict(shared._orders)
    assert set(orders) == set(shapes)
    select_concept_mask(cs, 0.02, r1=0.1)
    assert all(shared._orders[k] is orders[k] for k in shapes), "orders are built once per model"
    # the list API (dense S_t) agrees as well
    steps = [{k: weights[k] * columns[k][t][None, :] for k in shapes} for t in range(10)]
    listed = select_concept_mask(StepSaliency(steps, r1=0.05), 0.01)
    for key in shapes:
        assert listed.layers[key].indices.tolist() == \
            straightforward_fast_mode(weights[key], columns[key], 0.05, 0.01).tolist()


@pytest.mark.parametrize("case", CASES[:3] + CASES[8:12], ids=lambda c: f"case{c[0]}")
def test_both_paths_forced_are_bit_identical(case):
    """Mask building on the device of |W|: rank-one on the CPU, the dense definition
    elsewhere (a GPU). Both forced on the CPU give the same indices; the sensitivity the
    dense path selects from is bit-identical to the straightforward one."""
    seed, c_out, c_in, steps, w_kind, zero_cols, col_kind, r1, r2 = case
    w, cols = make_layer(seed, c_out, c_in, steps, w_kind, zero_cols, col_kind)
    expected = straightforward_fast_mode(w, cols, r1, r2).tolist()
    for path in ("rank_one", "dense", "auto"):
        assert fast_layer_indices({"l": w}, "l", cols, r1, r2, path=path).tolist() == expected, path
    dense_a = straightforward_sensitivity((w * col[None, :] for col in cols), r1)
    integ = SensitivityIntegrator(r1)
    for col in cols:
        integ.add("l", w * col[None, :])
    assert torch.equal(integ.sensitivity("l"), dense_a)


def test_auto_path_follows_the_device_of_w(monkeypatch):
    """|W| on the CPU takes the rank-one path: the dense integration is never run there."""
    import fia_core.neurons as N

    w, cols = make_layer(3, 30, 40, 4)
    calls = []
    dense = N.integrate_steps
    monkeypatch.setattr(N, "integrate_steps", lambda *a, **k: calls.append(1) or dense(*a, **k))
    auto = fast_layer_indices({"l": w}, "l", cols, 0.05, 0.05, path="auto")
    assert calls == []
    forced = fast_layer_indices({"l": w}, "l", cols, 0.05, 0.05, path="dense")
    assert calls == [1]
    assert auto.tolist() == forced.tolist() == straightforward_fast_mode(w, cols, 0.05, 0.05).tolist()
    with pytest.raises(ValueError, match="unknown path"):
        fast_layer_indices({"l": w}, "l", cols, 0.05, 0.05, path="gpu")


def test_mask_building_leaves_torch_threads_alone(monkeypatch):
    """No process-wide torch setting is changed (issue 11): set_num_threads is never called."""
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    w, cols = make_layer(9, 96, 1024, 10)
    cs = FastSaliency("c", "ffn2", {"l": (96, 1024)}, 10, 0.05, columns={"l": cols}, weight_abs={"l": w})
    select_concept_mask(cs, 0.01)
    assert seen == []


def test_column_order_is_sorted_and_consistent():
    w, _ = make_layer(40, 37, 53, 1, "ties")
    order = ColumnOrder(w)
    assert order.values.is_contiguous() and order.rows.dtype == torch.int16
    assert torch.all(order.values[:, 1:] >= order.values[:, :-1])
    rebuilt = torch.gather(w.t(), 1, order.rows.long())
    assert torch.equal(rebuilt, order.values)


# --------------------------------------------------------------------------- dense helpers
def big_vector(seed, n, kind):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=g)
    if kind == "ties":
        v = torch.randint(0, 50, (n,), generator=g).float()
    elif kind == "zeros":
        v[torch.rand(n, generator=g) < 0.9] = 0
    elif kind == "nan":
        v[torch.randint(n, (20,), generator=g)] = float("nan")
    return v


@pytest.mark.parametrize("kind", ["smooth", "ties", "zeros", "nan"])
@pytest.mark.parametrize("frac", [0.001, 0.01, 0.05, 0.2])
def test_kth_largest_and_top_k_flat_match(kind, frac):
    v = big_vector(hash((kind, frac)) % 1000, 300_000, kind)  # above the pruning threshold
    k = top_fraction_count(frac, v.numel())
    got, want = kth_largest(v, k), straightforward_kth_largest(v, k)
    assert (math.isnan(got) and math.isnan(want)) or got == want
    assert torch.equal(top_k_flat(v, k), straightforward_top_k_flat(v, k))


@pytest.mark.parametrize("kind", ["smooth", "ties", "zeros", "nan"])
@pytest.mark.parametrize("k", [1, 7, 40, 200])
def test_top_k_rows_match(kind, k):
    m = big_vector(k, 64 * 512, kind).view(64, 512)
    assert torch.equal(top_k_rows(m, k), straightforward_top_k_rows(m, k))


@pytest.mark.parametrize("kind", ["smooth", "ties", "zeros"])
def test_dense_eq3_to_eq6_match(kind):
    """The exact-mode / list-API path: the integrator and Eq. 4-6 on dense tensors."""
    g = torch.Generator().manual_seed(7)
    steps = []
    for t in range(5):
        s = big_vector(100 + t, 256 * 1200, kind).view(256, 1200)
        if kind == "ties":
            s = s / 50
        steps.append(s * (torch.rand(1200, generator=g) < 0.7))
    integ = SensitivityIntegrator(0.05)
    for s in steps:
        integ.add("l", s)
    a = integ.sensitivity("l")
    want = straightforward_sensitivity(steps, 0.05)
    assert torch.equal(a, want)
    for r2 in (0.01, 0.03):
        assert select_from_sensitivity(a, r2).tolist() == straightforward_select(want, r2).tolist()
