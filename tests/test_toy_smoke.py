"""The toy model (devkit.toy): data, model plumbing, shipped weights, and a seconds-long
slice of the forget/preserve benchmark (``python -m benchmarks.toy.evaluate --quick``, run
through its command line) through the pack's nodes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from devkit import harness as H
from devkit.toy import data as D
from devkit.toy import model as M


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
        assert f.is_file(), f"{f} missing: python -m benchmarks.toy.train / python -m devkit.toy.classifier"
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


def harmonic(p: float, f: float) -> float:
    """The paper's overall score, written out here: harmonic mean of P and 1 - F."""
    return 2 * p * (1 - f) / (p + 1 - f)


@pytest.mark.slow
def test_benchmark_quick_slice(comfy, tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.toy.evaluate", "--quick", "--out-dir", str(tmp_path)],
                          cwd=H.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suffix in ("_benchmark.md", "_benchmark.json", "_sweep.png", "_samples.png"):
        assert (tmp_path / f"toy_quick{suffix}").is_file()
    saved = json.loads((tmp_path / "toy_quick_benchmark.json").read_text())
    assert saved["targets"] and all({"value", "ok"} <= set(t) for t in saved["targets"].values())
    assert "[bench] target" in proc.stdout  # the command reports every target it checked
    groups = saved["summary"]
    assert len(groups) == 3
    for methods in groups.values():
        assert {"unpruned", "random", "union", "FIA"} <= set(methods)
        for m in methods.values():
            assert 0.0 <= m["F"] <= 1.0 and 0.0 <= m["ffn2_fraction"] < 0.5
            if m["P"] + 1 - m["F"] > 0:
                assert m["H"] == pytest.approx(harmonic(m["P"], m["F"]))
        assert methods["unpruned"]["ffn2_fraction"] == 0.0
        assert methods["random"]["ffn2_fraction"] == pytest.approx(methods["FIA"]["ffn2_fraction"])
