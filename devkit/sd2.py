"""A tiny SD2.x-shaped model built through ComfyUI's own classes (test and benchmark use).

What makes it SD2 rather than SD1 (all taken from ``comfy.supported_models.SD20``):

* v-prediction: the model is ``BaseModel(config, ModelType.V_PREDICTION)``, so its
  ``model_sampling`` is ComfyUI's ``V_PREDICTION`` sampling;
* linear projections in the spatial transformers (``use_linear_in_transformer=True``:
  ``proj_in`` / ``proj_out`` are Linear, not 1x1 convs);
* attention heads of a fixed width (``num_head_channels``) instead of a fixed count, and
  ``attn_precision`` float32, as SD20's ``unet_extra_config``;
* an OpenCLIP-H-style text encoder: ``comfy.text_encoders.sd2_clip.SD2ClipModel``
  (``clip_h``, penultimate layer, pad token 0) with the real SD2 tokenizer, scaled down
  from 1024 to :data:`TINY_SD2_CONTEXT` wide.

Nothing here registers itself: :func:`register_tiny_sd2_for_detection` puts
:class:`TinySD20` in front of ``comfy.supported_models.models`` (test-only, for loading a
saved tiny SD2 checkpoint). Real SD2 checkpoints never match the tiny config.

Needs ComfyUI importable (``devkit.harness.import_comfy()`` first).
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from . import harness as H

#: Context width of the tiny SD2 (OpenCLIP-H's 1024 scaled down; distinct from the tiny
#: SD15's 64 so the configs never collide in detection).
TINY_SD2_CONTEXT = 96

#: UNet config in the form ComfyUI's detect_unet_config produces for it (a saved tiny SD2
#: checkpoint round-trips to the same dict).
TINY_SD2_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": TINY_SD2_CONTEXT, "use_temporal_resblock": False, "use_temporal_attention": False,
}
#: ff.net.2 of input 1, input 2, middle, output 0..3 (as the tiny SD15).
TINY_SD2_FFN2_COUNT = 7

#: Overrides of ComfyUI's OpenCLIP-H json (vocab 49408 and 77 positions stay, so the real
#: tokenizer works). Three layers: SD2 takes the penultimate one (layer_idx -2).
TINY_CLIP_H = {"hidden_size": TINY_SD2_CONTEXT, "intermediate_size": 4 * TINY_SD2_CONTEXT,
               "num_hidden_layers": 3, "num_attention_heads": 2, "projection_dim": TINY_SD2_CONTEXT}

_CLASSES: types.SimpleNamespace | None = None


def tiny_sd2_classes() -> types.SimpleNamespace:
    """``TinySD20`` (subclass of ``supported_models.SD20``) and ``TinySD2ClipModel``
    (subclass of ``sd2_clip.SD2ClipModel``), built on first use."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import comfy.model_base as model_base
    import comfy.supported_models as sm
    import comfy.text_encoders.sd2_clip as sd2_clip
    from comfy.supported_models_base import ClipTarget

    class TinySD2ClipModel(sd2_clip.SD2ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            model_options = {**model_options, "clip_h_model_config": dict(TINY_CLIP_H)}
            super().__init__(device=device, dtype=dtype, model_options=model_options, **kwargs)

    class TinySD20(sm.SD20):
        unet_config = {k: TINY_SD2_UNET[k] for k in (
            "context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
            "use_temporal_attention", "channel_mult", "transformer_depth_middle")}
        # SD20's own extra config (head width, float32 attention) with narrower heads
        unet_extra_config = {**sm.SD20.unet_extra_config, "num_heads": -1, "num_head_channels": 16}

        def model_type(self, state_dict, prefix=""):
            # SD20 guesses v-prediction from the spread of one norm bias of a full-size
            # UNet (output_blocks.11), which the tiny UNet does not have: the tiny SD2 is
            # v-prediction by construction, like SD 2.x 768-v.
            return model_base.ModelType.V_PREDICTION

        def clip_target(self, state_dict={}):
            return ClipTarget(sd2_clip.SD2Tokenizer, TinySD2ClipModel)

    _CLASSES = types.SimpleNamespace(TinySD20=TinySD20, TinySD2ClipModel=TinySD2ClipModel)
    return _CLASSES


def register_tiny_sd2_for_detection() -> None:
    """Test-only: TinySD20 first in ``comfy.supported_models.models`` (idempotent), so
    ``load_checkpoint_guess_config`` / UNETLoader recognise a saved tiny SD2."""
    import comfy.supported_models as sm
    cls = tiny_sd2_classes().TinySD20
    if cls not in sm.models:
        sm.models.insert(0, cls)


def tiny_sd2_model(seed: int = 0, dtype=None):
    """A ``ModelPatcher`` around ``BaseModel(TinySD20(TINY_SD2_UNET), V_PREDICTION)``:
    ~1 M parameters, linear proj_in/out, 7 FFN2 layers; weights seeded
    (``devkit.harness.fill_weights_``). dtype None = what ComfyUI's loader would pick."""
    H.import_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher

    config = tiny_sd2_classes().TinySD20(dict(TINY_SD2_UNET))
    if dtype is None:
        dtype = mm.unet_dtype(model_params=2_000_000, supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(),
                                                          config.supported_inference_dtypes))
    model = config.get_model({})  # model_type() -> V_PREDICTION
    H.fill_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd2_clip(seed: int = 0, dtype=None):
    """``comfy.sd.CLIP`` with the real SD2 tokenizer and a 3-layer, width-96 clip_h:
    ``encode`` gives cond (1, 77, 96) from the penultimate layer."""
    H.import_comfy()
    import comfy.sd
    import comfy.text_encoders.sd2_clip as sd2_clip
    from comfy.supported_models_base import ClipTarget

    opts = {} if dtype is None else {"dtype": dtype}
    clip = comfy.sd.CLIP(ClipTarget(sd2_clip.SD2Tokenizer, tiny_sd2_classes().TinySD2ClipModel),
                         parameters=6_000_000, model_options=opts)
    H.fill_weights_(clip.cond_stage_model, seed)
    return clip


def save_tiny_sd2_checkpoint(path, seed: int = 0):
    """All-in-one tiny SD2 checkpoint via ``comfy.sd.save_checkpoint`` (UNet, clip_h in
    SD2's open_clip layout under ``cond_stage_model.model.``, TAESD VAE). Loading it needs
    :func:`register_tiny_sd2_for_detection` in that process."""
    import comfy.sd
    H.import_comfy()
    register_tiny_sd2_for_detection()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(path), tiny_sd2_model(seed), clip=tiny_sd2_clip(seed + 1),
                             vae=H.tiny_vae(seed + 2), metadata={"fia_test": f"tiny sd2 seed {seed}"})
    return path
