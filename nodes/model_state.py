"""Per-model state of the FIA nodes, kept as a ModelPatcher attachment (never module-level).

One :class:`ModelState` hangs on a MODEL under ``ATTACHMENT_KEY``; ComfyUI hands the same
object to every clone made afterwards (clones share the diffusion module, so what is keyed
by the module's weights stays valid; what depends on the patches is keyed by the clone's
``patches_uuid``, which ComfyUI renews whenever patches change). It holds:

- |W| of the target layers as the sampler sees them (patches applied), weakly: every
  concept of one model shares one :class:`AbsWeights` (and the column orders that rank-one
  mask building sorts once per layer, kept inside it), freed with the last saliency.
- the mask fingerprint of the target layers (what masks record), strongly: a string, so
  applying a mask never recomputes |W| just to compare fingerprints.
- the content fingerprint of the unpatched UNet (the saliency cache key's model part),
  computed once per loaded model from a strided sample of 1024 values of every tensor.
- the content digest of the weight patches, memoised per ``patches_uuid`` (the uuid is
  only an in-process memo key; the digest itself is content-based and stable across
  processes).
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..fia_core import TargetLayer, architecture_signature, describe_architecture, weights_fingerprint
from ..fia_core.column_order import SharedAbsWeights

ATTACHMENT_KEY = "fia_model_state"
#: values sampled per tensor for content fingerprints of large tensors (the unpatched
#: UNet, big "diff" patches); tensors up to FULL_HASH_NUMEL elements are hashed whole
SAMPLES_PER_TENSOR = 1024
FULL_HASH_NUMEL = 1 << 20


class AbsWeights(SharedAbsWeights):
    """{layer key: |W|} as the sampler sees it (patches such as LoRAs included), on the CPU.

    A dict subclass so that it can be weakly referenced: every concept of one model shares
    one instance, and it is freed with the last saliency that uses it. It also keeps each
    layer's column order of |W| (fia_core.rank_one.ColumnOrder, built by the first mask
    and reused by every later concept's mask building).
    """

    fingerprint: str = ""


@dataclass(frozen=True)
class ModelIdentity:
    """What a mask records about the model it was built on."""

    model_type: str
    architecture: str
    fingerprint: str
    description: str


def tensor_digest(t: torch.Tensor, h: "hashlib._Hash", samples: int = SAMPLES_PER_TENSOR,
                  full_numel: int = FULL_HASH_NUMEL) -> None:
    """Feed ``t``'s shape, dtype and content into ``h``: the whole tensor when it has at most
    ``full_numel`` elements, else a strided sample of ``samples`` values plus the last one
    (a cheap identity, not a security hash: two large tensors that differ only between
    sampled positions collide)."""
    t = t.detach()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.reshape(-1)
    if flat.numel() > full_numel:
        step = max(1, flat.numel() // samples)
        flat = torch.cat([flat[::step][:samples], flat[-1:]])
    flat = flat.to("cpu").contiguous()
    try:
        h.update(flat.view(torch.uint8).numpy().tobytes())
    except (TypeError, RuntimeError):  # dtypes numpy cannot view (e.g. float8): go through float32
        h.update(flat.to(torch.float32).numpy().tobytes())


class ModelState:
    """The attachment object (see the module docstring). Thread-safe for the node's use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abs: dict[tuple, weakref.ref] = {}
        self._mask_fingerprints: dict[tuple, str] = {}
        self._base_fingerprint: str | None = None
        self._patch_digests: dict[object, str] = {}

    def on_model_patcher_clone(self) -> "ModelState":
        return self  # clones share the module: share what is keyed by it

    # -- |W| and the mask fingerprint ---------------------------------------------------
    def abs_weights(self, model, layers: list[TargetLayer],
                    read: Callable[[object, list[TargetLayer]], Mapping[str, torch.Tensor]]) -> AbsWeights:
        """Shared |W| of ``layers``; ``read(model, layers)`` gives the effective weights."""
        key = (model.patches_uuid, tuple(l.key for l in layers))
        with self._lock:
            ref = self._abs.get(key)
            cached = ref() if ref is not None else None
        if cached is not None:
            return cached
        weights = read(model, layers)
        result = AbsWeights({k: w.abs_() for k, w in weights.items()})
        result.fingerprint = weights_fingerprint(result)
        with self._lock:
            self._abs = {k: r for k, r in self._abs.items() if r() is not None}
            self._abs[key] = weakref.ref(result)
            self._mask_fingerprints[key] = result.fingerprint
        return result

    def mask_fingerprint(self, model, layers: list[TargetLayer], read) -> str:
        """The fingerprint masks record (of |W| of ``layers``), computed at most once."""
        key = (model.patches_uuid, tuple(l.key for l in layers))
        with self._lock:
            fp = self._mask_fingerprints.get(key)
        return fp if fp is not None else self.abs_weights(model, layers, read).fingerprint

    # -- saliency-cache identity ----------------------------------------------------------
    def base_fingerprint(self, model) -> str:
        """Content fingerprint of the unpatched diffusion model (original weights, from
        ComfyUI's backup when a clone patched the module in place): every tensor's name,
        shape, dtype and a strided sample of its values. Computed once per loaded model."""
        with self._lock:
            if self._base_fingerprint is not None:
                return self._base_fingerprint
        h = hashlib.sha256()
        for key, ((weight, _convert), *_patches) in sorted(model.get_key_patches("diffusion_model.").items()):
            h.update(key.encode())
            tensor_digest(weight, h, full_numel=SAMPLES_PER_TENSOR)  # sampled: cheap even for SDXL
        fp = h.hexdigest()[:32]
        with self._lock:
            self._base_fingerprint = fp
        return fp

    def patch_digest(self, model, describe: Callable[[object], str]) -> str:
        """Digest of ``model.patches`` by ``describe`` (content-based), memoised per
        patches_uuid. ``describe`` raises ValueError when a patch cannot be described."""
        key = model.patches_uuid
        with self._lock:
            digest = self._patch_digests.get(key)
        if digest is None:
            digest = describe(model.patches)
            with self._lock:
                if len(self._patch_digests) > 64:  # bounded: old patch states are rarely revisited
                    self._patch_digests.clear()
                self._patch_digests[key] = digest
        return digest


def state_of(model) -> ModelState:
    """The ModelState attached to ``model`` (attached on first use)."""
    state = model.get_attachment(ATTACHMENT_KEY)
    if not isinstance(state, ModelState):
        state = ModelState()
        model.set_attachments(ATTACHMENT_KEY, state)
    return state


def identity_of(model, layers: list[TargetLayer], target: str, model_type: str, fingerprint: str) -> ModelIdentity:
    shapes = {l.key: l.shape for l in layers}
    return ModelIdentity(model_type, architecture_signature(shapes), fingerprint, describe_architecture(shapes, target))
