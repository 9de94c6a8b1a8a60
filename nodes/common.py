"""Shared input definitions and parsing for the FIA nodes (paper defaults, Appendix B)."""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..fia_core.prompts import TEMPLATES
from .saliency_settings import SaliencySettings, SaliencySettingsError

SALIENCY = "FIA_SALIENCY"
MASK = "FIA_MASK"
TEMPLATE_CHOICES = list(TEMPLATES) + ["custom"]
MAX_RESOLUTION = 8192


class FIAInputError(ValueError):
    """Bad node input: the message names the node, the input and what was expected."""

    def __init__(self, node: str, name: str, expected: str):
        super().__init__(f"{node}: input '{name}' {expected}")


def r1_input():
    return ("FLOAT", {"default": 0.05, "min": 0.001, "max": 1.0, "step": 0.001,
                      "tooltip": "r1 - temporal sparsity (Eq. 3): fraction of connections per step counted "
                                 "as active. Paper: 0.05 (0.06 for 'sexual')."})


def r2_input(default: float = 0.01):
    return ("FLOAT", {"default": default, "min": 0.0001, "max": 0.5, "step": 0.0001,
                      "tooltip": "r2 - spatial sparsity (Eq. 4-5): fraction of each row and of the layer that "
                                 "may be selected. Paper: 0.01 objects (0.007 easy, 0.03 hard), 0.02 art styles "
                                 "(0.03 Van Gogh)."})


def alpha_input():
    return ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01,
                      "tooltip": "alpha - concept-agnostic threshold (Eq. 8): connections chosen by at least "
                                 "max(2, ceil(alpha x concepts)) concepts are kept. Paper: 0.6 objects/nudity, "
                                 "0.8 art styles."})


def fusion_input():
    return (["concept-agnostic", "union"], {"default": "concept-agnostic",
            "tooltip": "concept-agnostic: keep connections shared by many concepts (Eq. 7-8, the paper). "
                       "union: prune every selected connection (naive baseline, for comparison)."})


def template_inputs() -> dict:
    return {
        "template": (TEMPLATE_CHOICES, {"default": "objects",
                     "tooltip": "Prompt template (paper Table 6): objects 'a <concept> in a <place>' vs 'a <place>'; "
                                "art_style 'a <object> in the style of <concept>' vs 'a <object>'; explicit "
                                "'a photo of a <concept> <person>' vs 'a photo of a <person>'; custom uses custom_template."}),
    }


def sampling_inputs() -> dict:
    """Inputs that define the saliency sampling run (all part of the cache key)."""
    return {
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                          "tooltip": "Length of the sampling schedule the saliency steps are taken from (paper: 50)."}),
        "saliency_steps": ("INT", {"default": 10, "min": 1, "max": 1000,
                                   "tooltip": "T - how many first steps of the schedule are sampled and recorded "
                                              "(paper: 10). The rest of the schedule is never run."}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale of the saliency run (paper: 7.5). "
                                     "Only the conditional branch is recorded."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                         "tooltip": "Sampler of the saliency run."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal",
                      "tooltip": "Noise schedule of the saliency run."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                         "tooltip": "Seed of the starting noise (a concept prompt and its base prompt share it) "
                                    "and of the prompt placeholder choice."}),
        "width": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                          "tooltip": "Image width of the saliency run (SD1.5: 512, SDXL: 1024)."}),
        "height": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                           "tooltip": "Image height of the saliency run."}),
        "mode": (["fast", "exact"], {"default": "fast",
                 "tooltip": "fast: the reference code's Wanda-style statistic (|W| x token-normalised input norm), "
                            "tiny memory. exact: Eq. 1 with the cosine term; every prompt in one batch and "
                            "about five layer-size float32 tensors of extra memory."}),
        "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                               "tooltip": "Prompt pairs per sampling batch (rows = 2 x batch_size, x2 with CFG). "
                                          "Lower it if you run out of VRAM; results do not change."}),
        "num_prompts": ("INT", {"default": 8, "min": 2, "max": 512,
                                "tooltip": "Concept/base prompt pairs per concept (placeholders from paper Table 7)."}),
    }


def settings_from(node: str, kwargs: dict, r1: float) -> SaliencySettings:
    if kwargs["saliency_steps"] > kwargs["steps"]:
        raise FIAInputError(node, "saliency_steps", f"({kwargs['saliency_steps']}) must not exceed steps ({kwargs['steps']})")
    settings = SaliencySettings(
        steps=kwargs["steps"], saliency_steps=kwargs["saliency_steps"], cfg=kwargs["cfg"],
        sampler_name=kwargs["sampler_name"], scheduler=kwargs["scheduler"], seed=kwargs["seed"],
        width=kwargs["width"], height=kwargs["height"], mode=kwargs["mode"], batch_size=kwargs["batch_size"],
        r1=r1,
    )
    try:
        settings.validate()
    except SaliencySettingsError as e:
        raise FIAInputError(node, e.input_name, e.expected) from None
    return settings


def progress_bar(total: int):
    """A (done, total) callback that drives a ComfyUI progress bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(max(1, total))

    def update(done: int, of: int) -> None:
        bar.update_absolute(done, of)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return update


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]
