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

try:  # ComfyUI >= 0.3.6x: weights of quantized layers (MixedPrecisionOps) are tensor subclasses
    from comfy.quant_ops import QuantizedTensor
except ImportError:
    QuantizedTensor = None

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


def dequantized_float32(weight: torch.Tensor, convert=None) -> torch.Tensor:
    """A float32 CPU copy of a stored weight, dequantized the way ComfyUI's patch path does.

    ``weight`` is what a ModelPatcher holds for a key (a Parameter, its backup, ...);
    ``convert`` the module's ``convert_weight`` (None for plain layers). Handles
    * plain float32 / float16 / bfloat16 / fp8 tensors (upcast: fp8 has no arithmetic);
    * ComfyUI's QuantizedTensor (``comfy.quant_ops``: MixedPrecisionOps weights in 0.3.75
      and the comfy_kitchen tensors of 0.8.0): copied to the CPU, then ``.dequantize()``
      in float32 (0.8: ``.to(float32)`` sets the dequantization dtype; 0.3.75 ignores it,
      so its ``orig_dtype`` layout parameter is set on a new wrapper of the copy);
    * 0.3.75 scaled_fp8 Linears: their ``convert_weight`` multiplies by ``scale_weight``,
      exactly as ModelPatcher.patch_weight_to_device does before applying patches.
    The model's tensors are never modified.
    """
    if _is_quantized(weight):
        w = weight.detach().to(device="cpu", copy=True)
        params = getattr(w, "_layout_params", None)
        if isinstance(params, dict) and "orig_dtype" in params:
            # ComfyUI 0.3.x QuantizedTensor ignores .to(dtype) (with a warning): set the
            # dequantization dtype on a new wrapper of the copied data instead.
            w = QuantizedTensor(w._qdata, w._layout_type, {**params, "orig_dtype": torch.float32})
        else:  # 0.8 (comfy_kitchen): .to(dtype) sets the dequantization dtype
            w = w.to(torch.float32)
        w = w.dequantize()
    else:
        w = weight.detach().to(device="cpu", dtype=torch.float32, copy=True)
    if convert is not None:
        w = convert(w, inplace=True)
    if QuantizedTensor is not None and isinstance(w, QuantizedTensor):  # a convert that re-wraps
        w = w.dequantize()
    return w.to(torch.float32).contiguous()


def key_weight_and_patches(model, sd_key: str):
    """(stored weight, convert function, patch list) of one state-dict key, as
    ``ModelPatcher.get_key_patches`` would give them, without building the whole state
    dict (ComfyUI 0.8's get_key_patches raises AttributeError 'weight_scale' on quantized
    models: their state_dict() lists scale keys that are no module attributes). The weight
    is the original one: the patcher's backup (or hook backup) when a clone patched the
    shared module in place."""
    weight, _, convert = comfy.model_patcher.get_key_weight(model.model, sd_key)
    backup = model.backup.get(sd_key)
    if backup is not None:
        weight = backup.weight
    hook_backup = getattr(model, "hook_backup", {}).get(sd_key)
    if hook_backup is not None:
        weight = hook_backup[0]
    return weight, convert, list(model.patches.get(sd_key, ()))


@torch.no_grad()
def effective_weights(model, layers: list[TargetLayer]) -> dict[str, torch.Tensor]:
    """Weights of the target layers with the patcher's patches applied, read through the
    patcher (the module may hold another clone's patched weights), on the CPU.

    Dequantized and patched in float32 (:func:`dequantized_float32`, then
    ``comfy.lora.calculate_weight`` as ModelPatcher does). Returned in the stored dtype
    when that is float32 / float16 / bfloat16 (rounded as ComfyUI rounds a patched
    weight: what the sampler uses), else in float32 (fp8 and quantized weights; ComfyUI's
    stochastic re-quantization of a patched fp8 weight is not reproduced: it moves
    entries by at most one fp8 step).
    """
    out = {}
    for layer in layers:
        sd_key = state_dict_key(layer.key)
        weight, convert, patches = key_weight_and_patches(model, sd_key)
        w = dequantized_float32(weight, convert)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, sd_key)
        stored = weight.dtype
        if stored in (torch.float16, torch.bfloat16) and not _is_quantized(weight):
            w = w.to(stored)
        out[layer.key] = w
    return out


def _is_quantized(weight) -> bool:
    return QuantizedTensor is not None and isinstance(weight, QuantizedTensor)


def abs_weights(model, layers: list[TargetLayer]) -> AbsWeights:
    """Shared |W| of the target layers (model_state.AbsWeights, kept on the model's state)."""
    return state_of(model).abs_weights(model, layers, effective_weights)


def model_identity(model, layers: list[TargetLayer], target: str = "ffn2",
                   weight_abs: AbsWeights | None = None) -> ModelIdentity:
    """Identity of the model; its fingerprint is computed at most once per patch state."""
    fingerprint = (weight_abs.fingerprint if weight_abs is not None
                   else state_of(model).mask_fingerprint(model, layers, effective_weights))
    return identity_of(model, layers, target, model_type_name(model), fingerprint)


class MaskPatchError(RuntimeError):
    """The mask patch met a weight it cannot mask; raised so that ComfyUI never runs the
    weight unmasked (returning it, or None, would leave the concept in the model)."""


def _is_identity(function) -> bool:
    """True when ``function`` is ComfyUI's default pass-through for patch results."""
    if function is None:
        return True
    probe = torch.ones(1)
    try:
        result = function(probe)
    except Exception:  # noqa: BLE001 - anything else is "not the identity"
        return False
    return result is probe and float(probe[0]) == 1.0


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


def mask_weight(weight: torch.Tensor, indices: torch.Tensor, strength: float) -> torch.Tensor:
    """W * (1 - strength * M) for the flat ``indices`` in any float dtype; the result is
    contiguous: ``weight`` itself (masked in place) when it was, else a masked copy.

    Strength 1 writes exact zeros (fp32, fp16, bf16 and fp8 all encode +0 as all-zero
    bits). fp8 has no arithmetic: a partial strength is computed in float32 and rounded
    back to the weight's fp8 dtype.
    """
    if _is_quantized(weight):
        raise MaskPatchError("the weight is still quantized (ComfyUI passes patches a dequantized weight)")
    if not weight.dtype.is_floating_point:
        raise MaskPatchError(f"the weight has dtype {weight.dtype}, not a float dtype")
    out = weight if weight.is_contiguous() else weight.contiguous()
    if weight.dtype in _FP8_DTYPES:
        if strength == 1.0:
            out.view(torch.uint8).view(-1).index_fill_(0, indices, 0)
            return out
        wide = apply_mask_to_weight(out.to(torch.float32), indices, strength, inplace=True)
        out.copy_(wide.to(weight.dtype))
        return out
    return apply_mask_to_weight(out, indices, strength, inplace=True)


if WeightAdapterBase is not None:

    class FIAMaskPatch(WeightAdapterBase):
        """Sparse weight patch: W <- W * (1 - strength * M) for the mask's flat indices.

        Goes through ComfyUI's own weight-patch path (``comfy.lora.calculate_weight``), like
        a LoRA: ComfyUI hands it the dequantized weight (float32, or float16 where 0.8
        patches in fp16, or the compute dtype in LowVramPatch), and re-quantizes the result
        for fp8 / quantized layers. Fails closed: a layout it cannot mask raises
        MaskPatchError. The flat int64 indices are copied to each device once and cached
        (lowvram runs the patch on every forward).
        """

        name = "fia_mask"

        def __init__(self, indices: torch.Tensor, shape: tuple[int, int] | None = None):
            self.loaded_keys = set()
            self.indices = indices.detach().to("cpu", torch.long).contiguous()
            self.weights = [self.indices]
            self.shape = tuple(shape) if shape is not None else None
            self._by_device: dict[torch.device, torch.Tensor] = {self.indices.device: self.indices}
            self._max_index = int(self.indices.max()) if self.indices.numel() else -1

        def indices_on(self, device: torch.device) -> torch.Tensor:
            """The indices on ``device``, copied there once."""
            device = torch.device(device)
            idx = self._by_device.get(device)
            if idx is None:
                idx = self._by_device[device] = self.indices.to(device)
            return idx

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            where = f"FIA mask patch for {key}"
            if offset is not None:  # calculate_weight would drop our result for a narrowed view
                raise MaskPatchError(f"{where}: patches with an offset are not supported (offset {offset})")
            if not _is_identity(function):
                raise MaskPatchError(f"{where}: patches with a transform function are not supported")
            if self.shape is not None and tuple(weight.shape) != self.shape:
                raise MaskPatchError(f"{where}: weight shape {tuple(weight.shape)} is not the mask's {self.shape}")
            if self._max_index >= weight.numel():
                raise MaskPatchError(f"{where}: mask index {self._max_index} is outside the weight "
                                     f"of {weight.numel()} entries")
            try:
                return mask_weight(weight, self.indices_on(weight.device), float(strength))
            except MaskPatchError as e:
                raise MaskPatchError(f"{where}: {e}") from None

        def to(self, device):
            """Patches holding tensors follow the model (IPAdapter convention); the
            indices are cached per device, so this only prepares ``device``'s copy."""
            self.indices_on(device)
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
        patches = {state_dict_key(k): FIAMaskPatch(mask.prune_indices(k), shapes[k])
                   for k in shapes if mask.layers[k].count}
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
