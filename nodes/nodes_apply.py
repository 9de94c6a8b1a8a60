"""Applying masks: the non-destructive patch node and the one-node common case."""
from __future__ import annotations

import logging
import re

from ..fia_core import fuse_masks
from .comfy_adapter import abs_weights, apply_mask, target_layers
from .common import (MASK, FIAInputError, alpha_input, fusion_input, progress_bar, r1_input, r2_input,
                     sampling_inputs, settings_from, template_inputs)
from .nodes_saliency import make_pairs
from .report import short_summary, summary_line
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
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "1 zeroes the masked connections (the paper); 0 leaves the model "
                                              "unchanged; in between scales them down."}),
        }}

    def apply(self, model, mask, strength):
        return (apply_mask(model, mask, strength, node="FIAApplyMask"),)


_R2_SUFFIX = re.compile(r"^(?P<concept>.+?)\s*:\s*(?P<r2>[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)\s*$")


def parse_concepts(text: str, default_r2: float, node: str = "FIAForgetConcepts") -> list[tuple[str, float]]:
    """One concept per line, optionally 'concept: r2'. Empty lines are skipped; duplicates refused."""
    out: list[tuple[str, float]] = []
    seen = set()
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        m = _R2_SUFFIX.match(line)
        concept, r2 = (m["concept"].strip(), float(m["r2"])) if m else (line, default_r2)
        if not 0.0 < r2 <= 0.5:
            raise FIAInputError(node, "concepts", f"line {number} ('{line}'): r2 must be in (0, 0.5], got {r2}")
        if concept.lower() in seen:
            raise FIAInputError(node, "concepts", f"line {number}: '{concept}' is listed twice")
        seen.add(concept.lower())
        out.append((concept, r2))
    if not out:
        raise FIAInputError(node, "concepts", "is empty: list the concepts to erase, one per line")
    return out


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
                                                   "that line (e.g. 'parachute: 0.03')."}),
                **template_inputs(),
                "r1": r1_input(),
                "r2": r2_input(),
                "alpha": alpha_input(),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "1 zeroes the pruned connections (the paper)."}),
                "fusion": fusion_input(),
                **sampling_inputs(),
            },
        }

    def forget(self, model, clip, concepts, template, r1, r2, alpha, strength, fusion="concept-agnostic", **kwargs):
        node = "FIAForgetConcepts"
        items = parse_concepts(concepts, r2, node)
        settings = settings_from(node, kwargs, r1)
        bar = progress_bar(len(items) * settings.saliency_steps)
        # held for the loop: every concept shares |W| and its per-model column order
        weight_abs = abs_weights(model, target_layers(model, settings.target))
        masks, notes = [], []
        for n, (concept, concept_r2) in enumerate(items):
            pairs = make_pairs(node, concept, template, kwargs["num_prompts"], kwargs["seed"])

            def progress(done, total, n=n):
                bar(n * settings.saliency_steps + done * settings.saliency_steps // max(1, total),
                    len(items) * settings.saliency_steps)

            run = concept_saliency(model, clip, concept, pairs, settings, progress=progress)
            saliency = run.saliency
            notes += [f"{concept}: {note}" for note in run.notes]
            masks.append(saliency.select(r2=concept_r2))
            del saliency  # one concept's saliency at a time: memory stays flat in the concept count
        del weight_abs
        fused = fuse_masks(masks, None if fusion == "union" else alpha)
        log.info("FIA: %s", summary_line(fused))
        patched = apply_mask(model, fused, strength, node=node)
        return {"ui": {"fia_summary": [{**short_summary(fused), "warnings": notes}]}, "result": (patched, fused)}
