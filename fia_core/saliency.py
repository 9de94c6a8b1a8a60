"""Contrastive concept saliency (Eq. 1-2), recorded from live activations.

Both modes share one fact: the weight magnitude factors out of Eq. 1,
U_{t,i,j} = |W_ij| * q_{t,i,j}, and |W_ij| is the same for every prompt, so

    mean(U) = |W| * mean(q),  std(U) = |W| * std(q),
    S_t = |W| * max(0, mean_c q - mean_b q - std_b q)          (Eq. 2)

and only statistics of q need recording:
- ``fast`` (the reference code's statistic, default): q_ij = ||X̂_j||_2, the column norm of
  the layer input with every token row L2-normalised; it does not depend on i, so S_t is
  |W| times one C_in vector per step, and a concept's saliency is T * C_in floats per layer.
- ``exact`` (Eq. 1 with the cosine term): q_ij = ||X_j|| |<X_j, Y_i>| / (||X_j|| ||Y_i|| + eps),
  full-size per step; S_t is folded into the Eq. 3 integrator when the step ends, so at
  most five layer-size float32 tensors per layer are alive (the step's concept mean, base
  mean and base M2, and the integrator's sum and hit count), whatever the step count.

Statistics are per prompt (a batch row) on the conditional branch only; the caller says,
per model call, which rows are concept prompts, which are base prompts and which to skip
(the unconditional CFG rows). Means and deviations are merged batch by batch (Chan et al.)
on the model's device, without host synchronisation. std is the sample std (ddof = 1, as
torch.std), so each side needs at least two prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .masks import ConceptMask, LayerMask
from .neurons import ProgressFn, SensitivityIntegrator, select_from_sensitivity
from .rank_one import select_fast_mode
from .prompts import PromptPair
from .targets import TargetLayer

CONCEPT = "concept"
BASE = "base"
MODES = ("fast", "exact")
EXACT_EPS = 1e-8


def column_norm_statistic(x: torch.Tensor) -> torch.Tensor:
    """fast mode's q: [B, N, C_in] layer input -> [B, C_in] ||X̂_j||_2 with X̂ token-normalised.

    Two reductions and one float32 temporary of x's size (the normalised copy): row norms
    are accumulated in float32 without converting x first.
    """
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).clamp_min_(1e-12).reciprocal_()
    return torch.linalg.vector_norm(x * inv, dim=1)  # zero token rows stay zero


def energy_statistic(x: torch.Tensor, y: torch.Tensor, eps: float = EXACT_EPS) -> torch.Tensor:
    """exact mode's q of Eq. 1: [B, N, C_in], [B, N, C_out] -> [B, C_out, C_in]."""
    x = x.float()
    y = y.float()
    x_norm = x.norm(dim=1)  # [B, C_in]   ||X_j||
    y_norm = y.norm(dim=1)  # [B, C_out]  ||Y_i||
    inner = torch.bmm(y.transpose(1, 2), x).abs_()  # [B, C_out, C_in]  |<X_j, Y_i>|
    return inner.mul_(x_norm[:, None, :]).div_(x_norm[:, None, :] * y_norm[:, :, None] + eps)


class RunningMoments:
    """Count, mean and sum of squared deviations over rows, merged one batch at a time."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        m = rows.shape[0]
        if m == 0:
            return
        batch_mean = rows.mean(0)
        batch_m2 = (rows - batch_mean).square_().sum(0)
        if self.n == 0:
            self.mean, self.m2 = batch_mean, batch_m2
        else:
            n = self.n + m
            delta = batch_mean - self.mean
            self.mean.add_(delta, alpha=m / n)
            self.m2.add_(batch_m2).add_(delta.square_(), alpha=self.n * m / n)
        self.n += m

    def std(self) -> torch.Tensor:
        return (self.m2 / (self.n - 1)).sqrt()


def contrast(concept: RunningMoments, base: RunningMoments) -> torch.Tensor:
    """Eq. 2 without the |W| factor: max(0, mu_c - mu_b - sigma_b)."""
    if concept.n < 1 or base.n < 2:
        raise ValueError(
            f"Eq. 2 needs at least one concept and two base prompts per step, got {concept.n} and {base.n}"
        )
    return (concept.mean - base.mean - base.std()).clamp_min_(0)


@dataclass
class ConceptSaliency:
    """One concept's contrastive saliency, ready for mask building (Eq. 3-6).

    fast: ``columns[key]`` is [T, C_in] (S_t = |W| * columns[key][t]), with ``weight_abs``
    a shared mapping to |W| (not owned: it is the model's, shared by all concepts).
    exact: ``sensitivity[key]`` is A of Eq. 3, already integrated with ``r1``.
    """

    concept: str
    mode: str
    target: str
    layer_shapes: dict[str, tuple[int, int]]
    num_steps: int
    r1: float
    columns: dict[str, torch.Tensor] | None = None
    weight_abs: Mapping[str, torch.Tensor] | None = None
    sensitivity: dict[str, torch.Tensor] | None = None
    prompts: tuple[PromptPair, ...] = ()
    architecture: str = ""
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Memory this saliency owns (|W| excluded: it is shared)."""
        tensors = (self.columns or {}) | (self.sensitivity or {})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def step_saliency(self, key: str):
        """Yield S_t [C_out, C_in] of one layer for t = 0..T-1 (fast mode)."""
        if self.columns is None:
            raise ValueError("per-step saliency exists in fast mode only (exact mode is integrated while recording)")
        if self.weight_abs is None:
            raise ValueError("fast-mode saliency needs weight_abs (|W| of the model) to build S_t = |W| * s_t")
        w = self.weight_abs[key]
        for col in self.columns[key]:
            yield w.float() * col.to(w.device)[None, :]

    @torch.no_grad()
    def select(self, r2: float, r1: float | None = None, progress: ProgressFn | None = None) -> ConceptMask:
        """Concept mask Q^(c) of Eq. 3-6. r1 defaults to the recorded one; exact mode fixed it."""
        if r1 is None:
            r1 = self.r1
        elif self.mode == "exact" and not math.isclose(r1, self.r1):
            raise ValueError(f"exact-mode saliency was integrated with r1={self.r1}; recompute it to use r1={r1}")
        layers: dict[str, LayerMask] = {}
        keys = list(self.layer_shapes)
        for i, key in enumerate(keys):
            if self.mode == "exact":
                indices = select_from_sensitivity(self.sensitivity[key], r2)
            else:
                if self.weight_abs is None:
                    raise ValueError("fast-mode saliency needs weight_abs (|W| of the model) to build S_t = |W| * s_t")
                # rank-one S_t: no layer-size pass per step (same result as integrating step_saliency)
                indices = select_fast_mode(self.weight_abs, key, self.columns[key], r1, r2)
            layers[key] = LayerMask(self.layer_shapes[key], indices)
            if progress:
                progress(i + 1, len(keys))
        return ConceptMask(
            concepts=(self.concept,),
            target=self.target,
            layers=layers,
            architecture=self.architecture,
            fingerprint=self.fingerprint,
            params={"r1": r1, "r2": r2, "mode": self.mode, "saliency_steps": self.num_steps, **self.settings},
        )


class SaliencyRecorder:
    """Context manager that hooks target layers by module identity and records Eq. 1-2.

    Before each model evaluation the caller states the context with ``set_call(step,
    row_groups)``: the saliency step index (None = outside the window, nothing recorded)
    and, per batch row, CONCEPT, BASE or None (skip, e.g. unconditional rows). Hooks are
    removed on exit, also after exceptions. Only one call context is active at a time.
    """

    def __init__(
        self,
        layers: Sequence[TargetLayer],
        num_steps: int,
        mode: str = "fast",
        weight_abs: Mapping[str, torch.Tensor] | None = None,
        r1: float | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown saliency mode {mode!r}; choose one of {MODES}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if mode == "exact" and (weight_abs is None or r1 is None):
            raise ValueError("exact mode folds each step into Eq. 3 as it ends: it needs weight_abs and r1")
        self.layers = list(layers)
        self.num_steps = num_steps
        self.mode = mode
        self.weight_abs = weight_abs
        self.r1 = r1
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._step: int | None = None
        self._rows: tuple[str | None, ...] = ()
        self._index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # fast: per layer, per step, per side; exact: per layer, current step only
        self._moments: dict[str, dict[int, dict[str, RunningMoments]]] = {layer.key: {} for layer in self.layers}
        self._integrator = SensitivityIntegrator(r1) if mode == "exact" else None
        self._exact_step: int | None = None
        self.calls = 0

    # -- hooks -----------------------------------------------------------------------
    def __enter__(self) -> "SaliencyRecorder":
        try:
            for layer in self.layers:
                self._handles.append(layer.module.register_forward_hook(self._make_hook(layer.key)))
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, key: str) -> Callable:
        def hook(module, args, output):
            if self._step is not None:
                self._record(key, args[0], output, getattr(module, "bias", None))

        return hook

    # -- call context ----------------------------------------------------------------
    def set_call(self, step: int | None, row_groups: Sequence[str | None] = ()) -> None:
        """Declare the step and per-row sides of the next model evaluation."""
        if step is not None and not 0 <= step < self.num_steps:
            step = None
        if step is not None and self.mode == "exact":
            if self._exact_step is not None and step < self._exact_step:
                raise RuntimeError(
                    "exact saliency needs every prompt of a concept in one batch (steps went back "
                    f"from {self._exact_step} to {step}); run it with all prompts in one batch"
                )
            if self._exact_step is not None and step != self._exact_step:
                self._fold_exact_step()
            self._exact_step = step
        rows = tuple(row_groups)
        if rows != self._rows:
            self._index_cache.clear()
        self._step, self._rows = step, rows
        if step is not None:
            self.calls += 1

    def clear_call(self) -> None:
        self._step = None

    def _indices(self, device: torch.device) -> tuple[slice, torch.Tensor, torch.Tensor]:
        """The span of recorded rows (skipped rows, e.g. unconditional, are not computed at
        all when outside it) and the concept / base rows relative to the span's start."""
        idx = self._index_cache.get(device)
        if idx is None:
            used = [i for i, g in enumerate(self._rows) if g in (CONCEPT, BASE)]
            lo = used[0] if used else 0
            span = slice(lo, used[-1] + 1 if used else 0)
            c = [i - lo for i, g in enumerate(self._rows) if g == CONCEPT]
            b = [i - lo for i, g in enumerate(self._rows) if g == BASE]
            idx = (span, torch.tensor(c, dtype=torch.long, device=device), torch.tensor(b, dtype=torch.long, device=device))
            self._index_cache[device] = idx
        return idx

    @torch.no_grad()
    def _record(self, key: str, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None) -> None:
        if x.dim() != 3:
            raise RuntimeError(f"layer {key}: expected a [batch, tokens, channels] input, got {tuple(x.shape)}")
        if x.shape[0] != len(self._rows):
            raise RuntimeError(
                f"layer {key}: the model call has {x.shape[0]} batch rows but the call context "
                f"describes {len(self._rows)}"
            )
        span, idx_c, idx_b = self._indices(x.device)
        sides = self._moments[key].setdefault(self._step, {CONCEPT: RunningMoments(), BASE: RunningMoments()})
        if not (idx_c.numel() or idx_b.numel()):
            return
        x = x[span]  # a view: only the recorded rows are computed
        if self.mode == "fast":
            q = column_norm_statistic(x)
        else:
            y = y[span]
            if bias is not None:
                y = y - bias.to(y.dtype)
            q = energy_statistic(x, y)
        if idx_c.numel():
            sides[CONCEPT].add(q.index_select(0, idx_c))
        if idx_b.numel():
            sides[BASE].add(q.index_select(0, idx_b))

    @torch.no_grad()
    def _fold_exact_step(self) -> None:
        step = self._exact_step
        for layer in self.layers:
            sides = self._moments[layer.key].pop(step, None)
            if sides is None:
                continue
            s = contrast(sides[CONCEPT], sides[BASE])
            w = self.weight_abs[layer.key]
            self._integrator.add(layer.key, s.mul_(w.to(s.device, torch.float32)))

    # -- result ----------------------------------------------------------------------
    @torch.no_grad()
    def result(self, concept: str, target: str = "ffn2", **info: Any) -> ConceptSaliency:
        """The recorded saliency. Raises when a step or layer saw no prompts."""
        self._step = None
        shapes = {layer.key: layer.shape for layer in self.layers}
        if self.mode == "exact":
            if self._exact_step is not None:
                self._fold_exact_step()
                self._exact_step = None
            missing = [k for k in shapes if k not in self._integrator.keys()]
            if missing or any(self._integrator._steps[k] != self.num_steps for k in shapes):
                raise RuntimeError(f"saliency incomplete: {len(missing)} layers saw no saliency step")
            sens = {k: self._integrator.sensitivity(k, release=True).cpu() for k in shapes}
            return ConceptSaliency(concept, "exact", target, shapes, self.num_steps, self.r1, sensitivity=sens, **info)
        columns = {}
        for key in shapes:
            steps = self._moments[key]
            if sorted(steps) != list(range(self.num_steps)):
                raise RuntimeError(
                    f"saliency incomplete: layer {key} recorded steps {sorted(steps)}, expected 0..{self.num_steps - 1}"
                )
            columns[key] = torch.stack([contrast(steps[t][CONCEPT], steps[t][BASE]) for t in range(self.num_steps)]).cpu()
        return ConceptSaliency(
            concept, "fast", target, shapes, self.num_steps, self.r1 if self.r1 is not None else 0.05,
            columns=columns, weight_abs=self.weight_abs, **info,
        )
