"""Target discovery: the prunable layers of a diffusion network, keyed by module path.

FIA prunes the second feed-forward projection (FFN2, ``ff.net.2``) of every transformer
block; the paper's ablation targets are offered too. Keys are module paths relative to
the network passed in (for ComfyUI that is ``model.model.diffusion_model``), so they are
stable across runs and independent of hook call order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

#: target name -> module-name suffixes inside a transformer block (ComfyUI and diffusers
#: use the same names for these layers).
TARGETS: dict[str, tuple[str, ...]] = {
    "ffn2": ("ff.net.2",),
    "ffn1": ("ff.net.0.proj",),
    "cross_attn_kv": ("attn2.to_k", "attn2.to_v"),
    "self_attn_kv": ("attn1.to_k", "attn1.to_v"),
}
DEFAULT_TARGET = "ffn2"

SUPPORTED_ARCHITECTURES = (
    "Stable Diffusion 1.x / 2.x / SDXL UNets (ComfyUI's openaimodel.UNetModel, "
    "diffusers' UNet2DConditionModel)"
)


class UnsupportedArchitectureError(ValueError):
    """The network has no layers of the requested target kind."""


@dataclass(frozen=True)
class TargetLayer:
    """One prunable Linear layer: ``key`` is its module path inside the network.

    ``module`` is an ``nn.Linear`` or a Linear-like module (see :func:`linear_like_shape`):
    forward hooks work on any ``nn.Module``; read its weight through the host's own
    dequantization, never as ``module.weight`` directly (it may be fp8 or a tensor subclass).
    """

    key: str
    module: nn.Module
    shape: tuple[int, int]  # (C_out, C_in) of the weight

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def linear_like_shape(module: nn.Module) -> tuple[int, int] | None:
    """(C_out, C_in) when ``module`` acts as a Linear layer, else None.

    Duck typing, so that fia_core needs no host imports: an ``nn.Linear`` (ComfyUI's
    ``comfy.ops`` disable_weight_init / manual_cast / scaled_fp8 Linears subclass it),
    or any module with integer ``in_features`` / ``out_features`` and a 2-D ``weight``
    tensor of shape (out_features, in_features). The second form covers ComfyUI 0.8's
    ``MixedPrecisionOps.Linear`` (a plain ``nn.Module`` whose weight is a QuantizedTensor
    reporting its logical shape) and similar quantized Linear replacements. A Conv2d has
    a 4-D weight and no in/out_features, so it never matches.
    """
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    weight = getattr(module, "weight", None)
    c_in, c_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(c_in, int) or not isinstance(c_out, int):
        return None
    shape = tuple(weight.shape)
    return shape if shape == (c_out, c_in) else None


def find_target_layers(network: nn.Module, target: str = DEFAULT_TARGET) -> list[TargetLayer]:
    """List the ``target`` layers of ``network`` in module order.

    A layer is a module whose path ends in one of the target's suffixes and that acts as
    a Linear layer (:func:`linear_like_shape`: ``nn.Linear`` or a quantized look-alike).
    Raises UnsupportedArchitectureError, naming what was found, when there are none.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {sorted(TARGETS)}")
    suffixes = TARGETS[target]
    found: list[TargetLayer] = []
    linear_names: list[str] = []
    for name, module in network.named_modules():
        shape = linear_like_shape(module)
        if shape is None:
            continue
        linear_names.append(name)
        if any(name == s or name.endswith("." + s) for s in suffixes):
            found.append(TargetLayer(name, module, shape))
    if not found:
        examples = ", ".join(linear_names[:4]) or "none"
        raise UnsupportedArchitectureError(
            f"{type(network).__name__} has no {target} layers (Linear modules named "
            f"'*.{suffixes[0]}' inside transformer blocks). It has {len(linear_names)} "
            f"Linear layers (e.g. {examples}). Supported: {SUPPORTED_ARCHITECTURES}."
        )
    return found


def layer_shapes(layers: Sequence[TargetLayer]) -> dict[str, tuple[int, int]]:
    """{key: (C_out, C_in)} in layer order."""
    return {layer.key: layer.shape for layer in layers}


def architecture_signature(shapes: Mapping[str, Sequence[int]]) -> str:
    """Hash of the layer keys and shapes: equal for every checkpoint of one architecture."""
    h = hashlib.sha256()
    for key, shape in shapes.items():
        h.update(f"{key}:{tuple(int(s) for s in shape)}\n".encode())
    return h.hexdigest()[:16]


def describe_architecture(shapes: Mapping[str, Sequence[int]], target: str = DEFAULT_TARGET) -> str:
    """Short human description, e.g. '16 ffn2 layers, 49.5 M connections'."""
    total = sum(int(s[0]) * int(s[1]) for s in shapes.values())
    return f"{len(shapes)} {target} layers, {total / 1e6:.1f} M connections"


@torch.no_grad()
def weights_fingerprint(weights: Mapping[str, torch.Tensor], samples_per_layer: int = 4096) -> str:
    """Cheap checkpoint fingerprint from a strided sample of each layer's weights.

    Values are rounded to float16 first, so the fp16 and fp32 copies of one checkpoint
    agree; it is a hint for a warning, not a security hash.
    """
    h = hashlib.sha256()
    for key, w in weights.items():
        flat = w.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_layer)
        sample = flat[::step][:samples_per_layer].to("cpu", torch.float16)
        h.update(f"{key}:{tuple(w.shape)}\n".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
