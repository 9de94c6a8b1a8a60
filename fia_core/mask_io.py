"""Mask files: safetensors with JSON metadata. Loading validates everything, never unpickles.

Layout: tensor ``layer{i}`` holds the pruned flat indices of layer i (the selected ones for
a concept mask), ``agnostic{i}`` the concept-agnostic ones of a fused mask, and
``source{c}.layer{i}`` the concept masks a fused mask came from. The metadata entry
``fia_mask`` is a JSON header with the format version, target, layer keys and shapes,
concepts, parameters and the model's architecture signature and fingerprint.

Content checksum: the header's last field ``checksum`` is the SHA-256 of the header
text without it (json.dumps of the other fields, in order) and of every tensor (name,
dtype, shape and bytes, in name order). load_mask verifies it and raises MaskFileError
on a mismatch, so a bit flip that keeps indices sorted and in range is caught. (It sits
inside the header because safetensors does not keep the order of metadata entries, and
saving must stay byte-for-byte deterministic.)

FORMAT_VERSION stays 1: the checksum is an extra header field that older readers
ignore, and the other fields and the tensors are unchanged, so files stay readable in
both directions. A version bump is for changes an older reader would misread (a new tensor
layout, a changed meaning of a header field). Files written before the checksum load as
before, with a log warning that their content cannot be verified.

Header limits: a header over MAX_HEADER_CHARS or nested too deeply for JSON parsing is
a MaskFileError, never a RecursionError or a long stall.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .masks import ConceptMask, FusedMask, LayerMask, NeuronMask

FORMAT = "fia-mask"
FORMAT_VERSION = 1
HEADER_KEY = "fia_mask"
CHECKSUM_FIELD = "checksum"
MAX_HEADER_CHARS = 8 << 20  # a 50-concept SDXL fused mask's header is a few tens of KB

log = logging.getLogger(__name__)


class MaskFileError(ValueError):
    """A mask file is unreadable, corrupted or not an FIA mask."""


def _index_tensor(idx: torch.Tensor, numel: int) -> torch.Tensor:
    dtype = torch.int32 if numel < 2**31 else torch.int64
    return idx.to("cpu", dtype).contiguous()


def _layers_header(mask: NeuronMask) -> list:
    return [[k, list(s)] for k, s in mask.layer_shapes.items()]


def content_checksum(header_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the header text and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(b"fia-mask-checksum-v1\0")
    h.update(header_text.encode("utf-8") + b"\0")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


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
    header[CHECKSUM_FIELD] = content_checksum(json.dumps(header), tensors)  # last: load pops it
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


def _read_file(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise _fail(path, f"not a readable safetensors file ({e})") from e
    return meta, tensors


def _header_text(path, meta: Mapping[str, str]) -> str:
    if HEADER_KEY not in meta:
        raise _fail(path, "no FIA mask header: this safetensors file is not an FIA mask")
    text = meta[HEADER_KEY]
    if len(text) > MAX_HEADER_CHARS:
        raise _fail(path, f"damaged header ({len(text)} characters, at most {MAX_HEADER_CHARS} expected)")
    return text


def _verify_checksum(path, header: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    """Pop and check the header's checksum; files from before checksums only log a note."""
    if CHECKSUM_FIELD not in header:
        log.warning("FIA mask file %s has no content checksum (written before checksums): its content "
                    "cannot be verified; save it again to add one", os.fspath(path))
        return
    expected = header.pop(CHECKSUM_FIELD)
    if expected != content_checksum(json.dumps(header), tensors):
        raise _fail(path, "content checksum mismatch: the file was modified or damaged after it was saved "
                          "(save the mask again from its source)")


def _parse_header(path, text: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The header's fields, checksum verified and validated; MaskFileError otherwise."""
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise TypeError(f"a JSON object was expected, got {type(header).__name__}")
        _verify_checksum(path, header, tensors)
        if header.get("format") != FORMAT:
            raise _fail(path, f"unknown format {header.get('format')!r}")
        version = header["version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _fail(path, f"invalid format version {version!r}")
        if version > FORMAT_VERSION:
            raise _fail(path, f"format version {version} is newer than this pack supports ({FORMAT_VERSION}); update the pack")
        out = {
            "kind": header["kind"],
            "target": str(header["target"]),
            "shapes": {str(k): (int(s[0]), int(s[1])) for k, s in header["layers"]},
            "concepts": tuple(str(c) for c in header["concepts"]),
            "params": dict(header.get("params") or {}),
            "architecture": str(header.get("architecture", "")),
            "fingerprint": str(header.get("fingerprint", "")),
            "sources": [(str(src["concept"]), str(src.get("fingerprint", "")), dict(src.get("params") or {}))
                        for src in (header.get("sources") or [])],
        }
    except MaskFileError:
        raise
    except RecursionError:
        raise _fail(path, "damaged header (nested too deeply)") from None
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise _fail(path, f"damaged header ({e})") from e
    if out["kind"] not in ("concept", "fused"):
        raise _fail(path, f"unknown mask kind {out['kind']!r}")
    if any(s[0] <= 0 or s[1] <= 0 for s in out["shapes"].values()):
        raise _fail(path, "a layer shape is not positive")
    return out


def _build_mask(path, h: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> NeuronMask:
    shapes, target, architecture = h["shapes"], h["target"], h["architecture"]

    def layers_from(prefix: str) -> dict[str, LayerMask]:
        return {
            key: LayerMask(shape, _read_indices(tensors, f"{prefix}{i}", shape[0] * shape[1], path))
            for i, (key, shape) in enumerate(shapes.items())
        }

    expected = {f"layer{i}" for i in range(len(shapes))}
    layers = layers_from("layer")
    if h["kind"] == "concept":
        if len(h["concepts"]) != 1:
            raise _fail(path, f"a concept mask names exactly one concept, this one {len(h['concepts'])}")
        mask: NeuronMask = ConceptMask(h["concepts"], target, layers, architecture, h["fingerprint"], h["params"])
    else:
        agnostic = {k: m.indices for k, m in layers_from("agnostic").items()}
        expected |= {f"agnostic{i}" for i in range(len(shapes))}
        sources = []
        for c, (src_concept, src_fingerprint, src_params) in enumerate(h["sources"]):
            sources.append(ConceptMask(
                (src_concept,), target, layers_from(f"source{c}.layer"), architecture, src_fingerprint, src_params,
            ))
            expected |= {f"source{c}.layer{i}" for i in range(len(shapes))}
        if tuple(s.concepts[0] for s in sources) != h["concepts"]:
            raise _fail(path, "the fused mask's concept list does not match its sources")
        mask = FusedMask(h["concepts"], target, layers, architecture, h["fingerprint"], h["params"], agnostic,
                         tuple(sources))
    unexpected = set(tensors) - expected
    if unexpected:
        raise _fail(path, f"unexpected tensors {sorted(unexpected)[:3]}")
    return mask


def load_mask(path: str | os.PathLike) -> NeuronMask:
    """Read and validate a mask file (checksum, header, every index tensor); raises
    MaskFileError with the reason, FileNotFoundError when there is no file."""
    meta, tensors = _read_file(path)
    header = _parse_header(path, _header_text(path, meta), tensors)
    return _build_mask(path, header, tensors)
