"""The Stage-1 sampling run: samples the first ``saliency_steps`` of the schedule for a
concept's prompts and records contrastive saliency (fia_core.SaliencyRecorder).

- Only the saliency window is sampled (KSampler's last_step), never the rest.
- Every prompt of the concept, concept and base side alike, starts from the SAME noise:
  the noise ComfyUI's KSampler draws from ``seed`` for a batch of one
  (comfy.sample.prepare_noise on a one-row latent, noise index 0), as the reference
  re-seeds before every prompt. Differences between rows then come from the text alone,
  and a row's input does not depend on the batching.
- Rows (one per prompt) are batched by conditioning shape; the unconditional CFG rows
  are skipped using transformer_options["cond_or_uncond"], never by assuming an order.
- The saliency step comes from the sigma of each model call, matched against the
  schedule in transformer_options["sample_sigmas"]; the first evaluation at each schedule
  sigma counts (multi-evaluation samplers evaluate some sigmas twice).
- Memory guard: before sampling, the batch is sized against FREE device memory with
  ComfyUI's own estimate (BaseModel.memory_required, with the 1.5 margin its sampler
  uses to batch conds); a run that cannot fit one row is refused at once.
- Per-run state is one :class:`SamplingRun` object whose methods are the clone's keyed
  OUTER_SAMPLE / APPLY_MODEL wrappers (as comfy_extras/nodes_easycache.py keeps its
  state); hooks exist only while the clone samples. Interruption is checked before every
  model call and at every UNet block.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from ..fia_core import BASE, CONCEPT, ConceptSaliency, PromptPair, SaliencyRecorder
from .model_state import AbsWeights, ModelIdentity
from .saliency_settings import SaliencySettings

log = logging.getLogger(__name__)

WRAPPER_KEY = "fia_saliency"
#: ComfyUI's sampler batches conds while memory_required * 1.5 fits in free memory
MEMORY_MARGIN = 1.5
GIB = 1024 ** 3

Encoded = tuple[torch.Tensor, dict]
Row = tuple[str, int]  # (CONCEPT or BASE, pair index)


class SaliencyMemoryError(ValueError):
    """The saliency run cannot fit in device memory; the message says what to lower."""


# -- CLIP encoding and row batching ------------------------------------------------------
def encode(clip, text: str) -> Encoded:
    """(cond, extras) of one prompt, as CLIPTextEncode computes them."""
    tokens = clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return cond, out


@dataclass
class EncodedPrompts:
    """The concept's prompts encoded once: concept side, base side, the empty negative."""

    concept: list[Encoded]
    base: list[Encoded]
    negative: Encoded

    @classmethod
    def of(cls, clip, pairs: list[PromptPair]) -> "EncodedPrompts":
        return cls([encode(clip, p.concept_prompt) for p in pairs], [encode(clip, p.base_prompt) for p in pairs],
                   encode(clip, ""))

    def row(self, row: Row) -> Encoded:
        side, i = row
        return (self.concept if side == CONCEPT else self.base)[i]


def batch_conditioning(encoded: list[Encoded]) -> list:
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


def row_batches(prompts: EncodedPrompts, rows_per_batch: int) -> list[list[Row]]:
    """Split the rows (side, pair index) into batches of equal conditioning shape.

    A pair's two rows stay together where they can (the order does not change results:
    every row starts from the same noise); a prompt longer than CLIP's 77 tokens encodes to
    a longer tensor and is batched only with rows of its own length.
    """
    groups: dict[tuple, list[Row]] = {}
    for i, (c, b) in enumerate(zip(prompts.concept, prompts.base)):
        groups.setdefault(tuple(c[0].shape), []).append((CONCEPT, i))
        groups.setdefault(tuple(b[0].shape), []).append((BASE, i))
    batches = []
    for rows in groups.values():
        for start in range(0, len(rows), rows_per_batch):
            batches.append(rows[start:start + rows_per_batch])
    return batches


# -- sigma -> saliency step ---------------------------------------------------------------
class StepTracker:
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


# -- memory guard -------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def rows_per_batch(model, settings: SaliencySettings, total_rows: int, exact_layer_bytes: int = 0,
                   max_layer_numel: int = 0) -> tuple[int, list[str]]:
    """Rows per sampling batch that fit FREE device memory by ComfyUI's own estimate.

    One model call carries a batch's rows twice with CFG (cond and uncond together when
    memory allows: ComfyUI splits them otherwise), so a batch of r rows fits when
    memory_required([2r, ...]) * 1.5 is free, and at the least memory_required([r, ...]) *
    1.5. fast mode may then run fewer rows per batch (a note says so); exact mode needs
    every row in one batch (the recorder integrates each step as it ends) and is refused
    when that does not fit; so is any run that cannot fit one row.
    """
    mm = comfy.model_management
    channels = model.get_model_object("latent_format").latent_channels
    h, w = settings.height // 8, settings.width // 8
    uncond = 2 if settings.cfg != 1.0 else 1

    def need(rows: int, per_call_rows: int) -> float:
        extra = 0
        if settings.mode == "exact":  # energy statistic [rows, C_out, C_in] and its integrator
            extra = exact_layer_bytes + 2 * rows * max_layer_numel * 4
        return model.model.memory_required([per_call_rows, channels, h, w]) * MEMORY_MARGIN + extra

    exact = settings.mode == "exact"
    wanted = total_rows if exact else min(total_rows, 2 * settings.batch_size)
    least = wanted if exact else 1
    device = model.load_device
    total = mm.get_total_memory(device)
    if need(least, least) + model.model_size() > total:
        raise _too_large(settings, least, need(least, least), total, "in total", device)
    # ComfyUI's sampler first loads the model (freeing other models for the estimate),
    # then batches by the memory left free: do the same, before the first batch
    mm.load_models_gpu([model], memory_required=need(wanted, uncond * wanted),
                       minimum_memory_required=need(least, least))
    free = mm.get_free_memory(device)
    notes: list[str] = []
    if exact:
        if need(wanted, wanted) > free:
            raise _too_large(settings, wanted, need(wanted, wanted), free, "free", device)
        return wanted, notes
    rows = wanted
    while rows > 1 and need(rows, rows) > free:
        rows = (rows + 1) // 2
    if need(rows, rows) > free:
        raise _too_large(settings, 1, need(1, 1), free, "free", device)
    if rows < wanted:
        notes.append(f"batch lowered to {rows} rows ({max(1, rows // 2)} prompt pairs) instead of "
                     f"{wanted} to fit free device memory ({_gib(free)} free, "
                     f"{_gib(need(wanted, wanted))} needed for the batch asked)")
        log.info("FIA: %s", notes[-1])
    return rows, notes


def _too_large(settings: SaliencySettings, rows: int, needed: float, available: float, kind: str,
               device) -> SaliencyMemoryError:
    what = (f"exact mode needs all {rows} prompts of the concept in one batch"
            if settings.mode == "exact" else f"{rows} prompt row(s) per model call")
    lower = ("lower width/height or num_prompts, or use mode 'fast' (any batch size)"
             if settings.mode == "exact" else "lower width/height (batch_size is already at its minimum)")
    return SaliencyMemoryError(
        f"saliency at {settings.width} x {settings.height} does not fit in device memory: {what} "
        f"needs about {_gib(needed)} by ComfyUI's estimate, {_gib(available)} {kind} on {device}. "
        f"To run it, {lower}.")


# -- the sampling run ---------------------------------------------------------------------
class SamplingRun:
    """State of one concept's sampling run; its methods are the work clone's wrappers."""

    def __init__(self, model, recorder: SaliencyRecorder, settings: SaliencySettings,
                 progress: Callable[[int, int], None] | None = None):
        self.recorder = recorder
        self.settings = settings
        self.progress = progress
        self.total = settings.saliency_steps  # set once the batches are known
        self.done = 0
        self.rows: tuple[str, ...] = ()
        self.tracker = StepTracker()
        self.work = model.clone()
        mp = comfy.patcher_extension.WrappersMP
        self.work.add_wrapper_with_key(mp.OUTER_SAMPLE, WRAPPER_KEY, self.outer_sample)
        self.work.add_wrapper_with_key(mp.APPLY_MODEL, WRAPPER_KEY, self.apply_model)
        # interruption inside a model call: at every UNet block (returns h unchanged)
        self.work.set_model_input_block_patch(self.check_interrupt)
        self.work.set_model_output_block_patch(self.check_interrupt_output)

    @staticmethod
    def check_interrupt(h, transformer_options):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return h

    @staticmethod
    def check_interrupt_output(h, hsp, transformer_options):
        comfy.model_management.throw_exception_if_processing_interrupted()
        return h, hsp

    def outer_sample(self, executor, *args, **kwargs):
        with self.recorder:  # hooks exist only while this clone samples
            return executor(*args, **kwargs)

    def _row_groups(self, x: torch.Tensor, chunks: list) -> list:
        rows_per_chunk = x.shape[0] // max(1, len(chunks))
        rows: list = []
        for kind in chunks:
            use = kind == 0 and len(self.rows) == rows_per_chunk
            rows.extend(self.rows if use else [None] * rows_per_chunk)
        return rows

    def apply_model(self, executor, x, t, *args, **kwargs):
        comfy.model_management.throw_exception_if_processing_interrupted()
        # apply_model's positional order: c_concat, c_crossattn, control, transformer_options
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        rows = self._row_groups(x, transformer_options.get("cond_or_uncond", [0]))
        step = self.tracker.index_of(float(t[0]), transformer_options.get("sample_sigmas"))
        step = self.tracker.claim(step) if any(r is not None for r in rows) else None
        self.recorder.set_call(step, rows)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            self.recorder.clear_call()
            if step is not None:
                self.done += 1
                if self.progress:
                    self.progress(self.done, self.total)

    def sample_batch(self, batch: list[Row], prompts: EncodedPrompts, noise_row: torch.Tensor) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        s = self.settings
        self.rows = tuple(side for side, _ in batch)
        self.tracker = StepTracker()
        positive = batch_conditioning([prompts.row(r) for r in batch])
        latent = torch.zeros((len(batch),) + tuple(noise_row.shape[1:]))
        noise = noise_row.expand(len(batch), *noise_row.shape[1:]).contiguous()
        comfy.sample.sample(
            self.work, noise, s.steps, s.cfg, s.sampler_name, s.scheduler, positive, [list(prompts.negative)],
            latent, denoise=1.0, start_step=0, last_step=s.saliency_steps, force_full_denoise=False,
            disable_pbar=True, seed=s.seed,
        )


def shared_noise(model, settings: SaliencySettings) -> torch.Tensor:
    """The starting noise of every prompt: KSampler's noise for a one-row latent."""
    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, settings.height // 8, settings.width // 8]))
    return comfy.sample.prepare_noise(latent, settings.seed)


def sample_saliency(model, prompts: EncodedPrompts, layers, weight_abs: AbsWeights, identity: ModelIdentity,
                    concept: str, pairs: list[PromptPair], settings: SaliencySettings,
                    progress: Callable[[int, int], None] | None = None) -> tuple[ConceptSaliency, list[str]]:
    """Sample the saliency window for every prompt; returns (saliency, notes)."""
    total_rows = 2 * len(pairs)
    exact_bytes = 5 * 4 * sum(l.shape[0] * l.shape[1] for l in layers)
    max_numel = max(l.shape[0] * l.shape[1] for l in layers)
    recorder = SaliencyRecorder(layers, settings.saliency_steps, settings.mode, weight_abs=weight_abs, r1=settings.r1)
    run = SamplingRun(model, recorder, settings, progress)
    if settings.mode == "exact" and len(row_batches(prompts, total_rows)) > 1:
        raise ValueError("exact mode needs every prompt in one batch; keep prompts under 77 CLIP tokens")
    rows, notes = rows_per_batch(run.work, settings, total_rows, exact_bytes, max_numel)
    batches = row_batches(prompts, rows)
    run.total = len(batches) * settings.saliency_steps
    noise = shared_noise(run.work, settings)
    for batch in batches:
        run.sample_batch(batch, prompts, noise)
    saliency = recorder.result(
        concept,
        settings.target,
        prompts=tuple(pairs),
        architecture=identity.architecture,
        fingerprint=identity.fingerprint,
        settings={"model_type": identity.model_type, **settings.as_dict()},
    )
    return saliency, notes
