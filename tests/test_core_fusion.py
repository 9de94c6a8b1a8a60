"""Eq. 7-8 (multi-concept fusion with concept-agnostic retention) against the dense
reference of devkit/oracles.py, tau_ca = max(3, ceil(alpha * C))."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fia_core import ConceptMask, FusedMask, LayerMask, agnostic_threshold, fuse_masks
from devkit import oracles as O

SHAPES = {"down.0.ff.net.2": (4, 6), "mid.0.ff.net.2": (3, 5), "up.0.ff.net.2": (2, 8)}


def concept_mask(name, dense: dict[str, np.ndarray], **kw) -> ConceptMask:
    layers = {k: LayerMask(tuple(d.shape), torch.from_numpy(np.flatnonzero(d).astype(np.int64))) for k, d in dense.items()}
    return ConceptMask((name,), "ffn2", layers, **kw)


def random_dense(rng, density):
    return {k: rng.random(s) < density for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    "alpha,c,expected",
    [(0.6, 1, 3), (0.6, 2, 3), (0.6, 3, 3), (0.6, 5, 3), (0.8, 5, 4), (1.0, 5, 5), (0.2, 5, 3), (0.6, 10, 6),
     (0.8, 1, 3), (1.0, 2, 3), (1.0, 3, 3), (0.7, 10, 7), (0.3, 10, 3), (0.14, 50, 7), (0.56, 25, 14)],
)
def test_agnostic_threshold(alpha, c, expected):
    # 0.14 * 50 and 0.56 * 25 are 7.000000000000001 and 14.000000000000002 in floats:
    # a naive ceil would give 8 and 15; tau_ca follows the decimal alpha
    assert agnostic_threshold(alpha, c) == expected == O.tau_ca(alpha, c)


def test_agnostic_threshold_union_and_errors():
    assert agnostic_threshold(None, 3) is None
    for bad in (0.0, -0.2, 1.2):
        with pytest.raises(ValueError):
            agnostic_threshold(bad, 3)


@pytest.mark.parametrize("c", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("alpha", [0.6, 0.8, 1.0, 0.2, None])
def test_fusion_matches_dense_reference(c, alpha):
    rng = np.random.default_rng(100 * c + int((alpha or 0) * 10))
    dense = [random_dense(rng, 0.5) for _ in range(c)]
    masks = [concept_mask(f"concept{n}", d) for n, d in enumerate(dense)]
    fused = fuse_masks(masks, alpha=alpha)
    assert isinstance(fused, FusedMask)
    assert fused.concepts == tuple(f"concept{n}" for n in range(c))
    assert fused.layer_shapes == SHAPES
    assert fused.params["tau_ca"] == (None if alpha is None else O.tau_ca(alpha, c))
    total_pruned = 0
    for key, shape in SHAPES.items():
        prune, keep = O.eq78([d[key] for d in dense], alpha)
        assert fused.layers[key].indices.tolist() == np.flatnonzero(prune).tolist()
        assert fused.layers[key].indices.dtype == torch.int64
        assert fused.agnostic[key].tolist() == np.flatnonzero(keep).tolist()
        assert torch.equal(fused.layers[key].dense(), torch.from_numpy(prune))
        total_pruned += int(prune.sum())
    st = fused.stats()
    assert st["total_pruned"] == total_pruned
    assert st["agnostic_kept"] == sum(len(v) for v in fused.agnostic.values())
    assert st["per_concept"] == {f"concept{n}": int(sum(d[k].sum() for k in SHAPES)) for n, d in enumerate(dense)}


def test_single_concept_is_pruned_whole():
    """The reference code's ceil(alpha * 1) = 1 would keep everything; tau_ca = 3 prunes it."""
    rng = np.random.default_rng(1)
    d = random_dense(rng, 0.3)
    m = concept_mask("naked", d)
    for alpha in (0.6, 0.8, 1.0):
        fused = fuse_masks([m], alpha=alpha)
        for key in SHAPES:
            assert fused.layers[key].indices.tolist() == np.flatnonzero(d[key]).tolist()
            assert fused.agnostic[key].numel() == 0


def test_two_concepts_give_the_union():
    """C = 2: tau_ca = 3 > C, so nothing is agnostic and both masks are pruned whole."""
    a = {k: np.zeros(s, bool) for k, s in SHAPES.items()}
    b = {k: np.zeros(s, bool) for k, s in SHAPES.items()}
    key = "down.0.ff.net.2"
    a[key][0, [0, 1, 2]] = True
    b[key][0, [2, 3]] = True
    for alpha in (0.6, 0.8, 1.0, None):
        fused = fuse_masks([concept_mask("a", a), concept_mask("b", b)], alpha=alpha)
        assert fused.layers[key].indices.tolist() == [0, 1, 2, 3]
        assert fused.agnostic[key].numel() == 0
        assert all(fused.layers[k].count == 0 for k in SHAPES if k != key)


def test_three_concepts_keep_only_what_all_three_select():
    """C = 3, alpha 0.6: ceil(1.8) = 2 but tau_ca = max(3, 2) = 3."""
    key = "mid.0.ff.net.2"
    picks = {"a": [0, 1, 2, 5], "b": [1, 2, 6], "c": [2, 7, 1]}  # 1 and 2: all three
    masks = []
    for name, flat in picks.items():
        d = {k: np.zeros(s, bool) for k, s in SHAPES.items()}
        d[key].reshape(-1)[flat] = True
        masks.append(concept_mask(name, d))
    fused = fuse_masks(masks, alpha=0.6)
    assert fused.params["tau_ca"] == 3
    assert fused.agnostic[key].tolist() == [1, 2]
    assert fused.layers[key].indices.tolist() == [0, 5, 6, 7]


def test_five_concepts_follow_the_paper():
    """C = 5 at the paper's alphas: tau_ca = ceil(alpha * C) as in Eq. 8 (3 and 4)."""
    rng = np.random.default_rng(11)
    dense = [random_dense(rng, 0.6) for _ in range(5)]
    masks = [concept_mask(f"c{n}", d) for n, d in enumerate(dense)]
    for alpha, tau in ((0.6, 3), (0.8, 4)):
        fused = fuse_masks(masks, alpha=alpha)
        assert fused.params["tau_ca"] == tau
        for key in SHAPES:
            s = sum(d[key].astype(int) for d in dense)
            assert fused.layers[key].indices.tolist() == np.flatnonzero((s > 0) & (s < tau)).tolist()
            assert fused.agnostic[key].tolist() == np.flatnonzero(s >= tau).tolist()


def test_identical_masks_never_fuse_to_empty():
    """The same mask twice under two names prunes the concept, not nothing (before, with
    tau_ca = 2, it fused to an empty mask)."""
    d = random_dense(np.random.default_rng(5), 0.3)
    masks = [concept_mask(f"golf ball {n}", d) for n in range(2)]
    fused = fuse_masks(masks, alpha=0.6)
    for key in SHAPES:
        assert fused.layers[key].indices.tolist() == np.flatnonzero(d[key]).tolist()


def test_refusing_a_fused_mask_uses_its_sources():
    rng = np.random.default_rng(2)
    dense = [random_dense(rng, 0.5) for _ in range(3)]
    masks = [concept_mask(f"c{n}", d) for n, d in enumerate(dense)]
    direct = fuse_masks(masks, alpha=0.6)
    nested = fuse_masks([fuse_masks(masks[:2], alpha=0.8), masks[2]], alpha=0.6)
    assert nested.concepts == direct.concepts
    for key in SHAPES:
        assert torch.equal(nested.layers[key].indices, direct.layers[key].indices)
        assert torch.equal(nested.agnostic[key], direct.agnostic[key])


def test_fusion_errors():
    rng = np.random.default_rng(3)
    a = concept_mask("a", random_dense(rng, 0.5))
    with pytest.raises(ValueError):
        fuse_masks([])
    with pytest.raises(ValueError, match="same concept"):
        fuse_masks([a, concept_mask("a", random_dense(rng, 0.5))])
    other = {"x.ff.net.2": rng.random((4, 6)) < 0.5}
    with pytest.raises(ValueError, match="different layers"):
        fuse_masks([a, concept_mask("b", other)])
    with pytest.raises(TypeError):
        fuse_masks([a, "not a mask"])


def test_fingerprint_kept_only_when_all_agree():
    rng = np.random.default_rng(4)
    a = concept_mask("a", random_dense(rng, 0.5), fingerprint="f1", architecture="arch")
    b = concept_mask("b", random_dense(rng, 0.5), fingerprint="f1", architecture="arch")
    c = concept_mask("c", random_dense(rng, 0.5), fingerprint="f2", architecture="arch")
    assert fuse_masks([a, b]).fingerprint == "f1"
    assert fuse_masks([a, c]).fingerprint == ""
    assert fuse_masks([a, b]).architecture == "arch"


@pytest.mark.parametrize("first,second", [("golf ball", "golf  ball"), ("cross", "Cross"),
                                          ("cross", "cross\u200b"), ("ｇｏｌｆ", "GOLF")])
def test_duplicate_concepts_are_refused_naming_both(first, second):
    """The same concept from two saliency nodes (other spacing, case or invisible
    characters) is refused instead of fusing to nothing."""
    rng = np.random.default_rng(6)
    masks = [concept_mask(first, random_dense(rng, 0.3)), concept_mask("other", random_dense(rng, 0.3)),
             concept_mask(second, random_dense(rng, 0.3))]
    with pytest.raises(ValueError) as e:
        fuse_masks(masks, alpha=0.6)
    assert f"'{first}' and '{second}' are the same concept" in str(e.value)
    # also when one of them comes inside a fused mask
    with pytest.raises(ValueError, match="same concept"):
        fuse_masks([fuse_masks(masks[:2]), masks[2]])


def test_unnamed_masks_fuse_with_distinct_names():
    rng = np.random.default_rng(7)
    dense = [random_dense(rng, 0.4) for _ in range(3)]
    unnamed = [concept_mask("", dense[0]), concept_mask("  ", dense[1])]
    fused = fuse_masks(unnamed, alpha=0.6)
    assert fused.concepts == ("unnamed concept 1", "unnamed concept 2")
    assert [s.concepts for s in fused.sources] == [("unnamed concept 1",), ("unnamed concept 2",)]
    for key in SHAPES:  # C = 2: the union
        assert fused.layers[key].indices.tolist() == np.flatnonzero(dense[0][key] | dense[1][key]).tolist()
    # re-fused with another unnamed mask: the new one takes the next free name
    again = fuse_masks([concept_mask("", dense[2]), fused])
    assert again.concepts == ("unnamed concept 3", "unnamed concept 1", "unnamed concept 2")
    assert fuse_masks([concept_mask("unnamed concept 1", dense[0]), concept_mask("", dense[1])]).concepts == \
        ("unnamed concept 1", "unnamed concept 2")


def test_fused_mask_keeps_its_sources_fingerprints():
    rng = np.random.default_rng(8)
    a = concept_mask("a", random_dense(rng, 0.5), fingerprint="f1")
    c = concept_mask("c", random_dense(rng, 0.5), fingerprint="f2")
    fused = fuse_masks([a, c])
    assert fused.fingerprint == ""
    assert [s.fingerprint for s in fused.sources] == ["f1", "f2"]
    assert [s.fingerprint for s in fuse_masks([fused]).sources] == ["f1", "f2"]
