"""The README's "Library API" example runs as written, on a tiny network whose FFN2
layers see a planted concept signal, and does what its comments say."""
from __future__ import annotations

import re
import zlib
from pathlib import Path

import torch
from torch import nn

import fia_core as F

README = Path(__file__).resolve().parent.parent / "README.md"
CONCEPT_COLUMNS = {"golf ball": range(0, 4), "parachute": range(4, 8)}
N_TOKENS = 5


def library_example() -> str:
    text = README.read_text()
    section = text[text.index("## Library API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class Block(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Identity(), nn.Identity(), nn.Linear(c_in, c_out))


class TinyUNet(nn.Module):
    def __init__(self, dims=((16, 8), (24, 12))):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(c_in, c_out) for c_in, c_out in dims])


def make_unet_step(unet):
    """Feeds each FFN2 layer one row per prompt: shared noise for the step (one starting
    noise for every prompt), a small context term per prompt, and the concept's columns
    raised where the prompt names the concept."""
    def unet_step(step, prompts):
        for block in unet.blocks:
            lin = block.ff.net[2]
            g = torch.Generator().manual_seed(step)
            noise = torch.randn(N_TOKENS, lin.in_features, generator=g)
            rows = []
            for p in prompts:
                ctx = torch.Generator().manual_seed(zlib.crc32(p.split()[-1].encode()))
                x = noise + 0.3 * torch.randn(N_TOKENS, lin.in_features, generator=ctx)
                for concept, cols in CONCEPT_COLUMNS.items():
                    if concept in p:
                        x[:, list(cols)] += 3.0
                rows.append(x)
            with torch.no_grad():
                block.ff.net(torch.stack(rows))
    return unet_step


def test_readme_library_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unet = TinyUNet()
    ns = {"unet": unet, "unet_step": make_unet_step(unet)}
    exec(compile(library_example(), str(README), "exec"), ns)
    fused, masks, layers = ns["fused"], ns["masks"], ns["layers"]
    assert isinstance(fused, F.FusedMask) and fused.concepts == ("golf ball", "parachute")
    assert [len(F.build_prompt_pairs(c, "objects")) for c in fused.concepts] == [30, 30]
    assert {l.module for l in layers} == {b.ff.net[2] for b in unet.blocks}
    for mask, (concept, cols) in zip(masks, CONCEPT_COLUMNS.items()):
        assert mask.concepts == (concept,) and mask.params["r2"] == 0.01
        for key, layer in mask.layers.items():
            c_in = layer.shape[1]
            assert layer.count > 0
            assert {int(f) % c_in for f in layer.indices} <= set(cols), (concept, key)  # only its columns
    assert ns["warnings"] == []
    back = F.load_mask(tmp_path / "erase.safetensors")
    for key in fused.layers:  # C = 2: the union of both masks is pruned
        union = torch.unique(torch.cat([m.layers[key].indices for m in masks]))
        assert torch.equal(back.layers[key].indices, union) and torch.equal(fused.layers[key].indices, union)
    w_new, key = ns["w_new"], ns["key"]
    assert (w_new.reshape(-1)[fused.prune_indices(key)] == 0).all()
    assert [(e.name, e.r2) for e in ns["entries"]] == [("golf ball", 0.01), ("parachute", 0.03)]
