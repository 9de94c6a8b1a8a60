"""fp16 and bf16 UNets through the whole chain (saliency -> mask -> apply), and ComfyUI
0.8's fp16 patch computation (issue 13 item 3): strength 1 zeroes exactly in any dtype.

The reference for the mask is an fp32 UNet holding the same (fp16 / bf16) weights; the
reference for the patched weights is the original with zeros planted at the mask (or,
where ComfyUI rounds every patched weight, the same ComfyUI path with a do-nothing patch).
"""
from __future__ import annotations

import logging

import pytest
import torch

from devkit import harness as H
from devkit import quant_models as QM

log = logging.getLogger(__name__)

@pytest.fixture(scope="module")
def pack(comfy):
    return H.load_pack()


def mask_of(pack, model, clip, concept="golf ball", r2=0.05):
    return QM.fresh_saliency_and_mask(pack, model, clip, concept, r2)


def stored_ffn2(model) -> dict[str, torch.Tensor]:
    """Load like sampling does and read each FFN2 weight in its stored dtype."""
    import comfy.model_management as mm

    with torch.no_grad():
        mm.load_models_gpu([model])
        return {k: m.weight.detach().clone() for k, m in QM.ffn2_modules(model).items()}


def fp32_twin(model, seed: int):
    """A float32 tiny SD15 holding exactly ``model``'s (rounded) weights."""
    twin = H.tiny_sd15_model(seed=seed, dtype=torch.float32)
    src = model.model.diffusion_model.state_dict()
    with torch.no_grad():
        for k, p in twin.model.diffusion_model.state_dict().items():
            p.copy_(src[k].float())
    return twin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_unet_whole_chain(comfy, pack, tiny_clip, dtype):
    seed = {torch.float16: 40, torch.bfloat16: 41}[dtype]
    model = H.tiny_sd15_model(seed=seed, dtype=dtype)
    assert all(m.weight.dtype == dtype for m in QM.ffn2_modules(model).values())
    twin = fp32_twin(model, seed)
    sal, mask = mask_of(pack, model, tiny_clip)
    sal32, mask32 = mask_of(pack, twin, tiny_clip)
    dense, dense32 = mask.dense(), mask32.dense()
    j = QM.jaccard(torch.cat([d.flatten() for d in dense.values()]), torch.cat([d.flatten() for d in dense32.values()]))
    log.warning("ComfyUI %s %s UNet: Jaccard(mask, fp32-twin mask) = %.6f (%d pruned)", QM.comfyui_version(),
                dtype, j, mask.stats()["total_pruned"])
    assert mask.stats()["total_pruned"] > 0 and j == 1.0
    original = stored_ffn2(model)
    patched = pack.NODE_CLASS_MAPPINGS["FIAApplyMask"]().apply(model, mask, 1.0)[0]
    got = stored_ffn2(patched)
    for key, w in original.items():
        m = dense[key]
        assert got[key].dtype == dtype
        assert (got[key][m] == 0).all(), key
        assert torch.equal(got[key][~m], w[~m]), key
    pos, neg = H.encode(tiny_clip, "a golf ball"), H.encode(tiny_clip, "")
    assert not torch.equal(H.sample(model, pos, neg, steps=3), H.sample(patched, pos, neg, steps=3))
    assert all(torch.equal(v, original[k]) for k, v in stored_ffn2(model).items()), "the input model changed"


def test_patches_computed_in_fp16_zero_exactly(comfy, pack, tiny_sd15, tiny_clip, monkeypatch):
    """ComfyUI 0.8 computes weight patches in fp16 on GPUs that support it
    (model_management.lora_compute_dtype); forced here on the CPU."""
    import comfy.model_management as mm

    if not hasattr(mm, "lora_compute_dtype"):
        pytest.skip(f"ComfyUI {QM.comfyui_version()} always patches in float32 (no lora_compute_dtype)")
    _, mask = mask_of(pack, tiny_sd15, tiny_clip, "parachute")
    dense = mask.dense()
    keys = list(QM.ffn2_modules(tiny_sd15))
    monkeypatch.setitem(mm.LORA_COMPUTE_DTYPES, torch.device("cpu"), torch.float16)
    assert mm.lora_compute_dtype(torch.device("cpu")) == torch.float16
    try:
        got = stored_ffn2(pack.NODE_CLASS_MAPPINGS["FIAApplyMask"]().apply(tiny_sd15, mask, 1.0)[0])
        noop = tiny_sd15.clone()
        noop.add_patches({f"diffusion_model.{k}.weight": ("diff", (torch.zeros(dense[k].shape),)) for k in keys}, 1.0)
        ref = stored_ffn2(noop)
    finally:
        mm.unload_all_models()
    moved = sum(int((ref[k] != w).sum()) for k, w in stored_ffn2(tiny_sd15).items())
    assert moved > 0, "the fp16 patch path was not taken (a do-nothing patch should round to fp16)"
    for k in keys:
        assert (got[k][dense[k]] == 0).all(), k
        assert torch.equal(got[k][~dense[k]], ref[k][~dense[k]]), k
