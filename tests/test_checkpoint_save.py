"""Sharing an erased model: ComfyUI's own CheckpointSave and ModelSave nodes
(comfy_extras/nodes_model_merging.py) on the MODEL that FIAApplyMask returns write the
masked weights, and reloading the file (comfy.sd.load_checkpoint_guess_config, UNETLoader)
gives exactly zero at the mask and the original weights everywhere else.

Ground truth: the weights the sampler used BEFORE patching (read through ComfyUI's loading
path), the raw tensors in the written file (safetensors, no ComfyUI), and the mask itself.
Tiny models: the harness's SD15 / SDXL configs and devkit/sd2.py's SD2 config are
registered for detection in this process (test-only).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devkit import harness as H
from devkit import sd2

SMALL = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
             width=64, height=64, mode="fast", batch_size=2, num_prompts=4)
UNET_PREFIX = "model.diffusion_model."  # where save_checkpoint puts the UNet


@pytest.fixture(scope="module")
def pack(comfy):
    H.register_tiny_models_for_detection()
    sd2.register_tiny_sd2_for_detection()
    return H.load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def merging(comfy):
    """ComfyUI's checkpoint-saving nodes, real classes from its comfy_extras."""
    import comfy_extras.nodes_model_merging as mm
    return mm


def build(arch: str):
    if arch == "sd15":
        return H.tiny_sd15_model(seed=0), H.tiny_clip(seed=1)
    if arch == "sd15_fp16":
        return H.tiny_sd15_model(seed=0, dtype=torch.float16), H.tiny_clip(seed=1)
    if arch == "sdxl":
        return H.tiny_sdxl_model(seed=0), H.tiny_sdxl_clip(seed=1)
    if arch == "sd2":
        return sd2.tiny_sd2_model(seed=0), sd2.tiny_sd2_clip(seed=1)
    raise ValueError(arch)


def result(out):
    return out["result"] if isinstance(out, dict) else out


def loaded_unet_state(model) -> dict[str, torch.Tensor]:
    """Every UNet tensor as the sampler uses it: load the patcher as sampling does, copy."""
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    return {k: v.detach().cpu().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def ffn2_weight_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(".ff.net.2.weight")]


def erase(nodes, model, clip):
    sal = result(nodes["FIAConceptSaliency"].compute(model, clip, "golf ball", "objects", 0.05, **SMALL))[0]
    mask = result(nodes["FIABuildConceptMask"].build(sal, 0.08))[0]
    assert mask.stats()["total_pruned"] > 0
    return result(nodes["FIAApplyMask"].apply(model, mask, 1.0))[0], mask


def newest(folder: Path, prefix: str) -> Path:
    files = sorted(folder.glob(f"{prefix}_*.safetensors"))
    assert files, f"nothing saved as {folder}/{prefix}_*"
    return files[-1]


def check_erased(state: dict, original: dict, mask, prefix: str = "") -> None:
    """``state`` (keys ``prefix`` + UNet key): zero exactly at the mask, original elsewhere
    (FFN2 weights), every other UNet tensor identical."""
    dense = mask.dense()
    ffn2 = ffn2_weight_keys(original)
    assert len(ffn2) == len(dense)
    for key, w in original.items():
        got = state[prefix + key]
        assert got.shape == w.shape, key
        if key in ffn2:
            m = dense[key[:-len(".weight")]]
            got, w = got.float(), w.float()
            assert int(m.sum()) == 0 or torch.all(got[m] == 0), key
            assert torch.equal(got[~m], w[~m]), key
        else:
            assert torch.equal(got.float(), w.float()), key


@pytest.mark.parametrize("arch", ["sd15", "sd15_fp16", "sdxl", "sd2"])
def test_checkpoint_save_writes_the_erased_weights(comfy, nodes, merging, arch):
    import comfy.sd

    model, clip = build(arch)
    vae = H.tiny_vae(seed=2)
    original = loaded_unet_state(model)
    dtype = next(iter(original.values())).dtype
    pos, neg = H.encode(clip, "a golf ball"), H.encode(clip, "")
    before = H.sample(model, pos, neg, seed=4)

    patched, mask = erase(nodes, model, clip)
    erased_sample = H.sample(patched, pos, neg, seed=4)
    assert not torch.equal(before, erased_sample)
    saver = merging.CheckpointSave()
    saver.save(patched, clip, vae, f"checkpoints/fia_erased_{arch}")
    path = newest(Path(saver.output_dir) / "checkpoints", f"fia_erased_{arch}")

    # the file itself, read without ComfyUI
    raw = load_file(str(path))
    assert all(raw[UNET_PREFIX + k].dtype == dtype for k in ffn2_weight_keys(original))
    check_erased(raw, original, mask, UNET_PREFIX)
    assert any(k.startswith("first_stage_model.") for k in raw) and any(
        k.startswith(("cond_stage_model.", "conditioner.")) for k in raw)

    # reloaded by ComfyUI: detected as the same architecture, same weights, same images
    reloaded, reclip, revae = comfy.sd.load_checkpoint_guess_config(str(path))[:3]
    assert type(reloaded.model.model_config) is type(model.model.model_config)
    assert reloaded.model.model_type == model.model.model_type
    assert revae is not None and reclip is not None
    check_erased(loaded_unet_state(reloaded), original, mask)
    rpos, rneg = H.encode(reclip, "a golf ball"), H.encode(reclip, "")
    torch.testing.assert_close(rpos[0][0], pos[0][0], rtol=0, atol=0)
    torch.testing.assert_close(H.sample(reloaded, rpos, rneg, seed=4), erased_sample, rtol=0, atol=0)

    # saving did not touch the input model
    assert torch.equal(H.sample(model, pos, neg, seed=4), before)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_model_save_and_unet_loader(comfy, comfy_base_dir, nodes, merging, arch):
    import folder_paths

    model, clip = build(arch)
    original = loaded_unet_state(model)
    patched, mask = erase(nodes, model, clip)
    saver = merging.ModelSave()
    saver.save(patched, f"diffusion_models/fia_erased_unet_{arch}")
    path = newest(Path(saver.output_dir) / "diffusion_models", f"fia_erased_unet_{arch}")
    raw = load_file(str(path))
    assert not any(k.startswith(("cond_stage_model.", "conditioner.", "first_stage_model.")) for k in raw)
    check_erased(raw, original, mask, UNET_PREFIX)

    # a user puts it in models/diffusion_models and loads it with UNETLoader
    dest_dir = Path(folder_paths.get_folder_paths("diffusion_models")[0])
    dest_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, dest_dir / path.name)
    folder_paths.filename_list_cache.clear()
    (unet,) = comfy.nodes.UNETLoader().load_unet(path.name, "default")
    assert type(unet.model.model_config) is type(model.model.model_config)
    check_erased(loaded_unet_state(unet), original, mask)
    pos, neg = H.encode(clip, "a golf ball"), H.encode(clip, "")
    torch.testing.assert_close(H.sample(unet, pos, neg, seed=5), H.sample(patched, pos, neg, seed=5), rtol=0, atol=0)


def test_partial_strength_is_saved_as_scaled_weights(comfy, nodes, merging):
    """strength 0.5 halves the masked entries: the file holds exactly what the sampler used."""
    import comfy.sd

    model, clip = build("sd15")
    original = loaded_unet_state(model)
    sal = result(nodes["FIAConceptSaliency"].compute(model, clip, "parachute", "objects", 0.05, **SMALL))[0]
    mask = result(nodes["FIABuildConceptMask"].build(sal, 0.08))[0]
    half = result(nodes["FIAApplyMask"].apply(model, mask, 0.5))[0]
    used = loaded_unet_state(half)
    saver = merging.CheckpointSave()
    saver.save(half, clip, H.tiny_vae(seed=2), "checkpoints/fia_half")
    reloaded = comfy.sd.load_checkpoint_guess_config(str(newest(Path(saver.output_dir) / "checkpoints", "fia_half")))[0]
    state = loaded_unet_state(reloaded)
    dense = mask.dense()
    for key in ffn2_weight_keys(original):
        m = dense[key[:-len(".weight")]]
        assert torch.equal(state[key], used[key])
        torch.testing.assert_close(state[key][m], original[key][m] * 0.5)
        assert torch.equal(state[key][~m], original[key][~m])
