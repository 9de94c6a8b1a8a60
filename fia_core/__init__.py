"""Forget-It-All (FIA) in pure PyTorch: contrastive concept saliency (Eq. 1-2),
concept-sensitive neuron selection (Eq. 3-6) and concept-agnostic mask fusion (Eq. 7-8).

Imports nothing from ComfyUI; the ComfyUI glue lives in the pack's ``nodes`` package.
Stage 2 has one public function, select_concept_mask; its per-layer parts
(sensitivity.SensitivityIntegrator for Eq. 3, neurons.select_from_sensitivity for
Eq. 4-6, neurons.fast_layer_indices) are importable from their modules.
Modules, in import order (each imports only modules before it):
counting (top-fraction sizes, top-k with the tie rule) -> sensitivity (Eq. 3) ->
prompts, targets, concepts (concept text) -> saliency (Eq. 1-2 statistics and types) ->
recorder (hooks) -> column_order, rank_one (CPU fast path of Eq. 3-6) -> masks ->
neurons (Stage 2, select_concept_mask) -> fusion (Eq. 7-8) -> diagnostics (mask
warnings), mask_io (files).
"""
from .concepts import ConceptEntry, ConceptListError, normalize_concept, parse_concept_list
from .counting import top_fraction_count
from .diagnostics import mask_warnings
from .fusion import agnostic_threshold, fuse_masks
from .mask_io import MaskFileError, load_mask, save_mask
from .masks import ConceptMask, FusedMask, LayerMask, NeuronMask, apply_mask_to_weight, check_mask_matches
from .neurons import select_concept_mask
from .prompts import TEMPLATES, PromptPair, build_prompt_pairs
from .recorder import SaliencyRecorder
from .saliency import BASE, CONCEPT, MODES, ConceptSaliency, ExactSaliency, FastSaliency, StepSaliency
from .targets import (
    TARGETS,
    TargetLayer,
    UnsupportedArchitectureError,
    architecture_signature,
    describe_architecture,
    find_target_layers,
    layer_shapes,
    weights_fingerprint,
)

__version__ = "0.1.0"

__all__ = [
    "BASE", "CONCEPT", "MODES", "TARGETS", "TEMPLATES",
    "ConceptEntry", "ConceptListError", "ConceptMask", "ConceptSaliency", "ExactSaliency", "FastSaliency", "FusedMask", "LayerMask", "MaskFileError",
    "NeuronMask", "PromptPair", "SaliencyRecorder", "StepSaliency", "TargetLayer",
    "UnsupportedArchitectureError", "agnostic_threshold", "apply_mask_to_weight",
    "architecture_signature", "build_prompt_pairs", "check_mask_matches", "describe_architecture",
    "find_target_layers", "fuse_masks", "layer_shapes", "load_mask", "mask_warnings", "normalize_concept",
    "parse_concept_list", "save_mask",
    "select_concept_mask", "top_fraction_count", "weights_fingerprint",
]
