"""Rank-one fast path of Eq. 3-6 for fast-mode saliency, S_t = |W| * s_t[None, :].

Gives exactly the indices of neurons.select_from_sensitivity applied to the Eq. 3
sensitivity integrated one dense step at a time (tests/test_perf_equivalence.py), without
any layer-size pass per concept: each column of |W| is sorted once per model and shared
by every concept (SharedAbsWeights). An optional fast path for the CPU (on a GPU the
dense definition is faster): neurons.select_concept_mask decides where it runs. Depends
only on the counting helpers.

Within one column j every S_t[:, j] = fl(|W|[:, j] * s_tj) is a monotone function of
|W|[:, j] (IEEE rounding is monotone), and so are the running sum of Eq. 3 and the hit
count. With each column of |W| sorted once per model (ColumnOrder), Eq. 3-6 need no
layer-size pass per concept:
  counts: #{S_t >= v} column by column with searchsorted on the sorted columns, at the
         smallest |W| whose product reaches v (exact, see _min_reaching);
  tau_t: two sample quantiles bracket it, exact counts confirm the bracket, and the
         k1-th largest is selected among the few entries between them (bisection over
         float32 bit patterns if the sample misleads);
  max of the Eq. 3 sum: at every column's largest |W|;
  Eq. 5: rigorous lower/upper bounds of A (float rounding included) give a value v_lo
         not above the K-th largest A and the set E of entries whose A may reach v_lo:
         a little more than K entries, read off the sorted columns;
  A on E is computed with the very operations the dense path performs, so its bits are
  the same; Eq. 4 and 5 (ties to the lower index) only need entries with A >= the K-th
  largest, all of which are in E.
Any condition the argument relies on that fails at run time (non-finite values, a bound
check) makes select_rank_one return None, and callers run the dense path instead.

It is a few hundred small ops per layer; on a CPU shared with other processes OpenMP's
fork/join per op can cost more than the op. The process's thread setting is left alone
(never change process-wide settings inside ComfyUI): the caller decides the threads.
"""
from __future__ import annotations

import math

import torch

from .column_order import ColumnOrder
from .counting import top_fraction_count

_F32_INF_BITS = 0x7F800000
_REL_SLACK_ULPS = 8  # extra float32 roundings allowed for in the A bounds, beyond T + 4


def _min_reaching(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Smallest float32 w >= 0 with fl(w * s) >= v, elementwise (v > 0, s >= 0 finite);
    +inf where none exists (s = 0). fl(w * s) is monotone in w, so for a column scaled
    by s: #{w >= result} = #{fl(w * s) >= v}, exactly."""
    inf = torch.tensor(float("inf"), device=s.device)
    zero = torch.zeros((), device=s.device)
    # the answer is within 2 ulps of v / s (one rounding in the division, one in the
    # product) except in subnormal corners; test the 6 floats q - 3 ulps .. q + 2 ulps
    q = v / s
    down1 = torch.nextafter(q, zero)
    down2 = torch.nextafter(down1, zero)
    up1 = torch.nextafter(q, inf)
    window = torch.stack([torch.nextafter(down2, zero), down2, down1, q, up1, torch.nextafter(up1, inf)])
    reach = window * s >= v  # monotone along the window
    first = (~reach).sum(0, keepdim=True)  # count of leading False
    ok = (first > 0) & (first < window.shape[0])
    found = window.gather(0, first.clamp_max(window.shape[0] - 1)).squeeze(0)
    ok = ok.squeeze(0) | (s == 0)  # s = 0: v / s = inf, nothing reaches v
    found = torch.where(s == 0, inf, found)
    if bool(ok.all()):
        return found
    # subnormal corners: bisection over the bit patterns of w
    v, s = torch.broadcast_tensors(v, s)
    lo = torch.zeros(s.shape, dtype=torch.int64, device=s.device)
    hi = torch.full(s.shape, _F32_INF_BITS, dtype=torch.int64, device=s.device)
    for _ in range(32):
        mid = (lo + hi) // 2
        hit = mid.to(torch.int32).view(torch.float32) * s >= v
        hi = torch.where(hit, mid, hi)
        lo = torch.where(hit, lo, mid)
    exact = torch.where(s == 0, inf, hi.to(torch.int32).view(torch.float32))
    return torch.where(ok, found, exact)


def _ceil_f32(x: torch.Tensor) -> torch.Tensor:
    """Smallest float32 >= x (float64 in)."""
    y = x.float()
    return torch.where(y.double() < x, torch.nextafter(y, torch.tensor(float("inf"), device=y.device)), y)


def _ragged(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For segment sizes ``counts`` (1-D): each element's segment and offset in it."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return seg, torch.arange(seg.numel(), device=counts.device) - first[seg]


def _kth_largest_of(values: torch.Tensor, rank: int) -> float:
    return float(values.kthvalue(values.numel() - rank + 1).values)


class _RankOneLayer:
    """Eq. 3 quantities of one layer for one concept, read off the sorted columns."""

    def __init__(self, order: ColumnOrder, cols: torch.Tensor, r1: float):
        self.order = order
        self.cols = cols  # [T, C_in] float32, s_t
        self.T, self.c_in = cols.shape
        self.c_out = order.shape[0]
        self.n = self.c_out * self.c_in
        self.k1 = top_fraction_count(r1, self.n)

    def count_ge(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For v > 0 ([T]): #{S_t >= v_t} ([T]) and, per column, the sorted position where
        those entries start ([C_in, T])."""
        q = _min_reaching(v[:, None], self.cols)  # [T, C_in]
        pos = torch.searchsorted(self.order.values, q.t().contiguous())  # [C_in, T]
        return (self.c_out - pos).sum(0), pos

    def taus(self) -> torch.Tensor:
        """tau_t = k1-th largest S_t for every step, [T] float32 (exact)."""
        o, cols, k1, T = self.order, self.cols, self.k1, self.T
        sample = o.sample_w[None, :] * cols.index_select(1, o.sample_col)  # [T, m] entries of S_t
        m = sample.shape[1]
        if o.complete:  # the sample is the whole layer
            return sample.kthvalue(m - k1 + 1, dim=1).values
        # bracket tau_t by sample quantiles, verify with exact counts, then select among
        # the few entries between the two bounds
        pm = k1 * m / self.n
        spread = 4.5 * math.sqrt(pm) + 2.0
        r_lo, r_hi = min(m, math.ceil(pm + spread)), math.floor(pm - spread)
        inf = torch.tensor(float("inf"), device=cols.device)
        tiny = torch.tensor(2.0 ** -149, device=cols.device)
        top = sample.topk(r_lo, dim=1).values  # sorted, largest first
        low = torch.maximum(top[:, r_lo - 1], tiny)
        if r_hi >= 1:
            high = top[:, r_hi - 1]
        else:
            high = torch.nextafter((o.column_max[None, :] * cols).amax(1), inf)
        high = torch.maximum(high, torch.nextafter(low, inf))
        c_low, pos_low = self.count_ge(low)
        c_high, pos_high = self.count_ge(high)
        good = (c_low >= k1) & (c_high < k1)
        zero = (low == tiny) & (c_low < k1)  # fewer than k1 positive entries: tau_t = 0
        tau = torch.zeros(T, device=cols.device)
        widths = torch.where(good[None, :], pos_high - pos_low, torch.zeros_like(pos_low)).t()  # [T, C_in]
        if bool((~good & ~zero).any()) or int(widths.sum()) > self.n:
            return self.bisect_taus()
        tj, off = _ragged(widths.reshape(-1))  # tj = t * C_in + j
        lin = (tj % self.c_in) * self.c_out + pos_low.t().reshape(-1).index_select(0, tj) + off
        band = o.values.reshape(-1).index_select(0, lin) * cols.reshape(-1).index_select(0, tj)
        ends = torch.cumsum(widths.sum(1), 0).tolist()
        for t in range(T):
            if bool(good[t]):
                seg = band[(ends[t - 1] if t else 0):ends[t]]
                tau[t] = _kth_largest_of(seg, k1 - int(c_high[t]))
        return tau

    def bisect_taus(self) -> torch.Tensor:
        """taus() by bisection over float32 bit patterns (slower; any data)."""
        max_s = (self.order.column_max[None, :] * self.cols).amax(1)
        lo = torch.zeros(self.T, dtype=torch.int64, device=self.cols.device)  # count(0) = n >= k1
        hi = max_s.view(torch.int32).to(torch.int64) + 1  # count(nextup(max S_t)) = 0 < k1
        while bool((hi - lo > 1).any()):
            mid = (lo + hi) // 2
            ge = self.count_ge(mid.clamp_min(1).to(torch.int32).view(torch.float32))[0] >= self.k1
            lo = torch.where(ge, mid, lo)
            hi = torch.where(ge, hi, mid)
        return lo.to(torch.int32).view(torch.float32)


class _Eq5Bounds:
    """Rigorous bounds of A_ij as functions of w = |W_ij| within column j, with the hit count
    h(w) = #{t: w >= hit_at[t, j]}: a_hat = 0.5 w sigma_j / peak + 0.5 h / T and
    A in [a_hat (1 - delta) - abs, a_hat (1 + delta) + abs] (T + 4 float32 roundings)."""

    def __init__(self, layer: _RankOneLayer, tau: torch.Tensor, peak: float):
        cols, device = layer.cols, layer.cols.device
        self.layer, self.order, self.peak, self.T = layer, layer.order, peak, layer.T
        inf = torch.tensor(float("inf"), device=device)
        self.hit_at = _min_reaching(torch.nextafter(tau, inf)[:, None], cols)  # [T, C_in]
        # absolute slack: float64 rounding, and products / sums that end up subnormal
        # (absolute error 2^-150 each, divided by the peak in the strength term)
        self.abs_slack = 1e-9 + (2 * self.T + 2) * 2.0 ** -149 / peak
        self.sigma = cols.double().sum(0)  # [C_in]
        hs = self.hit_at.double().sort(dim=0).values  # [T, C_in]
        inf64 = torch.full((1, layer.c_in), float("inf"), dtype=torch.float64, device=device)
        self.level_lo = torch.cat([torch.zeros_like(inf64), hs])  # w range of hit level h = 0..T
        self.level_hi = torch.cat([hs, inf64])
        self.half_freq = (torch.arange(self.T + 1, dtype=torch.float64, device=device) / (2 * self.T))[:, None]
        self.delta = (self.T + 4 + _REL_SLACK_ULPS) * 2.0 ** -23

    def min_w(self, v: float, upper: bool) -> torch.Tensor:
        """Per column, the smallest real w whose lower (upper) bound of A reaches v; [C_in]."""
        target = (v - self.abs_slack) / (1 + self.delta) if upper else (v + self.abs_slack) / (1 - self.delta)
        need = target - self.half_freq  # [T+1, 1]: what 0.5 * w * sigma / peak must reach
        c = need.clamp_min(0) * (2 * self.peak) / self.sigma[None, :]  # sigma = 0: inf (nan where need = 0)
        c = torch.where(need <= 0, torch.zeros_like(c), c)
        cand = torch.maximum(self.level_lo, c)
        return torch.where(cand < self.level_hi, cand, torch.full_like(cand, float("inf"))).amin(0)

    def count_from(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per column, the sorted position where w >= m starts, and how many entries follow."""
        start = torch.searchsorted(self.order.values, _ceil_f32(m)[:, None]).squeeze(1)
        return start, self.layer.c_out - start

    def count_reaching(self, v: float) -> int:
        return int(self.count_from(self.min_w(v, upper=False))[1].sum())

    def value_below_kth(self, big_k: int) -> float:
        """v_lo <= the K-th largest A: a sample quantile of the lower bound, checked by an
        exact count (bisection when the sample misled)."""
        o, T = self.order, self.T
        h_sample = (o.sample_w[None, :] >= self.hit_at.index_select(1, o.sample_col)).sum(0)
        a_hat = 0.5 * o.sample_w.double() * self.sigma.index_select(0, o.sample_col) / self.peak \
            + h_sample.double() / (2 * T)
        a_low = a_hat * (1 - self.delta) - self.abs_slack
        m_s = a_low.numel()
        if o.complete:
            rank = big_k
        else:
            pk = big_k * m_s / self.layer.n
            rank = min(m_s, math.ceil(pk + 5.0 * math.sqrt(pk) + 2.0))
        v_lo = max(0.0, _kth_largest_of(a_low, rank) * (1 - 1e-9) - 1e-12)
        if v_lo > 0 and self.count_reaching(v_lo) < big_k:
            lo, hi = 0.0, 1.0 + 1e-6
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if self.count_reaching(mid) >= big_k else (lo, mid)
            v_lo = lo
        return v_lo

    def candidates(self, v_lo: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """E: entries whose upper bound of A reaches v_lo, with w > 0 in a nonzero column:
        (flat index sorted, position in the sorted columns, column) of each; None when E
        is more than half the layer (the dense path is as fast)."""
        o, c_out, c_in = self.order, self.layer.c_out, self.layer.c_in
        start, counts = self.count_from(self.min_w(v_lo, upper=True).clamp_min(2.0 ** -149))
        counts = torch.where(self.sigma > 0, counts, torch.zeros_like(counts))
        if int(counts.sum()) > self.layer.n // 2:
            return None
        col, off = _ragged(counts)
        lin = col * c_out + start.index_select(0, col) + off
        flat = o.rows.reshape(-1).index_select(0, lin).to(torch.int64) * c_in + col
        flat, by_flat = torch.sort(flat)
        return flat, lin.index_select(0, by_flat), col.index_select(0, by_flat)


def _sum_peak(order: ColumnOrder, cols: torch.Tensor) -> torch.Tensor:
    """max of the Eq. 3 sum: at each column's largest |W| (same operations as the dense path)."""
    w_max = order.column_max
    tot = w_max * cols[0]
    for t in range(1, cols.shape[0]):
        tot = tot + w_max * cols[t]
    return tot.max()


def _sensitivity_at(order: ColumnOrder, cols: torch.Tensor, tau: torch.Tensor, peak: torch.Tensor,
                    lin: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """A of Eq. 3 on the entries (sorted position lin, column col), with the dense path's
    operations (sensitivity.combine_terms), so with its bits."""
    w_e = order.values.reshape(-1).index_select(0, lin)
    hits = torch.zeros(lin.numel(), dtype=torch.int16, device=lin.device)
    total = None
    for t in range(cols.shape[0]):
        s = w_e * cols[t].index_select(0, col)
        total = s if total is None else total.add_(s)
        hits.add_(s > tau[t])
    steps = torch.full((), float(cols.shape[0]), device=lin.device)
    return 0.5 * (total / peak) + 0.5 * (hits.float() / steps)


def _eq4_eq5(a: torch.Tensor, flat: torch.Tensor, c_in: int, big_k: int, k_row: int,
             v_star: torch.Tensor) -> torch.Tensor:
    """Eq. 4 and 5 (ties to the lower index) on candidates holding every entry with A at or
    above the layer's K-th largest ``v_star``: sorted flat indices of Q_l with A > 0."""
    positive = a > 0
    cand = positive & (a >= v_star)
    above = positive & (a > v_star)
    tied = cand & ~above
    need = big_k - int(above.sum())
    layer_sel = above | (tied & (tied.cumsum(0) <= need))
    # Eq. 4: rank inside the row by (-A, column); every row's top k is among the
    # candidates, or the row has fewer than k candidates and keeps them all
    idx = cand.nonzero().squeeze(1)
    a_c, row_c = a[idx], flat[idx] // c_in
    by_a = torch.argsort(a_c, descending=True, stable=True)
    by_row = by_a[torch.argsort(row_c[by_a], stable=True)]
    _, per_row = torch.unique_consecutive(row_c[by_row], return_counts=True)
    rank_in_row = torch.empty_like(by_row)
    rank_in_row[by_row] = _ragged(per_row)[1]
    return flat[idx[layer_sel[idx] & (rank_in_row < k_row)]]


def _checked_columns(order: ColumnOrder, columns: torch.Tensor, r1: float, r2: float) -> torch.Tensor | None:
    if not 0.0 < r1 <= 1.0:
        raise ValueError(f"r1 (temporal sparsity) must be in (0, 1], got {r1}")
    if not 0.0 < r2 <= 1.0:
        raise ValueError(f"r2 (spatial sparsity) must be in (0, 1], got {r2}")
    c_out, c_in = order.shape
    if columns.dim() != 2 or columns.shape[1] != c_in or columns.shape[0] < 1:
        raise ValueError(f"columns of shape {tuple(columns.shape)} do not fit a [{c_out}, {c_in}] layer")
    if not order.usable:
        return None
    cols = columns.to(device=order.values.device, dtype=torch.float32) + 0.0  # -0.0 -> 0.0
    if not (bool(torch.isfinite(cols).all()) and bool((cols >= 0).all())):
        return None
    return cols


@torch.no_grad()
def select_rank_one(order: ColumnOrder, columns: torch.Tensor, r1: float, r2: float) -> torch.Tensor | None:
    """Eq. 3-6 for one layer of fast-mode saliency (S_t = |W| * columns[t]): the same sorted
    flat indices as SensitivityIntegrator + select_from_sensitivity on the dense S_t, or
    None where the fast argument does not apply (callers then run the dense path)."""
    cols = _checked_columns(order, columns, r1, r2)
    if cols is None:
        return None
    layer = _RankOneLayer(order, cols, r1)
    big_k = top_fraction_count(r2, layer.n)
    if big_k > layer.n // 2:
        return None  # nearly everything is a candidate: the dense path is as fast
    empty = torch.zeros(0, dtype=torch.int64)
    peak = _sum_peak(order, cols)
    if not bool(torch.isfinite(peak)):
        return None
    if not bool(peak > 0):
        return empty  # S = 0 everywhere: A = 0 and nothing is selected
    tau = layer.taus()  # [T]
    bounds = _Eq5Bounds(layer, tau, float(peak))
    v_lo = bounds.value_below_kth(big_k)
    found = bounds.candidates(v_lo)
    if found is None:
        return None
    flat, lin, col = found
    size = flat.numel()
    if size == 0:
        return empty
    a = _sensitivity_at(order, cols, tau, peak, lin, col)
    # Eq. 5: the K-th largest A of the layer (every entry reaching it is in E)
    if size >= big_k:
        v_star = a.kthvalue(size - big_k + 1).values
        if v_lo > 0 and not bool(v_star >= v_lo):
            return None  # cannot happen while the bounds hold; never trust a broken argument
    elif v_lo > 0:
        return None
    else:
        v_star = torch.zeros((), device=a.device)
    return _eq4_eq5(a, flat, layer.c_in, big_k, top_fraction_count(r2, layer.c_in), v_star).cpu()
