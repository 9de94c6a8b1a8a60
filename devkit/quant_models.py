"""Tiny fp8 / quantized checkpoints in the formats ComfyUI loads, with fp32 twins.

For tests of the pack on quantized weights (issue 13): every builder writes two files
from one tiny model, the quantized one and an fp32 "reference" whose weights are the
exact dequantized values (q.float() * scale), so that any difference between runs on
the two comes from ComfyUI's quantized code path, not from the weights.

Formats (:data:`FORMATS`); :func:`format_unsupported` says which the running ComfyUI
lacks, naming its version:

``scaled_fp8``  (ComfyUI 0.3.x and 0.8; the format of most community fp8 SD checkpoints)
    full checkpoint; every 2-D UNet weight (all Linear layers) stored as float8_e4m3fn
    with a per-layer float32 ``<layer>.scale_weight`` and the marker key
    ``model.diffusion_model.scaled_fp8`` (a 2-element fp8 tensor: "no fp8 matrix
    multiplication, no input scaling"). 0.3.75 loads it with ``comfy.ops.scaled_fp8_ops``
    (nn.Linear subclasses holding fp8 weights); 0.8 converts it on load
    (``comfy.utils.convert_old_quants``) to MixedPrecisionOps with QuantizedTensor weights.
``quant_metadata``  (ComfyUI 0.3.75 and 0.8)
    diffusion-model-only file (UNETLoader / ``comfy.sd.load_diffusion_model``): the chosen
    Linear weights in fp8 with ``<layer>.weight_scale``, and the safetensors metadata entry
    ``_quantization_metadata`` = ``{"format_version": "1.0", "layers": {<layer>:
    {"format": "float8_e4m3fn"}}}``. Loaded as MixedPrecisionOps in both versions.
``comfy_quant``  (ComfyUI 0.8 only)
    full checkpoint; the chosen layers hold ``<layer>.weight`` (fp8), ``<layer>.weight_scale``
    and ``<layer>.comfy_quant`` (a uint8 tensor holding the JSON ``{"format":
    "float8_e4m3fn"}``): 0.8's native per-layer format (what its own save writes).

Needs ComfyUI importable (``devkit.harness.import_comfy`` first) and the tiny configs
registered (done here through ``devkit.harness.register_tiny_models_for_detection``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from . import harness as H

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
FORMATS = ("scaled_fp8", "quant_metadata", "comfy_quant")
UNET_PREFIX = "model.diffusion_model."


def comfyui_version() -> str:
    """Version string of the imported ComfyUI (``comfyui_version.py``), or "unknown"."""
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


def format_unsupported(fmt: str) -> str | None:
    """None when the running ComfyUI loads ``fmt``, else the reason (naming the version).
    Detected from the features ComfyUI has, not from the version number."""
    import inspect

    import comfy.model_detection
    import comfy.utils

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    version = comfyui_version()
    new_loader = hasattr(comfy.utils, "convert_old_quants")  # 0.8: every format -> comfy_quant keys
    if fmt == "scaled_fp8":
        if new_loader or "scaled_fp8" in inspect.getsource(comfy.model_detection.model_config_from_unet):
            return None
        return f"ComfyUI {version} does not detect scaled_fp8 checkpoints"
    if fmt == "quant_metadata":
        old = "metadata" in inspect.signature(getattr(comfy.model_detection, "detect_layer_quantization",
                                                      lambda: None)).parameters
        if new_loader or old:
            return None
        return f"ComfyUI {version} does not read _quantization_metadata"
    if new_loader and hasattr(comfy.utils, "detect_layer_quantization"):
        return None
    return (f"ComfyUI {version} has no per-layer comfy_quant format (it came with ComfyUI 0.8's "
            "MixedPrecisionOps rewrite)")


# ---------------------------------------------------------------------------------
# fp8 per-tensor quantization (the recipe of ComfyUI's QUANTIZATION.md)
# ---------------------------------------------------------------------------------

def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): absmax per-tensor float8_e4m3fn quantization, scale float32 0-dim."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().max() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(())
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale in float32 (one correctly rounded multiply: what every ComfyUI path gives)."""
    return q.to(torch.float32) * scale.to(torch.float32)


@dataclass
class QuantizedStateDict:
    """``quantized``: the state dict to write; ``metadata``: safetensors metadata;
    ``reference``: the same keys as the source with dequantized fp32 values for the
    quantized weights; ``layers``: quantized layer names (state-dict key without
    ``.weight``)."""

    quantized: dict[str, torch.Tensor]
    metadata: dict[str, str]
    reference: dict[str, torch.Tensor]
    layers: list[str] = field(default_factory=list)


def _linear_weight_keys(sd: Mapping[str, torch.Tensor], prefix: str) -> list[str]:
    """2-D ``.weight`` keys under ``prefix``: in an SD UNet those are exactly the Linear
    layers (convolutions are 4-D, norms 1-D)."""
    return [k for k, v in sd.items() if k.startswith(prefix) and k.endswith(".weight") and v.ndim == 2]


def scaled_fp8_rounds_biases() -> bool:
    """True on ComfyUI 0.3.x: its ``scaled_fp8_ops`` Linear is built in fp8 (weight AND
    bias), so loading rounds each float bias to fp8, unscaled. ComfyUI 0.8 converts
    scaled_fp8 files to MixedPrecisionOps, which keep biases in the compute dtype."""
    import comfy.utils

    return not hasattr(comfy.utils, "convert_old_quants")


def requantize_recalculates_scale() -> bool:
    """True on ComfyUI 0.8: a patched quantized weight is re-quantized with a scale
    recalculated from its new absmax (MixedPrecisionOps.set_weight, scale="recalculate").
    0.3.75 keeps the layer's scale_weight (scaled_fp8)."""
    import comfy.utils

    return hasattr(comfy.utils, "convert_old_quants")


def quantize_state_dict(sd: Mapping[str, torch.Tensor], fmt: str, prefix: str = UNET_PREFIX,
                        layers: Iterable[str] | None = None,
                        fp8_biases: bool | None = None) -> QuantizedStateDict:
    """Quantize the Linear weights under ``prefix`` of ``sd`` into format ``fmt``.

    ``layers``: substrings selecting which Linear layers to quantize (None = all);
    scaled_fp8 always quantizes all (0.3.75's scaled_fp8 ops make every Linear fp8).
    ``fp8_biases``: for scaled_fp8, give the reference the fp8-rounded biases the running
    ComfyUI computes with (None = :func:`scaled_fp8_rounds_biases`); the file itself keeps
    float32 biases, as real scaled_fp8 checkpoints do.
    """
    if fp8_biases is None:
        fp8_biases = fmt == "scaled_fp8" and scaled_fp8_rounds_biases()
    keys = _linear_weight_keys(sd, prefix)
    if layers is not None and fmt != "scaled_fp8":
        wanted = list(layers)
        keys = [k for k in keys if any(w in k for w in wanted)]
    quant = {k: v.clone() for k, v in sd.items()}
    ref = {k: v.clone() for k, v in sd.items()}
    metadata: dict[str, str] = {}
    names = []
    for k in keys:
        q, scale = quantize_fp8(sd[k])
        layer = k[: -len(".weight")]
        names.append(layer)
        quant[k] = q
        ref[k] = dequantize_fp8(q, scale)
        if fmt == "scaled_fp8":
            quant[f"{layer}.scale_weight"] = scale
            bias = f"{layer}.bias"
            if fp8_biases and bias in sd:  # what 0.3.x's scaled_fp8 Linear holds (see below)
                ref[bias] = sd[bias].to(FP8).to(torch.float32)
        else:
            quant[f"{layer}.weight_scale"] = scale
        if fmt == "comfy_quant":
            conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            quant[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if fmt == "scaled_fp8":
        quant[f"{prefix}scaled_fp8"] = torch.zeros(2, dtype=FP8)
    elif fmt == "quant_metadata":
        metadata["_quantization_metadata"] = json.dumps(
            {"format_version": "1.0", "layers": {n[len(prefix):]: {"format": "float8_e4m3fn"} for n in names}})
    elif fmt != "comfy_quant":
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    return QuantizedStateDict(quant, metadata, ref, names)


# ---------------------------------------------------------------------------------
# Files and loading
# ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantFiles:
    """A quantized file and its fp32 twin. ``loader``: "checkpoint"
    (load_checkpoint_guess_config / CheckpointLoaderSimple) or "unet" (load_diffusion_model
    / UNETLoader); ``layers``: quantized layer names relative to the diffusion model."""

    fmt: str
    quantized: Path
    reference: Path
    loader: str
    layers: tuple[str, ...]


def write_safetensors(path: str | os.PathLike, sd: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=dict(metadata or {}))
    return path


def tiny_quantized_files(directory: str | os.PathLike, fmt: str, seed: int = 0, arch: str = "sd15",
                         layers: Iterable[str] | None = None) -> QuantFiles:
    """Write ``<fmt>_fp8.safetensors`` and ``<fmt>_fp32.safetensors`` in ``directory``
    from the tiny ``arch`` checkpoint of ``seed`` (devkit.harness.save_tiny_checkpoint).
    ``layers``: see :func:`quantize_state_dict` (default: all Linear layers)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    src = H.save_tiny_checkpoint(directory / f"src_{arch}_{seed}.safetensors", seed=seed, arch=arch)
    sd = load_file(str(src))
    loader = "checkpoint"
    prefix = UNET_PREFIX
    if fmt == "quant_metadata":  # diffusion-model-only file, as such models are shipped
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        prefix, loader = "", "unet"
    q = quantize_state_dict(sd, fmt, prefix, layers)
    qpath = write_safetensors(directory / f"{fmt}_{arch}_fp8.safetensors", q.quantized, q.metadata)
    rpath = write_safetensors(directory / f"{fmt}_{arch}_fp32.safetensors", q.reference)
    return QuantFiles(fmt, qpath, rpath, loader, tuple(n[len(prefix):] for n in q.layers))


def load_model(path: str | os.PathLike, loader: str = "checkpoint"):
    """The MODEL (ModelPatcher) of a file, loaded as CheckpointLoaderSimple / UNETLoader do."""
    import comfy.sd

    H.register_tiny_models_for_detection()
    if loader == "checkpoint":
        return comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False)[0]
    if loader == "unet":
        return comfy.sd.load_diffusion_model(str(path))
    raise ValueError(f"loader must be 'checkpoint' or 'unet', not {loader!r}")


# ---------------------------------------------------------------------------------
# Reading what a loaded module really holds (independent of the pack)
# ---------------------------------------------------------------------------------

def is_quantized_tensor(t) -> bool:
    """ComfyUI's QuantizedTensor (0.3.75 comfy.quant_ops or 0.8 comfy_kitchen), by class name."""
    return any(c.__name__ == "QuantizedTensor" for c in type(t).__mro__)


def module_weight_float32(module: torch.nn.Module) -> torch.Tensor:
    """The weight a loaded Linear-like module computes with, dequantized to float32 on the
    CPU: QuantizedTensor -> dequantize in float32; scaled_fp8 (0.3.75) -> weight *
    scale_weight; plain -> float32 copy. Reads module state only (load the patcher first)."""
    w = module.weight.detach()
    if is_quantized_tensor(w):  # dequantized in its compute dtype: float32 for CPU tests
        return w.to(device="cpu", copy=True).dequantize().to(torch.float32)
    out = w.to(device="cpu", dtype=torch.float32, copy=True)
    scale = getattr(module, "scale_weight", None)
    if scale is not None:
        out = out * scale.detach().to("cpu", torch.float32)
    return out


def ffn2_modules(model) -> dict[str, torch.nn.Module]:
    """{layer path inside diffusion_model: module} of every ``*.ff.net.2``, Linear or not."""
    return {n: m for n, m in model.model.diffusion_model.named_modules() if n.endswith(".ff.net.2")}


def loaded_ffn2_float32(model) -> dict[str, torch.Tensor]:
    """Load ``model`` the way sampling does and read each FFN2 weight dequantized."""
    import comfy.model_management as mm

    with torch.no_grad():  # as ComfyUI runs nodes (inference mode): fp8 rounding needs it
        mm.load_models_gpu([model])
        return {k: module_weight_float32(m) for k, m in ffn2_modules(model).items()}


#: Small saliency settings for tests (fields of the pack's SaliencySettings).
SMALL_SALIENCY = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
                      width=64, height=64, mode="fast", batch_size=2)


def fresh_saliency_and_mask(pack, model, clip, concept: str = "golf ball", r2: float = 0.05,
                            num_prompts: int = 4, **settings):
    """(saliency, mask) of a fresh run, the disk cache bypassed (two models with equal
    weights, e.g. an fp8 file and its fp32 twin, would otherwise share one entry).
    Goes through the pack's runner API, old (saliency_runner) or new (saliency)."""
    nodes_pkg = pack.nodes
    runner = getattr(nodes_pkg, "saliency", None) or nodes_pkg.saliency_runner
    settings_mod = getattr(nodes_pkg, "saliency_settings", None) or nodes_pkg.saliency_runner
    s = settings_mod.SaliencySettings(**{**SMALL_SALIENCY, **settings})
    pairs = pack.fia_core.build_prompt_pairs(concept, "objects", num_prompts, s.seed)
    run = runner.concept_saliency(model, clip, concept, pairs, s, use_cache=False)
    sal = run.saliency if hasattr(run, "saliency") else run[0]
    select = getattr(pack.fia_core, "select_concept_mask", None)
    mask = select(sal, r2) if select is not None else sal.select(r2=r2)
    return sal, mask


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|A & B| / |A | B| of two boolean masks (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
