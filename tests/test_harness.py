"""The test harness works against the real ComfyUI (no mocks): tiny models sample
deterministically through nodes.common_ksampler, FFN2 keys are the ones add_patches
accepts, the tiny CLIPs encode, and a real main.py server runs a checkpoint workflow."""
from __future__ import annotations

import torch
import pytest

from devkit import harness as H

SD15_FFN2 = [
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.input_blocks.3.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight",
] + [f"diffusion_model.output_blocks.{i}.1.transformer_blocks.0.ff.net.2.weight" for i in range(4)]


def _sample(model, clip, seed, text="a cat"):
    return H.sample(model, H.encode(clip, text), H.encode(clip, ""), seed=seed, steps=3)


def test_tiny_sd15_ffn2_keys_and_config(comfy, tiny_sd15):
    keys = H.ffn2_keys(tiny_sd15)
    assert keys == SD15_FFN2 and len(keys) == H.TINY_SD15_FFN2_COUNT
    sd = tiny_sd15.model.state_dict()
    assert sd[keys[0]].shape == (32, 128) and sd[keys[2]].shape == (64, 256)
    # add_patches silently ignores unknown keys: these are the keys it accepts.
    clone = tiny_sd15.clone()
    accepted = clone.add_patches({k: ("diff", (torch.zeros_like(sd[k]),)) for k in keys})
    assert sorted(accepted) == sorted(keys)
    # The in-process config is what ComfyUI's detection derives from the weights.
    detected = comfy.comfy.model_detection.detect_unet_config(tiny_sd15.model.diffusion_model.state_dict(), "")
    assert detected == H.TINY_SD15_UNET


def test_tiny_sdxl_structure(comfy, tiny_sdxl):
    keys = H.ffn2_keys(tiny_sdxl)
    assert len(keys) == H.TINY_SDXL_FFN2_COUNT
    assert "diffusion_model.middle_block.1.transformer_blocks.1.ff.net.2.weight" in keys
    assert isinstance(tiny_sdxl.model, comfy.comfy.model_base.SDXL)
    assert tiny_sdxl.model.adm_channels == H.TINY_SDXL_POOLED_DIM + 1536
    detected = comfy.comfy.model_detection.detect_unet_config(tiny_sdxl.model.diffusion_model.state_dict(), "")
    assert detected == H.TINY_SDXL_UNET


def test_tiny_clips_encode(comfy, tiny_clip, tiny_sdxl_clip):
    cond, pooled = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a cat"), return_pooled=True)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 64)
    [[c, extra]] = H.encode(tiny_clip, "a cat")
    assert torch.equal(c, cond) and torch.equal(extra["pooled_output"], pooled)
    assert not torch.equal(c, H.encode(tiny_clip, "a dog")[0][0])
    again = H.tiny_clip(seed=0)  # rebuilt from the same seed: identical weights
    assert torch.equal(H.encode(again, "a cat")[0][0], c)
    [[cx, extrax]] = H.encode(tiny_sdxl_clip, "a cat")
    assert cx.shape == (1, 77, 64) and extrax["pooled_output"].shape == (1, H.TINY_SDXL_POOLED_DIM)


def test_tiny_sd15_samples_deterministically(comfy, tiny_sd15, tiny_clip):
    a = _sample(tiny_sd15, tiny_clip, seed=1)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, _sample(tiny_sd15, tiny_clip, seed=1))
    assert not torch.equal(a, _sample(tiny_sd15, tiny_clip, seed=2))
    assert not torch.equal(a, _sample(tiny_sd15, tiny_clip, seed=1, text="a dog"))
    # Same weight seed -> same model; another weight seed -> another model.
    assert torch.equal(a, _sample(H.tiny_sd15_model(seed=0), tiny_clip, seed=1))
    assert not torch.equal(a, _sample(H.tiny_sd15_model(seed=5), tiny_clip, seed=1))


def test_tiny_sdxl_samples_deterministically_with_pooled(comfy, tiny_sdxl, tiny_sdxl_clip):
    a = _sample(tiny_sdxl, tiny_sdxl_clip, seed=1)
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, _sample(tiny_sdxl, tiny_sdxl_clip, seed=1))
    assert not torch.equal(a, _sample(tiny_sdxl, tiny_sdxl_clip, seed=2))
    # The ADM path is live: only pooled_output changed -> another result.
    pos, neg = H.encode(tiny_sdxl_clip, "a cat"), H.encode(tiny_sdxl_clip, "")
    pos2 = [[pos[0][0], {**pos[0][1], "pooled_output": pos[0][1]["pooled_output"] + 1.0}]]
    b = H.sample(tiny_sdxl, pos2, neg, seed=1, steps=3)
    assert torch.equal(a, H.sample(tiny_sdxl, pos, neg, seed=1, steps=3))
    assert not torch.equal(a, b)


def test_effective_weight_follows_the_patcher_not_the_shared_module(comfy, tiny_sd15, tiny_clip):
    key = H.ffn2_keys(tiny_sd15)[0]
    original = H.effective_weight(tiny_sd15, key)
    mask = torch.zeros_like(original, dtype=torch.bool)
    mask[0, :5] = True
    patched = tiny_sd15.clone()
    assert patched.add_patches({key: ("diff", (-original * mask,))}) == [key]
    before = _sample(tiny_sd15, tiny_clip, seed=3)
    after_patched = _sample(patched, tiny_clip, seed=3)  # patches the shared module in place
    assert not torch.equal(before, after_patched)
    assert torch.equal(H.effective_weight(tiny_sd15, key), original)
    eff = H.effective_weight(patched, key)
    assert (eff[mask] == 0).all() and torch.equal(eff[~mask], original[~mask])
    assert torch.equal(_sample(tiny_sd15, tiny_clip, seed=3), before)  # restored on load


def test_tiny_checkpoint_loads_in_process(comfy, tiny_checkpoint, tiny_sd15):
    model, clip, vae, _ = comfy.comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint))
    assert type(model.model.model_config).__name__ == "TinySD15"
    assert type(clip.cond_stage_model).__name__ == "TinySD1ClipModel"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    ref = tiny_sd15.model.diffusion_model.state_dict()
    got = model.model.diffusion_model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert H.ffn2_keys(model) == SD15_FFN2
    image = vae.decode(H.sample(model, H.encode(clip, "a cat"), H.encode(clip, ""), seed=0, steps=2))
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.server
def test_server_runs_tiny_checkpoint_workflow(comfy, tiny_checkpoint, tmp_path):
    base = tmp_path / "server"
    with H.ComfyServer(base, custom_nodes=(), models={"checkpoints/tiny.safetensors": tiny_checkpoint},
                       wait_for="/object_info/CheckpointLoaderSimple") as srv:
        info = srv.get("/object_info/CheckpointLoaderSimple")
        assert "tiny.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        entry = srv.run(H.sd15_api_graph("tiny.safetensors", save_prefix="harness"), timeout=180)
        [image] = entry["outputs"]["image"]["images"]
        assert (base / "output" / image["filename"]).is_file()
        with pytest.raises(H.ComfyServerError, match="(?s)HTTP 400.*node_errors.*nope.safetensors"):
            srv.post_prompt(H.sd15_api_graph("nope.safetensors"))
    assert srv.proc.returncode is not None
