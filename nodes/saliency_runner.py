"""Sampling runner for Stage 1: runs the first ``saliency_steps`` of the schedule for a
concept's prompt pairs and records contrastive saliency (fia_core.SaliencyRecorder).

- Only the saliency window is sampled (KSampler's last_step), never the rest.
- Concept and base prompt i share their starting noise (ComfyUI's prepare_noise with
  noise index i), so pairs are identical whatever the batching.
- Pairs are batched (concept rows then base rows); the unconditional CFG rows are skipped
  using transformer_options["cond_or_uncond"], never by assuming an order.
- The saliency step comes from the sigma of each model call, matched against the
  schedule in transformer_options["sample_sigmas"]; the first evaluation at each schedule
  sigma counts (multi-evaluation samplers evaluate some sigmas twice).
- Hooks live on a clone's keyed OUTER_SAMPLE wrapper and are removed whatever happens;
  interruption is checked before every model call.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import folder_paths

from ..fia_core import BASE, CONCEPT, ConceptSaliency, FastSaliency, PromptPair, SaliencyRecorder
from ..fia_core.prompts import build_prompt_pairs
from .comfy_adapter import abs_weights, model_identity, target_layers

log = logging.getLogger(__name__)

WRAPPER_KEY = "fia_saliency"
CACHE_VERSION = 1


@dataclass(frozen=True)
class SaliencySettings:
    """Every setting that changes a concept's saliency (the disk-cache key uses all)."""

    steps: int = 50
    saliency_steps: int = 10
    cfg: float = 7.5
    sampler_name: str = "euler"
    scheduler: str = "normal"
    seed: int = 0
    width: int = 512
    height: int = 512
    mode: str = "fast"
    batch_size: int = 4
    r1: float = 0.05
    target: str = "ffn2"

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _encode(clip, text: str) -> tuple[torch.Tensor, dict]:
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return cond, out


def _batch_conditioning(encoded: list[tuple[torch.Tensor, dict]]) -> list:
    """Stack per-prompt encodings into one ComfyUI CONDITIONING with batch = rows."""
    cond = torch.cat([c for c, _ in encoded])
    extra = {}
    for name in encoded[0][1]:
        values = [e[name] for _, e in encoded]
        if all(isinstance(v, torch.Tensor) for v in values):
            extra[name] = torch.cat(values)
        else:
            extra[name] = values[0]
    return [[cond, extra]]


def _row_batches(encoded_c: list, encoded_b: list, rows_per_batch: int) -> list[list[tuple[str, int]]]:
    """Split the rows (side, pair index) into batches of equal conditioning shape.

    Pairs stay together where they can; a prompt longer than CLIP's 77 tokens encodes to
    a longer tensor and is batched only with rows of its own length.
    """
    groups: dict[tuple, list[tuple[str, int]]] = {}
    for i, (c, b) in enumerate(zip(encoded_c, encoded_b)):
        groups.setdefault(tuple(c[0].shape), []).append((CONCEPT, i))
        groups.setdefault(tuple(b[0].shape), []).append((BASE, i))
    batches = []
    for rows in groups.values():
        for start in range(0, len(rows), rows_per_batch):
            batches.append(rows[start:start + rows_per_batch])
    return batches


class _StepTracker:
    """Maps a model call's sigma to its index in the running schedule; a step counts once,
    at the first call that carries conditional rows (ComfyUI may evaluate the
    unconditional branch in a separate call, before or after the conditional one)."""

    def __init__(self):
        self.recorded: set[int] = set()
        self._schedule: tuple[torch.Tensor, torch.Tensor] | None = None  # (schedule, its CPU copy)

    def index_of(self, sigma: float, schedule: torch.Tensor | None) -> int | None:
        if schedule is None:
            return None
        if self._schedule is None or self._schedule[0] is not schedule:  # one copy per sampling run
            self._schedule = (schedule, schedule.detach().float().cpu())
        sched = self._schedule[1]
        close = torch.isclose(sched, torch.tensor(sigma, dtype=torch.float32), rtol=1e-4, atol=1e-6).nonzero()
        return int(close[0, 0]) if close.numel() else None

    def claim(self, step: int | None) -> int | None:
        """``step`` the first time it is claimed, else None."""
        if step is None or step in self.recorded:
            return None
        self.recorded.add(step)
        return step


def memory_bounded_pairs(model, wanted: int, h: int, w: int) -> int:
    """Prompt pairs per sampling batch: ``wanted``, halved until one model call (concept and
    base rows, with their unconditional rows: 4 rows per pair) fits beside the model on its
    device by ComfyUI's own estimate (the 1.5 margin its sampler uses to batch conds)."""
    mm = comfy.model_management
    device = model.load_device
    try:
        budget = mm.get_total_memory(device) - model.model_size() - mm.extra_reserved_memory()
        pairs = max(1, wanted)
        while pairs > 1 and model.model.memory_required([4 * pairs, 4, h, w]) * 1.5 > budget:
            pairs = (pairs + 1) // 2
    except Exception as e:  # an estimate, never a reason to fail
        log.debug("FIA: no memory estimate (%s); batch of %d pairs", e, wanted)
        return max(1, wanted)
    if pairs < wanted:
        log.info("FIA: %d prompt pairs per batch instead of %d, to fit device memory", pairs, wanted)
    return pairs


def run_concept_saliency(
    model,
    clip,
    concept: str,
    pairs: list[PromptPair],
    settings: SaliencySettings,
    progress: Callable[[int, int], None] | None = None,
) -> ConceptSaliency:
    """Sample the saliency window for ``pairs`` and return the concept's saliency."""
    if settings.saliency_steps > settings.steps:
        raise ValueError(f"saliency_steps ({settings.saliency_steps}) must not exceed steps ({settings.steps})")
    layers = target_layers(model, settings.target)
    weight_abs = abs_weights(model, layers)  # held here: the weak cache then serves every later call
    identity = model_identity(model, layers, settings.target, weight_abs)
    encoded_c = [_encode(clip, p.concept_prompt) for p in pairs]
    encoded_b = [_encode(clip, p.base_prompt) for p in pairs]
    negative = [list(_encode(clip, ""))]
    h, w = settings.height // 8, settings.width // 8
    if settings.mode == "exact":
        pairs_per_batch = len(pairs)
    else:
        pairs_per_batch = memory_bounded_pairs(model, settings.batch_size, h, w)
    batches = _row_batches(encoded_c, encoded_b, 2 * pairs_per_batch)
    if settings.mode == "exact" and len(batches) > 1:
        raise ValueError("exact mode needs every prompt in one batch; keep prompts under 77 CLIP tokens")
    encoded = {CONCEPT: encoded_c, BASE: encoded_b}

    recorder = SaliencyRecorder(layers, settings.saliency_steps, settings.mode, weight_abs=weight_abs, r1=settings.r1)
    work = model.clone()
    state = {"rows": (), "tracker": _StepTracker(), "done": 0}
    total = len(batches) * settings.saliency_steps

    def outer_sample(executor, *args, **kwargs):
        with recorder:  # hooks exist only while this clone samples
            return executor(*args, **kwargs)

    def apply_model(executor, x, t, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        # apply_model's positional order: c_concat, c_crossattn, control, transformer_options
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        chunks = transformer_options.get("cond_or_uncond", [0])
        rows_per_chunk = x.shape[0] // max(1, len(chunks))
        rows: list = []
        for kind in chunks:
            rows.extend(state["rows"] if kind == 0 and len(state["rows"]) == rows_per_chunk else [None] * rows_per_chunk)
        tracker = state["tracker"]
        step = tracker.index_of(float(t[0]), transformer_options.get("sample_sigmas"))
        step = tracker.claim(step) if any(r is not None for r in rows) else None
        recorder.set_call(step, rows)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            recorder.clear_call()
            if step is not None:
                state["done"] += 1
                if progress:
                    progress(state["done"], total)

    work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)
    work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)

    for batch in batches:
        comfy.model_management.throw_exception_if_processing_interrupted()
        state["rows"] = tuple(side for side, _ in batch)
        state["tracker"] = _StepTracker()
        positive = _batch_conditioning([encoded[side][i] for side, i in batch])
        latent = comfy.sample.fix_empty_latent_channels(work, torch.zeros([len(batch), 4, h, w]))
        # noise index = pair index: a concept prompt and its base prompt start from one noise
        noise = comfy.sample.prepare_noise(latent, settings.seed, noise_inds=[i for _, i in batch])
        comfy.sample.sample(
            work, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
            positive, negative, latent, denoise=1.0, start_step=0, last_step=settings.saliency_steps,
            force_full_denoise=False, disable_pbar=True, seed=settings.seed,
        )
    return recorder.result(
        concept,
        settings.target,
        prompts=tuple(pairs),
        architecture=identity.architecture,
        fingerprint=identity.fingerprint,
        settings={"model_type": identity.model_type, **settings.as_dict()},
    )


# -- disk cache ------------------------------------------------------------------------
CACHE_FOLDER = "fia_cache"


def cache_dir() -> str:
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    return folder_paths.get_folder_paths(CACHE_FOLDER)[0]


def cache_key(fingerprint: str, concept: str, pairs: list[PromptPair], settings: SaliencySettings) -> str:
    payload = {
        "v": CACHE_VERSION, "fingerprint": fingerprint, "concept": concept,
        "pairs": [[p.concept_prompt, p.base_prompt] for p in pairs], "settings": settings.as_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _cache_path(key: str) -> str:
    return os.path.join(cache_dir(), "saliency", f"{key}.safetensors")


def load_cached(key: str, weight_abs, layer_shapes, concept, pairs, settings, identity) -> ConceptSaliency | None:
    """A cached fast-mode saliency, or None."""
    from safetensors.torch import load_file

    path = _cache_path(key)
    if settings.mode != "fast" or not os.path.exists(path):
        return None
    try:
        tensors = load_file(path)
        columns = {k: tensors[f"layer{i}"] for i, k in enumerate(layer_shapes)}
        if any(c.shape != (settings.saliency_steps, layer_shapes[k][1]) for k, c in columns.items()):
            raise ValueError("shape mismatch")
    except Exception as e:  # a damaged cache entry is recomputed, never trusted
        log.warning("FIA saliency cache entry %s unreadable (%s); recomputing", path, e)
        return None
    return FastSaliency(
        concept, settings.target, dict(layer_shapes), settings.saliency_steps, settings.r1,
        columns=columns, weight_abs=weight_abs, prompts=tuple(pairs), architecture=identity.architecture,
        fingerprint=identity.fingerprint, settings={"model_type": identity.model_type, **settings.as_dict()},
    )


def store_cached(key: str, saliency: ConceptSaliency) -> None:
    from safetensors.torch import save_file

    if saliency.mode != "fast":
        return  # exact mode's integrated sensitivity is layer-sized: not worth the disk
    path = _cache_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        save_file({f"layer{i}": c.contiguous() for i, c in enumerate(saliency.columns.values())}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("FIA could not write the saliency cache (%s); continuing without it", e)


def concept_saliency(
    model, clip, concept: str, pairs: list[PromptPair], settings: SaliencySettings,
    progress: Callable[[int, int], None] | None = None, use_cache: bool = True,
) -> tuple[ConceptSaliency, bool]:
    """Saliency from the disk cache when present, else by sampling. Returns (saliency, cached)."""
    layers = target_layers(model, settings.target)
    weight_abs = abs_weights(model, layers)
    identity = model_identity(model, layers, settings.target, weight_abs)
    key = cache_key(identity.fingerprint, concept, pairs, settings)
    if use_cache:
        hit = load_cached(key, weight_abs, {l.key: l.shape for l in layers},
                          concept, pairs, settings, identity)
        if hit is not None:
            log.info("FIA: saliency for %r from cache", concept)
            return hit, True
    saliency = run_concept_saliency(model, clip, concept, pairs, settings, progress)
    if use_cache:
        store_cached(key, saliency)
    return saliency, False


__all__ = ["SaliencySettings", "build_prompt_pairs", "concept_saliency", "run_concept_saliency"]
