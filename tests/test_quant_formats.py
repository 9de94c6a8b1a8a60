"""fp8 / quantized checkpoints through the whole chain, against an fp32 run of the same
weights (issue 13 item 2), on whichever ComfyUI runs the tests (0.3.75 or 0.8).

Each format of devkit/quant_models.py writes a tiny fp8 file and an fp32 twin holding
the exact dequantized values, both loaded by ComfyUI's own loaders. Checked:
discovery finds the 7 FFN2 layers; |W| equals the fp32 twin's; saliency hooks fire and
the masks equal the fp32 run's (Jaccard 1.0); after FIAApplyMask the loaded,
dequantized weights are exactly zero at the mask and equal, elsewhere, to what ComfyUI's
patch path gives for the same weight with a do-nothing patch (ComfyUI re-quantizes
every patched fp8 weight) and, everywhere, to a hand-built LoRA-style "diff" patch.
The same under ComfyUI's lowvram path (weights patched on the fly at each forward).
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from devkit import harness as H
from devkit import quant_models as QM

log = logging.getLogger(__name__)

SMALL = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
             width=64, height=64, mode="fast", batch_size=2)
CONCEPT = "golf ball"
R2 = 0.05




@pytest.fixture(scope="module")
def adapter(pack):
    return sys.modules[f"{pack.__name__}.nodes.comfy_adapter"]


@pytest.fixture(scope="module")
def clip(comfy):
    return H.tiny_clip(seed=1)


_LOADED: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    """Free the loaded models with the module (not at interpreter exit, where ComfyUI's
    ModelPatcher.__del__ fails on already-cleared globals)."""
    yield
    import comfy.model_management as mm

    _LOADED.clear()
    mm.unload_all_models()


@pytest.fixture(params=QM.FORMATS)
def pair(request, comfy, tmp_path_factory):
    """(files, fp8 MODEL, fp32 twin MODEL) of one format, loaded once per session."""
    fmt = request.param
    reason = QM.format_unsupported(fmt)
    if reason:
        pytest.skip(reason)
    if fmt not in _LOADED:
        files = QM.tiny_quantized_files(tmp_path_factory.mktemp(f"q_{fmt}"), fmt, seed=0)
        _LOADED[fmt] = (files, QM.load_model(files.quantized, files.loader),
                        QM.load_model(files.reference, files.loader))
    files, fp8, ref = _LOADED[fmt]
    return files, fp8.clone(), ref.clone()


def saliency_and_mask(pack, model, clip, concept=CONCEPT, r2=R2):
    """A fresh (uncached) saliency run and its mask, through the pack's runner API."""
    return QM.fresh_saliency_and_mask(pack, model, clip, concept, r2, **SMALL)


def ffn2_dense(mask) -> dict[str, torch.Tensor]:
    return {k: v for k, v in mask.dense().items()}


def with_diff_patches(model, diffs: dict[str, torch.Tensor]):
    m = model.clone()
    accepted = m.add_patches({f"diffusion_model.{k}.weight": ("diff", (d,)) for k, d in diffs.items()}, 1.0)
    assert len(accepted) == len(diffs)
    return m


def test_discovery_and_abs_weights_use_the_dequantized_weight(comfy, adapter, pair):
    files, fp8, ref = pair
    layers = adapter.target_layers(fp8)
    assert [l.key for l in layers] == [l.key for l in adapter.target_layers(ref)]
    assert len(layers) == H.TINY_SD15_FFN2_COUNT
    assert all(l.key in files.layers for l in layers), "the FFN2 layers should be quantized in this file"
    assert any(QM.is_quantized_tensor(l.module.weight) or l.module.weight.dtype == QM.FP8 for l in layers)
    a8 = adapter.effective_weights(fp8, layers)
    a32 = QM.loaded_ffn2_float32(ref)  # the fp32 twin's weights, read from its modules
    for key, w in a8.items():
        assert w.dtype == torch.float32
        assert torch.equal(w, a32[key]), key
    assert adapter.abs_weights(fp8, layers).fingerprint == adapter.abs_weights(ref, adapter.target_layers(ref)).fingerprint


def test_saliency_hooks_fire_and_mask_equals_fp32_run(comfy, pack, pair, clip):
    files, fp8, ref = pair
    sal8, mask8 = saliency_and_mask(pack, fp8, clip)
    sal32, mask32 = saliency_and_mask(pack, ref, clip)
    assert list(sal8.columns) == list(sal32.columns)
    jaccards = {}
    for key in sal8.columns:
        assert float(sal8.columns[key].max()) > 0, f"no saliency recorded on {key}"
        torch.testing.assert_close(sal8.columns[key], sal32.columns[key], rtol=1e-4, atol=1e-6)
    d8, d32 = ffn2_dense(mask8), ffn2_dense(mask32)
    for key in d8:
        jaccards[key] = QM.jaccard(d8[key], d32[key])
    total = QM.jaccard(torch.cat([d.flatten() for d in d8.values()]), torch.cat([d.flatten() for d in d32.values()]))
    log.warning("ComfyUI %s %s: Jaccard(fp8 mask, fp32 mask) = %.6f overall (%d vs %d pruned); per layer %s",
                QM.comfyui_version(), files.fmt, total, mask8.stats()["total_pruned"], mask32.stats()["total_pruned"],
                sorted(set(jaccards.values())))
    assert mask8.stats()["total_pruned"] > 0
    assert total == 1.0 and all(j == 1.0 for j in jaccards.values())


def test_apply_zeroes_exactly_through_comfys_patch_path(comfy, pack, pair, clip):
    files, fp8, ref = pair
    _, mask = saliency_and_mask(pack, fp8, clip)
    dense = ffn2_dense(mask)
    twin = QM.loaded_ffn2_float32(ref)  # exact dequantized originals
    original = QM.loaded_ffn2_float32(fp8)
    assert all(torch.equal(original[k], twin[k]) for k in twin)
    patched = pack.nodes.comfy_adapter.apply_mask(fp8, mask, 1.0)
    got = QM.loaded_ffn2_float32(patched)
    noop = QM.loaded_ffn2_float32(with_diff_patches(fp8, {k: torch.zeros_like(w) for k, w in twin.items()}))
    lora = QM.loaded_ffn2_float32(with_diff_patches(fp8, {k: -twin[k] * dense[k] for k in twin}))
    moved_by_noop = sum(int((noop[k] != twin[k]).sum()) for k in twin)
    differs = {k: int((got[k] != noop[k])[~dense[k]].sum()) for k in twin}
    total = sum(w.numel() for w in twin.values())
    log.warning("ComfyUI %s %s: do-nothing patch moves %d of %d FFN2 entries; masked %d; entries off the mask "
                "differing from the do-nothing patch: %s", QM.comfyui_version(), files.fmt, moved_by_noop, total,
                sum(int(d.sum()) for d in dense.values()), differs)
    compared = 0
    for k in twin:
        assert (got[k][dense[k]] == 0).all(), f"{k}: masked entries are not zero after dequantization"
        assert torch.equal(got[k], lora[k]), f"{k}: differs from the LoRA-style diff patch"
        # ComfyUI 0.8 re-quantizes with a scale recalculated from the patched weight's absmax:
        # where the mask removes the absmax entry, every other entry gets a new scale, and
        # the do-nothing patch is no reference for that layer (the diff patch above is).
        if bool(dense[k].flatten()[twin[k].abs().flatten().argmax()]) and QM.requantize_recalculates_scale():
            continue
        compared += 1
        assert torch.equal(got[k][~dense[k]], noop[k][~dense[k]]), (
            f"{k}: {differs[k]} entries off the mask differ from the do-nothing patch")
    assert compared >= len(twin) - 2
    # the erased model samples, and differently from the original
    pos, neg = H.encode(clip, "a golf ball in a park"), H.encode(clip, "")
    assert not torch.equal(H.sample(fp8, pos, neg, seed=1, steps=3), H.sample(patched, pos, neg, seed=1, steps=3))
    # the input MODEL is untouched
    assert all(torch.equal(v, twin[k]) for k, v in QM.loaded_ffn2_float32(fp8).items())


def lowvram_effective_weights(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FFN2 weights a forward computes with under ComfyUI's lowvram path (every
    module offloaded: patches run on the fly), dequantized to float32."""
    import comfy.model_management as mm

    mm.unload_all_models()
    cpu = torch.device("cpu")
    with torch.no_grad():
        return _lowvram_effective_weights(model, inputs, cpu)


def _lowvram_effective_weights(model, inputs, cpu):
    import comfy.ops

    model.patch_model(device_to=cpu, lowvram_model_memory=1)
    try:
        out = {}
        for key, mod in QM.ffn2_modules(model).items():
            assert mod.comfy_cast_weights, f"{key} is not on the lowvram path"
            w, _ = comfy.ops.cast_bias_weight(mod, inputs[key])
            w = w.detach().to(torch.float32)
            scale = getattr(mod, "scale_weight", None)  # 0.3.75 scaled_fp8 scales after the cast
            if scale is not None:
                w = w * scale.to(torch.float32)
            out[key] = w
        return out
    finally:
        model.unpatch_model(device_to=cpu)


def test_lowvram_masks_on_the_fly(comfy, pack, pair, clip):
    files, fp8, ref = pair
    _, mask = saliency_and_mask(pack, fp8, clip)
    dense = ffn2_dense(mask)
    twin = QM.loaded_ffn2_float32(ref)
    g = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(1, 4, w.shape[1], generator=g) for k, w in twin.items()}
    patched = pack.nodes.comfy_adapter.apply_mask(fp8, mask, 1.0)
    got = lowvram_effective_weights(patched, inputs)
    noop = lowvram_effective_weights(with_diff_patches(fp8, {k: torch.zeros_like(w) for k, w in twin.items()}), inputs)
    for k in twin:
        assert (got[k][dense[k]] == 0).all(), k
        assert torch.equal(got[k][~dense[k]], noop[k][~dense[k]]), k
    for k, mod in QM.ffn2_modules(fp8).items():
        assert not mod.weight_function, "lowvram patches were left on the module"


@pytest.mark.parametrize("fmt", ["scaled_fp8", "comfy_quant"])
def test_sdxl_fp8_checkpoint_whole_chain(comfy, pack, tmp_path, fmt):
    """SDXL (linear proj_in/out, two transformer blocks per level) in fp8: same mask as
    the fp32 twin, exact zeros after ComfyUI's re-quantization."""
    reason = QM.format_unsupported(fmt)
    if reason:
        pytest.skip(reason)
    files = QM.tiny_quantized_files(tmp_path, fmt, seed=0, arch="sdxl")
    fp8, ref = QM.load_model(files.quantized, files.loader), QM.load_model(files.reference, files.loader)
    clip = H.tiny_sdxl_clip(seed=1)
    layers = pack.nodes.comfy_adapter.target_layers(fp8)
    assert len(layers) == H.TINY_SDXL_FFN2_COUNT
    _, mask8 = saliency_and_mask(pack, fp8, clip)
    _, mask32 = saliency_and_mask(pack, ref, clip)
    d8, d32 = ffn2_dense(mask8), ffn2_dense(mask32)
    j = QM.jaccard(torch.cat([d.flatten() for d in d8.values()]), torch.cat([d.flatten() for d in d32.values()]))
    log.warning("ComfyUI %s SDXL %s: Jaccard(fp8 mask, fp32 mask) = %.6f (%d pruned)", QM.comfyui_version(), fmt,
                j, mask8.stats()["total_pruned"])
    assert j == 1.0 and mask8.stats()["total_pruned"] > 0
    twin = QM.loaded_ffn2_float32(ref)
    got = QM.loaded_ffn2_float32(pack.nodes.comfy_adapter.apply_mask(fp8, mask8, 1.0))
    lora = QM.loaded_ffn2_float32(with_diff_patches(fp8, {k: -twin[k] * d8[k] for k in twin}))
    for k in twin:
        assert (got[k][d8[k]] == 0).all() and torch.equal(got[k], lora[k]), k
    import comfy.model_management as mm
    mm.unload_all_models()
