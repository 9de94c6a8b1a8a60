"""Every FIA node against a real, in-process ComfyUI 0.3.75 with tiny models.

References are independent of the pack: the saliency check re-runs ComfyUI's sampler
one prompt at a time with its own hooks and computes Eq. 2 in numpy; patched weights
are compared with weights built by hand from the original, the LoRA diff and the mask.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit import harness as H

SMALL = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
             width=64, height=64, mode="fast", batch_size=2, num_prompts=4)


@pytest.fixture(scope="session")
def pack(comfy):
    return H.load_pack()


@pytest.fixture
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


def result(out):
    return out["result"] if isinstance(out, dict) else out


def saliency_of(nodes, model, clip, concept="golf ball", **kw):
    args = {**SMALL, **kw}
    return result(nodes["FIAConceptSaliency"].compute(model, clip, concept, "objects", 0.05, **args))[0]


def mask_of(nodes, model, clip, concept="golf ball", r2=0.05, **kw):
    return result(nodes["FIABuildConceptMask"].build(saliency_of(nodes, model, clip, concept, **kw), r2))[0]


def unet_calls(model):
    """Counts diffusion-model forward calls on the shared module."""
    count = {"n": 0}
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *a: count.__setitem__("n", count["n"] + 1))
    return count, handle


def loaded_ffn2_weights(model) -> dict[str, torch.Tensor]:
    """Weights the sampler really uses: load the patcher the way sampling does, read them."""
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    return {k: m.weight.detach().float().cpu().clone() for k, m in H.ffn2_modules(model).items()}


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


# -- saliency: batched, cond-only, sigma-stepped vs a one-prompt-at-a-time reference ------

def reference_columns(comfy, model, clip, pairs, steps, saliency_steps, cfg, seed, size):
    """Eq. 2 (fast statistic) by the slow route: every prompt alone, full-length sampling,
    step = call order, conditional rows picked by the model_function_wrapper's list."""
    import comfy.sample

    keys = [k[len("diffusion_model."):-len(".weight")] for k in H.ffn2_keys(model)]
    mods = dict(model.model.diffusion_model.named_modules())
    per_prompt: dict[str, list] = {"concept": [], "base": []}
    for i, pair in enumerate(pairs):
        for side, text in (("concept", pair.concept_prompt), ("base", pair.base_prompt)):
            records = []  # per model call: {key: [rows, C_in] of cond rows}
            state = {"cond_rows": None}

            def wrapper(apply_model, args):
                chunks = args["cond_or_uncond"]
                n = args["input"].shape[0] // len(chunks)
                state["cond_rows"] = [r for c, kind in enumerate(chunks) for r in range(c * n, (c + 1) * n) if kind == 0]
                records.append({})
                return apply_model(args["input"], args["timestep"], **args["c"])

            def hook_for(key):
                def hook(mod, inp):
                    x = inp[0].detach().double().numpy()[state["cond_rows"]]
                    records[-1][key] = x
                return hook

            m = model.clone()
            m.set_model_unet_function_wrapper(wrapper)
            handles = [mods[k].register_forward_pre_hook(hook_for(k)) for k in keys]
            try:
                latent = torch.zeros([1, 4, size // 8, size // 8])
                noise = comfy.sample.prepare_noise(latent, seed, noise_inds=[0])  # every prompt: one noise (issue 10)
                pos = H.encode(clip, text)
                neg = H.encode(clip, "")
                comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)
            finally:
                for h in handles:
                    h.remove()
            assert len(records) == steps  # euler: one model call per step, cond+uncond batched
            per_prompt[side].append(records[:saliency_steps])
    out = {}
    for key in keys:
        cols = []
        for t in range(saliency_steps):
            def q(rec):
                x = rec[t][key][0]  # [tokens, C_in], the single conditional row
                xn = x / np.linalg.norm(x, axis=1, keepdims=True)
                return np.sqrt((xn ** 2).sum(0))
            qc = np.stack([q(r) for r in per_prompt["concept"]])
            qb = np.stack([q(r) for r in per_prompt["base"]])
            cols.append(np.maximum(0, qc.mean(0) - qb.mean(0) - qb.std(0, ddof=0)))
        out[key] = np.stack(cols)
    return out


def test_saliency_matches_one_prompt_at_a_time_reference(comfy, nodes, pack, tiny_sd15, tiny_clip):
    sal = saliency_of(nodes, tiny_sd15, tiny_clip)
    ref = reference_columns(comfy, tiny_sd15, tiny_clip, list(sal.prompts), SMALL["steps"], SMALL["saliency_steps"],
                            SMALL["cfg"], SMALL["seed"], SMALL["width"])
    assert list(sal.columns) == list(ref)
    for key, expected in ref.items():
        got = sal.columns[key].double().numpy()
        assert got.shape == expected.shape
        assert expected.max() > 0, "the reference should see some positive saliency"
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)


def test_saliency_runs_only_the_window_and_leaves_no_hooks(comfy, nodes, tiny_sd15, tiny_clip):
    count, handle = unet_calls(tiny_sd15)
    try:
        sal = saliency_of(nodes, tiny_sd15, tiny_clip, "parachute", seed=11)
    finally:
        handle.remove()
    # 4 pairs = 8 rows, batch_size 2 pairs = 4 rows -> 2 batches x 3 window steps (cond+uncond in one call)
    assert count["n"] == 2 * SMALL["saliency_steps"]
    assert sal.num_steps == SMALL["saliency_steps"]
    assert hooks_left(tiny_sd15) == 0
    assert not tiny_sd15.model_options.get("transformer_options", {}).get("wrappers")


def test_batch_size_does_not_change_saliency(comfy, nodes, pack, tiny_sd15, tiny_clip):
    a = saliency_of(nodes, tiny_sd15, tiny_clip, "chain saw", batch_size=1, seed=5)
    b = saliency_of(nodes, tiny_sd15, tiny_clip, "chain saw", batch_size=4, seed=5)
    for key in a.columns:
        torch.testing.assert_close(a.columns[key], b.columns[key], rtol=1e-4, atol=1e-6)


def test_identical_inputs_give_identical_masks(comfy, pack, nodes, tiny_sd15, tiny_clip):
    from_nodes = []
    for _ in range(2):
        settings = pack.nodes.saliency.SaliencySettings(**{k: v for k, v in SMALL.items() if k != "num_prompts"})
        pairs = pack.fia_core.build_prompt_pairs("church", "objects", 4, SMALL["seed"])
        sal, cached, _ = pack.nodes.saliency.concept_saliency(tiny_sd15, tiny_clip, "church", pairs, settings,
                                                             use_cache=False)
        assert not cached
        from_nodes.append(pack.fia_core.select_concept_mask(sal, 0.05))
    a, b = from_nodes
    for key in a.layers:
        assert torch.equal(a.layers[key].indices, b.layers[key].indices)


def test_disk_cache_hit_runs_no_unet_and_r2_change_is_free(comfy, nodes, tiny_sd15, tiny_clip):
    first = saliency_of(nodes, tiny_sd15, tiny_clip, "gas pump", seed=21)
    count, handle = unet_calls(tiny_sd15)
    try:
        again = nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "gas pump", "objects", 0.05, **{**SMALL, "seed": 21})
        m1 = result(nodes["FIABuildConceptMask"].build(result(again)[0], 0.02))[0]
        m2 = result(nodes["FIABuildConceptMask"].build(result(again)[0], 0.05))[0]
    finally:
        handle.remove()
    assert count["n"] == 0
    assert again["ui"]["fia_summary"][0]["cached"] is True
    for key in first.columns:
        assert torch.equal(first.columns[key], result(again)[0].columns[key])
    assert m1.stats()["total_pruned"] < m2.stats()["total_pruned"]


def test_exact_mode_runs_and_differs_from_fast(comfy, nodes, tiny_sd15, tiny_clip):
    fast = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball", mode="fast")
    exact = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball", mode="exact")
    assert exact.params["mode"] == "exact" and fast.params["mode"] == "fast"
    assert 0 < exact.stats()["total_pruned"]
    assert any(not torch.equal(fast.layers[k].indices, exact.layers[k].indices) for k in fast.layers)
    assert hooks_left(tiny_sd15) == 0


# -- apply: non-destructive, strength, LoRA stacking -------------------------------------

def test_apply_is_non_destructive_and_patches_exactly_the_mask(comfy, nodes, tiny_sd15, tiny_clip):
    pos, neg = H.encode(tiny_clip, "a golf ball in a park"), H.encode(tiny_clip, "")
    before = H.sample(tiny_sd15, pos, neg, seed=1)
    original = loaded_ffn2_weights(tiny_sd15)
    mask = mask_of(nodes, tiny_sd15, tiny_clip)
    patched = result(nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0))[0]
    erased = H.sample(patched, pos, neg, seed=1)
    got = loaded_ffn2_weights(patched)
    dense = mask.dense()
    for sd_key, w in original.items():
        m = dense[sd_key[len("diffusion_model."):-len(".weight")]]
        torch.testing.assert_close(got[sd_key], torch.where(m, torch.zeros_like(w), w), rtol=0, atol=0)
    assert not torch.equal(before, erased)
    after = H.sample(tiny_sd15, pos, neg, seed=1)
    assert torch.equal(before, after), "the input model changed"
    assert all(torch.equal(original[k], v) for k, v in loaded_ffn2_weights(tiny_sd15).items())


def test_strength_zero_equals_original_and_half_scales(comfy, nodes, tiny_sd15, tiny_clip):
    pos, neg = H.encode(tiny_clip, "a parachute"), H.encode(tiny_clip, "")
    mask = mask_of(nodes, tiny_sd15, tiny_clip, "parachute")
    base = H.sample(tiny_sd15, pos, neg, seed=2)
    zero = H.sample(result(nodes["FIAApplyMask"].apply(tiny_sd15, mask, 0.0))[0], pos, neg, seed=2)
    assert torch.equal(base, zero)
    original = loaded_ffn2_weights(tiny_sd15)
    half = loaded_ffn2_weights(result(nodes["FIAApplyMask"].apply(tiny_sd15, mask, 0.5))[0])
    for sd_key, w in original.items():
        m = mask.dense()[sd_key[len("diffusion_model."):-len(".weight")]]
        torch.testing.assert_close(half[sd_key], torch.where(m, w * 0.5, w))


@pytest.mark.parametrize("order", ["lora_then_fia", "fia_then_lora"])
def test_lora_style_patches_still_apply(comfy, nodes, tiny_sd15, tiny_clip, order):
    mask = mask_of(nodes, tiny_sd15, tiny_clip, "tench")
    original = loaded_ffn2_weights(tiny_sd15)
    g = torch.Generator().manual_seed(9)
    diffs = {k: torch.randn(w.shape, generator=g) * 0.05 for k, w in original.items()}

    def add_lora(model):
        m = model.clone()
        accepted = m.add_patches({k: ("diff", (d,)) for k, d in diffs.items()}, 0.7)
        assert len(accepted) == len(diffs)
        return m

    if order == "lora_then_fia":
        model = result(nodes["FIAApplyMask"].apply(add_lora(tiny_sd15), mask, 1.0))[0]
    else:
        model = add_lora(result(nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0))[0])
    got = loaded_ffn2_weights(model)
    for sd_key, w in original.items():
        m = mask.dense()[sd_key[len("diffusion_model."):-len(".weight")]]
        if order == "lora_then_fia":
            expected = torch.where(m, torch.zeros_like(w), w + 0.7 * diffs[sd_key])
        else:
            expected = torch.where(m, torch.zeros_like(w), w) + 0.7 * diffs[sd_key]
        torch.testing.assert_close(got[sd_key], expected, rtol=1e-5, atol=1e-6)


def test_mask_from_other_architecture_is_refused(comfy, nodes, tiny_sd15, tiny_clip, tiny_sdxl, tiny_sdxl_clip):
    xl_mask = mask_of(nodes, tiny_sdxl, tiny_sdxl_clip, "golf ball")
    with pytest.raises(ValueError) as e:
        nodes["FIAApplyMask"].apply(tiny_sd15, xl_mask, 1.0)
    msg = str(e.value)
    assert "FIAApplyMask" in msg and "TinySDXL" in msg and "TinySD15" in msg
    assert hooks_left(tiny_sd15) == 0 and not tiny_sd15.patches


def test_mask_from_other_checkpoint_applies_with_warning(comfy, nodes, tiny_sd15, tiny_clip, caplog):
    mask = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    other = H.tiny_sd15_model(seed=1)
    with caplog.at_level(logging.WARNING):
        patched = result(nodes["FIAApplyMask"].apply(other, mask, 1.0))[0]
    assert "another" in caplog.text and "checkpoint" in caplog.text
    assert len(patched.patches) == sum(1 for m in mask.layers.values() if m.count)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        nodes["FIAApplyMask"].apply(tiny_sd15, mask, 1.0)
    assert "checkpoint" not in caplog.text


def test_sdxl_end_to_end(comfy, nodes, tiny_sdxl, tiny_sdxl_clip):
    m1 = mask_of(nodes, tiny_sdxl, tiny_sdxl_clip, "golf ball")
    m2 = mask_of(nodes, tiny_sdxl, tiny_sdxl_clip, "parachute")
    fused = result(nodes["FIAFuseMasks"].fuse(m1, 0.6, mask_2=m2))[0]
    assert len(fused.layers) == H.TINY_SDXL_FFN2_COUNT
    patched = result(nodes["FIAApplyMask"].apply(tiny_sdxl, fused, 1.0))[0]
    pos, neg = H.encode(tiny_sdxl_clip, "a golf ball"), H.encode(tiny_sdxl_clip, "")
    assert not torch.equal(H.sample(tiny_sdxl, pos, neg), H.sample(patched, pos, neg))


# -- interruption --------------------------------------------------------------------------

def test_interruption_mid_saliency_leaves_no_hooks_and_no_patches(comfy, pack, tiny_sd15, tiny_clip):
    import comfy.model_management as mm

    original = loaded_ffn2_weights(tiny_sd15)
    runner = pack.nodes.saliency
    settings = runner.SaliencySettings(**{k: v for k, v in SMALL.items() if k != "num_prompts"})
    pairs = pack.fia_core.build_prompt_pairs("cassette player", "objects", 4, 0)
    seen = []

    def progress(done, total):
        seen.append(done)
        if done == 2:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            runner.run_concept_saliency(tiny_sd15, tiny_clip, "cassette player", pairs, settings, progress)
    finally:
        mm.interrupt_current_processing(False)
    assert seen[-1] == 2
    assert hooks_left(tiny_sd15) == 0
    assert not tiny_sd15.patches
    assert all(torch.equal(original[k], v) for k, v in loaded_ffn2_weights(tiny_sd15).items())


# -- fusion, forget-in-one, io, info --------------------------------------------------------

def test_fuse_accepts_dynamic_inputs_and_counts_agnostic(comfy, pack, nodes, tiny_sd15, tiny_clip):
    masks = [mask_of(nodes, tiny_sd15, tiny_clip, c, r2=0.08) for c in ("golf ball", "parachute", "church")]
    fused = result(nodes["FIAFuseMasks"].fuse(masks[0], 0.6, mask_2=masks[1], mask_3=masks[2]))[0]
    assert fused.concepts == ("golf ball", "parachute", "church")
    # tau_ca = max(3, ceil(0.6 * 3)) = 3: a connection picked by all 3 concepts is kept
    for key in fused.layers:
        votes = sum(m.layers[key].dense().int() for m in masks)
        assert torch.equal(fused.layers[key].dense(), (votes >= 1) & (votes < 3))
        assert torch.equal(fused.agnostic[key].sort().values, (votes >= 3).flatten().nonzero().squeeze(1))
    assert fused.stats()["agnostic_kept"] > 0
    union = result(nodes["FIAFuseMasks"].fuse(masks[0], 0.6, fusion="union", mask_2=masks[1], mask_3=masks[2]))[0]
    assert union.stats()["agnostic_kept"] == 0
    with pytest.raises(ValueError, match="FIAFuseMasks.*same concept"):
        nodes["FIAFuseMasks"].fuse(masks[0], 0.6, mask_2=masks[0])


def test_forget_concepts_matches_the_granular_pipeline(comfy, nodes, tiny_sd15, tiny_clip):
    out = nodes["FIAForgetConcepts"].forget(tiny_sd15, tiny_clip, "golf ball\n\nparachute: 0.08", "objects",
                                            0.05, 0.05, 0.6, 1.0, **SMALL)
    model, fused = result(out)
    m1 = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball", r2=0.05)
    m2 = mask_of(nodes, tiny_sd15, tiny_clip, "parachute", r2=0.08)
    expected = result(nodes["FIAFuseMasks"].fuse(m1, 0.6, mask_2=m2))[0]
    for key in expected.layers:
        assert torch.equal(fused.layers[key].indices, expected.layers[key].indices)
    summary = out["ui"]["fia_summary"][0]
    assert summary["concepts"] == ["golf ball", "parachute"] and 0 < summary["pruned_fraction"] < 0.5
    count, handle = unet_calls(tiny_sd15)
    try:  # only r2/alpha/strength changed: every saliency comes from the cache
        nodes["FIAForgetConcepts"].forget(tiny_sd15, tiny_clip, "golf ball\nparachute: 0.08", "objects",
                                          0.05, 0.03, 0.8, 0.5, **SMALL)
    finally:
        handle.remove()
    assert count["n"] == 0


@pytest.mark.parametrize("text, fragment", [
    ("", "'concepts' is empty"),
    ("golf ball\nGolf Ball", "same concept"),  # was "listed twice" (issue 11: fia_core's message names both)
    ("golf ball: 0.9", "r2 must be"),
])
def test_forget_concepts_bad_lists(comfy, nodes, tiny_sd15, tiny_clip, text, fragment):
    with pytest.raises(ValueError) as e:
        nodes["FIAForgetConcepts"].forget(tiny_sd15, tiny_clip, text, "objects", 0.05, 0.01, 0.6, 1.0, **SMALL)
    assert "FIAForgetConcepts" in str(e.value) and fragment in str(e.value)
    assert hooks_left(tiny_sd15) == 0


def test_saliency_bad_inputs_are_named(comfy, nodes, tiny_sd15, tiny_clip):
    with pytest.raises(ValueError, match=r"FIAConceptSaliency: input 'concept' is empty"):
        nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "  ", "objects", 0.05, **SMALL)
    with pytest.raises(ValueError, match=r"FIAConceptSaliency: input 'saliency_steps'"):
        nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "cat", "objects", 0.05, **{**SMALL, "saliency_steps": 9})
    with pytest.raises(ValueError, match=r"FIAConceptSaliency: input 'custom_template'"):
        nodes["FIAConceptSaliency"].compute(tiny_sd15, tiny_clip, "cat", "custom", 0.05, custom_template="a {place}", **SMALL)
    assert hooks_left(tiny_sd15) == 0


def test_custom_template_and_base_prompts(comfy, nodes, tiny_sd15, tiny_clip):
    sal = result(nodes["FIAConceptSaliency"].compute(
        tiny_sd15, tiny_clip, "red cube", "custom", 0.05, custom_template="a {concept} on a {place}",
        base_prompts="an empty {place}\na photo of a {place}", **SMALL))[0]
    assert all(p.concept_prompt.startswith("a red cube on a ") for p in sal.prompts)
    assert sal.prompts[0].base_prompt.startswith("an empty ") and sal.prompts[1].base_prompt.startswith("a photo of a ")


def test_save_load_and_info(comfy, comfy_base_dir, nodes, pack, tiny_sd15, tiny_clip):
    m1 = mask_of(nodes, tiny_sd15, tiny_clip, "golf ball")
    m2 = mask_of(nodes, tiny_sd15, tiny_clip, "parachute")
    fused = result(nodes["FIAFuseMasks"].fuse(m1, 0.6, mask_2=m2))[0]
    ui = nodes["FIASaveMask"].save(fused, "erase/imagenette")["ui"]["fia_summary"][0]
    assert ui["file"].startswith("erase") and ui["file"].endswith(".safetensors")
    names = pack.nodes.mask_folder.mask_names()
    assert ui["file"].replace("\\", "/") in [n.replace("\\", "/") for n in names]
    assert ui["file"] in pack.NODE_CLASS_MAPPINGS["FIALoadMask"].INPUT_TYPES()["required"]["mask_name"][0]
    loaded = result(nodes["FIALoadMask"].load(ui["file"]))[0]
    assert loaded.stats() == fused.stats()
    for key in fused.layers:
        assert torch.equal(loaded.layers[key].indices, fused.layers[key].indices)
        assert torch.equal(loaded.agnostic[key], fused.agnostic[key])
    # files stay inside models/fia_masks
    with pytest.raises(ValueError, match="FIASaveMask: input 'filename_prefix'"):
        nodes["FIASaveMask"].save(fused, "../../escape")
    assert not list(Path(comfy_base_dir).glob("**/escape*"))
    # a damaged file is refused with the reason
    bad = Path(pack.nodes.mask_folder.save_dir()) / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="FIALoadMask: input 'mask_name'.*broken"):
        nodes["FIALoadMask"].load("broken.safetensors")
    report, chart = result(nodes["FIAMaskInfo"].info(fused))
    assert "golf ball, parachute" in report and "concept-agnostic kept" in report
    assert report.count("ff.net.2") == H.TINY_SD15_FFN2_COUNT
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0


def test_node_metadata_is_complete(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("FIA") and name in pack.NODE_DISPLAY_NAME_MAPPINGS
        assert cls.CATEGORY.startswith("FIA/unlearning")
        assert len(cls.DESCRIPTION) > 40
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for inp, (kind, *opts) in spec.get(group, {}).items():
                assert opts and opts[0].get("tooltip"), f"{name}.{inp} has no tooltip"
        if cls.RETURN_TYPES:
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    saliency = pack.NODE_CLASS_MAPPINGS["FIAConceptSaliency"].INPUT_TYPES()["required"]
    assert saliency["steps"][1]["default"] == 50 and saliency["saliency_steps"][1]["default"] == 10
    assert saliency["cfg"][1]["default"] == 7.5 and saliency["r1"][1]["default"] == 0.05


def test_cond_and_uncond_in_separate_calls_give_the_same_saliency(comfy, nodes, tiny_sd15, tiny_clip):
    """ComfyUI runs the CFG branches in separate calls when memory is short, in either order."""
    import comfy.patcher_extension as pe

    def split_calls(executor, model, conds, x_in, timestep, model_options):
        outs = [None] * len(conds)
        for i in reversed(range(len(conds))):  # unconditional first; None keeps the branch index
            only = [c if j == i else None for j, c in enumerate(conds)]
            outs[i] = executor(model, only, x_in, timestep, model_options)[i]
        return outs

    together = saliency_of(nodes, tiny_sd15, tiny_clip, "French horn", seed=31)
    split = tiny_sd15.clone()
    split.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test_split", split_calls)
    count, handle = unet_calls(split)
    try:
        apart = saliency_of(nodes, split, tiny_clip, "French horn", seed=31, batch_size=4)
    finally:
        handle.remove()
    assert count["n"] == 2 * SMALL["saliency_steps"]  # one batch, two calls per step
    for key in together.columns:
        torch.testing.assert_close(apart.columns[key], together.columns[key], rtol=1e-4, atol=1e-6)
