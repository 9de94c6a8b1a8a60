"""Per-model preprocessing of the rank-one fast path: every column of |W| sorted once.

Independent of the concept, so one ColumnOrder per layer serves every concept of a model
(SharedAbsWeights keeps them with |W|). Depends only on the counting helpers.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .counting import SAMPLE_SIZE


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
        self.complete = n <= SAMPLE_SIZE
        if self.complete:
            lin = torch.arange(n, device=w.device)
        else:
            g = torch.Generator(device="cpu").manual_seed(0x5EED)
            lin = torch.randint(n, (SAMPLE_SIZE,), generator=g).to(w.device)
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
