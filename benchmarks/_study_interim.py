# INTERIM: delete this module once wave2-core and wave2-runner are merged into main.
"""INTERIM stand-ins for the interfaces benchmarks/prompt_study.py is written against,
implemented on the pack as it was before issue 10 (see the brief's "Agreed interfaces"):

- ``build_prompt_pairs(concept, template, num_prompts=None, seed=0)``: the reference's
  object pair set (place i of Table 7 in the table's order, "a <c> in a <place>" for even
  i, "a <c> near the <place>" for odd i, base "a <place>"; 30 pairs, shuffled); fewer
  pairs = a seeded subset of those pairs;
- ``select_concept_mask(saliency, r2)``: Eq. 3-6 (today's ``ConceptSaliency.select``);
- ``concept_saliency(model, clip, concept, pairs, settings, progress=None, use_cache=True)
  -> SaliencyRun(saliency, cached, notes)``: the saliency window sampled in batches with
  the pack's SaliencyRecorder and hooks, but every row starting from ONE noise (ComfyUI's
  prepare_noise on a one-row latent with the seed, as KSampler draws it for a batch of
  one) and Eq. 2's sigma_b the population standard deviation, read from the recorder's
  moments. No disk cache.

Nothing here is part of the pack; only the study imports it.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

SOURCE = "interim adapter (benchmarks/_study_interim.py) on the pre-issue-10 pack"


@dataclass(frozen=True)
class SaliencyRun:
    saliency: object
    cached: bool
    notes: tuple[str, ...] = ()


def api(pack) -> SimpleNamespace:
    """The study's interfaces, bound to the loaded pack module."""
    name = pack.__name__
    core = sys.modules[f"{name}.fia_core"]
    runner = sys.modules[f"{name}.nodes.saliency_runner"]
    adapter = sys.modules[f"{name}.nodes.comfy_adapter"]
    prompts = sys.modules[f"{name}.fia_core.prompts"]

    def build_prompt_pairs(concept: str, template: str = "objects", num_prompts: int | None = None, seed: int = 0):
        if template != "objects":
            raise NotImplementedError("the interim adapter builds the objects template only")
        full = [core.PromptPair(f"a {concept} in a {place}" if i % 2 == 0 else f"a {concept} near the {place}",
                                f"a {place}") for i, place in enumerate(prompts.PLACES)]
        random.Random(seed).shuffle(full)
        if num_prompts is None or num_prompts >= len(full):
            return full
        if num_prompts < 2:
            raise ValueError("num_prompts must be at least 2")
        return random.Random(seed + 1).sample(full, num_prompts)

    def select_concept_mask(saliency, r2: float, r1: float | None = None, progress=None):
        return saliency.select(r2, r1=r1, progress=progress)

    @torch.no_grad()
    def concept_saliency(model, clip, concept, pairs, settings, progress=None, use_cache=True) -> SaliencyRun:
        import comfy.patcher_extension
        import comfy.sample

        if settings.mode != "fast":
            raise NotImplementedError("the interim adapter records fast-mode saliency only")
        CONCEPT, BASE = core.CONCEPT, core.BASE
        layers = adapter.target_layers(model, settings.target)
        weight_abs = adapter.abs_weights(model, layers)
        identity = adapter.model_identity(model, layers, settings.target, weight_abs)
        enc = {CONCEPT: [runner._encode(clip, p.concept_prompt) for p in pairs],
               BASE: [runner._encode(clip, p.base_prompt) for p in pairs]}
        negative = [list(runner._encode(clip, ""))]
        h, w = settings.height // 8, settings.width // 8
        per_batch = runner.memory_bounded_pairs(model, settings.batch_size, h, w)
        batches = runner._row_batches(enc[CONCEPT], enc[BASE], 2 * per_batch)
        recorder = core.SaliencyRecorder(layers, settings.saliency_steps, "fast", weight_abs=weight_abs, r1=settings.r1)
        state = {"rows": (), "tracker": None}

        def apply_model(executor, x, t, *args, **kwargs):
            opts = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
            chunks = opts.get("cond_or_uncond", [0])
            per_chunk = x.shape[0] // max(1, len(chunks))
            rows: list = []
            for kind in chunks:
                rows.extend(state["rows"] if kind == 0 and len(state["rows"]) == per_chunk else [None] * per_chunk)
            tracker = state["tracker"]
            step = tracker.index_of(float(t[0]), opts.get("sample_sigmas"))
            step = tracker.claim(step) if any(r is not None for r in rows) else None
            recorder.set_call(step, rows)
            try:
                return executor(x, t, *args, **kwargs)
            finally:
                recorder.clear_call()

        work = model.clone()
        work.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "fia_study_interim", apply_model)
        with recorder:
            for batch in batches:
                state["rows"] = tuple(side for side, _ in batch)
                state["tracker"] = runner._StepTracker()
                positive = runner._batch_conditioning([enc[side][i] for side, i in batch])
                one = comfy.sample.fix_empty_latent_channels(work, torch.zeros([1, 4, h, w]))
                noise = comfy.sample.prepare_noise(one, settings.seed).repeat(len(batch), 1, 1, 1)  # one noise
                latent = torch.zeros_like(noise)
                comfy.sample.sample(work, noise, settings.steps, settings.cfg, settings.sampler_name,
                                    settings.scheduler, positive, negative, latent, denoise=1.0, start_step=0,
                                    last_step=settings.saliency_steps, force_full_denoise=False,
                                    disable_pbar=True, seed=settings.seed)
        # Eq. 2 with the population std (m2 / n) from the recorder's per-step moments
        columns = {}
        for layer in layers:
            steps = recorder._moments[layer.key]
            cols = []
            for t in range(settings.saliency_steps):
                c, b = steps[t][CONCEPT], steps[t][BASE]
                cols.append((c.mean - b.mean - (b.m2 / b.n).sqrt()).clamp_min(0))
            columns[layer.key] = torch.stack(cols).cpu()
        saliency = core.ConceptSaliency(
            concept, "fast", settings.target, {l.key: l.shape for l in layers}, settings.saliency_steps,
            settings.r1, columns=columns, weight_abs=weight_abs, prompts=tuple(pairs),
            architecture=identity.architecture, fingerprint=identity.fingerprint,
            settings={"model_type": identity.model_type, **settings.as_dict()})
        return SaliencyRun(saliency, False, ())

    return SimpleNamespace(build_prompt_pairs=build_prompt_pairs, select_concept_mask=select_concept_mask,
                           concept_saliency=concept_saliency, SaliencySettings=runner.SaliencySettings,
                           target_layers=adapter.target_layers, source=SOURCE)
