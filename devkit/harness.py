"""The one entry point of tests into devkit: ``from devkit import harness as H``.

Re-exports the public names of :mod:`devkit.comfyui` (locating and importing ComfyUI,
loading the pack), :mod:`devkit.zoo` (tiny models and helpers to run them) and
:mod:`devkit.server` (ComfyServer, chromium_path), so a test reads ``H.tiny_sd15_model``,
``H.encode``, ``H.sample``, ``H.ComfyServer``, ``H.load_pack``, ... Import the modules
themselves where only one concern is needed (benchmarks and the demo do).
"""
from __future__ import annotations

from .comfyui import (  # noqa: F401
    COMFYUI_VERSION, DEFAULT_VERSION, REPO_ROOT, SUPPORTED_VERSIONS, TESTS_DIR,
    ComfyUINotFound, cache_dir, comfyui_path, comfyui_version, import_comfy,
    installed_version, load_pack, pack_module_name, set_base_directory, use_cpu,
    version_tuple,
)
from .server import (  # noqa: F401
    PACK_DIR_NAME, TINY_MODELS_PACKAGE, ComfyServer, ComfyServerError, chromium_path,
    free_port, sd15_api_graph,
)
from .zoo import (  # noqa: F401
    TINY_CLIP_L, TINY_SD15_FFN2_COUNT, TINY_SD15_UNET, TINY_SDXL_CLIP_G, TINY_SDXL_CLIP_L,
    TINY_SDXL_FFN2_COUNT, TINY_SDXL_POOLED_DIM, TINY_SDXL_UNET, clip_model_class,
    effective_weight, empty_latent, encode, ffn2_keys, ffn2_modules, fill_weights_,
    make_clip, model_config_class, register_for_detection,
    register_tiny_models_for_detection, sample, save_tiny_checkpoint, tiny_classes,
    tiny_clip, tiny_sd15_model, tiny_sdxl_clip, tiny_sdxl_model, tiny_vae,
)
