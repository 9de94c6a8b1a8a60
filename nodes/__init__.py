"""ComfyUI glue for FIA: node classes, model-patcher adapters and the saliency runner."""
from .mask_folder import register as _register_mask_folder
from .nodes_apply import FIAApplyMask, FIAForgetConcepts
from .nodes_fusion import FIAFuseMasks
from .nodes_io import FIALoadMask, FIAMaskInfo, FIASaveMask
from .nodes_saliency import FIABuildConceptMask, FIAConceptSaliency
from . import routes  # noqa: F401  (POST /fia/check_concepts; a no-op without a running server)

_register_mask_folder()

NODE_CLASS_MAPPINGS = {
    "FIAConceptSaliency": FIAConceptSaliency,
    "FIABuildConceptMask": FIABuildConceptMask,
    "FIAFuseMasks": FIAFuseMasks,
    "FIAApplyMask": FIAApplyMask,
    "FIAForgetConcepts": FIAForgetConcepts,
    "FIASaveMask": FIASaveMask,
    "FIALoadMask": FIALoadMask,
    "FIAMaskInfo": FIAMaskInfo,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FIAConceptSaliency": "FIA Concept Saliency",
    "FIABuildConceptMask": "FIA Build Concept Mask",
    "FIAFuseMasks": "FIA Fuse Masks",
    "FIAApplyMask": "FIA Apply Mask",
    "FIAForgetConcepts": "FIA Forget Concepts",
    "FIASaveMask": "FIA Save Mask",
    "FIALoadMask": "FIA Load Mask",
    "FIAMaskInfo": "FIA Mask Info",
}
