"""Stage 3 node: multi-concept fusion with concept-agnostic retention (Eq. 7-8)."""
from __future__ import annotations

from ..fia_core import fuse_masks
from .common import MASK, FIAError, NodeRun, alpha_input, check_inputs, fusion_input
from .report import mask_summary


class FIAFuseMasks:
    DESCRIPTION = ("Stage 3 of Forget-It-All: fuses concept masks into one prune mask. Connections selected by "
                   "many concepts are concept-agnostic and kept (Eq. 7-8); the rest are pruned. Connect a mask to "
                   "the last input and a new one appears.")
    CATEGORY = "FIA/unlearning"
    FUNCTION = "fuse"
    RETURN_TYPES = (MASK,)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The fused prune mask, with the concept-agnostic count in its stats.",)

    @classmethod
    def INPUT_TYPES(cls):
        tip = "A concept mask (or a fused mask: its concepts are re-fused)."
        return {
            "required": {
                "mask_1": (MASK, {"tooltip": tip}),
                "alpha": alpha_input(),
                "fusion": fusion_input(),
            },
            # mask_3, mask_4, ... are added by the frontend and arrive through **more
            "optional": {"mask_2": (MASK, {"tooltip": tip})},
        }

    def fuse(self, mask_1, alpha, fusion="concept-agnostic", **more):
        node = "FIAFuseMasks"
        names = sorted((k for k in more if k.startswith("mask_") and more[k] is not None),
                       key=lambda k: int(k.split("_")[1]) if k.split("_")[1].isdigit() else 1 << 30)
        masks = [mask_1] + [more[k] for k in names]
        with NodeRun(node) as run:
            check_inputs(node, self.INPUT_TYPES(), {"alpha": alpha, "fusion": fusion})
            try:
                fused = fuse_masks(masks, None if fusion == "union" else alpha)
            except TypeError as e:  # something else than a mask on a mask input
                raise FIAError(f"{node}: {e}") from None
            summary = run.summary(mask_summary(fused))
        return {"ui": {"fia_summary": [summary]}, "result": (fused,)}
