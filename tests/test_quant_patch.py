"""FIAMaskPatch through ComfyUI's own weight-patch path (comfy.lora.calculate_weight and
ModelPatcher loading, lowvram included), in every dtype: it fails closed.

References are built by hand from the weight and the planted indices, never by the
pack's own masking code.
"""
from __future__ import annotations

import sys

import pytest
import torch

from devkit import harness as H

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.fixture(scope="module")
def adapter(comfy):
    pack = H.load_pack()
    return sys.modules[f"{pack.__name__}.nodes.comfy_adapter"]


def planted(shape=(24, 40), count=97, seed=0):
    """A weight with no zero entries and sorted random flat indices to mask."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(shape, generator=g) + 0.5) * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    idx = torch.randperm(shape[0] * shape[1], generator=g)[:count].sort().values
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    dense[idx] = True
    return w, idx, dense.view(shape)


def patch_entry(patch, strength=1.0, offset=None, function=None):
    """A ModelPatcher patch tuple: (strength, patch, strength_model, offset, function)."""
    return (strength, patch, 1.0, offset, function)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strength_one_zeroes_exactly_in_every_dtype(comfy, adapter, dtype):
    import comfy.lora

    w, idx, dense = planted()
    weight = w.to(dtype)
    expected_rest = weight.clone()
    out = comfy.lora.calculate_weight([patch_entry(adapter.FIAMaskPatch(idx, w.shape))], weight, "k",
                                      intermediate_dtype=dtype)
    assert out.dtype == dtype and out.shape == w.shape
    bits = out.view(torch.uint8) if dtype.itemsize == 1 else out
    assert (bits[dense] == 0).all(), "masked entries are not (+)0"
    assert torch.equal(out.view(torch.uint8)[~dense] if dtype.itemsize == 1 else out[~dense],
                       expected_rest.view(torch.uint8)[~dense] if dtype.itemsize == 1 else expected_rest[~dense])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_partial_strength_scales_masked_entries(comfy, adapter, dtype):
    import comfy.lora

    w, idx, dense = planted(seed=1)
    weight = w.to(dtype)
    out = comfy.lora.calculate_weight([patch_entry(adapter.FIAMaskPatch(idx, w.shape), strength=0.25)],
                                      weight.clone(), "k", intermediate_dtype=dtype)
    expected = torch.where(dense, weight.float() * 0.75, weight.float()).to(dtype)
    assert torch.equal(out.float(), expected.float())


def test_non_contiguous_weight_is_masked_not_skipped(comfy, adapter):
    """Issue 11 item 7: a non-contiguous weight used to come back UNMASKED (a log warning only)."""
    import comfy.lora

    w, idx, dense = planted(shape=(40, 24), seed=2)
    base = w.t().contiguous()  # (24, 40)
    view = base.t()  # (40, 24), non-contiguous, same values as w
    assert not view.is_contiguous() and torch.equal(view, w)
    out = comfy.lora.calculate_weight([patch_entry(adapter.FIAMaskPatch(idx, w.shape))], view, "k")
    assert out.is_contiguous()
    assert torch.equal(out, torch.where(dense, torch.zeros_like(w), w))


@pytest.mark.parametrize("case", ["offset", "function", "shape", "index_range", "integer_weight"])
def test_unexpected_layouts_raise(comfy, adapter, case):
    import comfy.lora

    w, idx, _ = planted(seed=3)
    patch = adapter.FIAMaskPatch(idx, w.shape)
    entry = patch_entry(patch)
    weight = w.clone()
    if case == "offset":
        entry = patch_entry(patch, offset=(0, 0, 12))
    elif case == "function":
        entry = patch_entry(patch, function=lambda a: a * 2)
    elif case == "shape":
        weight = torch.ones(w.shape[0], w.shape[1] + 1)
    elif case == "index_range":
        entry = patch_entry(adapter.FIAMaskPatch(torch.tensor([w.numel()]), None))
    else:
        weight = torch.ones(w.shape, dtype=torch.int32)
    with pytest.raises(adapter.MaskPatchError):
        comfy.lora.calculate_weight([entry], weight, "some.key")


def test_model_load_raises_instead_of_running_unmasked(comfy, adapter, tiny_sd15):
    """Through ModelPatcher: a patch the mask cannot honour (an offset) stops loading."""
    import comfy.model_management as mm

    key = H.ffn2_keys(tiny_sd15)[0]
    before = H.ffn2_modules(tiny_sd15)[key].weight.detach().clone()
    m = tiny_sd15.clone()
    shape = before.shape
    accepted = m.add_patches({(key, (0, 0, 4)): adapter.FIAMaskPatch(torch.tensor([0, 1, 2]), shape)}, 1.0)
    assert accepted
    with pytest.raises(adapter.MaskPatchError, match="offset"):
        mm.load_models_gpu([m])
    mm.unload_all_models()
    assert torch.equal(H.ffn2_modules(tiny_sd15)[key].weight.detach(), before), "the shared weight was changed"


def test_indices_are_cached_per_device(comfy, adapter):
    """lowvram runs the patch on every forward: the indices move to a device once."""
    _, idx, _ = planted(seed=4)
    patch = adapter.FIAMaskPatch(idx, (24, 40))
    cpu = patch.indices_on(torch.device("cpu"))
    assert cpu is patch.indices_on("cpu") and cpu.dtype == torch.long
    meta = patch.to(torch.device("meta")).indices_on("meta")  # a second device without a GPU
    assert meta.device.type == "meta" and meta is patch.indices_on(torch.device("meta"))
    assert len(patch._by_device) == 2


def test_lowvram_patch_masks_every_forward(comfy, adapter, tiny_sd15, tiny_clip):
    """ComfyUI's lowvram path on the CPU: patch_model with a tiny memory budget leaves
    the weights unpatched and masks them on the fly (LowVramPatch -> calculate_weight)."""
    import comfy.model_management as mm
    from devkit.harness import ffn2_modules

    keys = H.ffn2_keys(tiny_sd15)
    original = {k: m.weight.detach().float().clone() for k, m in ffn2_modules(tiny_sd15).items()}
    g = torch.Generator().manual_seed(5)
    plants = {k: torch.randperm(w.numel(), generator=g)[: w.numel() // 7].sort().values for k, w in original.items()}
    m = tiny_sd15.clone()
    assert len(m.add_patches({k: adapter.FIAMaskPatch(i, original[k].shape) for k, i in plants.items()}, 1.0)) == len(keys)
    mm.unload_all_models()
    m.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        mods = ffn2_modules(m)
        lowvram = [k for k in keys if any(type(f).__name__ == "LowVramPatch" for f in mods[k].weight_function)]
        assert lowvram == keys, "the lowvram path was not taken"
        for k in keys:
            assert torch.equal(mods[k].weight.detach().float(), original[k]), "weights were patched in place"
            x = torch.randn(2, 3, original[k].shape[1], generator=g)
            w_expected = original[k].flatten().index_fill(0, plants[k], 0).view(original[k].shape)
            ref = torch.nn.functional.linear(x, w_expected, mods[k].bias.detach().float())
            for _ in range(2):  # every forward masks again
                assert torch.equal(mods[k](x), ref)
            patch = m.patches[k][0][1]
            assert list(patch._by_device) == [torch.device("cpu")]
    finally:
        m.unpatch_model(device_to=torch.device("cpu"))
    assert all(torch.equal(mod.weight.detach().float(), original[k]) for k, mod in ffn2_modules(tiny_sd15).items())
