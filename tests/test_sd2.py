"""SD2.x through the FIA chain: a tiny SD2-shaped model (v-prediction, linear projections in
the transformers, OpenCLIP-H-style clip_h text encoder) built with ComfyUI's own SD20 and
sd2_clip classes (devkit/sd2.py), run through the pack's node classes:
saliency -> concept mask -> fuse -> apply.

Ground truth is independent of the pack: the FFN2 layers are listed from the module tree,
and the patched weights are checked against the weights the sampler used before patching,
read through ComfyUI's own loading path.
"""
from __future__ import annotations

import pytest
import torch

from devkit import harness as H
from devkit import sd2

SMALL = dict(steps=6, saliency_steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", seed=3,
             width=64, height=64, mode="fast", batch_size=2, num_prompts=4)


@pytest.fixture(scope="module")
def pack(comfy):
    return H.load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def _sd2_base(comfy):
    return sd2.tiny_sd2_model(seed=0), sd2.tiny_sd2_clip(seed=1)


@pytest.fixture
def sd2_model(_sd2_base):
    return _sd2_base[0].clone()


@pytest.fixture
def sd2_clip(_sd2_base):
    return _sd2_base[1].clone()


def result(out):
    return out["result"] if isinstance(out, dict) else out


def ffn2_names(model) -> list[str]:
    """ff.net.2 modules of the UNet, from the module tree (not from the pack)."""
    return [n for n, m in model.model.diffusion_model.named_modules()
            if n.endswith(".ff.net.2") and isinstance(m, torch.nn.Linear)]


def loaded_ffn2_weights(model) -> dict[str, torch.Tensor]:
    """The FFN2 weights the sampler uses: load the patcher as sampling does, read them."""
    import comfy.model_management as mm
    mm.load_models_gpu([model])
    mods = dict(model.model.diffusion_model.named_modules())
    return {n: mods[n].weight.detach().float().cpu().clone() for n in ffn2_names(model)}


def test_tiny_sd2_is_sd2_shaped(comfy, sd2_model, sd2_clip):
    import comfy.model_base
    import comfy.model_sampling
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    base = sd2_model.model
    assert isinstance(base.model_config, comfy.supported_models.SD20)
    assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert isinstance(base.model_sampling, comfy.model_sampling.V_PREDICTION)
    st = base.diffusion_model.input_blocks[1][1]  # the first SpatialTransformer
    assert isinstance(st.proj_in, torch.nn.Linear) and isinstance(st.proj_out, torch.nn.Linear)
    assert isinstance(sd2_clip.cond_stage_model, comfy.text_encoders.sd2_clip.SD2ClipModel)
    cond = H.encode(sd2_clip, "a golf ball")
    assert cond[0][0].shape == (1, 77, sd2.TINY_SD2_CONTEXT)
    assert len(ffn2_names(sd2_model)) == sd2.TINY_SD2_FFN2_COUNT


def test_sd2_chain_saliency_mask_fuse_apply(comfy, nodes, sd2_model, sd2_clip):
    expected_layers = ffn2_names(sd2_model)
    pos, neg = H.encode(sd2_clip, "a golf ball on the grass"), H.encode(sd2_clip, "")
    before = H.sample(sd2_model, pos, neg, seed=1)
    original = loaded_ffn2_weights(sd2_model)

    masks = []
    for concept in ("golf ball", "parachute"):
        sal = result(nodes["FIAConceptSaliency"].compute(sd2_model, sd2_clip, concept, "objects", 0.05, **SMALL))[0]
        assert sorted(sal.layer_shapes) == sorted(expected_layers), "FFN2 layers of the SD2 UNet not all found"
        for name, shape in sal.layer_shapes.items():
            assert tuple(shape) == tuple(original[name].shape)
        mask = result(nodes["FIABuildConceptMask"].build(sal, 0.05))[0]
        assert mask.stats()["total_pruned"] > 0, f"empty mask for {concept!r}"
        masks.append(mask)
    fused = result(nodes["FIAFuseMasks"].fuse(masks[0], 0.6, mask_2=masks[1]))[0]
    assert sorted(fused.layers) == sorted(expected_layers)
    dense = fused.dense()
    union = {k: masks[0].dense()[k] | masks[1].dense()[k] for k in dense}
    assert all(not (dense[k] & ~union[k]).any() for k in dense), "fused mask outside the concept masks"
    pruned = sum(int(m.sum()) for m in dense.values())
    assert pruned > 0

    patched = result(nodes["FIAApplyMask"].apply(sd2_model, fused, 1.0))[0]
    after = H.sample(patched, pos, neg, seed=1)
    got = loaded_ffn2_weights(patched)
    for name, w in original.items():
        m = dense[name]
        assert torch.all(got[name][m] == 0), name
        assert torch.equal(got[name][~m], w[~m]), name
    assert torch.isfinite(after).all()
    assert not torch.equal(before, after), "erasing on the SD2 model changed nothing in sampling"
    # the input model is untouched
    assert torch.equal(H.sample(sd2_model, pos, neg, seed=1), before)
    assert all(torch.equal(original[k], v) for k, v in loaded_ffn2_weights(sd2_model).items())


def test_forget_concepts_on_sd2(comfy, nodes, sd2_model, sd2_clip):
    out = nodes["FIAForgetConcepts"].forget(sd2_model, sd2_clip, "golf ball\nparachute", "objects",
                                            0.05, 0.05, 0.6, 1.0, **SMALL)
    patched, fused = result(out)
    [summary] = out["ui"]["fia_summary"]
    assert summary["concepts"] == ["golf ball", "parachute"]
    assert summary["pruned"] > 0 and summary["layers"] == sd2.TINY_SD2_FFN2_COUNT
    pos, neg = H.encode(sd2_clip, "a parachute"), H.encode(sd2_clip, "")
    assert not torch.equal(H.sample(sd2_model, pos, neg, seed=2), H.sample(patched, pos, neg, seed=2))
