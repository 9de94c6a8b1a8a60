"""SaliencyRecorder: records Eq. 1-2 from live activations of the target layers.

Statistics are per prompt (a batch row) on the conditional branch only; the caller says,
per model call, which rows are concept prompts, which are base prompts and which to skip
(the unconditional CFG rows). In exact mode S_t is folded into the Eq. 3 integrator when
the step ends, so at most five layer-size float32 tensors per layer are alive (the step's
concept mean, base mean and base M2, and the integrator's sum and hit count), whatever
the step count.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .saliency import (
    BASE, CONCEPT, MODES, ConceptSaliency, ExactSaliency, FastSaliency, RunningMoments, column_norm_statistic,
    contrast, energy_statistic,
)
from .sensitivity import SensitivityIntegrator
from .targets import TargetLayer

DEFAULT_R1 = 0.05  # the paper's temporal sparsity; recorded with fast saliency when none is given


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
        self._index_cache: dict[torch.device, tuple[slice, torch.Tensor, torch.Tensor]] = {}
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
            self._advance_exact_step(step)
        rows = tuple(row_groups)
        if rows != self._rows:
            self._index_cache.clear()
        self._step, self._rows = step, rows
        if step is not None:
            self.calls += 1

    def clear_call(self) -> None:
        self._step = None

    def _advance_exact_step(self, step: int) -> None:
        if self._exact_step is not None and step < self._exact_step:
            raise RuntimeError(
                "exact saliency needs every prompt of a concept in one batch (steps went back "
                f"from {self._exact_step} to {step}); run it with all prompts in one batch"
            )
        if self._exact_step is not None and step != self._exact_step:
            self._fold_exact_step()
        self._exact_step = step

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
        """The recorded saliency (FastSaliency or ExactSaliency); ``info``: prompts,
        architecture, fingerprint, settings. Raises when a step or layer saw no prompts."""
        self._step = None
        shapes = {layer.key: layer.shape for layer in self.layers}
        if self.mode == "exact":
            sensitivity = self._exact_sensitivity(shapes)
            return ExactSaliency(concept, target, shapes, self.num_steps, self.r1, sensitivity, **info)
        columns = {}
        for key in shapes:
            steps = self._moments[key]
            if sorted(steps) != list(range(self.num_steps)):
                raise RuntimeError(
                    f"saliency incomplete: layer {key} recorded steps {sorted(steps)}, expected 0..{self.num_steps - 1}"
                )
            columns[key] = torch.stack([contrast(steps[t][CONCEPT], steps[t][BASE]) for t in range(self.num_steps)]).cpu()
        r1 = self.r1 if self.r1 is not None else DEFAULT_R1
        return FastSaliency(concept, target, shapes, self.num_steps, r1, columns, self.weight_abs, **info)

    def _exact_sensitivity(self, shapes: Mapping[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        if self._exact_step is not None:
            self._fold_exact_step()
            self._exact_step = None
        missing = [k for k in shapes if self._integrator.steps(k) != self.num_steps]
        if missing:
            raise RuntimeError(f"saliency incomplete: {len(missing)} layers saw fewer than {self.num_steps} saliency steps")
        return {k: self._integrator.sensitivity(k, release=True).cpu() for k in shapes}
