"""Mask files: safetensors with JSON metadata. Loading validates everything, never unpickles.

Layout: tensor ``layer{i}`` holds the pruned flat indices of layer i (the selected ones for
a concept mask), ``agnostic{i}`` the concept-agnostic ones of a fused mask, and
``source{c}.layer{i}`` the concept masks a fused mask came from. The metadata entry
``fia_mask`` is a JSON header with the format version, target, layer keys and shapes,
concepts, parameters and the model's architecture signature and fingerprint.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .masks import ConceptMask, FusedMask, LayerMask, NeuronMask

FORMAT = "fia-mask"
FORMAT_VERSION = 1
HEADER_KEY = "fia_mask"


class MaskFileError(ValueError):
    """A mask file is unreadable, corrupted or not an FIA mask."""


def _index_tensor(idx: torch.Tensor, numel: int) -> torch.Tensor:
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return idx.to("cpu", dtype).contiguous()


def _layers_header(mask: NeuronMask) -> list:
    return [[k, list(s)] for k, s in mask.layer_shapes.items()]


def save_mask(mask: NeuronMask, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Write ``mask`` to ``path`` (safetensors)."""
    tensors: dict[str, torch.Tensor] = {}
    keys = list(mask.layers)
    for i, key in enumerate(keys):
        tensors[f"layer{i}"] = _index_tensor(mask.layers[key].indices, mask.layers[key].numel)
    sources = []
    if isinstance(mask, FusedMask):
        for i, key in enumerate(keys):
            tensors[f"agnostic{i}"] = _index_tensor(mask.agnostic[key], mask.layers[key].numel)
        for c, src in enumerate(mask.sources):
            sources.append({"concept": src.concepts[0], "params": src.params, "fingerprint": src.fingerprint})
            for i, key in enumerate(keys):
                tensors[f"source{c}.layer{i}"] = _index_tensor(src.layers[key].indices, src.layers[key].numel)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": mask.kind,
        "target": mask.target,
        "layers": _layers_header(mask),
        "concepts": list(mask.concepts),
        "params": mask.params,
        "architecture": mask.architecture,
        "fingerprint": mask.fingerprint,
        "sources": sources,
        "extra": extra or {},
    }
    save_file(tensors, os.fspath(path), metadata={HEADER_KEY: json.dumps(header)})


def _fail(path, why: str) -> MaskFileError:
    return MaskFileError(f"{os.fspath(path)}: {why}")


def _read_indices(tensors: dict, name: str, numel: int, path) -> torch.Tensor:
    if name not in tensors:
        raise _fail(path, f"tensor {name!r} is missing (file truncated or not written by this pack)")
    t = tensors[name]
    if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
        raise _fail(path, f"tensor {name!r} must be 1-D int32/int64 indices, got {t.dtype} {tuple(t.shape)}")
    t = t.to(torch.int64)
    if t.numel():
        if int(t.min()) < 0 or int(t.max()) >= numel:
            raise _fail(path, f"tensor {name!r} has indices outside its layer (0..{numel - 1})")
        if t.numel() > 1 and not bool((t[1:] > t[:-1]).all()):
            raise _fail(path, f"tensor {name!r} is not sorted and unique")
    return t


def load_mask(path: str | os.PathLike) -> NeuronMask:
    """Read and validate a mask file; raises MaskFileError with the reason."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise _fail(path, f"not a readable safetensors file ({e})") from e
    if HEADER_KEY not in meta:
        raise _fail(path, "no FIA mask header: this safetensors file is not an FIA mask")
    try:
        header = json.loads(meta[HEADER_KEY])
        if header.get("format") != FORMAT:
            raise _fail(path, f"unknown format {header.get('format')!r}")
        version = header["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _fail(path, f"invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise _fail(path, f"format version {version} is newer than this pack supports ({FORMAT_VERSION}); update the pack")
        kind = header["kind"]
        target = str(header["target"])
        shapes = {str(k): (int(s[0]), int(s[1])) for k, s in header["layers"]}
        concepts = tuple(str(c) for c in header["concepts"])
        params = dict(header.get("params") or {})
        architecture = str(header.get("architecture", ""))
        fingerprint = str(header.get("fingerprint", ""))
        sources_meta = [
            (str(src["concept"]), str(src.get("fingerprint", "")), dict(src.get("params") or {}))
            for src in (header.get("sources") or [])
        ]
    except MaskFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _fail(path, f"damaged header ({e})") from e
    if kind not in ("concept", "fused"):
        raise _fail(path, f"unknown mask kind {kind!r}")
    if any(s[0] <= 0 or s[1] <= 0 for s in shapes.values()):
        raise _fail(path, "a layer shape is not positive")

    def layers_from(prefix: str) -> dict[str, LayerMask]:
        return {
            key: LayerMask(shape, _read_indices(tensors, f"{prefix}{i}", shape[0] * shape[1], path))
            for i, (key, shape) in enumerate(shapes.items())
        }

    expected = {f"layer{i}" for i in range(len(shapes))}
    layers = layers_from("layer")
    if kind == "concept":
        if len(concepts) != 1:
            raise _fail(path, f"a concept mask names exactly one concept, this one {len(concepts)}")
        mask: NeuronMask = ConceptMask(concepts, target, layers, architecture, fingerprint, params)
    else:
        agnostic = {k: m.indices for k, m in layers_from("agnostic").items()}
        expected |= {f"agnostic{i}" for i in range(len(shapes))}
        sources = []
        for c, (src_concept, src_fingerprint, src_params) in enumerate(sources_meta):
            sources.append(ConceptMask(
                (src_concept,), target, layers_from(f"source{c}.layer"), architecture, src_fingerprint, src_params,
            ))
            expected |= {f"source{c}.layer{i}" for i in range(len(shapes))}
        if tuple(s.concepts[0] for s in sources) != concepts:
            raise _fail(path, "the fused mask's concept list does not match its sources")
        mask = FusedMask(concepts, target, layers, architecture, fingerprint, params, agnostic, tuple(sources))
    unexpected = set(tensors) - expected
    if unexpected:
        raise _fail(path, f"unexpected tensors {sorted(unexpected)[:3]}")
    return mask
