"""Stage 1-2 nodes: concept saliency (Eq. 1-2) and the concept mask (Eq. 3-6)."""
from __future__ import annotations

import logging

from ..fia_core import ConceptSaliency
from ..fia_core.prompts import build_prompt_pairs
from .common import MASK, SALIENCY, FIAInputError, progress_bar, r1_input, r2_input, sampling_inputs, settings_from, split_lines, template_inputs
from .report import short_summary, summary_line
from .saliency import concept_saliency

log = logging.getLogger(__name__)


def make_pairs(node: str, concept: str, template: str, num_prompts: int, seed: int,
               custom_template: str = "", base_prompts: str = ""):
    if not concept.strip():
        raise FIAInputError(node, "concept", "is empty: type the concept to erase, e.g. 'golf ball'")
    if template == "custom" and "{concept}" not in (custom_template or ""):
        raise FIAInputError(node, "custom_template", 'must contain "{concept}" when template is custom, '
                                                      'e.g. "a {concept} in a {place}"')
    try:
        return build_prompt_pairs(concept.strip(), template, num_prompts, seed,
                                  custom_template or None, split_lines(base_prompts) or None)
    except ValueError as e:
        raise FIAInputError(node, "template", f"could not build prompts: {e}") from None


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
            "optional": {
                "custom_template": ("STRING", {"default": "", "multiline": False,
                                               "tooltip": "Used when template is custom: must contain {concept}; may use "
                                                          "{place}, {person} or {object}."}),
                "base_prompts": ("STRING", {"default": "", "multiline": True,
                                            "tooltip": "Optional base prompts, one per line (the context without the "
                                                       "concept); they replace the template's base side."}),
            },
        }

    def compute(self, model, clip, concept, template, r1, custom_template="", base_prompts="", **kwargs):
        node = "FIAConceptSaliency"
        pairs = make_pairs(node, concept, template, kwargs["num_prompts"], kwargs["seed"], custom_template, base_prompts)
        settings = settings_from(node, kwargs, r1)
        run = concept_saliency(model, clip, concept.strip(), pairs, settings,
                               progress=progress_bar(settings.saliency_steps))
        saliency, cached = run.saliency, run.cached
        text = f"{concept.strip()}: {len(pairs)} prompt pairs, {settings.saliency_steps} steps, {settings.mode}" + \
               (" (cached)" if cached else "")
        return {"ui": {"fia_summary": [{"text": text, "cached": cached, "warnings": list(run.notes)}]},
                "result": (saliency,)}


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

    def build(self, saliency: ConceptSaliency, r2: float):
        mask = saliency.select(r2=r2, progress=progress_bar(len(saliency.layer_shapes)))
        log.info("FIA: %s", summary_line(mask))
        return {"ui": {"fia_summary": [short_summary(mask)]}, "result": (mask,)}
