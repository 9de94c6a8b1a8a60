"""Mask types: sparse per-layer index sets, their statistics and application math.

A mask is stored as sorted flat indices (row-major into the [C_out, C_in] weight) per
layer, so one concept's mask for SD1.5 is a few hundred KB instead of 50 M booleans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .targets import describe_architecture


@dataclass(frozen=True)
class LayerMask:
    """Selected connections of one layer: sorted unique int64 flat indices (CPU)."""

    shape: tuple[int, int]
    indices: torch.Tensor

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def count(self) -> int:
        return int(self.indices.numel())

    def dense(self) -> torch.Tensor:
        m = torch.zeros(self.numel, dtype=torch.bool)
        m[self.indices] = True
        return m.view(self.shape)

    @staticmethod
    def from_dense(mask: torch.Tensor) -> "LayerMask":
        return LayerMask(tuple(mask.shape), mask.reshape(-1).nonzero().squeeze(1).cpu())


@dataclass(frozen=True)
class NeuronMask:
    """Common part of concept and fused masks.

    ``layers`` holds, for every target layer of the model, the connections this mask
    prunes when applied. ``params`` records how it was made (r1, r2, alpha, mode, ...).
    """

    concepts: tuple[str, ...]
    target: str
    layers: dict[str, LayerMask]
    architecture: str = ""  # targets.architecture_signature of the model it was built on
    fingerprint: str = ""  # targets.weights_fingerprint of that model
    params: dict[str, Any] = field(default_factory=dict)

    kind = "mask"

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {k: m.shape for k, m in self.layers.items()}

    def prune_indices(self, key: str) -> torch.Tensor:
        return self.layers[key].indices

    def dense(self) -> dict[str, torch.Tensor]:
        """Exact boolean view {layer key: [C_out, C_in]} of the pruned connections."""
        return {k: m.dense() for k, m in self.layers.items()}

    def stats(self) -> dict[str, Any]:
        """Per-layer and total counts and fractions (what applying the mask prunes)."""
        layers = {}
        total = pruned = 0
        for key, m in self.layers.items():
            layers[key] = {"shape": list(m.shape), "pruned": m.count, "fraction": m.count / m.numel}
            total += m.numel
            pruned += m.count
        return {
            "kind": self.kind,
            "concepts": list(self.concepts),
            "target": self.target,
            "layers": layers,
            "layers_touched": sum(1 for m in self.layers.values() if m.count),
            "total_connections": total,
            "total_pruned": pruned,
            "pruned_fraction": pruned / total if total else 0.0,
            "params": dict(self.params),
        }


@dataclass(frozen=True)
class ConceptMask(NeuronMask):
    """Q^(c) of Eq. 6: the concept-sensitive connections of one concept."""

    kind = "concept"

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        s["per_concept"] = {self.concepts[0]: s["total_pruned"]} if self.concepts else {}
        s["agnostic_kept"] = 0
        return s


@dataclass(frozen=True)
class FusedMask(NeuronMask):
    """Eq. 7-8: what to prune after fusing several concept masks.

    ``agnostic`` holds the connections selected by at least tau_ca concepts, kept as
    concept-agnostic; ``sources`` the concept masks it was fused from.
    """

    agnostic: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: tuple[ConceptMask, ...] = ()
    kind = "fused"

    def stats(self) -> dict[str, Any]:
        s = super().stats()
        for key, info in s["layers"].items():
            info["agnostic_kept"] = int(self.agnostic[key].numel()) if key in self.agnostic else 0
        s["agnostic_kept"] = sum(int(a.numel()) for a in self.agnostic.values())
        s["per_concept"] = {m.concepts[0]: sum(l.count for l in m.layers.values()) for m in self.sources}
        return s


@torch.no_grad()
def apply_mask_to_weight(
    weight: torch.Tensor, indices: torch.Tensor, strength: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    """W <- W * (1 - strength * M) with M given as flat indices; never builds a dense M.

    ``strength`` 1 zeroes the masked connections, 0 returns W unchanged.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if inplace and not weight.is_contiguous():
        raise ValueError("apply_mask_to_weight(inplace=True) needs a contiguous weight tensor")
    out = weight if inplace else weight.clone(memory_format=torch.contiguous_format)
    if strength == 0.0 or indices.numel() == 0:
        return out
    flat = out.view(-1)
    idx = indices.to(out.device, torch.long)
    if strength == 1.0:
        flat.index_fill_(0, idx, 0)
    else:
        flat.index_copy_(0, idx, flat.index_select(0, idx) * (1.0 - strength))
    return out


def check_mask_matches(mask: NeuronMask, shapes: Mapping[str, tuple[int, int]], target: str) -> None:
    """Raise ValueError when ``mask`` cannot apply to layers of these shapes."""
    wanted = {k: tuple(v) for k, v in shapes.items()}
    if mask.target != target or dict(mask.layer_shapes) != wanted:
        built = mask.params.get("model_type", "")
        first = next((k for k in list(mask.layer_shapes) + list(wanted)
                      if mask.layer_shapes.get(k) != wanted.get(k)), None)
        detail = (f"; first difference at layer {first}: mask {mask.layer_shapes.get(first)}, "
                  f"model {wanted.get(first)}") if first else ""
        raise ValueError(
            f"the mask was built for another architecture ({built + ': ' if built else ''}"
            f"{describe_architecture(mask.layer_shapes, mask.target)}) and cannot apply to this model "
            f"({describe_architecture(shapes, target)}{detail})"
        )
