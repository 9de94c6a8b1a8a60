"""Stage 1 for the nodes: a concept's saliency from the disk cache or by sampling.

``concept_saliency`` validates the settings, encodes the prompts once, builds the cache
identity (nodes/saliency_cache.py), serves a validated cache entry or samples
(nodes/saliency_sampling.py), and returns a :class:`SaliencyRun` whose ``notes`` the node
must show (cache used or not usable, batch lowered, ...).
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

from ..fia_core import ConceptSaliency, PromptPair
from .comfy_adapter import abs_weights, model_identity, target_layers
from .saliency_cache import Undescribable, cache_key, load_cached, store_cached
from .saliency_sampling import EncodedPrompts, SaliencyMemoryError, sample_saliency
from .saliency_settings import SUPPORTED_SAMPLERS, SaliencySettings, SaliencySettingsError, check_sampler

log = logging.getLogger(__name__)

CACHED_NOTE = "saliency from cache"


class SaliencyRun(NamedTuple):
    """A concept's saliency, whether it came from the disk cache, and notes for the user."""

    saliency: ConceptSaliency
    cached: bool
    notes: tuple[str, ...] = ()


def _on_cpu(model) -> bool:
    return getattr(model.load_device, "type", str(model.load_device)) == "cpu"


def concept_saliency(
    model, clip, concept: str, pairs: list[PromptPair], settings: SaliencySettings,
    progress: Callable[[int, int], None] | None = None, use_cache: bool = True,
) -> SaliencyRun:
    """The saliency of ``concept`` over ``pairs``: from the disk cache when a valid entry
    matches every input (see saliency_cache), else by sampling the saliency window.

    Raises SaliencySettingsError (a ValueError naming the input) for settings that cannot
    work and SaliencyMemoryError (a ValueError saying what to lower) when the run cannot fit.
    """
    settings.validate(on_cpu=_on_cpu(model))
    if len(pairs) < 2:
        raise SaliencySettingsError("num_prompts", f"must give at least 2 prompt pairs (Eq. 2's sigma_b), got {len(pairs)}")
    layers = target_layers(model, settings.target)
    weight_abs = abs_weights(model, layers)  # held here: the model state then serves every later call
    identity = model_identity(model, layers, settings.target, weight_abs)
    prompts = EncodedPrompts.of(clip, pairs)
    notes: list[str] = []
    key = None
    if use_cache and settings.mode == "fast":
        try:
            key = cache_key(model, clip, prompts, concept, pairs, settings)
        except Undescribable as e:
            notes.append(f"saliency cache not used: {e}")
            log.warning("FIA: %s", notes[-1])
        if key is not None:
            hit = load_cached(key, weight_abs, {l.key: l.shape for l in layers}, concept, pairs, settings, identity)
            if hit is not None:
                log.info("FIA: saliency for %r from cache", concept)
                return SaliencyRun(hit, True, tuple(notes) + (CACHED_NOTE,))
    saliency, run_notes = sample_saliency(model, prompts, layers, weight_abs, identity, concept, pairs, settings, progress)
    if key is not None:
        store_cached(key, saliency)
    return SaliencyRun(saliency, False, tuple(notes + run_notes))


def run_concept_saliency(model, clip, concept: str, pairs: list[PromptPair], settings: SaliencySettings,
                         progress: Callable[[int, int], None] | None = None) -> ConceptSaliency:
    """Sample the saliency window (no cache) and return the concept's saliency."""
    return concept_saliency(model, clip, concept, pairs, settings, progress, use_cache=False).saliency


__all__ = ["CACHED_NOTE", "SUPPORTED_SAMPLERS", "SaliencyMemoryError", "SaliencyRun", "SaliencySettings",
           "SaliencySettingsError", "check_sampler", "concept_saliency", "run_concept_saliency"]
