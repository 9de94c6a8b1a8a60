"""Warnings about masks that do less than the user asked for, each saying what to change.

A mask that prunes nothing, or far less than asked, leaves the concept in the model
while the user believes it is gone: every such case gets a warning (the nodes show them
on the canvas and in the log). "Far less" is a documented threshold: a concept mask
that selects fewer than LOW_FRACTION (25 %) of its r2 budget (the sum over layers of
K = max(1, floor(r2 * C_out * C_in)), Eq. 5), or a fused mask that prunes fewer than
LOW_FRACTION of the connections its sources select. Selected masks normally fill
nearly all of the budget (the intersection with Eq. 4's per-row top-k removes a few).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from .counting import top_fraction_count
from .masks import ConceptMask, FusedMask, NeuronMask

LOW_FRACTION = 0.25

_FEW_PASSED = ("no connection passed Eq. 2's contrast (the concept prompts' saliency must exceed the base "
               "prompts' mean plus their spread)")
_WHAT_TO_CHANGE = ("use more prompt pairs (num_prompts; the full reference set is the default), a template that "
                   "fits the concept (objects, art_style, explicit), and check that model and CLIP come from "
                   "the same checkpoint")


def _selected(mask: NeuronMask) -> int:
    return sum(layer.count for layer in mask.layers.values())


def concept_budget(mask: ConceptMask) -> int | None:
    """Sum over layers of Eq. 5's K at the mask's r2, or None when r2 is not recorded."""
    r2 = mask.params.get("r2")
    if not isinstance(r2, (int, float)) or not 0.0 < r2 <= 1.0:
        return None
    return sum(top_fraction_count(r2, layer.numel) for layer in mask.layers.values())


def concept_warnings(mask: ConceptMask) -> list[str]:
    """Empty or nearly empty concept mask."""
    name = mask.concepts[0] if mask.concepts else ""
    n = _selected(mask)
    if n == 0:
        return [f"concept mask '{name}' selects no connection: {_FEW_PASSED}. To fix: {_WHAT_TO_CHANGE}."]
    budget = concept_budget(mask)
    if budget and n < LOW_FRACTION * budget:
        empty = sum(1 for layer in mask.layers.values() if layer.count == 0)
        where = f", nothing in {empty} of {len(mask.layers)} layers" if empty else ""
        return [f"concept mask '{name}' selects {n} connections, {100 * n / budget:.1f} % of its r2 budget "
                f"({budget} at r2={mask.params['r2']}){where}: few connections passed Eq. 2's contrast. "
                f"To fix: {_WHAT_TO_CHANGE}."]
    return []


def _content_digest(mask: ConceptMask) -> str:
    h = hashlib.sha256()
    for key, layer in mask.layers.items():
        h.update(key.encode() + b"\0")
        h.update(layer.indices.contiguous().numpy().tobytes())
    return h.hexdigest()


def identical_sources(sources: Sequence[ConceptMask]) -> list[str]:
    """Groups of differently named sources whose masks are identical."""
    groups: dict[str, list[str]] = {}
    for m in sources:
        if _selected(m):
            groups.setdefault(_content_digest(m), []).append(m.concepts[0])
    return [f"the masks of {', '.join(repr(n) for n in names)} are identical: they were probably built from one "
            "saliency or one concept under two names; fuse each concept once"
            for names in groups.values() if len(names) > 1]


def fused_warnings(mask: FusedMask) -> list[str]:
    """Fused mask pruning nothing or far less than its sources select; sources that are
    empty, identical or built on other checkpoints."""
    out: list[str] = []
    for src in mask.sources:
        out.extend(concept_warnings(src))
    out.extend(identical_sources(mask.sources))
    fingerprints = sorted({s.fingerprint for s in mask.sources if s.fingerprint})
    if len(fingerprints) > 1:
        by_fp = {fp: [s.concepts[0] for s in mask.sources if s.fingerprint == fp] for fp in fingerprints}
        detail = "; ".join(f"{', '.join(repr(n) for n in names)} on {fp}" for fp, names in by_fp.items())
        out.append(f"the fused masks were built on different checkpoints ({detail}): a mask only erases its "
                   "concept from the checkpoint it was computed on; rebuild them all on the model you apply them to")
    pruned = _selected(mask)
    agnostic = sum(int(a.numel()) for a in mask.agnostic.values())
    union = pruned + agnostic
    tau = mask.params.get("tau_ca")
    if union and pruned < LOW_FRACTION * union:
        what = "nothing" if pruned == 0 else f"only {pruned} of the {union} connections its concept masks select"
        out.append(f"the fused mask prunes {what}: {agnostic} are selected by at least tau_ca={tau} concepts and "
                   "kept as concept-agnostic (Eq. 8). To prune them: raise alpha (a higher tau_ca), fuse fewer "
                   "related concepts together, or use fusion 'union'")
    elif union == 0:
        out.append("the fused mask prunes nothing: none of its concept masks selects a connection (see their "
                   f"warnings). To fix: {_WHAT_TO_CHANGE}.")
    return out


def mask_warnings(mask: NeuronMask) -> list[str]:
    """Everything about ``mask`` the user must know, as actionable sentences ([] if fine)."""
    if isinstance(mask, FusedMask):
        return fused_warnings(mask)
    if isinstance(mask, ConceptMask):
        return concept_warnings(mask)
    raise TypeError(f"expected a concept or fused mask, got {type(mask).__name__}")
