"""Settings of a Stage-1 saliency run and what they may be (checked before any sampling).

Samplers: per-step saliency needs a model call at every sigma of the schedule's saliency
window (the step is found from the sigma). ComfyUI 0.3.75's dpm_fast and dpm_adaptive
choose their own sigmas (they only use the window's first and last one), so they are
refused by name; every other sampler of comfy.samplers.KSampler.SAMPLERS was run on the
tiny test model and records every step (tests/test_runner_settings.py).

Resolution: at most MAX_SIDE pixels per side, and on a CPU at most MAX_CPU_PIXELS pixels:
one UNet call cannot be interrupted inside its largest attention operation, which at
larger sizes takes many seconds on a CPU (the memory guard in saliency_sampling then
bounds the batch by free memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import comfy.samplers

from ..fia_core import MODES, TARGETS

#: samplers whose model calls do not land on the schedule's sigmas
UNSUPPORTED_SAMPLERS = {
    "dpm_fast": "it picks its own sigmas between the window's ends",
    "dpm_adaptive": "it picks its own, adaptive sigmas between the window's ends",
}
#: every sampler the saliency run accepts (ComfyUI's list minus the unsupported ones)
SUPPORTED_SAMPLERS = [s for s in comfy.samplers.KSampler.SAMPLERS if s not in UNSUPPORTED_SAMPLERS]
MAX_SIDE = 2048
MAX_CPU_PIXELS = 1024 * 1024


class SaliencySettingsError(ValueError):
    """A setting that cannot work; the message names the input and what to change."""

    def __init__(self, name: str, expected: str):
        self.input_name = name
        self.expected = expected
        super().__init__(f"input '{name}' {expected}")


def check_sampler(name: str) -> None:
    """Raise SaliencySettingsError when ``name`` cannot give per-step saliency."""
    if name in UNSUPPORTED_SAMPLERS:
        raise SaliencySettingsError(
            "sampler_name", f"'{name}' cannot be used for saliency: {UNSUPPORTED_SAMPLERS[name]}, so the "
            f"recorded steps would not be the schedule's. Choose e.g. euler (the default), euler_ancestral, "
            f"heun, dpmpp_2m or ddim.")
    if name not in comfy.samplers.KSampler.SAMPLERS:
        raise SaliencySettingsError("sampler_name", f"'{name}' is not a ComfyUI sampler; choose one of "
                                    f"{', '.join(SUPPORTED_SAMPLERS[:6])}, ...")


@dataclass(frozen=True)
class SaliencySettings:
    """Every setting that changes a concept's saliency (the disk-cache key uses all)."""

    steps: int = 50
    saliency_steps: int = 10
    cfg: float = 7.5
    sampler_name: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    width: int = 512
    height: int = 512
    mode: str = "fast"
    batch_size: int = 4
    r1: float = 0.05
    target: str = "ffn2"

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, on_cpu: bool = False) -> None:
        """Raise SaliencySettingsError naming the first input that cannot work."""
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise SaliencySettingsError(f.name, f"must be a finite number, got {v}")
        for name in ("steps", "saliency_steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SaliencySettingsError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.saliency_steps > self.steps:
            raise SaliencySettingsError("saliency_steps", f"({self.saliency_steps}) must not exceed steps ({self.steps})")
        if self.cfg < 0:
            raise SaliencySettingsError("cfg", f"must be >= 0, got {self.cfg}")
        if not 0.0 < self.r1 <= 1.0:
            raise SaliencySettingsError("r1", f"must be in (0, 1], got {self.r1}")
        if self.mode not in MODES:
            raise SaliencySettingsError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise SaliencySettingsError("target", f"must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.scheduler not in comfy.samplers.KSampler.SCHEDULERS:
            raise SaliencySettingsError("scheduler", f"'{self.scheduler}' is not a ComfyUI scheduler")
        check_sampler(self.sampler_name)
        for name in ("width", "height"):
            v = getattr(self, name)
            if not 8 <= v <= MAX_SIDE or v % 8:
                raise SaliencySettingsError(name, f"must be a multiple of 8 from 8 to {MAX_SIDE} for saliency, got {v} "
                                            "(the paper uses 512; SDXL's native size is 1024)")
        if on_cpu and self.width * self.height > MAX_CPU_PIXELS:
            raise SaliencySettingsError(
                "width", f"x height ({self.width} x {self.height}) is too large for saliency on a CPU (at most "
                f"{MAX_CPU_PIXELS} pixels, e.g. 1024 x 1024): one model call would take minutes and could not be "
                "interrupted. Lower width/height (the paper uses 512 x 512).")
