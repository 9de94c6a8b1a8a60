"""Mask files (models/fia_masks) and the mask report node."""
from __future__ import annotations

import logging
import os

import folder_paths

from ..fia_core import MaskFileError, load_mask, save_mask
from .common import MASK
from .mask_folder import FOLDER, mask_names, save_dir
from .report import layer_chart, short_summary, text_report

log = logging.getLogger(__name__)


class FIASaveMask:
    DESCRIPTION = "Saves an FIA mask (a few hundred KB, safetensors) to models/fia_masks to share or reuse it."
    CATEGORY = "FIA/unlearning/io"
    FUNCTION = "save"
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mask": (MASK, {"tooltip": "The mask to save."}),
            "filename_prefix": ("STRING", {"default": "fia_mask",
                                           "tooltip": "File name prefix inside models/fia_masks; a counter is "
                                                      "appended. Subfolders allowed, no path escapes."}),
        }}

    def save(self, mask, filename_prefix):
        root = save_dir()
        os.makedirs(root, exist_ok=True)
        prefix = (filename_prefix or "").strip() or "fia_mask"
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
        except Exception as e:  # ComfyUI raises a bare Exception for a path escaping the folder
            raise ValueError(f"FIASaveMask: input 'filename_prefix' {prefix!r} is not a file name inside "
                             f"models/{FOLDER} ({e})") from None
        os.makedirs(folder, exist_ok=True)
        file = f"{name}_{counter:05}_.safetensors"
        save_mask(mask, os.path.join(folder, file))
        rel = os.path.join(subfolder, file) if subfolder else file
        log.info("FIA: saved mask to %s", os.path.join(folder, file))
        return {"ui": {"fia_summary": [dict(short_summary(mask), file=rel)]}}


class FIALoadMask:
    DESCRIPTION = "Loads an FIA mask from models/fia_masks (validated; never unpickled)."
    CATEGORY = "FIA/unlearning/io"
    FUNCTION = "load"
    RETURN_TYPES = (MASK,)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("The loaded mask; apply it with FIA Apply Mask.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask_name": (mask_names(), {"tooltip": "A mask file in models/fia_masks."})}}

    def load(self, mask_name):
        path = folder_paths.get_full_path_or_raise(FOLDER, mask_name)
        try:
            mask = load_mask(path)
        except MaskFileError as e:
            raise ValueError(f"FIALoadMask: input 'mask_name': {e}") from None
        return {"ui": {"fia_summary": [short_summary(mask)]}, "result": (mask,)}


class FIAMaskInfo:
    DESCRIPTION = "Shows what a mask prunes: a text report per layer and a chart of the pruned fraction per layer."
    CATEGORY = "FIA/unlearning/io"
    FUNCTION = "info"
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "chart")
    OUTPUT_TOOLTIPS = ("Text report: concepts, parameters, per-layer pruned counts and agnostic neurons kept.",
                       "Bar chart of the pruned fraction per layer.")
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": (MASK, {"tooltip": "A concept or fused mask."})}}

    def info(self, mask):
        report = text_report(mask)
        return {"ui": {"text": [report], "fia_summary": [short_summary(mask)]}, "result": (report, layer_chart(mask))}
