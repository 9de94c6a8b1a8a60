"""Applying masks: the non-destructive patch node and the one-node common case."""
from __future__ import annotations

import logging

from ..fia_core import fuse_masks, mask_warnings, select_concept_mask
from .comfy_adapter import abs_weights, apply_mask, target_layers
from .common import (MASK, NodeRun, alpha_input, check_inputs, concept_entries, custom_prompt_inputs,
                     fusion_input, make_pairs, progress_bar, r1_input, r2_input, sampling_inputs, settings_from,
                     strength_input, template_inputs, validate_sampler)
from .report import mask_summary, summary_line
from .saliency import concept_saliency

log = logging.getLogger(__name__)


class FIAApplyMask:
    DESCRIPTION = ("Applies an FIA mask to a model: W <- W x (1 - strength x M) on the masked FFN connections. "
                   "Returns a patched copy like a LoRA loader does; the input model is never modified.")
    CATEGORY = "FIA/unlearning"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the concepts erased.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to erase concepts from (the one the mask was built on)."}),
            "mask": (MASK, {"tooltip": "A concept or fused mask (FIA Fuse Masks, FIA Load Mask)."}),
            "strength": strength_input("1 zeroes the masked connections (the paper); 0 leaves the model "
                                       "unchanged; in between scales them down."),
        }}

    def apply(self, model, mask, strength):
        node = "FIAApplyMask"
        with NodeRun(node) as run:
            check_inputs(node, self.INPUT_TYPES(), {"strength": strength})
            patched = apply_mask(model, mask, strength, node=node)
            # the summary also carries what apply_mask logged (a mask built on another checkpoint)
            summary = run.summary(mask_summary(mask))
        return {"ui": {"fia_summary": [summary]}, "result": (patched,)}


class FIAForgetConcepts:
    DESCRIPTION = ("Forget-It-All in one node: for each listed concept, saliency (Eq. 1-2) and its concept mask "
                   "(Eq. 3-6); then fusion with concept-agnostic retention (Eq. 7-8) and a non-destructive patch. "
                   "Saliency is cached, so changing r2, alpha or strength re-runs no sampling.")
    CATEGORY = "FIA/unlearning"
    FUNCTION = "forget"
    RETURN_TYPES = ("MODEL", MASK)
    RETURN_NAMES = ("model", "mask")
    OUTPUT_TOOLTIPS = ("The model with the concepts erased (a patched copy).",
                       "The fused mask: save it with FIA Save Mask or inspect it with FIA Mask Info.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x, SDXL UNets)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
                "concepts": ("STRING", {"default": "golf ball\nparachute: 0.03", "multiline": True,
                                        "tooltip": "Concepts to erase, one per line. 'concept: r2' overrides r2 for "
                                                   "that line (e.g. 'parachute: 0.03'); a concept that itself ends "
                                                   "in ': <number>' goes in double quotes (\"Area: 51\": 0.02)."}),
                **template_inputs(),
                "r1": r1_input(),
                "r2": r2_input(),
                "alpha": alpha_input(),
                "strength": strength_input("1 zeroes the pruned connections (the paper)."),
                "fusion": fusion_input(),
                **sampling_inputs(),
            },
            "optional": custom_prompt_inputs(),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, sampler_name=None):
        return validate_sampler(sampler_name)

    def forget(self, model, clip, concepts, template, r1, r2, alpha, strength, fusion="concept-agnostic",
               custom_template="", base_prompts="", **kwargs):
        node = "FIAForgetConcepts"
        with NodeRun(node) as run:
            check_inputs(node, self.INPUT_TYPES(), dict(template=template, r1=r1, r2=r2, alpha=alpha,
                                                        strength=strength, fusion=fusion, **kwargs))
            entries = concept_entries(node, concepts, r2)
            settings = settings_from(node, kwargs, r1)
            pairs = [make_pairs(node, e.name, template, kwargs["num_prompts"], kwargs["seed"], custom_template,
                                base_prompts) for e in entries]
            steps = settings.saliency_steps
            bar = progress_bar(len(entries) * steps)
            # held to the end: every concept and the patch share |W| and its per-model column order
            weight_abs = abs_weights(model, target_layers(model, settings.target))
            masks, cached, notes = [], [], []
            for n, (entry, concept_pairs) in enumerate(zip(entries, pairs)):
                def progress(done, total, n=n):
                    bar(n * steps + done * steps // max(1, total), len(entries) * steps)

                done = concept_saliency(model, clip, entry.name, concept_pairs, settings, progress=progress)
                if done.cached:
                    cached.append(entry.name)
                notes.extend(n_ if entry.name in n_ else f"{entry.name}: {n_}" for n_ in done.notes)
                masks.append(select_concept_mask(done.saliency, entry.r2))
                notes.extend(mask_warnings(masks[-1]))
                del done  # one concept's saliency at a time: memory stays flat in the concept count
            fused = fuse_masks(masks, None if fusion == "union" else alpha)
            log.info("FIA: %s", summary_line(fused))
            patched = apply_mask(model, fused, strength, node=node)
            del weight_abs
            summary = run.summary(dict(mask_summary(fused, notes), cached=cached))
        return {"ui": {"fia_summary": [summary]}, "result": (patched, fused)}
