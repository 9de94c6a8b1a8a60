"""The toy benchmark (benchmarks/toy): data, model plumbing, shipped weights, and a
seconds-long slice of the forget/preserve benchmark through the pack's nodes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_harness as H

BENCH = H.REPO_ROOT / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from toy import data as D  # noqa: E402
from toy import model as M  # noqa: E402


def test_places_and_templates_are_fias_own():
    """The toy prompts speak FIA's 'objects' template, so the nodes work unchanged."""
    from fia_core.prompts import PLACES, TEMPLATES

    assert set(D.PLACE_NAMES) == set(PLACES)
    objects = TEMPLATES["objects"]
    train = {t for t, _ in D.SHAPE_TEMPLATES}
    assert set(objects.concept) <= train
    assert D.BACKGROUND_TEMPLATE == objects.base
    assert len(D.CONCEPTS) >= 8


def test_data_is_seeded_and_in_range():
    a = D.batch(np.random.default_rng([0, 5]), 16)
    b = D.batch(np.random.default_rng([0, 5]), 16)
    assert [s.prompt for s in a[0]] == [s.prompt for s in b[0]]
    assert np.array_equal(a[1], b[1])
    assert a[1].shape == (16, 3, D.SIZE, D.SIZE)
    assert a[1].min() >= -1 and a[1].max() <= 1
    prompts = D.eval_prompts("circle", 6, seed=1)
    assert prompts == D.eval_prompts("circle", 6, seed=1) and all("circle" in p for p in prompts)


def test_shapes_are_distinct():
    masks = {c: D.shape_mask(c, 8, 8, 5.5) for c in D.CONCEPTS}
    for i, a in enumerate(D.CONCEPTS):
        for b in D.CONCEPTS[i + 1:]:
            assert np.abs(masks[a] - masks[b]).sum() > 8, (a, b)


def test_weights_shipped_and_small():
    files = [M.CHECKPOINT, M.CLASSIFIER]
    for f in files:
        assert f.is_file(), f"{f} missing: python benchmarks/toy/train.py / classifier.py"
    assert sum(f.stat().st_size for f in M.WEIGHTS_DIR.glob("*.safetensors")) < 25 * 2 ** 20


def test_vae_implements_the_latent_map(comfy):
    vae = M.build_vae()
    x = torch.from_numpy(D.batch(np.random.default_rng(3), 3)[1])
    lat = M.pixels_to_latent(x)
    image = vae.decode(lat)
    assert image.shape == (3, 8 * D.SIZE, 8 * D.SIZE, 3)
    assert (M.image_to_pixels(image) - x).abs().max() < 0.01
    assert (M.latent_to_pixels(vae.encode(image)) - x).abs().max() < 0.01


def test_checkpoint_loads_as_sd15_family(comfy):
    model, clip, vae = M.load_checkpoint()
    assert type(model.model.model_config).__name__ == "ToySD15"
    assert model.model.model_type.name == "V_PREDICTION"  # see benchmarks/toy/README.md
    ffn2 = H.ffn2_keys(model)
    assert len(ffn2) == 7 and all(k.endswith("ff.net.2.weight") for k in ffn2)
    cond = H.encode(clip, "a circle in a forest")
    assert cond[0][0].shape == (1, 77, M.CLIP_L_CONFIG["hidden_size"])


@pytest.mark.slow
def test_benchmark_quick_slice(comfy, tmp_path):
    from toy import evaluate as E

    res = E.run(E.Config(**E.QUICK), tmp_path, "toy_quick", log_fn=lambda s: None)
    for suffix in ("_benchmark.md", "_benchmark.json", "_sweep.png", "_samples.png"):
        assert (tmp_path / f"toy_quick{suffix}").is_file()
    saved = json.loads((tmp_path / "toy_quick_benchmark.json").read_text())
    assert set(saved["targets"]) == set(res["targets"])
    groups = saved["summary"]
    assert len(groups) == 3
    for methods in groups.values():
        assert {"unpruned", "random", "union", "FIA"} <= set(methods)
        for m in methods.values():
            assert 0.0 <= m["F"] <= 1.0 and 0.0 <= m["ffn2_fraction"] < 0.5
        assert methods["unpruned"]["ffn2_fraction"] == 0.0
        assert methods["random"]["ffn2_fraction"] == pytest.approx(methods["FIA"]["ffn2_fraction"])
    assert E.harmonic(0.8, 0.1) == pytest.approx(2 * 0.8 * 0.9 / 1.7)
