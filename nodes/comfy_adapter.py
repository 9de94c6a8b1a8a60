"""Adapters between fia_core and ComfyUI's ModelPatcher: target layers, effective weights,
fingerprints, and the sparse weight patch that applies a mask without touching the model."""
from __future__ import annotations

import logging

import torch

import comfy.lora
import comfy.model_patcher

from ..fia_core import (
    NeuronMask,
    TargetLayer,
    apply_mask_to_weight,
    check_mask_matches,
    find_target_layers,
)
from .model_state import AbsWeights, ModelIdentity, identity_of, state_of

try:  # ComfyUI >= 0.3.3x: patches may be objects that compute the new weight themselves
    from comfy.weight_adapter.base import WeightAdapterBase
except ImportError:  # older ComfyUI: fall back to dense "diff" patches
    WeightAdapterBase = None

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."


def state_dict_key(layer_key: str) -> str:
    """fia_core layer key -> ModelPatcher state-dict key of its weight."""
    return f"{PREFIX}{layer_key}.weight"


def model_type_name(model) -> str:
    """'SD15', 'SDXL', ... (ComfyUI's model config class name)."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def target_layers(model, target: str = "ffn2") -> list[TargetLayer]:
    """fia_core target discovery on the diffusion network inside a ModelPatcher."""
    return find_target_layers(model.model.diffusion_model, target)


@torch.no_grad()
def effective_weights(model, layers: list[TargetLayer]) -> dict[str, torch.Tensor]:
    """Weights of the target layers with the patcher's patches applied, read through the
    patcher (the module may hold another clone's patched weights), on the CPU."""
    key_patches = model.get_key_patches(PREFIX)
    out = {}
    for layer in layers:
        sd_key = state_dict_key(layer.key)
        (weight, convert), *patches = key_patches[sd_key]
        if patches:
            w = weight.to("cpu", torch.float32, copy=True)
            w = convert(w, inplace=True)
            w = comfy.lora.calculate_weight(patches, w, sd_key).to(weight.dtype)
        else:
            w = convert(weight.to("cpu", copy=True), inplace=True)
        out[layer.key] = w
    return out


def abs_weights(model, layers: list[TargetLayer]) -> AbsWeights:
    """Shared |W| of the target layers (model_state.AbsWeights, kept on the model's state)."""
    return state_of(model).abs_weights(model, layers, effective_weights)


def model_identity(model, layers: list[TargetLayer], target: str = "ffn2",
                   weight_abs: AbsWeights | None = None) -> ModelIdentity:
    """Identity of the model; its fingerprint is computed at most once per patch state."""
    fingerprint = (weight_abs.fingerprint if weight_abs is not None
                   else state_of(model).mask_fingerprint(model, layers, effective_weights))
    return identity_of(model, layers, target, model_type_name(model), fingerprint)


if WeightAdapterBase is not None:

    class FIAMaskPatch(WeightAdapterBase):
        """Sparse weight patch: W <- W * (1 - strength * M) for the mask's flat indices."""

        name = "fia_mask"

        def __init__(self, indices: torch.Tensor):
            self.loaded_keys = set()
            self.weights = [indices]
            self.indices = indices

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            if offset is not None or not weight.is_contiguous():
                log.warning("FIA mask patch for %s: unexpected weight layout, skipped", key)
                return weight
            return apply_mask_to_weight(weight, self.indices, float(strength), inplace=True)

        def to(self, device):  # patches holding tensors follow the model (IPAdapter convention)
            return self

else:
    FIAMaskPatch = None


class MaskMismatchError(ValueError):
    """The mask was built for another architecture than the model's."""


def apply_mask(model, mask: NeuronMask, strength: float = 1.0, node: str = "FIAApplyMask"):
    """Clone ``model`` and add one weight patch per masked layer; the input is untouched."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"{node}: strength must be in [0, 1], got {strength}")
    layers = target_layers(model, mask.target)
    shapes = {l.key: l.shape for l in layers}
    try:
        check_mask_matches(mask, shapes, mask.target)
    except ValueError as e:
        raise MaskMismatchError(
            f"{node}: {e}. The model is {model_type_name(model)}; build the mask on this model."
        ) from None
    identity = model_identity(model, layers, mask.target)
    if mask.fingerprint and mask.fingerprint != identity.fingerprint:
        log.warning(
            "%s: the mask (%s) was built on another %s checkpoint than this one; applying it anyway",
            node, ", ".join(mask.concepts), identity.model_type,
        )
    clone = model.clone()
    if FIAMaskPatch is not None:
        patches = {state_dict_key(k): FIAMaskPatch(mask.prune_indices(k)) for k in shapes if mask.layers[k].count}
        accepted = clone.add_patches(patches, strength) if patches else []
    else:
        weights = effective_weights(model, layers)
        patches = {}
        for k in shapes:
            if mask.layers[k].count:
                dense = torch.zeros(weights[k].numel(), dtype=torch.float32)
                dense[mask.prune_indices(k)] = 1.0
                patches[state_dict_key(k)] = ("diff", ((-weights[k].float() * dense.view(shapes[k])),))
        accepted = clone.add_patches(patches, strength) if patches else []
    if len(accepted) != len(patches):
        missing = sorted(set(patches) - set(accepted))[:3]
        raise RuntimeError(f"{node}: the model rejected patches for {missing}")
    return clone
