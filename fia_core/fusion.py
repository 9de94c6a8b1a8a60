"""Multi-concept mask fusion with concept-agnostic retention (Eq. 7-8).

s_ij counts the concepts whose mask selects connection (i, j). Connections selected by
at least tau_ca concepts serve many concepts (concept-agnostic) and are kept; the rest
of the selected ones are pruned. tau_ca = max(3, ceil(alpha * C)):
- C = 1: the reference code's ceil(alpha * C) = 1 would keep every selected connection
  and prune nothing; here the single concept's mask is pruned whole.
- C = 2: with only two concepts there is no evidence that a shared connection is
  agnostic (two related or duplicate concepts would cancel out), so tau_ca = 3 > C and
  the fused mask is the union of the two concept masks.
- C >= 3: a connection is agnostic only if at least three concepts select it; for
  C >= 5 at the paper's alpha (0.6, 0.8) this is the paper's ceil(alpha * C).
alpha=None gives the naive union (prune every selected connection) for comparison.
"""
from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from typing import Sequence

import torch

from .concepts import concept_key, normalize_concept
from .masks import ConceptMask, FusedMask, LayerMask, NeuronMask

#: the fewest concepts that must share a connection for it to count as concept-agnostic
MIN_AGNOSTIC = 3


def agnostic_threshold(alpha: float | None, num_concepts: int) -> int | None:
    """tau_ca of Eq. 8, or None for the naive union."""
    if alpha is None:
        return None
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return max(MIN_AGNOSTIC, math.ceil(Fraction(repr(float(alpha))) * num_concepts))


def concept_masks_of(masks: Sequence[NeuronMask]) -> list[ConceptMask]:
    """Flatten inputs to concept masks: a fused mask contributes the masks it came from."""
    out: list[ConceptMask] = []
    for m in masks:
        if isinstance(m, FusedMask):
            out.extend(m.sources)
        elif isinstance(m, ConceptMask):
            out.append(m)
        else:
            raise TypeError(f"expected concept or fused masks, got {type(m).__name__}")
    return out


def selection_counts(index_sets: Sequence[torch.Tensor], numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s_ij of Eq. 7 for one layer: the sorted connections selected by any of the sets
    (each of sorted unique flat indices) and how many sets select each.

    When the sets are large, a transient int16 counter over the layer (one index_add_
    per set) is several times faster than sorting their concatenation; it is freed on
    return.
    """
    total = sum(int(s.numel()) for s in index_sets)
    if total * 16 < numel or len(index_sets) >= torch.iinfo(torch.int16).max:
        return torch.unique(torch.cat(list(index_sets)), sorted=True, return_counts=True)
    device = index_sets[0].device
    counter = torch.zeros(numel, dtype=torch.int16, device=device)
    one = torch.ones((), dtype=torch.int16, device=device)
    for s in index_sets:
        counter.index_add_(0, s.to(device), one.expand(s.numel()))
    uniq = counter.nonzero().squeeze(1)
    return uniq, counter[uniq].long()


UNNAMED = "unnamed concept {}"


def named_sources(sources: Sequence[ConceptMask]) -> list[ConceptMask]:
    """The sources with every empty name replaced by "unnamed concept k" (the smallest k
    not already taken), so that masks built by the library without a concept name fuse."""
    taken = {concept_key(m.concepts[0]) for m in sources}
    out, k = [], 1
    for m in sources:
        if not normalize_concept(m.concepts[0]):
            while concept_key(UNNAMED.format(k)) in taken:
                k += 1
            taken.add(concept_key(UNNAMED.format(k)))
            m = replace(m, concepts=(UNNAMED.format(k),))
        out.append(m)
    return out


def check_sources(sources: Sequence[ConceptMask]) -> None:
    """Refuse one concept twice (normalised names compared ignoring case; the message
    names both spellings) and masks of other layers."""
    first = sources[0]
    seen: dict[str, str] = {}
    for m in sources:
        name = m.concepts[0]
        other = seen.get(concept_key(name))
        if other is not None:
            raise ValueError(
                f"'{other}' and '{name}' are the same concept (names are compared ignoring case, spacing "
                "and invisible characters): fuse each concept once"
            )
        seen[concept_key(name)] = name
        if m.target != first.target or m.layer_shapes != first.layer_shapes:
            raise ValueError(
                f"masks for {first.concepts[0]!r} and {name!r} were built on different layers "
                f"({first.target}, {len(first.layers)} layers vs {m.target}, {len(m.layers)} layers)"
            )


@torch.no_grad()
def fuse_masks(masks: Sequence[NeuronMask], alpha: float | None = 0.6) -> FusedMask:
    """The fused prune mask (Eq. 7-8) of several concept masks (or fused masks, re-fused
    from their sources). Works on sparse indices: no dense tensor is built.

    Unnamed concept masks (concept "") are named "unnamed concept 1", "2", ... in the
    fused mask. The fused mask keeps every source with its fingerprint; its own
    fingerprint is the sources' common one, or "" when they differ
    (diagnostics.mask_warnings reports that).
    """
    sources = named_sources(concept_masks_of(masks))
    if not sources:
        raise ValueError("fuse_masks needs at least one mask")
    check_sources(sources)
    first = sources[0]
    tau = agnostic_threshold(alpha, len(sources))
    pruned: dict[str, LayerMask] = {}
    agnostic: dict[str, torch.Tensor] = {}
    for key, shape in first.layer_shapes.items():
        uniq, counts = selection_counts([m.layers[key].indices for m in sources], shape[0] * shape[1])
        if tau is None:
            keep = torch.zeros_like(counts, dtype=torch.bool)
        else:
            keep = counts >= tau
        pruned[key] = LayerMask(shape, uniq[~keep])
        agnostic[key] = uniq[keep]
    fingerprints = {m.fingerprint for m in sources}
    return FusedMask(
        concepts=tuple(m.concepts[0] for m in sources),
        target=first.target,
        layers=pruned,
        architecture=first.architecture,
        fingerprint=first.fingerprint if len(fingerprints) == 1 else "",
        params={"alpha": alpha, "tau_ca": tau, "num_concepts": len(sources),
                **{k: v for k, v in first.params.items() if k == "model_type"}},
        agnostic=agnostic,
        sources=tuple(sources),
    )
