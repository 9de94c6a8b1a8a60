"""Stage 1-2 nodes: concept saliency (Eq. 1-2) and the concept mask (Eq. 3-6)."""
from __future__ import annotations

import logging

from ..fia_core import select_concept_mask
from .common import (MASK, SALIENCY, NodeRun, check_inputs, concept_name, custom_prompt_inputs, make_pairs,
                     progress_bar, r1_input, r2_input, sampling_inputs, settings_from, template_inputs,
                     validate_sampler)
from .report import mask_summary, summary_line
from .saliency import concept_saliency

log = logging.getLogger(__name__)


class FIAConceptSaliency:
    DESCRIPTION = ("Stage 1 of Forget-It-All: samples the first saliency_steps of the schedule for paired "
                   "concept/base prompts and measures which FFN connections respond to the concept "
                   "(contrastive saliency, Eq. 1-2). Cached on disk: re-running with the same inputs is instant.")
    CATEGORY = "FIA/unlearning"
    FUNCTION = "compute"
    RETURN_TYPES = (SALIENCY,)
    RETURN_NAMES = ("saliency",)
    OUTPUT_TOOLTIPS = ("Contrastive saliency of the concept; feed it to FIA Build Concept Mask (changing r2 there "
                       "does not re-run this node).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to analyse (SD1.x, SD2.x, SDXL UNets)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
                "concept": ("STRING", {"default": "golf ball", "multiline": False,
                                       "tooltip": "The concept to erase, e.g. 'golf ball', 'Van Gogh', 'naked'."}),
                **template_inputs(),
                "r1": r1_input(),
                **sampling_inputs(),
            },
            "optional": custom_prompt_inputs(),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_name=None):
        return validate_sampler(sampler_name)

    def compute(self, model, clip, concept, template, r1, custom_template="", base_prompts="", **kwargs):
        node = "FIAConceptSaliency"
        with NodeRun(node) as run:
            check_inputs(node, self.INPUT_TYPES(), dict(template=template, r1=r1, **kwargs))
            name = concept_name(node, concept)
            pairs = make_pairs(node, name, template, kwargs["num_prompts"], kwargs["seed"], custom_template,
                               base_prompts)
            settings = settings_from(node, kwargs, r1)
            done = concept_saliency(model, clip, name, pairs, settings, progress=progress_bar(settings.saliency_steps))
            text = f"{name}: {len(pairs)} prompt pairs, {settings.saliency_steps} steps, {settings.mode}" + \
                   (" (cached)" if done.cached else "")
            summary = run.summary({"text": text, "cached": done.cached}, done.notes)
        return {"ui": {"fia_summary": [summary]}, "result": (done.saliency,)}


class FIABuildConceptMask:
    DESCRIPTION = ("Stage 2 of Forget-It-All: turns a concept's saliency into its concept-sensitive neurons "
                   "(Eq. 3-6: time-integrated sensitivity, then channel and layer top-r2). Fast; no sampling.")
    CATEGORY = "FIA/unlearning"
    FUNCTION = "build"
    RETURN_TYPES = (MASK,)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The concept mask; fuse several with FIA Fuse Masks or apply it with FIA Apply Mask.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "saliency": (SALIENCY, {"tooltip": "Output of FIA Concept Saliency."}),
            "r2": r2_input(),
        }}

    def build(self, saliency, r2: float):
        node = "FIABuildConceptMask"
        with NodeRun(node) as run:
            check_inputs(node, self.INPUT_TYPES(), {"r2": r2})
            mask = select_concept_mask(saliency, r2, progress=progress_bar(len(saliency.layer_shapes)))
            log.info("FIA: %s", summary_line(mask))
            summary = run.summary(mask_summary(mask))
        return {"ui": {"fia_summary": [summary]}, "result": (mask,)}
