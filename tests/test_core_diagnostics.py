"""mask_warnings: empty or nearly empty concept masks, fused masks that prune (almost)
nothing, identical sources under different names, sources from different checkpoints.
Masks are planted by hand, so what each must say is known."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fia_core import ConceptMask, LayerMask, fuse_masks, mask_warnings
from fia_core.diagnostics import LOW_FRACTION
from devkit import oracles as O

SHAPES = {"a.ff.net.2": (10, 40), "b.ff.net.2": (20, 30)}
R2 = 0.05
BUDGET = sum(O.count(R2, a * b) for a, b in SHAPES.values())  # 20 + 30 = 50


def mask(name, n_per_layer, fingerprint="fp", offset=0, r2=R2):
    layers = {k: LayerMask(s, torch.arange(offset, offset + n, dtype=torch.int64)) for (k, s), n
              in zip(SHAPES.items(), n_per_layer)}
    return ConceptMask((name,), "ffn2", layers, fingerprint=fingerprint, params={"r1": 0.05, "r2": r2})


def test_a_full_mask_has_no_warning():
    assert BUDGET == 50
    assert mask_warnings(mask("cross", (20, 30))) == []
    assert mask_warnings(mask("cross", (10, 3))) == []  # 13 of 50 = 26 %: above the threshold
    assert mask_warnings(fuse_masks([mask("cross", (20, 30)), mask("star", (10, 5), offset=100)])) == []


def test_empty_concept_mask_says_why_and_what_to_change():
    (w,) = mask_warnings(mask("golf ball", (0, 0)))
    assert "'golf ball' selects no connection" in w and "Eq. 2" in w and "num_prompts" in w


def test_concept_mask_far_below_budget():
    assert 12 < LOW_FRACTION * BUDGET
    (w,) = mask_warnings(mask("golf ball", (12, 0)))
    assert "12 connections" in w and "24.0 %" in w and "nothing in 1 of 2 layers" in w and "num_prompts" in w


def test_fused_mask_that_keeps_everything_as_agnostic():
    same = [mask(n, (20, 30)) for n in ("cross", "Kreuz", "croix")]  # C = 3: tau_ca = 3, all agnostic
    fused = fuse_masks(same, alpha=0.6)
    assert fused.stats()["total_pruned"] == 0
    warnings = mask_warnings(fused)
    assert any("prunes nothing" in w and "concept-agnostic" in w and "alpha" in w for w in warnings), warnings
    assert any("'cross', 'Kreuz', 'croix' are identical" in w for w in warnings), warnings


def test_fused_mask_pruning_far_less_than_its_sources():
    shared = [mask(n, (20, 30)) for n in ("a", "b", "c")]
    fused = fuse_masks(shared + [mask("d", (2, 0), offset=200)], alpha=0.6)  # tau_ca = 3
    (w,) = [w for w in mask_warnings(fused) if "fused mask prunes" in w]
    assert "only 2 of the 52" in w


def test_identical_masks_under_two_names():
    warnings = mask_warnings(fuse_masks([mask("golf ball", (20, 30)), mask("golfball", (20, 30))]))
    assert warnings == ["the masks of 'golf ball', 'golfball' are identical: they were probably built from one "
                        "saliency or one concept under two names; fuse each concept once"]


def test_sources_on_different_checkpoints():
    fused = fuse_masks([mask("a", (20, 30), fingerprint="f1"), mask("b", (20, 30), fingerprint="f2", offset=50)])
    (w,) = mask_warnings(fused)
    assert "different checkpoints" in w and "'a' on f1" in w and "'b' on f2" in w and "rebuild" in w


def test_empty_sources_are_reported_in_the_fused_mask():
    warnings = mask_warnings(fuse_masks([mask("a", (0, 0)), mask("b", (20, 30), offset=60)]))
    assert len(warnings) == 1 and "'a' selects no connection" in warnings[0]


def test_mask_warnings_rejects_other_types():
    with pytest.raises(TypeError):
        mask_warnings("mask")
