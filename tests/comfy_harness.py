"""A real ComfyUI for tests, and tiny models built through ComfyUI's own classes.

Plain module (stdlib imports only at module level) used by ``tests/`` and by
``benchmarks/`` scripts. Nothing here mocks ``comfy.*``: tests run upstream ComfyUI
in-process (:func:`import_comfy`) or as a real ``main.py`` server (:class:`ComfyServer`).

Where ComfyUI comes from (:func:`comfyui_path`)
    1. the ComfyUI this pack is installed in (repo at ``<ComfyUI>/custom_nodes/<pack>``),
    2. ``$COMFYUI_PATH``,
    3. ``${FIA_CACHE:-~/.cache/fia-comfyui}/ComfyUI-0.3.75``, fetched by
       ``tests/setup_env.sh`` when missing.
The ComfyUI tree is never written: bytecode writing is switched off and every
folder_paths directory (models, input, output, temp, user, custom_nodes) is moved to
a temporary base directory.

Tiny models (deterministic: comfy ops skip weight init, so every weight is filled
from a seeded ``torch.Generator`` by :func:`fill_weights_`)
    * :func:`tiny_sd15_model`  SD1.5-shaped UNet, ~1 M params, 7 FFN2 layers.
    * :func:`tiny_sdxl_model`  SDXL-shaped UNet (two transformer blocks per attention
      level, ADM input fed by ``pooled_output``), 8 FFN2 layers.
    * :func:`tiny_clip` / :func:`tiny_sdxl_clip`  real SD1 / SDXL tokenizers with tiny
      text transformers; context dims 64 / 64, pooled dims 64 / 32.
    * :func:`tiny_vae`  a TAESD-shaped VAE (ComfyUI detects it from its keys).

Checkpoints for server tests
    ComfyUI's model detection accepts SD15 only with model_channels 320 and
    context_dim 768, and ``SD15.clip_target`` always builds a full CLIP-L (124 M
    params) whatever the checkpoint holds. The chosen approach keeps everything tiny:
    test-only config classes :class:`TinySD15` / :class:`TinySDXL` subclass
    ``comfy.supported_models.SD15`` / ``SDXL``, match only the tiny UNet shapes and
    return tiny CLIP targets from ``clip_target``; :func:`register_tiny_models_for_detection`
    puts them at the front of ``comfy.supported_models.models``. In-process that call
    is enough; for a server, :class:`ComfyServer` (``tiny_models=True``, the default)
    writes a throw-away package ``fia_test_tiny_models`` into ``BASE/custom_nodes``
    that imports this module and makes the same call at server start. Nothing of it
    lives in the ComfyUI tree or ships with the pack.
    :func:`save_tiny_checkpoint` writes the checkpoint with ``comfy.sd.save_checkpoint``
    (UNet under ``model.diffusion_model.``, tiny CLIP under ``cond_stage_model.`` for
    SD15 / ``conditioner.embedders.*`` for SDXL, TAESD under ``first_stage_model.``),
    so CheckpointLoaderSimple loads MODEL, CLIP and VAE of about 7 M params in total
    (most of it the 49408-token embedding table) in well under a second.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# The repository as imported (symlinks kept): a pack symlinked into custom_nodes.
_REPO_AS_IMPORTED = Path(os.path.abspath(__file__)).parent.parent
COMFYUI_VERSION = "0.3.75"
#: Folder name the pack gets inside ``BASE/custom_nodes`` of a test server (the key of
#: the pack in ``/api/workflow_templates`` and in ``/extensions/<name>/``).
PACK_DIR_NAME = os.environ.get("FIA_PACK_DIR_NAME", "ComfyUI-FIA")
#: Name of the generated test-only package that registers the tiny model configs.
TINY_MODELS_PACKAGE = "fia_test_tiny_models"


class ComfyUINotFound(RuntimeError):
    """ComfyUI could not be located or imported."""


class ComfyServerError(RuntimeError):
    """A ComfyServer request, start or prompt failed (message holds the log tail)."""


# ---------------------------------------------------------------------------------
# Locating and importing ComfyUI
# ---------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$FIA_CACHE`` or ``~/.cache/fia-comfyui``: venv and ComfyUI live there."""
    return Path(os.environ.get("FIA_CACHE") or Path.home() / ".cache" / "fia-comfyui")


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_path(fetch: bool = True) -> Path:
    """The ComfyUI directory tests run against.

    The enclosing ComfyUI when this repository sits in ``<ComfyUI>/custom_nodes/<pack>``
    (symlinked or not), else ``$COMFYUI_PATH``, else the cached ComfyUI 0.3.75, which
    ``tests/setup_env.sh`` fetches when it is missing and ``fetch`` is true.
    Raises :class:`ComfyUINotFound`.
    """
    for repo in (_REPO_AS_IMPORTED, REPO_ROOT):
        if repo.parent.name == "custom_nodes" and _is_comfyui(repo.parent.parent):
            return repo.parent.parent
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser()
        if not _is_comfyui(p):
            raise ComfyUINotFound(f"$COMFYUI_PATH={env} holds no ComfyUI (main.py + comfy/)")
        return p
    p = cache_dir() / f"ComfyUI-{COMFYUI_VERSION}"
    if not _is_comfyui(p) and fetch:
        log.info("ComfyUI not found at %s; running tests/setup_env.sh", p)
        r = subprocess.run(["bash", str(TESTS_DIR / "setup_env.sh")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            raise ComfyUINotFound(f"tests/setup_env.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if not _is_comfyui(p):
        raise ComfyUINotFound(f"no ComfyUI at {p} (run: bash tests/setup_env.sh)")
    return p


def use_cpu() -> bool:
    """Tests force ComfyUI onto the CPU unless ``FIA_TEST_GPU=1``."""
    return os.environ.get("FIA_TEST_GPU", "") not in ("1", "true", "yes")


_COMFY: types.SimpleNamespace | None = None


def import_comfy(base_directory: str | os.PathLike | None = None) -> types.SimpleNamespace:
    """Import upstream ComfyUI into this process, once; later calls return the same.

    Follows the order ComfyUI needs: ComfyUI root first on sys.path,
    ``args.cpu = True`` (unless ``FIA_TEST_GPU=1``) before ``comfy.model_management``,
    ``utils.install_util`` before ``nodes`` (``nodes`` puts ``comfy/`` first on
    sys.path, after which ``utils`` would be ``comfy/utils.py``). Bytecode writing is
    switched off so the ComfyUI tree stays untouched. ``init_extra_nodes`` is not run:
    only the core nodes of ``nodes.py`` are registered.

    ``base_directory``: see :func:`set_base_directory` (call it before anything writes).

    Returns a namespace with ``nodes``, ``comfy`` (the package, submodules imported:
    sd, sample, samplers, model_base, model_patcher, model_management, supported_models,
    sd1_clip, sdxl_clip, utils, patcher_extension, weight_adapter, lora), ``folder_paths``,
    ``args`` and ``path`` (the ComfyUI directory).
    Raises :class:`ComfyUINotFound` when ComfyUI is missing or fails to import.
    """
    global _COMFY
    if _COMFY is None:
        _COMFY = _do_import_comfy()
    if base_directory is not None:
        set_base_directory(base_directory)
    return _COMFY


def _do_import_comfy() -> types.SimpleNamespace:
    root = comfyui_path()
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    rs = str(root)
    while rs in sys.path:
        sys.path.remove(rs)
    sys.path.insert(0, rs)
    try:
        # The pack has a nodes/ package: an earlier `import nodes` would have found it.
        stale = sys.modules.get("nodes")
        if stale is not None and not str(getattr(stale, "__file__", "")).startswith(rs):
            raise ComfyUINotFound(f"'nodes' was already imported from {stale.__file__}, not ComfyUI")
        import comfy.options  # noqa: F401  (args parsing stays off: parse_args([]))
        from comfy.cli_args import args
        if use_cpu():
            args.cpu = True
        import comfy.model_management  # noqa: F401
        import utils.install_util  # noqa: F401
        import folder_paths
        import nodes
        import comfy.lora
        import comfy.model_base
        import comfy.model_detection
        import comfy.model_patcher
        import comfy.patcher_extension
        import comfy.sample
        import comfy.samplers
        import comfy.sd
        import comfy.sd1_clip
        import comfy.sdxl_clip
        import comfy.supported_models
        import comfy.supported_models_base
        import comfy.taesd.taesd
        import comfy.utils
        import comfy.weight_adapter
    except ComfyUINotFound:
        raise
    except Exception as e:  # ImportError, missing deps, a broken tree
        raise ComfyUINotFound(f"importing ComfyUI from {root} failed: {e!r}") from e
    if not str(nodes.__file__).startswith(rs):
        raise ComfyUINotFound(f"'nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py")
    return types.SimpleNamespace(nodes=nodes, comfy=comfy, folder_paths=folder_paths,
                                 args=args, path=root)


def set_base_directory(path: str | os.PathLike) -> Path:
    """Point ComfyUI's folder_paths at ``path`` (what ``--base-directory`` does at start).

    Every registered folder under the current base (models/*, custom_nodes, input,
    output, temp, user) is moved under ``path``; paths registered elsewhere (e.g. by
    a pack) stay. Creates ``path`` with input/output/temp/user/models. Returns it.
    """
    import_comfy()
    import folder_paths as fp

    new = Path(path).resolve()
    for sub in ("input", "output", "temp", "user", "models", "custom_nodes"):
        (new / sub).mkdir(parents=True, exist_ok=True)
    old = fp.base_path

    def move(p: str) -> str:
        rel = os.path.relpath(p, old)
        return p if rel == ".." or rel.startswith(".." + os.sep) else str(new / rel)

    for name, (paths, exts) in list(fp.folder_names_and_paths.items()):
        fp.folder_names_and_paths[name] = ([move(p) for p in paths], exts)
    fp.models_dir = move(fp.models_dir)
    fp.output_directory = move(fp.output_directory)
    fp.temp_directory = move(fp.temp_directory)
    fp.input_directory = move(fp.input_directory)
    fp.user_directory = move(fp.user_directory)
    fp.base_path = str(new)
    fp.filename_list_cache.clear()
    _COMFY.args.base_directory = str(new)
    return new


def load_pack(path: str | os.PathLike = REPO_ROOT) -> types.ModuleType:
    """Load a custom-node package exactly as ComfyUI does (``nodes.load_custom_node``):
    under a mangled module name, its NODE_CLASS_MAPPINGS merged into
    ``nodes.NODE_CLASS_MAPPINGS``. Relative imports inside the pack work; the absolute
    ``import fia_core`` of tests is a separate module object (its classes are not the
    pack's: compare by name, or use the pack's ``sys.modules[<name>.fia_core]``).
    Loads once per process; returns the module."""
    ns = import_comfy()
    path = str(Path(path).resolve())
    name = path.replace(".", "_x_")  # ComfyUI's module name for a package folder
    if name in sys.modules and path in ns.nodes.LOADED_MODULE_DIRS.values():
        return sys.modules[name]
    ok = asyncio.run(ns.nodes.load_custom_node(path))
    if not ok or name not in sys.modules:
        raise RuntimeError(f"ComfyUI could not load the custom node package at {path} (see log)")
    return sys.modules[name]


def chromium_path() -> str | None:
    """A chromium executable for browser tests: ``$FIA_CHROMIUM``, else ``chromium``,
    ``chromium-browser``, ``google-chrome`` on PATH; None when there is none."""
    env = os.environ.get("FIA_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


# ---------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------

#: UNet config of the tiny SD1.5 model, in the form ComfyUI's detect_unet_config
#: produces (so a saved checkpoint round-trips to the same config).
TINY_SD15_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "use_temporal_resblock": False, "use_temporal_attention": False,
}
#: FFN2 layers of the tiny SD15 (input 1, middle, output 0..3 of the mult-2 level, ...).
TINY_SD15_FFN2_COUNT = 7

#: Tiny SDXL: level 0 without attention, level 1 and the middle with 2 transformer
#: blocks each, linear proj_in/out, ADM input = pooled (32) + 6 size embeddings (6*256).
TINY_SDXL_POOLED_DIM = 32
TINY_SDXL_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential",
    "adm_in_channels": TINY_SDXL_POOLED_DIM + 6 * 256, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
    "transformer_depth_middle": 2, "use_linear_in_transformer": True,
    "context_dim": 64, "use_temporal_resblock": False, "use_temporal_attention": False,
}
TINY_SDXL_FFN2_COUNT = 8

#: Overrides of ComfyUI's CLIP-L json config (vocab 49408 and 77 positions stay, so the
#: real SD1 tokenizer works).
TINY_CLIP_L = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 2, "projection_dim": 64}
#: SDXL: clip_l 32 + clip_g 32 = context 64; pooled = clip_g hidden (32). Three layers:
#: SDXL takes the penultimate layer (layer_idx -2 must be < the layer count).
TINY_SDXL_CLIP_L = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 3,
                    "num_attention_heads": 2, "projection_dim": 32}
TINY_SDXL_CLIP_G = {"hidden_size": TINY_SDXL_POOLED_DIM, "intermediate_size": 128,
                    "num_hidden_layers": 3, "num_attention_heads": 2,
                    "projection_dim": TINY_SDXL_POOLED_DIM}

_TINY: types.SimpleNamespace | None = None


def tiny_classes() -> types.SimpleNamespace:
    """The test-only ComfyUI classes (built on first use; ComfyUI must be importable,
    i.e. after :func:`import_comfy` or inside a ComfyUI server process).

    ``TinySD15``, ``TinySDXL``: model configs (subclasses of supported_models.SD15 /
    SDXL) whose ``unet_config`` matches only the tiny shapes and whose ``clip_target``
    builds the tiny CLIPs; ``TinySD1ClipModel``, ``TinySDXLClipModel``: the text
    encoders (subclasses of sd1_clip.SD1ClipModel / sdxl_clip.SDXLClipModel that pass
    the tiny transformer configs through model_options ``clip_l_model_config`` /
    ``clip_g_model_config``).
    """
    global _TINY
    if _TINY is not None:
        return _TINY
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models as sm
    from comfy.supported_models_base import ClipTarget

    class TinySD1ClipModel(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            model_options = {**model_options, "clip_l_model_config": dict(TINY_CLIP_L)}
            super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)

    class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            model_options = {**model_options, "clip_l_model_config": dict(TINY_SDXL_CLIP_L),
                             "clip_g_model_config": dict(TINY_SDXL_CLIP_G)}
            super().__init__(device=device, dtype=dtype, model_options=model_options)

    class TinySD15(sm.SD15):
        unet_config = {k: TINY_SD15_UNET[k] for k in (
            "context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
            "use_temporal_attention", "channel_mult", "transformer_depth_middle")}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}

        def clip_target(self, state_dict={}):
            return ClipTarget(sd1_clip.SD1Tokenizer, TinySD1ClipModel)

    class TinySDXL(sm.SDXL):
        unet_config = {k: TINY_SDXL_UNET[k] for k in (
            "context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
            "use_temporal_attention", "channel_mult", "transformer_depth")}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

        def clip_target(self, state_dict={}):
            return ClipTarget(sdxl_clip.SDXLTokenizer, TinySDXLClipModel)

    _TINY = types.SimpleNamespace(TinySD15=TinySD15, TinySDXL=TinySDXL,
                                  TinySD1ClipModel=TinySD1ClipModel,
                                  TinySDXLClipModel=TinySDXLClipModel)
    return _TINY


def register_tiny_models_for_detection() -> None:
    """Test-only: put TinySD15 and TinySDXL at the front of
    ``comfy.supported_models.models`` so checkpoint loaders (CheckpointLoaderSimple,
    UNETLoader, ``comfy.sd.load_checkpoint_guess_config``) recognise tiny checkpoints
    and build the tiny CLIPs. Idempotent. Real models never match these configs."""
    import comfy.supported_models as sm
    t = tiny_classes()
    for cls in (t.TinySDXL, t.TinySD15):
        if cls not in sm.models:
            sm.models.insert(0, cls)


def register_tiny_sd15_for_detection() -> None:
    """Alias of :func:`register_tiny_models_for_detection` (registers SDXL too)."""
    register_tiny_models_for_detection()


def fill_weights_(module, seed: int = 0) -> None:
    """Fill every parameter of ``module`` in place from ``torch.Generator().manual_seed(seed)``.

    ComfyUI's ops allocate with ``torch.empty`` and skip initialisation. Order is the
    module's ``named_modules`` order, so the same architecture and seed give the same
    weights on any machine. Norm layers get weight 1 + N(0, 0.1), bias N(0, 0.1); other
    weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default scale), biases the
    same bound from their module's weight. 0-dim parameters (real values set in
    constructors, e.g. TAESD's vae_scale, CLIP's logit_scale) are left alone.
    """
    import torch

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for _, mod in module.named_modules():
            own = list(mod.named_parameters(recurse=False))
            if not own:
                continue
            is_norm = "norm" in type(mod).__name__.lower()
            w = getattr(mod, "weight", None)
            fan_in = w[0].numel() if isinstance(w, torch.Tensor) and w.ndim >= 2 else None
            for pname, p in own:
                if p.ndim == 0:
                    continue
                if is_norm:
                    v = torch.randn(p.shape, generator=g) * 0.1
                    if pname == "weight":
                        v += 1.0
                else:
                    fi = p[0].numel() if p.ndim >= 2 else (fan_in or p.numel())
                    bound = 1.0 / max(fi, 1) ** 0.5
                    v = (torch.rand(p.shape, generator=g) * 2 - 1) * bound
                p.copy_(v.to(dtype=p.dtype))


def _unet_dtype(config, params: int, dtype):
    import comfy.model_management as mm
    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes))
    manual_cast = mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    return dtype, manual_cast


def _tiny_model(config_cls, unet_config: dict, seed: int, dtype):
    import comfy.model_management as mm
    import comfy.model_patcher

    config = config_cls(dict(unet_config))
    dtype, manual_cast = _unet_dtype(config, 2_000_000, dtype)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({})  # BaseModel(EPS) for SD15, model_base.SDXL for SDXL
    fill_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def tiny_sd15_model(seed: int = 0, dtype=None):
    """A ``ModelPatcher`` around ``BaseModel(TinySD15(TINY_SD15_UNET), EPS)``: ~1 M
    parameters, SD15 latent format (4 channels), context dim 64, 7 FFN2 layers at
    ``diffusion_model.{input_blocks.1.1, input_blocks.2.1, middle_block.1,
    output_blocks.0.1 .. 3.1}.transformer_blocks.0.ff.net.2``. dtype: None = what
    ComfyUI's loader would pick (float32 on CPU)."""
    import_comfy()
    return _tiny_model(tiny_classes().TinySD15, TINY_SD15_UNET, seed, dtype)


def tiny_sdxl_model(seed: int = 0, dtype=None):
    """A ``ModelPatcher`` around ``model_base.SDXL(TinySDXL(TINY_SDXL_UNET), EPS)``:
    two transformer blocks per attention level, 8 FFN2 layers, ADM input of
    ``TINY_SDXL_POOLED_DIM + 1536``; needs conditioning with ``pooled_output``
    of width 32 (:func:`tiny_sdxl_clip` gives it)."""
    import_comfy()
    return _tiny_model(tiny_classes().TinySDXL, TINY_SDXL_UNET, seed, dtype)


def _tiny_clip(clip_cls, tokenizer_cls, seed: int, dtype):
    import comfy.sd
    from comfy.supported_models_base import ClipTarget

    opts = {} if dtype is None else {"dtype": dtype}
    clip = comfy.sd.CLIP(ClipTarget(tokenizer_cls, clip_cls), parameters=4_000_000, model_options=opts)
    fill_weights_(clip.cond_stage_model, seed)
    return clip


def tiny_clip(seed: int = 0, dtype=None):
    """``comfy.sd.CLIP`` with the real SD1 tokenizer and a 2-layer, 2-head, width-64
    CLIP-L (``TinySD1ClipModel``). ``encode_from_tokens(tokenize("a cat"),
    return_pooled=True)`` gives cond (1, 77, 64) and pooled (1, 64). dtype: None =
    ComfyUI's text-encoder default (float16 storage on CPU; outputs are float32)."""
    import_comfy()
    import comfy.sd1_clip
    return _tiny_clip(tiny_classes().TinySD1ClipModel, comfy.sd1_clip.SD1Tokenizer, seed, dtype)


def tiny_sdxl_clip(seed: int = 0, dtype=None):
    """``comfy.sd.CLIP`` with the real SDXL tokenizers (clip_l + clip_g) and tiny
    encoders: cond (1, 77, 64) = concat(l 32, g 32), pooled (1, 32) from clip_g, as
    :func:`tiny_sdxl_model` expects."""
    import_comfy()
    import comfy.sdxl_clip
    return _tiny_clip(tiny_classes().TinySDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, seed, dtype)


def tiny_vae(seed: int = 0):
    """``comfy.sd.VAE`` built from a TAESD-shaped state dict (2.4 M params, seeded
    random: decodes to noise-like images, but shapes and the pipeline are real)."""
    import_comfy()
    import comfy.sd
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    fill_weights_(taesd, seed)
    return comfy.sd.VAE(sd=taesd.state_dict())


def encode(clip, text: str) -> list:
    """CONDITIONING exactly as the CLIPTextEncode node returns it:
    ``[[cond (B, 77, D), {"pooled_output": (B, P), ...}]]``."""
    ns = import_comfy()
    return ns.nodes.CLIPTextEncode().encode(clip, text)[0]


def empty_latent(batch: int = 1, height: int = 64, width: int = 64) -> dict:
    """LATENT of zeros as EmptyLatentImage returns it (pixel size; latent is /8)."""
    ns = import_comfy()
    return ns.nodes.EmptyLatentImage().generate(width, height, batch)[0]


def sample(model, positive, negative, seed: int = 0, steps: int = 4, cfg: float = 5.0,
           latent: dict | None = None, sampler_name: str = "euler", scheduler: str = "normal"):
    """``nodes.common_ksampler`` (what KSampler runs); returns the latent tensor."""
    ns = import_comfy()
    latent = latent if latent is not None else empty_latent()
    return ns.nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler,
                                    positive, negative, latent)[0]["samples"]


def ffn2_modules(model_patcher) -> dict:
    """``{state-dict key of the weight: the ff.net.2 Linear module}`` of a MODEL, in
    module order (input blocks, middle, output blocks). Keys are
    ``ModelPatcher.model.state_dict()`` names, the ones ``add_patches`` accepts."""
    out = {}
    for name, mod in model_patcher.model.diffusion_model.named_modules():
        if name.endswith(".ff.net.2"):
            out[f"diffusion_model.{name}.weight"] = mod
    return out


def ffn2_keys(model_patcher) -> list[str]:
    """State-dict keys ``diffusion_model.*.ff.net.2.weight`` of a MODEL, module order."""
    return list(ffn2_modules(model_patcher))


def effective_weight(model_patcher, key: str):
    """The weight ``key`` has when ``model_patcher`` runs: a float32 copy of the original
    (taken from the patcher's backup if a clone patched the shared module in place)
    with this patcher's own patches applied, computed by ``comfy.lora.calculate_weight``
    as ModelPatcher does on load. Touches no module state."""
    import torch
    import comfy.lora
    entry = model_patcher.get_key_patches(key).get(key)
    if entry is None:
        raise KeyError(key)
    (weight, convert), patches = entry[0], entry[1:]
    w = convert(weight.to(torch.float32, copy=True), inplace=True)
    return comfy.lora.calculate_weight(patches, w, key) if patches else w


def save_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, arch: str = "sd15") -> Path:
    """Write a tiny all-in-one checkpoint (safetensors) with ``comfy.sd.save_checkpoint``.

    ``arch`` "sd15": tiny SD15 UNet (``model.diffusion_model.``), tiny CLIP-L
    (``cond_stage_model.transformer.text_model.``), TAESD VAE (``first_stage_model.``),
    about 24 MB in float32. "sdxl": the same with the tiny SDXL UNet and CLIP
    (``conditioner.embedders.0/1``). Loading it (CheckpointLoaderSimple in a server or
    ``comfy.sd.load_checkpoint_guess_config``) needs
    :func:`register_tiny_models_for_detection` in that process; ComfyServer does it by
    default. The SD15 checkpoint has no ``text_projection`` (SD15 drops it on save),
    so a loaded tiny SD15 CLIP's projection is uninitialised: SD15 never uses it.
    """
    import comfy.sd
    import_comfy()
    register_tiny_models_for_detection()
    if arch == "sd15":
        model, clip = tiny_sd15_model(seed), tiny_clip(seed + 1)
    elif arch == "sdxl":
        model, clip = tiny_sdxl_model(seed), tiny_sdxl_clip(seed + 1)
    else:
        raise ValueError(f"arch must be 'sd15' or 'sdxl', not {arch!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), model, clip=clip, vae=tiny_vae(seed + 2),
                             metadata={"fia_test": f"tiny {arch} seed {seed}"})
    return path


# ---------------------------------------------------------------------------------
# A real ComfyUI server
# ---------------------------------------------------------------------------------

_TINY_PACKAGE_INIT = '''\
"""Test-only, generated by tests/comfy_harness.py: registers the tiny model configs so
that CheckpointLoaderSimple can load tiny checkpoints. Never shipped."""
import sys
sys.path.insert(0, {tests_dir!r})
import comfy_harness
comfy_harness.register_tiny_models_for_detection()
sys.path.remove({tests_dir!r})
NODE_CLASS_MAPPINGS = {{}}
NODE_DISPLAY_NAME_MAPPINGS = {{}}
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py`` of the test ComfyUI as a context manager.

    ::

        with ComfyServer(tmp_path, models={"checkpoints/tiny.safetensors": ckpt},
                         wait_for="/object_info/CheckpointLoaderSimple") as srv:
            history = srv.wait(srv.post_prompt(graph))

    base_dir: ``--base-directory`` (custom_nodes/, models/, input/, output/, temp/,
        user/ are created there; the ComfyUI tree is not written).
    custom_nodes: packages symlinked into ``base_dir/custom_nodes``: a mapping
        ``{folder name: path}`` or paths (named by their basename). Default: this repo
        as ``PACK_DIR_NAME``. Pass ``()`` for none.
    tiny_models: also write the test-only ``fia_test_tiny_models`` package that
        registers the tiny configs (:func:`register_tiny_models_for_detection`).
    models: ``{"checkpoints/x.safetensors": source path}`` placed (symlinked) under
        ``base_dir/models``; ``files``: the same relative to ``base_dir`` (e.g. input/).
    wait_for: path polled until HTTP 200 (default ``/object_info``); startup_timeout
        seconds (generous: cold machines were 10x slower).
    The server log goes to ``log_path`` (default ``base_dir/comfyui-server.log``); every
    :class:`ComfyServerError` carries its tail.
    """

    def __init__(self, base_dir: str | os.PathLike,
                 custom_nodes: Mapping[str, str | os.PathLike] | Iterable[str | os.PathLike] | None = None,
                 *, tiny_models: bool = True,
                 models: Mapping[str, str | os.PathLike] | None = None,
                 files: Mapping[str, str | os.PathLike] | None = None,
                 wait_for: str = "/object_info", startup_timeout: float = 240.0,
                 port: int | None = None, extra_args: Iterable[str] = (),
                 python: str | None = None, log_path: str | os.PathLike | None = None,
                 comfy_dir: str | os.PathLike | None = None):
        self.base_dir = Path(base_dir).resolve()
        if custom_nodes is None:
            custom_nodes = {PACK_DIR_NAME: REPO_ROOT}
        if not isinstance(custom_nodes, Mapping):
            custom_nodes = {Path(p).name: p for p in custom_nodes}
        self.custom_nodes = {k: Path(v).resolve() for k, v in custom_nodes.items()}
        self.tiny_models = tiny_models
        self.models = dict(models or {})
        self.files = dict(files or {})
        self.wait_for = wait_for
        self.startup_timeout = startup_timeout
        self.port = port
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui-server.log"
        self.comfy_dir = Path(comfy_dir) if comfy_dir else comfyui_path()
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_base(self) -> None:
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cn = self.base_dir / "custom_nodes"
        for name, src in self.custom_nodes.items():
            _place(cn / name, src)
        if self.tiny_models:
            pkg = cn / TINY_MODELS_PACKAGE
            pkg.mkdir(exist_ok=True)
            (pkg / "__init__.py").write_text(_TINY_PACKAGE_INIT.format(tests_dir=str(TESTS_DIR)))
        for rel, src in self.models.items():
            _place(self.base_dir / "models" / rel, src)
        for rel, src in self.files.items():
            _place(self.base_dir / rel, src)

    def start(self) -> "ComfyServer":
        self._prepare_base()
        self.port = self.port or free_port()
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        if use_cpu():
            cmd.insert(2, "--cpu")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_PATH", None)
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"$ (cd {self.comfy_dir}; {' '.join(cmd)})\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_dir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._error(f"ComfyUI exited with {self.proc.returncode} during startup")
            try:
                status, _, _ = self.request("GET", self.wait_for, timeout=10)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = repr(e)
            time.sleep(0.25)
        raise self._error(f"ComfyUI not ready after {self.startup_timeout:.0f} s "
                          f"(GET {self.wait_for}: {last})")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT to the server's process group, then SIGKILL if it hangs."""
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("ComfyUI did not stop on SIGINT; killing it")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- diagnostics ---------------------------------------------------------------
    def log_tail(self, chars: int = 6000) -> str:
        try:
            if self._log_file is not None:
                self._log_file.flush()
            data = self.log_path.read_bytes()
        except OSError:
            return "<no server log>"
        return data[-chars:].decode("utf-8", "replace")

    def _error(self, msg: str) -> ComfyServerError:
        return ComfyServerError(f"{msg}\n--- ComfyUI log ({self.log_path}), tail ---\n{self.log_tail()}")

    # -- HTTP --------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0
                ) -> tuple[int, Mapping[str, str], bytes]:
        """Low-level request; returns (status, headers, body bytes) for any status."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers or {}), e.read()

    def get(self, path: str, raw: bool = False, timeout: float = 60.0) -> Any:
        """GET ``path``; decoded JSON (or bytes when ``raw``). Raises on non-2xx."""
        status, _, data = self.request("GET", path, timeout=timeout)
        if not 200 <= status < 300:
            raise self._error(f"GET {path} -> HTTP {status}: {data[:2000]!r}")
        return data if raw else json.loads(data)

    def post(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        status, _, data = self.request("POST", path, body, timeout=timeout)
        if not 200 <= status < 300:
            raise self._error(f"POST {path} -> HTTP {status}: {data[:4000]!r}")
        return json.loads(data) if data else None

    def post_prompt(self, api_graph: Mapping[str, Any]) -> str:
        """Queue an API-format graph; returns prompt_id. An invalid graph (HTTP 400)
        raises ComfyServerError with ComfyUI's ``error`` and ``node_errors``."""
        status, _, data = self.request("POST", "/prompt",
                                       {"prompt": api_graph, "client_id": self.client_id})
        if status != 200:
            try:
                info = json.loads(data)
                detail = json.dumps({"error": info.get("error"), "node_errors": info.get("node_errors")}, indent=1)
            except ValueError:
                detail = data[:4000].decode("utf-8", "replace")
            raise self._error(f"POST /prompt -> HTTP {status}:\n{detail}")
        return json.loads(data)["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Poll ``/history/<prompt_id>`` until the prompt finished; returns its history
        entry (``outputs[node_id]`` holds each node's UI output). Raises
        ComfyServerError on an execution error, a dead server or the timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self._error(f"ComfyUI is not running (waiting for {prompt_id})")
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry is not None:
                st = entry.get("status") or {}
                if st.get("status_str") == "error":
                    msgs = [m for m in st.get("messages", []) if m and m[0] == "execution_error"]
                    raise self._error(f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}")
                if st.get("completed", True):
                    return entry
            time.sleep(poll)
        raise self._error(f"prompt {prompt_id} not finished after {timeout:.0f} s")

    def run(self, api_graph: Mapping[str, Any], timeout: float = 300.0) -> dict:
        """post_prompt + wait."""
        return self.wait(self.post_prompt(api_graph), timeout)


def _place(dst: Path, src: str | os.PathLike) -> None:
    """Symlink ``src`` at ``dst`` (replacing an existing link/file), or copy if links fail."""
    src = Path(src).resolve()
    if not src.exists():
        raise FileNotFoundError(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        shutil.rmtree(dst)
    try:
        dst.symlink_to(src, target_is_directory=src.is_dir())
    except OSError:
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def sd15_api_graph(ckpt_name: str, positive: str = "a cat", negative: str = "blurry",
                   seed: int = 0, steps: int = 3, cfg: float = 5.0, size: int = 64,
                   save_prefix: str | None = "fia_test") -> dict:
    """API-format graph CheckpointLoaderSimple -> CLIPTextEncode x2 -> KSampler ->
    VAEDecode -> SaveImage (or PreviewImage when ``save_prefix`` is None). Node ids:
    "ckpt", "pos", "neg", "latent", "ksampler", "decode", "image"."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "ksampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["ckpt", 2]}},
    }
    if save_prefix is None:
        g["image"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    else:
        g["image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": save_prefix}}
    return g
