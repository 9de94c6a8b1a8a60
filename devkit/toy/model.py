"""The toy text-to-image model, built only from ComfyUI's own classes.

- UNet: ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel`` through a subclass
  of ``comfy.supported_models.SD15`` (:class:`ToySD15`) with a small unet_config:
  32 channels, levels [1, 2, 2] at 16x16, 8x8 and 4x4, spatial transformers at 8x8, 4x4
  and in the middle (none at full resolution, as in SDXL), context 64. Its FFN2 layers
  are ``ff.net.2`` of seven BasicTransformerBlocks, exactly as in SD. v-prediction on
  SD's own sigma schedule (``model_sampling`` of ``BaseModel``,
  ModelType.V_PREDICTION, as SD 2.x 768-v models; see train.py for why not EPS).
- Text encoder: ``comfy.sd.CLIP`` with the real SD1 tokenizer and a 2-layer, width-64
  CLIP-L (:class:`ToyClipModel`, an SD1ClipModel with a small transformer config).
- VAE: a TAESD-shaped state dict (ComfyUI detects it under ``first_stage_model.``),
  its weights set by hand (:func:`vae_state_dict`): the latent of a 128 x 128 image is
  its 8 x 8 block average, RGB in channels 0-2 and 0 in channel 3, scaled so that the
  UNet sees pixel values in [-1, 1] after SD15's latent scale factor 0.18215. Decoding
  repeats each latent pixel over an 8 x 8 block. So the model is a 16 x 16 pixel-space
  diffusion model that ComfyUI's KSampler / VAEDecode / VAEEncode treat as SD1.5.

Checkpoints are ordinary all-in-one SD1 safetensors files (``model.diffusion_model.``,
``cond_stage_model.``, ``first_stage_model.``). ComfyUI's model detection accepts SD15
only with 320 channels; :func:`register_for_detection` puts ToySD15 at the front of
``comfy.supported_models.models`` (in a server, ``devkit/server_plugin`` does it), after
which CheckpointLoaderSimple loads the toy checkpoint. ToySD15 and ToyClipModel come from
the factories of :mod:`devkit.zoo`, like the tiny test models.

The trained weights stay with the benchmark that produced them (``benchmarks/toy/weights``;
``python -m benchmarks.toy.train`` and ``python -m devkit.toy.classifier`` rewrite them).
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Sequence

from .. import zoo
from ..comfyui import REPO_ROOT

WEIGHTS_DIR = REPO_ROOT / "benchmarks" / "toy" / "weights"
CHECKPOINT = WEIGHTS_DIR / "fia_toy_sd15.safetensors"
CLASSIFIER = WEIGHTS_DIR / "fia_toy_classifier.safetensors"
CHECKPOINT_NAME = CHECKPOINT.name  # its name in ComfyUI's checkpoints folder

#: UNet config in the form ComfyUI's detect_unet_config produces for the saved file.
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2],
    "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 64, "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_EXTRA = {"num_heads": 2, "num_head_channels": -1}
#: Overrides of ComfyUI's CLIP-L json config (vocabulary and 77 positions stay).
CLIP_L_CONFIG = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "projection_dim": 64}

LATENT_SCALE = 0.18215  # comfy.latent_formats.SD15.scale_factor
VAE_GAIN = 0.25  # decoder input = pixels * VAE_GAIN: keeps TAESD's tanh clamp linear
SPATIAL = 8  # VAE down/upscale factor (SD1)


def toy_classes() -> types.SimpleNamespace:
    """ToySD15 (model config, v-prediction: like SD 2.x 768-v; saved files carry "v_pred"
    too) and ToyClipModel (text encoder); ComfyUI must be importable."""
    import comfy.sd1_clip as sd1_clip
    import comfy.supported_models as sm

    clip = zoo.clip_model_class("ToyClipModel", CLIP_L_CONFIG)
    config = zoo.model_config_class(
        "ToySD15", sm.SD15, UNET_CONFIG,
        ("context_dim", "model_channels", "use_linear_in_transformer", "adm_in_channels",
         "use_temporal_attention", "channel_mult", "transformer_depth", "transformer_depth_middle"),
        UNET_EXTRA, clip, sd1_clip.SD1Tokenizer, model_type="V_PREDICTION")
    return types.SimpleNamespace(ToySD15=config, ToyClipModel=clip)


def register_for_detection() -> None:
    """Put ToySD15 at the front of ComfyUI's model list (idempotent). Real SD models
    never match its config."""
    zoo.register_for_detection(toy_classes().ToySD15)


def build_model(dtype=None):
    """A fresh ModelPatcher(BaseModel(ToySD15, V_PREDICTION)); weights uninitialised (comfy ops use
    torch.empty): fill or load them. dtype None = float32."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    config = toy_classes().ToySD15(dict(UNET_CONFIG))
    config.set_inference_dtype(dtype or torch.float32, None)
    base = config.get_model({})
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip(dtype=None):
    """A fresh comfy.sd.CLIP (real SD1 tokenizer, toy encoder); weights uninitialised."""
    import torch
    import comfy.sd1_clip

    return zoo.make_clip(toy_classes().ToyClipModel, comfy.sd1_clip.SD1Tokenizer, seed=None,
                         dtype=dtype or torch.float32)


def vae_state_dict():
    """TAESD-shaped VAE whose weights implement the toy latent map exactly (see module doc).

    Decoder: channels 2k / 2k+1 carry the positive / negative part of colour k, every
    Block's conv path is zero (Block(x) = relu(x) = x for x >= 0), the convs after each
    nearest upsampling are identities, the last conv recombines to (x + 1) / 2.
    Encoder: 2 x 2 averaging in each stride-2 conv (three of them: 8 x 8 block mean).
    """
    import torch
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    sd = {k: torch.zeros_like(v) for k, v in taesd.state_dict().items()}
    g = VAE_GAIN
    sd["vae_scale"] = torch.tensor(LATENT_SCALE * g)
    sd["vae_shift"] = torch.tensor(0.0)

    def eye(key, n=64, taps=((1, 1),), value=1.0):
        w = sd[key]
        for i in range(n):
            for a, b in taps:
                w[i, i, a, b] = value

    # decoder
    w = sd["taesd_decoder.1.weight"]  # [64, 4, 3, 3]
    for k in range(3):
        w[2 * k, k, 1, 1] = 1.0 / g
        w[2 * k + 1, k, 1, 1] = -1.0 / g
    for idx in (7, 12, 17):
        eye(f"taesd_decoder.{idx}.weight")
    w = sd["taesd_decoder.19.weight"]  # [3, 64, 3, 3]
    for k in range(3):
        w[k, 2 * k, 1, 1] = 0.5
        w[k, 2 * k + 1, 1, 1] = -0.5
    sd["taesd_decoder.19.bias"][:] = 0.5
    # encoder (input in [0, 1])
    w = sd["taesd_encoder.0.weight"]  # [64, 3, 3, 3]
    for k in range(3):
        w[k, k, 1, 1] = 1.0
    for idx in (2, 6, 10):
        eye(f"taesd_encoder.{idx}.weight", taps=((1, 1), (1, 2), (2, 1), (2, 2)), value=0.25)
    w = sd["taesd_encoder.14.weight"]  # [4, 64, 3, 3]
    for k in range(3):
        w[k, k, 1, 1] = 2.0 * g
        sd["taesd_encoder.14.bias"][k] = -g
    return sd


def build_vae():
    import comfy.sd
    return comfy.sd.VAE(sd=vae_state_dict())


# -- the latent map ------------------------------------------------------------------

def pixels_to_latent(pixels):
    """[B, 3, H, W] in [-1, 1] -> raw latent [B, 4, H, W] (what KSampler outputs)."""
    import torch
    z = torch.zeros(pixels.shape[0], 4, *pixels.shape[2:], dtype=torch.float32)
    z[:, :3] = pixels.float() / LATENT_SCALE
    return z


def latent_to_pixels(latent):
    """Raw latent [B, 4, H, W] -> [B, 3, H, W] in [-1, 1] (what VAEDecode shows, per block)."""
    return (latent[:, :3].float() * LATENT_SCALE).clamp(-1, 1)


def image_to_pixels(image):
    """ComfyUI IMAGE [B, 8H, 8W, 3] in [0, 1] -> [B, 3, H, W] in [-1, 1] (8 x 8 block mean)."""
    import torch.nn.functional as F
    x = image.float().permute(0, 3, 1, 2) * 2 - 1
    return F.avg_pool2d(x, SPATIAL)


# -- checkpoints ---------------------------------------------------------------------

def save_checkpoint(path, model, clip, metadata: dict | None = None) -> Path:
    """All-in-one SD1 checkpoint through ComfyUI's save path (UNet float32; text encoder
    and the hand-set VAE float16, to keep the file small)."""
    import torch
    import comfy.sd
    import comfy.utils

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clip_sd = clip.get_sd()
    sd = model.model.state_dict_for_saving(clip_sd, vae_state_dict(), None)
    out = {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        if not k.startswith("model.diffusion_model.") and v.is_floating_point():
            v = v.to(torch.float16)
        out[k] = v
    comfy.utils.save_torch_file(out, str(path), metadata=metadata)
    return path


def load_checkpoint(path=CHECKPOINT):
    """(MODEL, CLIP, VAE) exactly as CheckpointLoaderSimple loads the file."""
    import comfy.sd
    register_for_detection()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no toy checkpoint at {path}; train it: python -m benchmarks.toy.train")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae


# -- sampling ------------------------------------------------------------------------

def encode_prompts(clip, prompts: Sequence[str]) -> list:
    """CONDITIONING for a batch of prompts (one row each), as CLIPTextEncode builds it."""
    import torch
    conds, pooled = [], []
    cache: dict[str, tuple] = {}
    for p in prompts:
        if p not in cache:
            out = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True, return_dict=True)
            cache[p] = (out["cond"], out.get("pooled_output"))
        c, pl = cache[p]
        conds.append(c)
        pooled.append(pl)
    extra = {}
    if all(p is not None for p in pooled):
        extra["pooled_output"] = torch.cat(pooled)
    return [[torch.cat(conds), extra]]


def generate(model, clip, prompts: Sequence[str], seed: int = 0, steps: int = 20, cfg: float = 5.0,
             sampler_name: str = "euler", scheduler: str = "normal", negative: str = "",
             noise_offset: int = 0, batch_size: int = 256, bf16: bool = False):
    """Sample one image per prompt with ComfyUI's sampler (what KSampler does); image i
    starts from the noise of index noise_offset + i of ``seed`` (prepare_noise), so a
    prompt's image does not depend on the batch it is in. ``bf16``: sample under CPU bfloat16
    autocast (about 2x faster; the weights and FIA patches stay float32). Returns raw
    latents [N, 4, 16, 16]."""
    import torch
    import comfy.sample

    outs = []
    neg = encode_prompts(clip, [negative])
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        positive = encode_prompts(clip, chunk)
        latent = torch.zeros(len(chunk), 4, 16, 16)
        inds = list(range(noise_offset + start, noise_offset + start + len(chunk)))
        noise = comfy.sample.prepare_noise(latent, seed, noise_inds=inds)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, neg, latent,
                                      denoise=1.0, disable_pbar=True, seed=seed)
        outs.append(out.float().cpu())
    return torch.cat(outs)
