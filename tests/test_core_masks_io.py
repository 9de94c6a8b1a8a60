"""Mask types, mask files (round trip and every kind of damage), mask application."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fia_core import (
    ConceptMask, FusedMask, LayerMask, MaskFileError, apply_mask_to_weight, check_mask_matches,
    fuse_masks, load_mask, save_mask,
)
from fia_core.mask_io import HEADER_KEY

SHAPES = {"down_blocks.0.ff.net.2": (8, 32), "mid_block.ff.net.2": (16, 64), "up_blocks.1.ff.net.2": (4, 16)}


def concept_mask(name, seed, shapes=SHAPES, density=0.1, **kw):
    rng = np.random.default_rng(seed)
    layers = {}
    for k, s in shapes.items():
        flat = np.flatnonzero(rng.random(s) < density).astype(np.int64)
        layers[k] = LayerMask(tuple(s), torch.from_numpy(flat))
    kw.setdefault("params", {"r1": 0.05, "r2": 0.01, "mode": "fast", "saliency_steps": 10, "model_type": "SD15"})
    kw.setdefault("architecture", "abcd1234")
    kw.setdefault("fingerprint", "ffff0000")
    return ConceptMask((name,), "ffn2", layers, **kw)


def assert_same_mask(a, b):
    assert type(a) is type(b)
    assert a.kind == b.kind
    assert a.concepts == b.concepts and a.target == b.target
    assert a.architecture == b.architecture and a.fingerprint == b.fingerprint
    assert a.params == b.params
    assert list(a.layers) == list(b.layers) and a.layer_shapes == b.layer_shapes
    for k in a.layers:
        assert b.layers[k].indices.dtype == torch.int64
        assert torch.equal(a.layers[k].indices, b.layers[k].indices)
    da, db = a.dense(), b.dense()
    for k in da:
        assert da[k].dtype == torch.bool and torch.equal(da[k], db[k])
    assert a.stats() == b.stats()


# --------------------------------------------------------------------------- dense / stats
def test_dense_view_and_stats_by_hand():
    m = ConceptMask(("x",), "ffn2", {
        "a": LayerMask((2, 3), torch.tensor([0, 4, 5])),
        "b": LayerMask((2, 2), torch.tensor([], dtype=torch.int64)),
    })
    d = m.dense()
    assert d["a"].tolist() == [[True, False, False], [False, True, True]]
    assert not d["b"].any()
    st = m.stats()
    assert st["kind"] == "concept"
    assert st["total_connections"] == 10 and st["total_pruned"] == 3
    assert st["pruned_fraction"] == pytest.approx(0.3)
    assert st["layers_touched"] == 1
    assert st["layers"]["a"] == {"shape": [2, 3], "pruned": 3, "fraction": 0.5}
    assert st["per_concept"] == {"x": 3}
    assert LayerMask.from_dense(d["a"]).indices.tolist() == [0, 4, 5]


# --------------------------------------------------------------------------- round trip
def test_concept_mask_round_trip(tmp_path):
    m = concept_mask("golf ball", 0)
    p = tmp_path / "golf.safetensors"
    save_mask(m, p, extra={"note": "hello"})
    back = load_mask(p)
    assert isinstance(back, ConceptMask)
    assert_same_mask(m, back)


def test_fused_mask_round_trip(tmp_path):
    srcs = [concept_mask(f"c{i}", i, density=0.5, fingerprint="fp") for i in range(3)]  # tau_ca = 3: all three
    fused = fuse_masks(srcs, alpha=0.6)
    assert any(a.numel() for a in fused.agnostic.values()), "test data should have agnostic entries"
    p = tmp_path / "fused.safetensors"
    save_mask(fused, p)
    back = load_mask(p)
    assert isinstance(back, FusedMask)
    assert_same_mask(fused, back)
    for k in SHAPES:
        assert back.agnostic[k].dtype == torch.int64
        assert torch.equal(back.agnostic[k], fused.agnostic[k])
    assert len(back.sources) == 3
    for s0, s1 in zip(fused.sources, back.sources):
        assert_same_mask(s0, s1)
    # re-fusing what was loaded gives the same result
    again = fuse_masks([back], alpha=0.6)
    for k in SHAPES:
        assert torch.equal(again.layers[k].indices, fused.layers[k].indices)


def test_empty_layers_round_trip(tmp_path):
    m = ConceptMask(("x",), "ffn2", {k: LayerMask(s, torch.zeros(0, dtype=torch.int64)) for k, s in SHAPES.items()})
    save_mask(m, tmp_path / "e.safetensors")
    assert_same_mask(m, load_mask(tmp_path / "e.safetensors"))


def test_save_is_deterministic(tmp_path):
    m = concept_mask("a", 5)
    save_mask(m, tmp_path / "1.safetensors")
    save_mask(m, tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


# --------------------------------------------------------------------------- damage
def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewrite(src, dst, tensors=None, header=None, edit=None, metadata=None):
    """Re-save ``src`` edited. The checksum is dropped (a damaged file without one), so
    these tests reach the validation behind the checksum; the checksum has its own tests."""
    t, meta = read_raw(src)
    h = json.loads(meta[HEADER_KEY])
    h.pop("checksum", None)
    if edit:
        edit(t, h)
    if metadata is None:
        metadata = {HEADER_KEY: json.dumps(h)}
    save_file(t if tensors is None else tensors, str(dst), metadata=metadata)
    return dst


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "ok.safetensors"
    save_mask(concept_mask("golf ball", 1), p)
    return p


@pytest.fixture
def saved_fused(tmp_path):
    p = tmp_path / "fused.safetensors"
    save_mask(fuse_masks([concept_mask("a", 1), concept_mask("b", 2)], alpha=0.6), p)
    return p


def load_fails(path, *fragments):
    with pytest.raises(MaskFileError) as e:
        load_mask(path)
    msg = str(e.value)
    assert os.fspath(path) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_truncated_file(saved, tmp_path):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 3, 20, 4):
        p = tmp_path / f"cut{cut}.safetensors"
        p.write_bytes(data[:cut])
        load_fails(p, "not a readable safetensors file")


def test_random_bytes(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    load_fails(p, "not a readable safetensors file")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    load_fails(p)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "nope.safetensors")


def test_safetensors_without_header(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"layer0": torch.arange(3)}, str(p))
    load_fails(p, "no FIA mask header")
    p2 = tmp_path / "othermeta.safetensors"
    save_file({"w": torch.zeros(2)}, str(p2), metadata={"format": "pt"})
    load_fails(p2, "no FIA mask header")


def test_header_newer_version(saved, tmp_path):
    p = rewrite(saved, tmp_path / "v2.safetensors", edit=lambda t, h: h.update(version=2))
    load_fails(p, "version 2", "newer")


@pytest.mark.parametrize("version", ["abc", None, [1], 0, -1, 1.9, True])
def test_header_invalid_version(saved, tmp_path, version):
    p = rewrite(saved, tmp_path / "vbad.safetensors", edit=lambda t, h: h.update(version=version))
    load_fails(p, "invalid format version")


def test_header_without_version(saved, tmp_path):
    p = rewrite(saved, tmp_path / "nov.safetensors", edit=lambda t, h: h.pop("version"))
    load_fails(p, "damaged header")


def test_header_wrong_format(saved, tmp_path):
    p = rewrite(saved, tmp_path / "fmt.safetensors", edit=lambda t, h: h.update(format="something-else"))
    load_fails(p, "unknown format")


def test_header_not_json(saved, tmp_path):
    p = rewrite(saved, tmp_path / "json.safetensors", metadata={HEADER_KEY: "{not json"})
    load_fails(p, "damaged header")


def test_header_missing_layers(saved, tmp_path):
    p = rewrite(saved, tmp_path / "nolayers.safetensors", edit=lambda t, h: h.pop("layers"))
    load_fails(p, "damaged header")


def test_header_bad_shape(saved, tmp_path):
    def edit(t, h):
        h["layers"][0][1] = [0, 32]
    load_fails(rewrite(saved, tmp_path / "shape.safetensors", edit=edit), "not positive")

    def edit2(t, h):
        h["layers"][0][1] = "8x32"
    load_fails(rewrite(saved, tmp_path / "shape2.safetensors", edit=edit2), "damaged header")


def test_header_unknown_kind(saved, tmp_path):
    load_fails(rewrite(saved, tmp_path / "kind.safetensors", edit=lambda t, h: h.update(kind="weird")), "unknown mask kind")


def test_concept_mask_with_two_concepts(saved, tmp_path):
    p = rewrite(saved, tmp_path / "two.safetensors", edit=lambda t, h: h.update(concepts=["a", "b"]))
    load_fails(p, "exactly one concept")


def test_indices_out_of_range(saved, tmp_path):
    numel = 8 * 32

    def edit(t, h):
        t["layer0"] = torch.tensor([0, 5, numel], dtype=torch.int32)
    load_fails(rewrite(saved, tmp_path / "oor.safetensors", edit=edit), "'layer0'", "outside its layer", str(numel - 1))

    def edit_neg(t, h):
        t["layer2"] = torch.tensor([-1, 3], dtype=torch.int64)
    load_fails(rewrite(saved, tmp_path / "neg.safetensors", edit=edit_neg), "'layer2'", "outside its layer")


def test_unsorted_or_duplicate_indices(saved, tmp_path):
    def edit(t, h):
        t["layer1"] = torch.tensor([3, 1, 7], dtype=torch.int32)
    load_fails(rewrite(saved, tmp_path / "unsorted.safetensors", edit=edit), "'layer1'", "not sorted")

    def edit_dup(t, h):
        t["layer1"] = torch.tensor([1, 3, 3, 7], dtype=torch.int32)
    load_fails(rewrite(saved, tmp_path / "dup.safetensors", edit=edit_dup), "'layer1'", "not sorted and unique")


def test_indices_wrong_dtype_or_rank(saved, tmp_path):
    def edit(t, h):
        t["layer0"] = torch.tensor([1.0, 2.0])
    load_fails(rewrite(saved, tmp_path / "float.safetensors", edit=edit), "'layer0'", "int32/int64")

    def edit2(t, h):
        t["layer0"] = torch.tensor([[1, 2]], dtype=torch.int64)
    load_fails(rewrite(saved, tmp_path / "2d.safetensors", edit=edit2), "'layer0'", "1-D")


def test_missing_tensor(saved, tmp_path):
    load_fails(rewrite(saved, tmp_path / "miss.safetensors", edit=lambda t, h: t.pop("layer1")), "'layer1'", "missing")


def test_unexpected_tensor(saved, tmp_path):
    def edit(t, h):
        t["layer3"] = torch.tensor([0], dtype=torch.int32)
    load_fails(rewrite(saved, tmp_path / "extra.safetensors", edit=edit), "unexpected tensors", "layer3")


def test_fused_missing_agnostic_or_source(saved_fused, tmp_path):
    load_fails(rewrite(saved_fused, tmp_path / "a.safetensors", edit=lambda t, h: t.pop("agnostic0")), "'agnostic0'", "missing")
    load_fails(rewrite(saved_fused, tmp_path / "s.safetensors", edit=lambda t, h: t.pop("source1.layer2")), "'source1.layer2'", "missing")


def test_fused_concepts_do_not_match_sources(saved_fused, tmp_path):
    p = rewrite(saved_fused, tmp_path / "c.safetensors", edit=lambda t, h: h.update(concepts=["a", "z"]))
    load_fails(p, "does not match its sources")


@pytest.mark.parametrize("sources", [[{}, {}], ["a", "b"], 5])
def test_fused_damaged_sources_header(saved_fused, tmp_path, sources):
    p = rewrite(saved_fused, tmp_path / "src.safetensors", edit=lambda t, h: h.update(sources=sources))
    load_fails(p)


# --------------------------------------------------------------------------- matching
def test_check_mask_matches():
    m = concept_mask("a", 0)
    check_mask_matches(m, SHAPES, "ffn2")  # no error
    check_mask_matches(m, {k: list(v) for k, v in SHAPES.items()}, "ffn2")
    sdxl_like = {f"l{i}.ff.net.2": (640, 2560) for i in range(20)}
    with pytest.raises(ValueError) as e:
        check_mask_matches(m, sdxl_like, "ffn2")
    msg = str(e.value)
    assert "3 ffn2 layers" in msg and "20 ffn2 layers" in msg and "SD15" in msg, msg
    with pytest.raises(ValueError, match="ffn1"):
        check_mask_matches(m, SHAPES, "ffn1")
    changed = dict(SHAPES)
    changed["mid_block.ff.net.2"] = (16, 65)
    with pytest.raises(ValueError):
        check_mask_matches(m, changed, "ffn2")


# --------------------------------------------------------------------------- application
@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0])
def test_apply_mask_matches_dense_reference(strength):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 9, generator=g)
    dense = torch.rand(6, 9, generator=g) < 0.3
    idx = torch.from_numpy(np.flatnonzero(dense.numpy()).astype(np.int64))
    orig = w.clone()
    out = apply_mask_to_weight(w, idx, strength)
    ref = w.double() * (1 - strength * dense.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(w, orig), "input modified without inplace"
    assert out.data_ptr() != w.data_ptr()
    if strength == 1.0:
        assert (out[dense] == 0).all()
    assert torch.equal(out[~dense], w[~dense])


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_apply_mask_inplace(strength):
    w = torch.randn(4, 5)
    orig = w.clone()
    idx = torch.tensor([0, 7, 19])
    out = apply_mask_to_weight(w, idx, strength, inplace=True)
    assert out is w
    ref = orig.clone().view(-1)
    ref[idx] *= 1 - strength
    torch.testing.assert_close(w.view(-1), ref)


def test_apply_mask_half_precision_and_empty():
    w = torch.randn(4, 5, dtype=torch.float16)
    out = apply_mask_to_weight(w, torch.tensor([3]), 1.0)
    assert out.dtype == torch.float16 and out.view(-1)[3] == 0
    same = apply_mask_to_weight(w, torch.zeros(0, dtype=torch.int64), 1.0)
    assert torch.equal(same, w) and same.data_ptr() != w.data_ptr()


def test_apply_mask_rejects_bad_strength():
    for s in (-0.1, 1.1):
        with pytest.raises(ValueError):
            apply_mask_to_weight(torch.ones(2, 2), torch.tensor([0]), s)


@pytest.mark.parametrize("text", ["[1, 2]", '"fia"', "3", "null"])
def test_header_json_not_an_object(saved, tmp_path, text):
    load_fails(rewrite(saved, tmp_path / "obj.safetensors", metadata={HEADER_KEY: text}), "damaged header")


# --------------------------------------------------------------------------- checksum, header limits
def flip_sorted_bit(path, tensor="layer1"):
    """Flip the lowest bit of one index of ``tensor`` in the file's bytes such that the
    indices stay sorted, unique and in range; returns (position, old value, new value)."""
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    info = json.loads(data[8:8 + n])[tensor]
    assert info["dtype"] == "I32"
    start = 8 + n + info["data_offsets"][0]
    idx = np.frombuffer(bytes(data[start:8 + n + info["data_offsets"][1]]), dtype="<i4")
    i = next(i for i in range(len(idx) - 1) if idx[i] % 2 == 0 and idx[i] + 1 < idx[i + 1])
    data[start + 4 * i] ^= 1
    path.write_bytes(bytes(data))
    return i, int(idx[i]), int(idx[i]) + 1


def test_saved_files_carry_a_checksum(saved):
    from fia_core.mask_io import content_checksum

    tensors, meta = read_raw(saved)
    h = json.loads(meta[HEADER_KEY])
    checksum = h.pop("checksum")
    assert len(checksum) == 64 and checksum == content_checksum(json.dumps(h), tensors)


@pytest.mark.parametrize("which", ["concept", "fused"])
def test_bit_flip_that_keeps_indices_sorted_is_caught(saved, saved_fused, tmp_path, which):
    path = saved if which == "concept" else saved_fused
    i, old, new = flip_sorted_bit(path, "layer1")
    load_fails(path, "checksum mismatch")
    # the same bytes without the checksum load "fine" with the changed index: only the checksum catches it
    tensors, meta = read_raw(path)
    h = json.loads(meta[HEADER_KEY])
    del h["checksum"]
    save_file(tensors, str(tmp_path / "nochecksum.safetensors"), metadata={HEADER_KEY: json.dumps(h)})
    back = load_mask(tmp_path / "nochecksum.safetensors")
    assert list(back.layers.values())[1].indices[i] == new != old


def test_header_edit_is_caught_by_the_checksum(saved, tmp_path):
    tensors, meta = read_raw(saved)
    h = json.loads(meta[HEADER_KEY])
    h["params"]["r2"] = 0.5  # the checksum field is kept as it was
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={HEADER_KEY: json.dumps(h)})
    load_fails(tmp_path / "edited.safetensors", "checksum mismatch")


def test_file_without_checksum_still_loads_with_a_warning(saved, tmp_path, caplog):
    """Files written before checksums (FORMAT_VERSION 1 too) load as before, with a note."""
    p = rewrite(saved, tmp_path / "old.safetensors")  # no checksum, as the pack wrote files before
    with caplog.at_level("WARNING", logger="fia_core.mask_io"):
        back = load_mask(p)
    assert_same_mask(concept_mask("golf ball", 1), back)
    assert any("no content checksum" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("depth", [100_000, 2_000_000])
def test_deeply_nested_header(saved, tmp_path, depth):
    p = rewrite(saved, tmp_path / "deep.safetensors", metadata={HEADER_KEY: "[" * depth + "]" * depth})
    load_fails(p, "damaged header")


def test_huge_header(saved, tmp_path):
    from fia_core.mask_io import MAX_HEADER_CHARS

    big = json.dumps({"format": "fia-mask", "pad": "x" * (MAX_HEADER_CHARS + 10)})
    load_fails(rewrite(saved, tmp_path / "huge.safetensors", metadata={HEADER_KEY: big}), "damaged header", "characters")
