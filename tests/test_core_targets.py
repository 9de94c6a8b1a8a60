"""Target discovery on a tiny diffusers UNet2DConditionModel (built in-process, no download),
counted independently by walking the transformer blocks; unsupported networks."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fia_core import (
    TARGETS, UnsupportedArchitectureError, architecture_signature, describe_architecture,
    find_target_layers, layer_shapes, weights_fingerprint,
)

try:
    import diffusers
except ImportError as e:  # like a missing ComfyUI: a skip locally, a failure in CI
    if os.environ.get("FIA_REQUIRE_COMFY") == "1":
        pytest.fail(f"diffusers is required (FIA_REQUIRE_COMFY=1): {e}", pytrace=False)
    pytest.skip(f"diffusers not available: {e}", allow_module_level=True)

CONFIG = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8, norm_num_groups=8,
)


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**CONFIG, **overrides}).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def walk_transformer_blocks(net):
    """(path, block) of every transformer block, found through `transformer_blocks` lists."""
    out = []
    for name, module in net.named_modules():
        blocks = getattr(module, "transformer_blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for i, blk in enumerate(blocks):
                out.append((f"{name}.transformer_blocks.{i}" if name else f"transformer_blocks.{i}", blk))
    return out


def expected_layers(net, target):
    """{key: (C_out, C_in)} read attribute by attribute from each transformer block."""
    exp = {}
    for path, blk in walk_transformer_blocks(net):
        if target == "ffn2":
            mods = {"ff.net.2": blk.ff.net[2]}
        elif target == "ffn1":
            mods = {"ff.net.0.proj": blk.ff.net[0].proj}
        elif target == "cross_attn_kv":
            mods = {"attn2.to_k": blk.attn2.to_k, "attn2.to_v": blk.attn2.to_v}
        else:
            mods = {"attn1.to_k": blk.attn1.to_k, "attn1.to_v": blk.attn1.to_v}
        for suffix, m in mods.items():
            assert isinstance(m, nn.Linear)
            exp[f"{path}.{suffix}"] = (m.out_features, m.in_features)
    return exp


def test_tiny_unet_has_four_transformer_blocks(unet):
    # 1 in the cross-attn down block, 1 in the mid block, 2 in the cross-attn up block
    assert len(walk_transformer_blocks(unet)) == 4


def test_ffn2_layers(unet):
    layers = find_target_layers(unet)  # ffn2 is the default
    exp = expected_layers(unet, "ffn2")
    assert len(layers) == 4 == len(exp)
    assert {l.key: l.shape for l in layers} == exp
    # FFN2 maps the 4x inner width back to the block width
    assert sorted(set(exp.values())) == [(32, 128), (64, 256)]
    for l in layers:
        assert l.module is unet.get_submodule(l.key)
        assert l.key.endswith(".ff.net.2")
        assert l.numel == l.shape[0] * l.shape[1]
    # module order, so that keys are stable
    order = [n for n, _ in unet.named_modules()]
    assert [l.key for l in layers] == sorted((l.key for l in layers), key=order.index)
    assert layer_shapes(layers) == {l.key: l.shape for l in layers}


@pytest.mark.parametrize("target,per_block", [("ffn1", 1), ("cross_attn_kv", 2), ("self_attn_kv", 2)])
def test_ablation_targets(unet, target, per_block):
    layers = find_target_layers(unet, target)
    exp = expected_layers(unet, target)
    assert len(layers) == 4 * per_block == len(exp)
    assert {l.key: l.shape for l in layers} == exp
    for l in layers:
        assert l.module is unet.get_submodule(l.key)
    if target == "cross_attn_kv":
        assert all(s[1] == CONFIG["cross_attention_dim"] for s in exp.values())
    if target == "ffn1":  # GEGLU: 2 x 4 x width
        assert sorted(set(exp.values())) == [(256, 32), (512, 64)]


def test_unknown_target(unet):
    with pytest.raises(ValueError, match="unknown target") as e:
        find_target_layers(unet, "ffn3")
    assert not isinstance(e.value, UnsupportedArchitectureError)
    assert set(TARGETS) == {"ffn2", "ffn1", "cross_attn_kv", "self_attn_kv"}


def test_architecture_signature_and_fingerprint():
    a, b = tiny_unet(0), tiny_unet(1)
    sa = layer_shapes(find_target_layers(a))
    sb = layer_shapes(find_target_layers(b))
    assert architecture_signature(sa) == architecture_signature(sb)  # same architecture, other weights
    wider = layer_shapes(find_target_layers(tiny_unet(0, block_out_channels=(32, 96), norm_num_groups=8)))
    assert architecture_signature(wider) != architecture_signature(sa)
    assert describe_architecture(sa) == f"4 ffn2 layers, {sum(x * y for x, y in sa.values()) / 1e6:.1f} M connections"

    wa = {l.key: l.module.weight for l in find_target_layers(a)}
    wb = {l.key: l.module.weight for l in find_target_layers(b)}
    assert weights_fingerprint(wa) == weights_fingerprint({k: v.half() for k, v in wa.items()})
    assert weights_fingerprint(wa) != weights_fingerprint(wb)


# --------------------------------------------------------------------------- unsupported
def check_unsupported(net, *found):
    with pytest.raises(UnsupportedArchitectureError) as e:
        find_target_layers(net)
    msg = str(e.value)
    for f in found:
        assert f in msg, msg
    assert "Supported" in msg and "UNet" in msg and "ffn2" in msg, msg
    assert isinstance(e.value, ValueError)
    return msg


def test_plain_mlp_is_unsupported():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    check_unsupported(mlp, "Sequential", "2 Linear layers", "0, 2")


def test_network_without_linear_layers_is_unsupported():
    check_unsupported(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "0 Linear layers", "none")


def test_resnet_is_unsupported():
    tv = pytest.importorskip("torchvision")
    check_unsupported(tv.models.resnet18(weights=None), "ResNet", "1 Linear layers", "fc")


def test_lookalike_names_do_not_match():
    class FF(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.ModuleList([nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 2)])

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.xff = FF()  # 'xff.net.2' is not 'ff.net.2'
            self.ff = nn.Module()
            self.ff.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Conv1d(8, 2, 1)])  # not Linear

    check_unsupported(Odd(), "Odd", "2 Linear layers", "xff.net.2")


def test_ffn2_of_a_bare_transformer_block():
    class FF(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.ModuleList([nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 2)])

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = FF()

    layers = find_target_layers(Blk())
    assert [(l.key, l.shape) for l in layers] == [("ff.net.2", (2, 8))]
