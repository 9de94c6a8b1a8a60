"""Mask files (models/fia_masks) and the mask report node."""
from __future__ import annotations

import logging
import os

import folder_paths

from ..fia_core import load_mask, save_mask
from .common import MASK, FIAInputError, NodeRun, check_file_prefix
from .mask_folder import FOLDER, mask_names, save_dir
from .report import layer_chart, mask_summary, text_report

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
        node, name = "FIASaveMask", "filename_prefix"
        with NodeRun(node) as run:
            root = save_dir()
            prefix = check_file_prefix(node, name, (filename_prefix or "").strip() or "fia_mask")
            try:
                folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, root)
            except Exception as e:  # ComfyUI raises a bare Exception for a path escaping the folder
                raise FIAInputError(node, name, f"{prefix!r} is not a file name inside models/{FOLDER} ({e})") from None
            file = f"{stem}_{counter:05}_.safetensors"
            path = os.path.join(folder, file)
            try:
                os.makedirs(folder, exist_ok=True)
                save_mask(mask, path)
            except Exception as e:  # OSError, safetensors' own error type: the file system said no
                raise FIAInputError(node, name, f"{prefix!r}: the mask could not be written to models/{FOLDER} "
                                                f"({type(e).__name__}: {e})") from None
            rel = os.path.join(subfolder, file) if subfolder else file
            log.info("FIA: saved mask to %s", path)
            summary = run.summary(dict(mask_summary(mask), file=rel))
        return {"ui": {"fia_summary": [summary]}}


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
        node, name = "FIALoadMask", "mask_name"
        with NodeRun(node) as run:
            path = folder_paths.get_full_path(FOLDER, mask_name) if mask_name else None
            if path is None:
                raise FIAInputError(node, name, f"{mask_name!r} is not a file in models/{FOLDER}")
            try:
                mask = load_mask(path)
            except Exception as e:  # MaskFileError says why; anything else is a damaged file too
                why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                raise FIAInputError(node, name, f"{mask_name!r} cannot be used: {why}") from None
            summary = run.summary(mask_summary(mask))
        return {"ui": {"fia_summary": [summary]}, "result": (mask,)}


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
        with NodeRun("FIAMaskInfo") as run:
            report = text_report(mask)
            summary = run.summary(mask_summary(mask))
        return {"ui": {"text": [report], "fia_summary": [summary]}, "result": (report, layer_chart(mask))}
