"""SaliencyRecorder (Eq. 1-2, and Eq. 3 for exact mode) against the slow references of
devkit/oracles.py (written from the method page), on a tiny module whose FFN2 inputs are fed directly, so X is known.

Prompts arrive in batches of mixed groups (CONCEPT / BASE / None = unconditional rows,
which must be ignored) over several model calls per step, so the per-batch merge of the
means and deviations is exercised.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fia_core import (
    BASE, CONCEPT, ExactSaliency, FastSaliency, SaliencyRecorder, StepSaliency, find_target_layers, select_concept_mask,
)
from devkit import oracles as O

KEYS = ("blocks.0.ff.net.2", "blocks.1.ff.net.2")


# --------------------------------------------------------------------------- a tiny network
class FF(nn.Module):
    def __init__(self, c_in, c_out, bias):
        super().__init__()
        self.net = nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(c_in, c_out, bias=bias))


class Block(nn.Module):
    def __init__(self, c_in, c_out, bias):
        super().__init__()
        self.proj_in = nn.Linear(c_in, c_in)  # a Linear that is not a target
        self.ff = FF(c_in, c_out, bias)


class Net(nn.Module):
    """blocks.{l}.ff.net.2 are the FFN2 layers; forward feeds each its own input tensor."""

    def __init__(self, dims=((5, 3), (4, 6)), bias=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList([Block(c_in, c_out, bias) for c_in, c_out in dims])
        with torch.no_grad():
            for b in self.blocks:
                if b.ff.net[2].bias is not None:
                    b.ff.net[2].bias.uniform_(2.0, 5.0)  # large: exact mode must remove it

    def forward(self, xs):
        return [b.ff.net(x) for b, x in zip(self.blocks, xs)]


N_TOKENS = (6, 7)
# one step's model calls: (group, prompt id) per row; None rows are unconditional
SCHEDULE = [
    [(None, 0), (CONCEPT, 0), (BASE, 0)],
    [(BASE, 1), (BASE, 2), (CONCEPT, 1), (CONCEPT, 2)],
    [(CONCEPT, 3)],
    [(None, 1), (BASE, 3), (CONCEPT, 4), (None, 2)],
    [(BASE, 4)],
]
N_CONCEPT, N_BASE = 5, 5


def make_data(net, steps, seed=0):
    """data[t][(group, id)] = list over layers of [N, C_in] float32 arrays."""
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(steps):
        d = {}
        for l, blk in enumerate(net.blocks):
            c_in = blk.ff.net[2].in_features
            shift = np.zeros(c_in)
            shift[:: 2] = rng.uniform(0.5, 2.0, size=len(shift[::2]))  # concept raises some columns
            for p in range(N_CONCEPT):
                d.setdefault((CONCEPT, p), []).append((rng.normal(size=(N_TOKENS[l], c_in)) + shift).astype(np.float32))
            for p in range(N_BASE):
                d.setdefault((BASE, p), []).append(rng.normal(size=(N_TOKENS[l], c_in)).astype(np.float32))
            for p in range(3):  # unconditional rows: huge, must not leak into the statistics
                d.setdefault((None, p), []).append((rng.normal(size=(N_TOKENS[l], c_in)) * 100 + 50).astype(np.float32))
        data.append(d)
    return data


def feed(net, rec, data, rows, step):
    rec.set_call(step, [g for g, _ in rows])
    xs = [torch.from_numpy(np.stack([data[step][r][l] for r in rows])) for l in range(len(net.blocks))]
    net(xs)


def record(net, data, mode="fast", r1=None, order="steps", num_steps=None):
    layers = find_target_layers(net)
    w_abs = {l.key: l.module.weight.detach().abs() for l in layers}
    rec = SaliencyRecorder(layers, num_steps or len(data), mode=mode, weight_abs=w_abs, r1=r1)
    with rec, torch.no_grad():
        if order == "steps":  # all prompts of a step, then the next step (batched sampling)
            for t in range(len(data)):
                for rows in SCHEDULE:
                    feed(net, rec, data, rows, t)
        else:  # one batch through all its steps, then the next batch (reference code's order)
            for rows in SCHEDULE:
                for t in range(len(data)):
                    feed(net, rec, data, rows, t)
    return rec, rec.result("golf ball")


def ref_step_saliency(net, data, t, l, exact):
    w = net.blocks[l].ff.net[2].weight.detach().numpy()
    if exact:
        stat = lambda x: O.eq1_exact(x, w)
    else:
        stat = lambda x: np.abs(w.astype(np.float64)) * O.eq1_fast_columns(x)[None, :]
    c = [stat(data[t][(CONCEPT, p)][l]) for p in range(N_CONCEPT)]
    b = [stat(data[t][(BASE, p)][l]) for p in range(N_BASE)]
    return O.eq2(c, b)


# --------------------------------------------------------------------------- fast mode
def test_find_targets_on_test_net():
    net = Net()
    assert [l.key for l in find_target_layers(net)] == list(KEYS)


@pytest.mark.parametrize("order", ["steps", "batches"])
def test_fast_columns_match_eq2_reference(order):
    net = Net()
    data = make_data(net, steps=3, seed=1)
    rec, cs = record(net, data, order=order)
    assert isinstance(cs, FastSaliency)
    assert cs.mode == "fast" and cs.num_steps == 3 and cs.concept == "golf ball"
    assert list(cs.columns) == list(KEYS)
    assert rec.calls == 3 * len(SCHEDULE)
    for l, key in enumerate(KEYS):
        cols = cs.columns[key]
        c_in = net.blocks[l].ff.net[2].in_features
        assert cols.shape == (3, c_in) and cols.dtype == torch.float32
        for t in range(3):
            qc = [O.eq1_fast_columns(data[t][(CONCEPT, p)][l]) for p in range(N_CONCEPT)]
            qb = [O.eq1_fast_columns(data[t][(BASE, p)][l]) for p in range(N_BASE)]
            np.testing.assert_allclose(cols[t].numpy(), O.eq2(qc, qb), rtol=1e-5, atol=1e-6)
        # the contrast is not trivially zero: the shifted columns are salient
        assert (cols > 0).any()


def test_fast_step_saliency_is_w_times_columns_and_matches_eq2_on_u():
    net = Net()
    data = make_data(net, steps=2, seed=2)
    _, cs = record(net, data)
    for l, key in enumerate(KEYS):
        got = [cs.weight_abs[key] * col[None, :] for col in cs.columns[key]]  # S_t = |W| * s_t
        assert len(got) == 2
        for t in range(2):
            # Eq. 2 evaluated on U = |W| * q directly (the |W| factor is taken out of nothing)
            np.testing.assert_allclose(got[t].numpy(), ref_step_saliency(net, data, t, l, exact=False), rtol=1e-5, atol=1e-6)


def test_fast_ignores_calls_outside_the_window():
    net = Net()
    data = make_data(net, steps=2, seed=3)
    junk = make_data(net, steps=4, seed=99)
    layers = find_target_layers(net)
    rec = SaliencyRecorder(layers, 2)
    with rec, torch.no_grad():
        for t in range(2):
            for rows in SCHEDULE:
                feed(net, rec, data, rows, t)
                # out-of-window step numbers and step None record nothing
                for outside in (2, 3, -1):
                    rec.set_call(outside, [g for g, _ in rows])
                    net([torch.from_numpy(np.stack([junk[outside][r][l] for r in rows])) for l in range(2)])
                rec.set_call(None)
                net([torch.from_numpy(np.stack([junk[2][r][l] for r in rows])) * 7 for l in range(2)])
        rec.set_call(0, [CONCEPT])
        rec.clear_call()
        net([torch.from_numpy(junk[1][(CONCEPT, 0)][l][None]) for l in range(2)])
    cs = rec.result("c")
    _, ref = record(net, data)
    for key in KEYS:
        torch.testing.assert_close(cs.columns[key], ref.columns[key])
    assert rec.calls == 2 * len(SCHEDULE) + 1


def test_unconditional_rows_are_ignored():
    """Replacing the None rows' data changes nothing."""
    net = Net()
    data = make_data(net, steps=2, seed=4)
    _, a = record(net, data)
    for d in data:
        for key in list(d):
            if key[0] is None:
                d[key] = [x * -3 + 1000 for x in d[key]]
    _, b = record(net, data)
    for key in KEYS:
        torch.testing.assert_close(a.columns[key], b.columns[key], rtol=0, atol=0)


def test_fast_select_equals_list_api_and_reference():
    net = Net(dims=((12, 4), (8, 6)))
    data = make_data(net, steps=4, seed=5)
    _, cs = record(net, data, r1=0.1)
    assert cs.r1 == 0.1
    r2 = 0.25
    mask = select_concept_mask(cs, r2)
    steps = [{key: cs.weight_abs[key] * cs.columns[key][t][None, :] for key in KEYS} for t in range(4)]
    via_list = select_concept_mask(StepSaliency(steps, r1=0.1), r2)
    via_api = select_concept_mask(cs, r2, r1=None)
    for l, key in enumerate(KEYS):
        ref_steps = [ref_step_saliency(net, data, t, l, exact=False) for t in range(4)]
        expected = O.eq456(O.eq3(ref_steps, 0.1), r2)
        assert expected, "test data should select something"
        assert mask.layers[key].indices.tolist() == expected
        assert via_list.layers[key].indices.tolist() == expected
        assert via_api.layers[key].indices.tolist() == expected
        assert mask.layers[key].indices.dtype == torch.int64
    assert mask.params["r1"] == 0.1 and mask.params["r2"] == r2 and mask.params["mode"] == "fast"
    # another r1 for fast saliency is fine (recomputed from the columns)
    other = select_concept_mask(cs, r2, r1=0.5)
    for l, key in enumerate(KEYS):
        ref_steps = [ref_step_saliency(net, data, t, l, exact=False) for t in range(4)]
        assert other.layers[key].indices.tolist() == O.eq456(O.eq3(ref_steps, 0.5), r2)


def test_fast_select_progress_callback():
    net = Net()
    _, cs = record(net, make_data(net, steps=2, seed=6))
    seen = []
    select_concept_mask(cs, 0.5, progress=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)]


# --------------------------------------------------------------------------- exact mode
def test_exact_sensitivity_matches_eq1_eq2_eq3_reference():
    net = Net(bias=True)
    data = make_data(net, steps=3, seed=7)
    r1 = 0.2
    _, cs = record(net, data, mode="exact", r1=r1)
    assert isinstance(cs, ExactSaliency) and cs.mode == "exact" and not hasattr(cs, "columns")
    for l, key in enumerate(KEYS):
        ref_steps = [ref_step_saliency(net, data, t, l, exact=True) for t in range(3)]
        assert any((s > 0).any() for s in ref_steps)
        a = cs.sensitivity[key]
        assert a.shape == tuple(net.blocks[l].ff.net[2].weight.shape) and a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), O.eq3(ref_steps, r1), rtol=1e-4, atol=1e-5)
        assert select_concept_mask(cs, 0.34).layers[key].indices.tolist() == O.eq456(O.eq3(ref_steps, r1), 0.34)


def test_exact_bias_is_removed():
    """Same weights with and without a bias give the same exact saliency."""
    with_bias = Net(bias=True, seed=3)
    without = Net(bias=False, seed=3)
    with torch.no_grad():
        for a, b in zip(with_bias.blocks, without.blocks):
            b.ff.net[2].weight.copy_(a.ff.net[2].weight)
    data = make_data(with_bias, steps=2, seed=8)
    _, a = record(with_bias, data, mode="exact", r1=0.3)
    _, b = record(without, data, mode="exact", r1=0.3)
    for key in KEYS:
        torch.testing.assert_close(a.sensitivity[key], b.sensitivity[key], rtol=1e-5, atol=1e-6)


def test_exact_select_rejects_another_r1():
    net = Net()
    _, cs = record(net, make_data(net, steps=2, seed=9), mode="exact", r1=0.2)
    select_concept_mask(cs, 0.5, r1=0.2)
    with pytest.raises(ValueError, match="r1"):
        select_concept_mask(cs, 0.5, r1=0.3)


def test_exact_steps_going_back_raise():
    net = Net()
    data = make_data(net, steps=2, seed=10)
    layers = find_target_layers(net)
    rec = SaliencyRecorder(layers, 2, mode="exact", weight_abs={l.key: l.module.weight.abs() for l in layers}, r1=0.1)
    with rec, torch.no_grad():
        for rows in SCHEDULE:
            feed(net, rec, data, rows, 0)
        feed(net, rec, data, SCHEDULE[0], 1)
        with pytest.raises(RuntimeError, match="one batch"):
            rec.set_call(0, [g for g, _ in SCHEDULE[0]])


def test_sigma_b_is_the_population_std():
    """Planted numbers: base values 1 and 3 (population std 1, sample std 1.414), concept 5:
    S = 5 - 2 - 1 = 2 (a sample std would give 1.586). Merged over two batches."""
    from fia_core.saliency import RunningMoments, contrast

    c, b = RunningMoments(), RunningMoments()
    c.add(torch.tensor([[5.0, 0.0]]))
    b.add(torch.tensor([[1.0, 0.0]]))
    b.add(torch.tensor([[3.0, 0.0]]))
    torch.testing.assert_close(contrast(c, b), torch.tensor([2.0, 0.0]))
    b3 = RunningMoments()
    b3.add(torch.tensor([[1.0], [2.0], [6.0]]))  # mean 3, population var 14/3
    torch.testing.assert_close(b3.std(), torch.tensor([(14 / 3) ** 0.5]))


# --------------------------------------------------------------------------- errors, hooks
def test_recorder_argument_errors():
    layers = find_target_layers(Net())
    with pytest.raises(ValueError):
        SaliencyRecorder(layers, 2, mode="fastest")
    with pytest.raises(ValueError):
        SaliencyRecorder(layers, 0)
    with pytest.raises(ValueError):
        SaliencyRecorder(layers, 2, mode="exact", r1=0.1)  # no weight_abs
    with pytest.raises(ValueError):
        SaliencyRecorder(layers, 2, mode="exact", weight_abs={l.key: l.module.weight.abs() for l in layers})


def test_row_count_mismatch_raises():
    net = Net()
    rec = SaliencyRecorder(find_target_layers(net), 1)
    with rec, torch.no_grad():
        rec.set_call(0, [CONCEPT, BASE])
        with pytest.raises(RuntimeError, match="batch rows"):
            net([torch.randn(3, 6, 5), torch.randn(3, 7, 4)])


def test_non_3d_input_raises():
    net = Net()
    rec = SaliencyRecorder(find_target_layers(net), 1)
    with rec, torch.no_grad():
        rec.set_call(0, [CONCEPT, BASE])
        with pytest.raises(RuntimeError, match="tokens"):
            net([torch.randn(2, 5), torch.randn(2, 4)])


def test_incomplete_saliency_raises():
    net = Net()
    data = make_data(net, steps=3, seed=11)
    layers = find_target_layers(net)
    rec = SaliencyRecorder(layers, 3)
    with rec, torch.no_grad():
        for t in (0, 2):  # step 1 never seen
            for rows in SCHEDULE:
                feed(net, rec, data, rows, t)
    with pytest.raises(RuntimeError, match="incomplete"):
        rec.result("c")


def test_incomplete_exact_saliency_raises():
    net = Net()
    data = make_data(net, steps=3, seed=12)
    layers = find_target_layers(net)
    rec = SaliencyRecorder(layers, 3, mode="exact", weight_abs={l.key: l.module.weight.abs() for l in layers}, r1=0.1)
    with rec, torch.no_grad():
        for t in (0, 1):
            for rows in SCHEDULE:
                feed(net, rec, data, rows, t)
    with pytest.raises(RuntimeError, match="incomplete"):
        rec.result("c")


def test_too_few_base_prompts_raise():
    net = Net()
    data = make_data(net, steps=1, seed=13)
    rec = SaliencyRecorder(find_target_layers(net), 1)
    with rec, torch.no_grad():
        feed(net, rec, data, [(CONCEPT, 0), (CONCEPT, 1), (BASE, 0)], 0)
    with pytest.raises(ValueError, match="two base"):
        rec.result("c")


def test_hooks_removed_on_exit_and_on_exception():
    net = Net()
    targets = [blk.ff.net[2] for blk in net.blocks]
    rec = SaliencyRecorder(find_target_layers(net), 1)
    with rec:
        assert all(len(m._forward_hooks) == 1 for m in targets)
    assert all(len(m._forward_hooks) == 0 for m in targets)
    with pytest.raises(KeyError):
        with SaliencyRecorder(find_target_layers(net), 1):
            raise KeyError("boom")
    assert all(len(m._forward_hooks) == 0 for m in targets)


# --------------------------------------------------------------------------- memory claim
def test_fast_saliency_size_is_t_by_c_in_whatever_c_out():
    """Fast mode keeps T x C_in floats per layer, independent of C_out (about 2 MB for
    SD1.5's 16 FFN2 layers x 10 steps, where dense per-step S_t would take over 1 GB)."""
    sizes = []
    for c_outs in ((10, 3), (40, 1)):
        net = Net(dims=((40, c_outs[0]), (12, c_outs[1])))
        _, cs = record(net, make_data(net, steps=2, seed=14))
        assert {k: tuple(v.shape) for k, v in cs.columns.items()} == {KEYS[0]: (2, 40), KEYS[1]: (2, 12)}
        sizes.append(cs.nbytes())
    assert sizes == [2 * (40 + 12) * 4] * 2


def test_mask_params_record_the_r1_actually_used():
    """select_concept_mask(r1=0.5) records 0.5, also when the saliency's settings (as the
    nodes pass them) name the recording's r1."""
    net = Net(dims=((12, 4), (8, 6)))
    layers = find_target_layers(net)
    rec = SaliencyRecorder(layers, 2, weight_abs={l.key: l.module.weight.detach().abs() for l in layers}, r1=0.05)
    data = make_data(net, steps=2, seed=15)
    with rec, torch.no_grad():
        for t in range(2):
            for rows in SCHEDULE:
                feed(net, rec, data, rows, t)
    cs = rec.result("c", settings={"r1": 0.05, "r2": 0.01, "model_type": "SD15"})
    assert select_concept_mask(cs, 0.02).params["r1"] == 0.05
    mask = select_concept_mask(cs, 0.02, r1=0.5)
    assert mask.params["r1"] == 0.5 and mask.params["r2"] == 0.02
    assert mask.params["mode"] == "fast" and mask.params["saliency_steps"] == 2 and mask.params["model_type"] == "SD15"
