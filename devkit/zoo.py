"""Tiny models built through ComfyUI's own classes, and the helpers that run them.

Needs an importable ComfyUI (:func:`devkit.comfyui.import_comfy`, or inside a ComfyUI
server process); stdlib imports only at module level.

Deterministic: comfy ops skip weight init, so every weight is filled from a seeded
``torch.Generator`` by :func:`fill_weights_`.

* :func:`tiny_sd15_model`  SD1.5-shaped UNet, ~1 M params, 7 FFN2 layers.
* :func:`tiny_sdxl_model`  SDXL-shaped UNet (two transformer blocks per attention level,
  ADM input fed by ``pooled_output``), 8 FFN2 layers.
* :func:`tiny_clip` / :func:`tiny_sdxl_clip`  real SD1 / SDXL tokenizers with tiny text
  transformers; context dims 64 / 64, pooled dims 64 / 32.
* :func:`tiny_vae`  a TAESD-shaped VAE (ComfyUI detects it from its keys).

The one CLIP factory is :func:`clip_model_class` (an SD1 or SDXL text encoder of any
small transformer config; the toy model and the benchmarks use it too) with
:func:`make_clip`; the one model-config factory is :func:`model_config_class`.

Checkpoints: ComfyUI's model detection accepts SD15 only with model_channels 320 and
context_dim 768, and ``SD15.clip_target`` always builds a full CLIP-L (124 M params)
whatever the checkpoint holds. So test-only config classes (``TinySD15`` / ``TinySDXL``,
subclasses of ``comfy.supported_models.SD15`` / ``SDXL``) match only the tiny UNet shapes
and return tiny CLIP targets; :func:`register_tiny_models_for_detection` puts them at the
front of ``comfy.supported_models.models``. In a server, ``devkit/server_plugin`` makes
the same call (see :class:`devkit.server.ComfyServer`). :func:`save_tiny_checkpoint`
writes a checkpoint with ``comfy.sd.save_checkpoint`` that CheckpointLoaderSimple loads
as MODEL, CLIP and VAE of about 7 M params in total in well under a second.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

from .comfyui import import_comfy

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

_CLIP_CLASSES: dict[tuple, type] = {}
_CONFIG_CLASSES: dict[str, type] = {}


def clip_model_class(name: str, clip_l: dict, clip_g: dict | None = None) -> type:
    """The one factory of tiny text encoders: a subclass of ``sd1_clip.SD1ClipModel``
    (``clip_g`` None) or ``sdxl_clip.SDXLClipModel`` named ``name`` that passes the given
    overrides of ComfyUI's CLIP-L / CLIP-G json configs through ``model_options``
    (``clip_l_model_config`` / ``clip_g_model_config``). Keep vocab 49408 and 77 positions
    so the real tokenizers work. Cached per (name, configs)."""
    key = (name, json.dumps(clip_l, sort_keys=True), json.dumps(clip_g, sort_keys=True))
    if key in _CLIP_CLASSES:
        return _CLIP_CLASSES[key]
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip

    configs = {"clip_l_model_config": clip_l}
    if clip_g is None:
        base = sd1_clip.SD1ClipModel
    else:
        base = sdxl_clip.SDXLClipModel
        configs["clip_g_model_config"] = clip_g

    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        # fresh copies: ComfyUI may update the config dicts it is given
        opts = {**model_options, **{k: dict(v) for k, v in configs.items()}}
        base.__init__(self, device=device, dtype=dtype, model_options=opts, **kwargs)

    cls = type(name, (base,), {"__init__": __init__, "__module__": __name__,
                               "__doc__": f"{base.__name__} with a tiny transformer: {configs}"})
    _CLIP_CLASSES[key] = cls
    return cls


def make_clip(clip_cls: type, tokenizer_cls: type, seed: int | None = 0, dtype=None,
              parameters: int = 4_000_000):
    """``comfy.sd.CLIP`` around ``clip_cls`` (from :func:`clip_model_class`), weights
    filled from ``seed`` (None: left as ComfyUI allocated them, for loading or training).
    dtype None: ComfyUI's text-encoder default (float16 storage on CPU)."""
    import comfy.sd
    from comfy.supported_models_base import ClipTarget

    opts = {} if dtype is None else {"dtype": dtype}
    clip = comfy.sd.CLIP(ClipTarget(tokenizer_cls, clip_cls), parameters=parameters, model_options=opts)
    if seed is not None:
        fill_weights_(clip.cond_stage_model, seed)
    return clip


def model_config_class(name: str, base: type, unet_config: dict, match_keys: tuple[str, ...],
                       unet_extra: dict, clip_cls: type, tokenizer_cls: type,
                       model_type: str | None = None) -> type:
    """A test-only subclass of a ``comfy.supported_models`` config (``base``) whose
    ``unet_config`` (the ``match_keys`` of ``unet_config``) matches only one small UNet and
    whose ``clip_target`` builds ``clip_cls``; ``model_type``: a ``ModelType`` name that
    overrides the base's (e.g. "V_PREDICTION"). Cached by name (names are unique)."""
    if name in _CONFIG_CLASSES:
        return _CONFIG_CLASSES[name]
    import comfy.model_base as model_base
    from comfy.supported_models_base import ClipTarget

    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": f"{base.__name__} config that matches only the {name} UNet.",
        "unet_config": {k: unet_config[k] for k in match_keys},
        "unet_extra_config": dict(unet_extra),
        "clip_target": lambda self, state_dict={}: ClipTarget(tokenizer_cls, clip_cls),
    }
    if model_type is not None:
        kind = getattr(model_base.ModelType, model_type)
        attrs["model_type"] = lambda self, state_dict, prefix="": kind
    cls = type(name, (base,), attrs)
    _CONFIG_CLASSES[name] = cls
    return cls


def register_for_detection(*classes: type) -> None:
    """Put model config classes at the front of ``comfy.supported_models.models`` so
    checkpoint loaders (CheckpointLoaderSimple, UNETLoader,
    ``comfy.sd.load_checkpoint_guess_config``) recognise them. Idempotent."""
    import comfy.supported_models as sm
    for cls in reversed(classes):
        if cls not in sm.models:
            sm.models.insert(0, cls)


def tiny_classes() -> types.SimpleNamespace:
    """The test-only ComfyUI classes (built on first use; ComfyUI must be importable):
    ``TinySD15``, ``TinySDXL`` (model configs) and ``TinySD1ClipModel``,
    ``TinySDXLClipModel`` (text encoders)."""
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.supported_models as sm

    sd1 = clip_model_class("TinySD1ClipModel", TINY_CLIP_L)
    sdxl = clip_model_class("TinySDXLClipModel", TINY_SDXL_CLIP_L, TINY_SDXL_CLIP_G)
    sd15 = model_config_class(
        "TinySD15", sm.SD15, TINY_SD15_UNET,
        ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
         "use_temporal_attention", "channel_mult", "transformer_depth_middle"),
        {"num_heads": 2, "num_head_channels": -1}, sd1, sd1_clip.SD1Tokenizer)
    sdxl_cfg = model_config_class(
        "TinySDXL", sm.SDXL, TINY_SDXL_UNET,
        ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
         "use_temporal_attention", "channel_mult", "transformer_depth"),
        {"num_heads": -1, "num_head_channels": 16}, sdxl, sdxl_clip.SDXLTokenizer)
    return types.SimpleNamespace(TinySD15=sd15, TinySDXL=sdxl_cfg,
                                 TinySD1ClipModel=sd1, TinySDXLClipModel=sdxl)


def register_tiny_models_for_detection() -> None:
    """Test-only: register TinySDXL and TinySD15 (:func:`register_for_detection`). Real
    models never match these configs."""
    t = tiny_classes()
    register_for_detection(t.TinySDXL, t.TinySD15)


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


def tiny_clip(seed: int = 0, dtype=None):
    """``comfy.sd.CLIP`` with the real SD1 tokenizer and a 2-layer, 2-head, width-64
    CLIP-L (``TinySD1ClipModel``). ``encode_from_tokens(tokenize("a cat"),
    return_pooled=True)`` gives cond (1, 77, 64) and pooled (1, 64). dtype: None =
    ComfyUI's text-encoder default (float16 storage on CPU; outputs are float32)."""
    import_comfy()
    import comfy.sd1_clip
    return make_clip(tiny_classes().TinySD1ClipModel, comfy.sd1_clip.SD1Tokenizer, seed, dtype)


def tiny_sdxl_clip(seed: int = 0, dtype=None):
    """``comfy.sd.CLIP`` with the real SDXL tokenizers (clip_l + clip_g) and tiny
    encoders: cond (1, 77, 64) = concat(l 32, g 32), pooled (1, 32) from clip_g, as
    :func:`tiny_sdxl_model` expects."""
    import_comfy()
    import comfy.sdxl_clip
    return make_clip(tiny_classes().TinySDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, seed, dtype)


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
    """The weight ``key`` has when ComfyUI runs ``model_patcher``, as a float32 CPU copy.

    Read the way sampling gets it, independently of the pack's own weight code: ComfyUI
    loads the patcher fully (``comfy.model_management.load_models_gpu``, which restores
    any other clone's in-place patches and applies this patcher's), then the module's
    weight is read and dequantized (``QuantizedTensor.dequantize()`` on ComfyUI 0.8;
    times ``scale_weight`` for 0.3.75's scaled fp8 layers). Leaves the patcher loaded,
    as a sampling call does."""
    import torch
    import comfy.model_management as mm
    import comfy.utils

    mm.load_models_gpu([model_patcher], force_full_load=True)
    module_name, _, attr = key.rpartition(".")
    module = comfy.utils.get_attr(model_patcher.model, module_name)
    w = getattr(module, attr)
    with torch.no_grad():
        w = w.dequantize()  # a QuantizedTensor's float value; plain tensors return themselves
        w = w.detach().to(device="cpu", dtype=torch.float32, copy=True)
        scale = getattr(module, "scale_" + attr, None)
        if isinstance(scale, torch.Tensor):
            w = w * scale.detach().to(device="cpu", dtype=torch.float32)
    return w


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
    import_comfy()
    import comfy.sd
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
