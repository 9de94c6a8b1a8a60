"""Full-size checkpoints (devkit/fullsize.py): random weights in the real SD1.5 / SDXL file
layouts, recognised by ComfyUI's own model detection without any test registration.

* fast: the key layout (built from ComfyUI's classes on the meta device) has the real
  models' parameter counts and prefixes, and ComfyUI's detection maps it to SD15 / SDXL;
* slow + server: the SD1.5 file (2.0 GB, written once into the cache folder) loaded by
  CheckpointLoaderSimple in a real server started with ``tiny_models=False``, then
  FIAForgetConcepts at a reduced resolution and prompt count, then one sample with the
  erased model. About 3-5 minutes on a 2-core CPU (most of it sampling SD1.5's UNet).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from devkit import fullsize as F


def _params(layout, prefix):
    """Float parameters under ``prefix`` (SDXL's CLIP-L also stores int64 position_ids)."""
    return sum(math.prod(v.shape) for k, v in layout.items() if k.startswith(prefix) and v.is_floating_point())


@pytest.mark.parametrize("arch, expected, unet_params, text", [
    ("sd15", "SD15", 859_520_964, {"cond_stage_model.transformer.text_model.": 123_060_480}),
    ("sdxl", "SDXL", 2_567_463_684, {"conditioner.embedders.0.transformer.text_model.": 123_060_480,
                                     "conditioner.embedders.1.model.": 694_659_841}),
])
def test_layout_is_the_real_one_and_detected(comfy, arch, expected, unet_params, text):
    import comfy.model_detection
    import comfy.supported_models as sm

    layout = F.checkpoint_layout(arch)
    assert _params(layout, "model.diffusion_model.") == unet_params
    for prefix, n in text.items():
        assert _params(layout, prefix) == n, prefix
    assert "first_stage_model.taesd_decoder.1.weight" in layout
    ffn2 = [k for k in layout if k.endswith(".ff.net.2.weight")]
    assert len(ffn2) == F.FFN2_COUNT[arch]
    # ComfyUI's detection on the key shapes, with only ComfyUI's own configs
    real_only = [m for m in sm.models if m.__module__ == "comfy.supported_models"]
    saved = list(sm.models)
    sm.models[:] = real_only
    try:
        config = comfy.model_detection.model_config_from_unet(layout, "model.diffusion_model.")
    finally:
        sm.models[:] = saved
    assert type(config).__name__ == expected


def test_values_are_seeded_small_and_norms_one(comfy):
    import torch

    layout = F.checkpoint_layout("sd15")
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"
    a = F._make_tensor(key, layout[key], 0, torch.float16)
    assert torch.equal(a, F._make_tensor(key, layout[key], 0, torch.float16))
    assert not torch.equal(a, F._make_tensor(key, layout[key], 1, torch.float16))
    assert abs(a.float().std().item() - F.WEIGHT_STD) < 1e-3
    norm = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1.weight"
    assert torch.equal(F._make_tensor(norm, layout[norm], 0, torch.float16), torch.ones(layout[norm].shape,
                                                                                          dtype=torch.float16))


@pytest.mark.slow
@pytest.mark.server
def test_sd15_fullsize_forget_concepts_on_a_real_server(comfy, tmp_path):
    inputs = F.fia_inputs("golf ball", size=64, num_prompts=2, steps=50, saliency_steps=2)
    r = F.run_forget_on_server("sd15", tmp_path / "base", inputs=inputs, sample_steps=1, anon_limit_gb=8)
    assert not r.get("error"), r.get("error")
    assert r["detected"]["model_type"] == "SD15"
    assert r["completed"] == ["load", "forget", "sample"]
    assert any("model_type EPS" in line for line in r["server_log"])
    s = r["summary"]
    assert s["concepts"] == ["golf ball"] and s["layers"] == F.FFN2_COUNT["sd15"]
    assert s["pruned"] > 0 and 0 < s["pruned_fraction"] < 0.5
    img = np.asarray(Image.open(r["image"]))
    assert img.shape == (64, 64, 3)
    assert r["peak_anon_bytes"] < 6.5e9, r["peak_anon_bytes"]
