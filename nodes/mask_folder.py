"""The ``fia_masks`` model folder (models/fia_masks), registered without overwriting a
user's own paths (extra_model_paths.yaml may already list it)."""
from __future__ import annotations

import os

import folder_paths

FOLDER = "fia_masks"
EXTENSIONS = {".safetensors"}


def register() -> None:
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        if exts is not None:
            exts.update(EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def mask_names() -> list[str]:
    register()
    return folder_paths.get_filename_list(FOLDER)


def save_dir() -> str:
    register()
    return folder_paths.get_folder_paths(FOLDER)[0]
