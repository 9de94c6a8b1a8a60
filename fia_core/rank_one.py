"""Rank-one fast path of Eq. 3-6 for fast-mode saliency, S_t = |W| * s_t[None, :].

Gives exactly the indices of neurons.select_from_sensitivity applied to the Eq. 3
sensitivity integrated one dense step at a time (tests/test_perf_equivalence.py), without
any layer-size pass per concept: each column of |W| is sorted once per model and shared
by every concept (SharedAbsWeights).

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
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping

import torch

from .neurons import _SAMPLE, SensitivityIntegrator, select_from_sensitivity, top_fraction_count

_F32_INF_BITS = 0x7F800000
_REL_SLACK_ULPS = 8  # extra float32 roundings allowed for in the A bounds, beyond T + 4


def _sort_columns(w: torch.Tensor, row_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every column of ``w`` sorted ascending: values [C_in, C_out] and their rows."""
    wt = w.t().contiguous()
    if wt.device.type == "cpu":
        try:  # numpy's vectorised sort is 2-3x faster than torch.sort on CPU
            import numpy as np

            a = wt.numpy()
            rows = np.argsort(a, axis=1)
            values = np.sort(a, axis=1)  # same order as rows (ties hold equal values)
            np_rows = rows.astype(np.int16 if row_dtype == torch.int16 else np.int32)
            return torch.from_numpy(values), torch.from_numpy(np_rows)
        except (ImportError, RuntimeError, TypeError):
            pass
    values, rows = torch.sort(wt, dim=1)
    return values, rows.to(row_dtype)


class ColumnOrder:
    """One layer's |W| with every column sorted ascending: the per-model preprocessing of
    the rank-one fast path (independent of the concept, so shared by all concepts).

    ``values[j]`` is column j of |W| (float32) sorted ascending and ``rows[j]`` the row of
    each sorted value (int16 when C_out fits): 6 bytes per connection. ``sample_w`` /
    ``sample_col`` hold a fixed random sample of entries (all of them in small layers),
    used only to bracket quantiles; results never depend on it.
    """

    __slots__ = ("shape", "values", "rows", "usable", "sample_w", "sample_col", "complete")

    @torch.no_grad()
    def __init__(self, weight_abs: torch.Tensor):
        w = weight_abs.detach().float()
        if w.dim() != 2:
            raise ValueError(f"expected a [C_out, C_in] weight, got {tuple(w.shape)}")
        c_out, c_in = w.shape
        self.shape = (c_out, c_in)
        row_dtype = torch.int16 if c_out <= torch.iinfo(torch.int16).max else torch.int32
        values, self.rows = _sort_columns(w, row_dtype)
        self.values = values.add_(0.0)  # -0.0 -> 0.0 (no other value changes): bit patterns order values
        n = c_out * c_in
        # the argument needs finite, non-negative |W|
        self.usable = bool(n > 0 and torch.isfinite(values[:, -1]).all() and (values[:, 0] >= 0).all())
        self.complete = n <= _SAMPLE
        if self.complete:
            lin = torch.arange(n, device=w.device)
        else:
            g = torch.Generator(device="cpu").manual_seed(0x5EED)
            lin = torch.randint(n, (_SAMPLE,), generator=g).to(w.device)
        self.sample_col = lin // c_out
        self.sample_w = self.values.reshape(-1)[lin]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.rows, self.sample_w, self.sample_col))

    @property
    def column_max(self) -> torch.Tensor:
        return self.values[:, -1]


class SharedAbsWeights(dict):
    """{layer key: |W|} shared by every concept of one model, with each layer's ColumnOrder
    built on first use and kept with it (freed together). Plain mappings work too; they
    just rebuild the order on every selection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._orders: dict[str, ColumnOrder] = {}

    def column_order(self, key: str) -> ColumnOrder:
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = ColumnOrder(self[key])
        return order

    def order_nbytes(self) -> int:
        return sum(o.nbytes() for o in self._orders.values())


def column_order_of(weight_abs: Mapping[str, torch.Tensor], key: str) -> ColumnOrder:
    """The ColumnOrder of one layer: cached when ``weight_abs`` is a SharedAbsWeights."""
    if isinstance(weight_abs, SharedAbsWeights):
        return weight_abs.column_order(key)
    return ColumnOrder(weight_abs[key])


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


@torch.no_grad()
def select_rank_one(order: ColumnOrder, columns: torch.Tensor, r1: float, r2: float) -> torch.Tensor | None:
    """Eq. 3-6 for one layer of fast-mode saliency (S_t = |W| * columns[t]): the same sorted
    flat indices as SensitivityIntegrator + select_from_sensitivity on the dense S_t, or
    None where the fast argument does not apply (callers then run the dense path)."""
    if not 0.0 < r1 <= 1.0:
        raise ValueError(f"r1 (temporal sparsity) must be in (0, 1], got {r1}")
    if not 0.0 < r2 <= 1.0:
        raise ValueError(f"r2 (spatial sparsity) must be in (0, 1], got {r2}")
    c_out, c_in = order.shape
    if columns.dim() != 2 or columns.shape[1] != c_in or columns.shape[0] < 1:
        raise ValueError(f"columns of shape {tuple(columns.shape)} do not fit a [{c_out}, {c_in}] layer")
    if not order.usable:
        return None
    device = order.values.device
    cols = columns.to(device=device, dtype=torch.float32) + 0.0  # -0.0 -> 0.0
    if not (bool(torch.isfinite(cols).all()) and bool((cols >= 0).all())):
        return None
    layer = _RankOneLayer(order, cols, r1)
    T, n = layer.T, layer.n
    big_k = top_fraction_count(r2, n)
    k_row = top_fraction_count(r2, c_in)
    if big_k > n // 2:
        return None  # nearly everything is a candidate: the dense path is as fast
    empty = torch.zeros(0, dtype=torch.int64)

    # max of the Eq. 3 sum: at each column's largest |W| (same operations as the dense path)
    w_max = order.column_max
    tot = w_max * cols[0]
    for t in range(1, T):
        tot = tot + w_max * cols[t]
    peak = tot.max()
    if not bool(torch.isfinite(peak)):
        return None
    if not bool(peak > 0):
        return empty  # S = 0 everywhere: A = 0 and nothing is selected
    p = float(peak)
    # absolute slack: float64 rounding, and products / sums that end up subnormal
    # (absolute error 2^-150 each, divided by the peak in the strength term)
    abs_slack = 1e-9 + (2 * T + 2) * 2.0 ** -149 / p

    tau = layer.taus()  # [T]
    hit_at = _min_reaching(torch.nextafter(tau, torch.tensor(float("inf"), device=device))[:, None], cols)

    # Bounds of A_ij as functions of w = |W_ij| in column j, with hit count
    # h(w) = #{t: w >= hit_at[t, j]}: a_hat = 0.5 w sigma_j / peak + 0.5 h / T and
    # A in [a_hat (1 - delta) - abs, a_hat (1 + delta) + abs] (T + 4 float32 roundings).
    sigma = cols.double().sum(0)  # [C_in]
    hs = hit_at.double().sort(dim=0).values  # [T, C_in]
    inf64 = torch.full((1, c_in), float("inf"), dtype=torch.float64, device=device)
    level_lo = torch.cat([torch.zeros_like(inf64), hs])  # w range of hit level h = 0..T
    level_hi = torch.cat([hs, inf64])
    half_freq = (torch.arange(T + 1, dtype=torch.float64, device=device) / (2 * T))[:, None]
    delta = (T + 4 + _REL_SLACK_ULPS) * 2.0 ** -23

    def min_w(v: float, upper: bool) -> torch.Tensor:
        """Per column, the smallest real w whose lower (upper) bound of A reaches v; [C_in]."""
        target = (v - abs_slack) / (1 + delta) if upper else (v + abs_slack) / (1 - delta)
        need = target - half_freq  # [T+1, 1]: what 0.5 * w * sigma / peak must reach
        c = need.clamp_min(0) * (2 * p) / sigma[None, :]  # sigma = 0: inf (nan where need = 0)
        c = torch.where(need <= 0, torch.zeros_like(c), c)
        cand = torch.maximum(level_lo, c)
        return torch.where(cand < level_hi, cand, torch.full_like(cand, float("inf"))).amin(0)

    def count_from(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.searchsorted(order.values, _ceil_f32(m)[:, None]).squeeze(1)
        return start, c_out - start

    # v_lo <= the K-th largest A: a sample quantile of the lower bound, checked by exact count
    o = order
    h_sample = (o.sample_w[None, :] >= hit_at.index_select(1, o.sample_col)).sum(0)
    a_hat = 0.5 * o.sample_w.double() * sigma.index_select(0, o.sample_col) / p + h_sample.double() / (2 * T)
    a_low = a_hat * (1 - delta) - abs_slack
    m_s = a_low.numel()
    if o.complete:
        rank = big_k
    else:
        pk = big_k * m_s / n
        rank = min(m_s, math.ceil(pk + 5.0 * math.sqrt(pk) + 2.0))
    v_lo = max(0.0, _kth_largest_of(a_low, rank) * (1 - 1e-9) - 1e-12)
    if v_lo > 0 and int(count_from(min_w(v_lo, upper=False))[1].sum()) < big_k:
        lo, hi = 0.0, 1.0 + 1e-6  # the sample misled: bisection
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if int(count_from(min_w(mid, upper=False))[1].sum()) >= big_k:
                lo = mid
            else:
                hi = mid
        v_lo = lo

    # E: entries whose upper bound of A reaches v_lo, with w > 0 in a nonzero column
    start, counts = count_from(min_w(v_lo, upper=True).clamp_min(2.0 ** -149))
    counts = torch.where(sigma > 0, counts, torch.zeros_like(counts))
    size = int(counts.sum())
    if size > n // 2:
        return None
    if size == 0:
        return empty
    col, off = _ragged(counts)
    lin = col * c_out + start.index_select(0, col) + off
    flat = order.rows.reshape(-1).index_select(0, lin).to(torch.int64) * c_in + col
    flat, by_flat = torch.sort(flat)
    lin = lin.index_select(0, by_flat)
    col = col.index_select(0, by_flat)
    w_e = order.values.reshape(-1).index_select(0, lin)

    # A on E, with the dense path's operations (so with its bits)
    hits = torch.zeros(size, dtype=torch.int16, device=device)
    total = None
    for t in range(T):
        s = w_e * cols[t].index_select(0, col)
        total = s if total is None else total.add_(s)
        hits.add_(s > tau[t])
    a = 0.5 * (total / peak) + 0.5 * (hits.float() / T)

    # Eq. 5: the K-th largest A of the layer (every entry reaching it is in E)
    if size >= big_k:
        v_star = a.kthvalue(size - big_k + 1).values
        if v_lo > 0 and not bool(v_star >= v_lo):
            return None  # cannot happen while the bounds hold; never trust a broken argument
    elif v_lo > 0:
        return None
    else:
        v_star = torch.zeros((), device=device)
    positive = a > 0
    cand = positive & (a >= v_star)
    above = positive & (a > v_star)
    tied = cand & ~above
    need = big_k - int(above.sum())
    layer_sel = above | (tied & (tied.cumsum(0) <= need))

    # Eq. 4 on the candidates: rank inside the row by (-A, column); every row's top k is
    # among them, or the row has fewer than k candidates and keeps them all
    idx = cand.nonzero().squeeze(1)
    a_c, row_c = a[idx], flat[idx] // c_in
    by_a = torch.argsort(a_c, descending=True, stable=True)
    by_row = by_a[torch.argsort(row_c[by_a], stable=True)]
    _, per_row = torch.unique_consecutive(row_c[by_row], return_counts=True)
    rank_in_row = torch.empty_like(by_row)
    rank_in_row[by_row] = _ragged(per_row)[1]
    chosen = idx[layer_sel[idx] & (rank_in_row < k_row)]
    return flat[chosen].cpu()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run CPU ops single-threaded inside the block (the thread count is restored after).

    The rank-one path is a few hundred small ops per layer; on CPU, OpenMP's fork/join per
    op costs more than the op itself, several times more when other processes share the
    cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def select_fast_mode(
    weight_abs: Mapping[str, torch.Tensor], key: str, columns: torch.Tensor, r1: float, r2: float
) -> torch.Tensor:
    """Eq. 3-6 for one layer of fast-mode saliency, S_t = |W| * columns[t]: sorted flat indices.

    Takes the rank-one path (select_rank_one; |W|'s ColumnOrder is cached when
    ``weight_abs`` is a SharedAbsWeights) and falls back to the dense path, integrating
    S_t one step at a time, wherever that path does not apply. Both give the same result.
    """
    order = column_order_of(weight_abs, key)
    with _one_cpu_thread(order.values.device):
        idx = select_rank_one(order, columns, r1, r2)
    if idx is not None:
        return idx
    w = weight_abs[key]
    integrator = SensitivityIntegrator(r1)
    for col in columns:
        integrator.add(key, w.float() * col.to(w.device)[None, :])
    return select_from_sensitivity(integrator.sensitivity(key, release=True), r2)
