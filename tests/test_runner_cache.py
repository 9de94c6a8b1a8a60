"""Saliency disk cache (issue 11 item 1) against a real in-process ComfyUI: the key covers
the text encoder's layer setting, weight patches and model_options patches; entries are
validated on read; a hit says so."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import comfy_harness as H

SET = dict(steps=4, saliency_steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", seed=7,
           width=64, height=64, mode="fast", batch_size=2)


@pytest.fixture(scope="session")
def pack(comfy):
    return H.load_pack()


@pytest.fixture(scope="session")
def runner(pack):
    return pack.nodes.saliency


def run(pack, runner, model, clip, concept="golf ball", use_cache=True, **kw):
    settings = runner.SaliencySettings(**{**SET, **kw})
    pairs = pack.fia_core.build_prompt_pairs(concept, "objects", 3, 0)
    return runner.concept_saliency(model, clip, concept, pairs, settings, use_cache=use_cache)


def unet_calls(model):
    count = {"n": 0}
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
    return count, handle


def assert_same_columns(a, b):
    assert list(a.columns) == list(b.columns)
    for k in a.columns:
        torch.testing.assert_close(a.columns[k], b.columns[k], rtol=1e-5, atol=1e-7)


def differs(a, b) -> bool:
    return any(not torch.allclose(a.columns[k], b.columns[k], rtol=1e-4, atol=1e-6) for k in a.columns)


def attn_key(model) -> str:
    return next(k for k in model.model.state_dict() if k.endswith("attn1.to_q.weight"))


def scale_queries(q, k, v, extra_options):  # an attention patch, as model_options carry them
    return q * 1.5, k, v


def test_hit_says_so_and_runs_no_unet(comfy, pack, runner, tiny_sd15, tiny_clip):
    first = run(pack, runner, tiny_sd15, tiny_clip, "tench")
    assert not first.cached and runner.CACHED_NOTE not in first.notes
    count, handle = unet_calls(tiny_sd15)
    try:
        again = run(pack, runner, tiny_sd15.clone(), tiny_clip.clone(), "tench", batch_size=1)
    finally:
        handle.remove()
    assert again.cached and runner.CACHED_NOTE in again.notes and count["n"] == 0
    for k in first.saliency.columns:
        assert torch.equal(first.saliency.columns[k], again.saliency.columns[k])


def test_clip_set_last_layer_misses(comfy, pack, runner, tiny_sd15, tiny_clip):
    run(pack, runner, tiny_sd15, tiny_clip, "church")
    penultimate = comfy.nodes.CLIPSetLastLayer().set_last_layer(tiny_clip, -2)[0]
    got = run(pack, runner, tiny_sd15, penultimate, "church")
    fresh = run(pack, runner, tiny_sd15, penultimate, "church", use_cache=False)
    assert not got.cached
    assert_same_columns(got.saliency, fresh.saliency)
    assert differs(got.saliency, run(pack, runner, tiny_sd15, tiny_clip, "church").saliency)


def test_lora_like_patch_on_attention_misses(comfy, pack, runner, tiny_sd15, tiny_clip):
    run(pack, runner, tiny_sd15, tiny_clip, "parachute")
    key = attn_key(tiny_sd15)
    shape = tiny_sd15.model.state_dict()[key].shape
    lora = tiny_sd15.clone()
    assert lora.add_patches({key: ("diff", (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5,))},
                            1.0) == [key]
    got = run(pack, runner, lora, tiny_clip, "parachute")
    assert not got.cached
    assert_same_columns(got.saliency, run(pack, runner, lora, tiny_clip, "parachute", use_cache=False).saliency)
    # the key is content-based: the same patch added to another clone (new patches_uuid) hits
    twin = tiny_sd15.clone()
    twin.add_patches({key: ("diff", (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5,))}, 1.0)
    assert twin.patches_uuid != lora.patches_uuid
    assert run(pack, runner, twin, tiny_clip, "parachute").cached
    # another strength is another model
    weaker = tiny_sd15.clone()
    weaker.add_patches({key: ("diff", (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.5,))}, 0.5)
    assert not run(pack, runner, weaker, tiny_clip, "parachute").cached


def test_model_options_attention_patch_misses(comfy, pack, runner, tiny_sd15, tiny_clip):
    run(pack, runner, tiny_sd15, tiny_clip, "gas pump")
    patched = tiny_sd15.clone()
    patched.set_model_attn1_patch(scale_queries)
    got = run(pack, runner, patched, tiny_clip, "gas pump")
    assert not got.cached
    assert_same_columns(got.saliency, run(pack, runner, patched, tiny_clip, "gas pump", use_cache=False).saliency)
    assert run(pack, runner, patched, tiny_clip, "gas pump").cached  # describable: cached from now on


def test_undescribable_patch_disables_the_cache_with_a_note(comfy, pack, runner, tiny_sd15, tiny_clip):
    class Opaque:
        __slots__ = ("factor",)

        def __init__(self):
            self.factor = 1.0

        def __call__(self, q, k, v, extra_options):
            return q * self.factor, k, v

    patched = tiny_sd15.clone()
    patched.set_model_attn1_patch(Opaque())
    first = run(pack, runner, patched, tiny_clip, "chain saw")
    second = run(pack, runner, patched, tiny_clip, "chain saw")
    assert not first.cached and not second.cached
    assert any("cache not used" in n for n in second.notes)


def entry_path(runner, comfy_base_dir) -> Path:
    files = sorted(Path(comfy_base_dir).glob("**/fia_cache/saliency/*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert files
    return files[-1]


@pytest.mark.parametrize("damage", ["zeros", "nan", "negative", "shape"])
def test_damaged_entry_is_recomputed_not_served(comfy, comfy_base_dir, pack, runner, tiny_sd15, tiny_clip, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    concept = f"cassette player {damage}"
    first = run(pack, runner, tiny_sd15, tiny_clip, concept)
    path = entry_path(runner, comfy_base_dir)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert any(bool(t.any()) for t in tensors.values())
    bad = {"zeros": lambda t: torch.zeros_like(t), "nan": lambda t: torch.full_like(t, math.nan),
           "negative": lambda t: -t - 1, "shape": lambda t: t[:, :-1].contiguous()}[damage]
    save_file({k: bad(t) for k, t in tensors.items()}, str(path), metadata=meta)
    again = run(pack, runner, tiny_sd15, tiny_clip, concept)
    assert not again.cached
    assert_same_columns(again.saliency, first.saliency)
    assert run(pack, runner, tiny_sd15, tiny_clip, concept).cached  # rewritten, valid again


def test_forget_concepts_reports_the_cache(comfy, pack, tiny_sd15, tiny_clip):
    node = pack.NODE_CLASS_MAPPINGS["FIAForgetConcepts"]()
    args = {**SET, "num_prompts": 3}
    node.forget(tiny_sd15, tiny_clip, "bell\nhorn", "objects", 0.05, 0.05, 0.6, 1.0, **args)
    out = node.forget(tiny_sd15, tiny_clip, "bell\nhorn", "objects", 0.05, 0.03, 0.6, 1.0, **args)
    warnings = out["ui"]["fia_summary"][0]["warnings"]
    assert any("bell" in w and "cache" in w for w in warnings) and any("horn" in w and "cache" in w for w in warnings)
