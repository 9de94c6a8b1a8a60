#!/usr/bin/env python
"""FIA performance benchmark (issue 6): the pack's saliency path against the reference
procedure and against the bare UNet evaluations, in one run on one model; mask building
and fusion on SD1.5's real FFN2 shapes; applying a fused mask; re-running with only
r2 / alpha / strength changed.

    $PY -m benchmarks.bench_fia                          # CPU, SD1.x-shaped model (~17 min, 1 thread)
    $PY -m benchmarks.bench_fia --smoke --out /tmp/fia  # seconds: checks that everything runs
    $PY -m benchmarks.bench_fia --device cuda --full-size   # SD1.5 checkpoint (random weights, devkit/fullsize.py) on a GPU

$PY is the test environment's python (tests/setup_env.sh prints it); run from the
repository root. Results are printed
as a table and written to --out (default benchmarks/results/) as <name>.json and
<name>.md, name = <device>-<config> (cpu-small, cuda-full, ...).

What is measured, side by side and interleaved (repeat r runs pack, reference and bare on
the same concept, rotating their order), medians over the repeats:
(a) pack: nodes.saliency.run_concept_saliency (only the first saliency_steps of
    the schedule are sampled, prompt pairs batched, hooks keep per-column statistics on
    the device) and select_concept_mask (rank-one Eq. 3-6 on sorted columns of |W|);
(b) reference: benchmarks/reference_fia.py, a re-implementation of the published
    procedure: full-length sampling, one prompt at a time, a CPU copy of the activation
    in every hook call, dense Eq. 3-6;
(c) bare: the same sampling calls as (a) (same batches, same window), no hooks at all:
    the compute floor of the pack's UNet evaluations.
UNet evaluations are counted by a forward pre-hook on the diffusion model (calls and batch
rows). Peak memory: resident-set growth sampled every 2 ms (CPU) or
torch.cuda.max_memory_allocated (GPU), above the level at the start of the measurement.
Models have random weights (ComfyUI's own classes, devkit.zoo.fill_weights_);
the timings do not depend on the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from devkit import comfyui, zoo
from devkit.comfyui import REPO_ROOT as REPO

PAPER_SECONDS_PER_CONCEPT = 11.28  # SD v1.5 on an A6000 (fia-method.md)
PAPER_PEAK_GB = 2.95

# SD1.5's FFN2 layers (ff.net.2 of every transformer block): [C_out, C_in]
SD15_FFN2 = {
    **{f"input_blocks.{i}.1.transformer_blocks.0.ff.net.2": (320, 1280) for i in (1, 2)},
    **{f"input_blocks.{i}.1.transformer_blocks.0.ff.net.2": (640, 2560) for i in (4, 5)},
    **{f"input_blocks.{i}.1.transformer_blocks.0.ff.net.2": (1280, 5120) for i in (7, 8)},
    "middle_block.1.transformer_blocks.0.ff.net.2": (1280, 5120),
    **{f"output_blocks.{i}.1.transformer_blocks.0.ff.net.2": (1280, 5120) for i in (3, 4, 5)},
    **{f"output_blocks.{i}.1.transformer_blocks.0.ff.net.2": (640, 2560) for i in (6, 7, 8)},
    **{f"output_blocks.{i}.1.transformer_blocks.0.ff.net.2": (320, 1280) for i in (9, 10, 11)},
}


def sd15_unet_config(model_channels: int, context_dim: int) -> dict:
    """SD1.5's UNet layout (4 levels, 2 res blocks, attention on the first 3, 16 FFN2
    layers) at a chosen width; model_channels 320 + context 768 is SD1.5 itself."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": context_dim, "use_temporal_resblock": False,
        "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1,
    }


#: name: model, sampling and repeat settings. "small": SD1.x-shaped, big enough to
#: measure on 2 CPU cores; "full": SD1.5's UNet at 512 x 512 (for a GPU); "smoke": the
#: test harness's tiny SD15, a few seconds.
CONFIGS = {
    "smoke": dict(unet=None, clip_hidden=None, size=64, steps=5, saliency_steps=2, pairs=2, repeats=1,
                  mask_shapes="tiny", fusion_concepts=(1, 3), mask_repeats=1),
    "small": dict(unet=sd15_unet_config(64, 64), clip_hidden=None, size=192, steps=50, saliency_steps=10,
                  pairs=4, repeats=3, mask_shapes="sd15", fusion_concepts=(1, 10, 50), mask_repeats=3),
    "full": dict(unet=sd15_unet_config(320, 768), clip_hidden=768, size=512, steps=50, saliency_steps=10,
                 pairs=8, repeats=3, mask_shapes="sd15", fusion_concepts=(1, 10, 50), mask_repeats=3),
}
CONCEPTS = ("golf ball", "parachute", "church", "gas pump", "chain saw", "French horn", "garbage truck",
            "cassette player", "English springer", "tench")
R1, R2, ALPHA = 0.05, 0.01, 0.6


# --------------------------------------------------------------------------- measurement tools
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _fixed_mmap_threshold() -> None:
    """Large allocations always mmapped (glibc's dynamic threshold off): freed tensors go
    back to the OS, so resident-set growth tracks live memory, whatever ran before."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory growth inside the block: resident set (CPU, sampled every 2 ms) or
    torch.cuda.max_memory_allocated (GPU), above the level at entry. Bytes in .peak."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch

        _trim()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = _rss_bytes()
        self._high = self._base
        self._stop = threading.Event()

        def watch():
            while not self._stop.is_set():
                self._high = max(self._high, _rss_bytes())
                self._stop.wait(0.002)

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._high = max(self._high, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak = self._high - self._base


class EvalCounter:
    """UNet evaluations: calls and batch rows of the diffusion model's forward."""

    def __init__(self, model_patcher):
        self.module = model_patcher.model.diffusion_model
        self.calls = self.rows = 0

    def __enter__(self):
        def pre_hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            self.calls += 1
            self.rows += int(x.shape[0])

        self._handle = self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class Timer:
    def __init__(self, device: str):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        _sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self._t


def median(values):
    return statistics.median(values) if values else float("nan")


def summary(values) -> dict:
    return {"median": median(values), "min": min(values), "max": max(values), "all": list(values)}


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


# --------------------------------------------------------------------------- setup
class Bench:
    def __init__(self, args):
        self.args = args
        self.config_name = "smoke" if args.smoke else ("full" if args.full_size else "small")
        self.cfg = dict(CONFIGS[self.config_name])
        if args.repeats:
            self.cfg["repeats"] = args.repeats
        if args.pairs:
            self.cfg["pairs"] = args.pairs
        for opt in ("size", "steps", "saliency_steps"):  # quick checks of a configuration
            if getattr(args, opt):
                self.cfg[opt] = getattr(args, opt)
        self.device = args.device
        if self.device == "cuda":
            os.environ["FIA_TEST_GPU"] = "1"  # devkit.comfyui: let ComfyUI use the GPU
        _fixed_mmap_threshold()
        self.H = zoo
        self.tmp = tempfile.TemporaryDirectory(prefix="fia_bench_")
        self.ns = comfyui.import_comfy(self.tmp.name)
        import torch

        self.torch = torch
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
        # CPU: one thread unless told otherwise. The benchmark machine's 2 cores are shared
        # with other jobs; with 2 OpenMP threads every op waits for a descheduled thread
        # (the tiny model sampled 250x slower), which drowns what is being measured.
        threads = args.threads or (1 if self.device == "cpu" else 0)
        if threads:
            torch.set_num_threads(threads)
        self.ns.comfy.utils.PROGRESS_BAR_ENABLED = False
        pack = comfyui.load_pack()
        self.runner = pack.nodes.saliency
        self.sampling = pack.nodes.saliency_sampling
        self.adapter = pack.nodes.comfy_adapter
        self.core = pack.fia_core
        self.column_order = pack.fia_core.column_order
        self.neurons = pack.fia_core.neurons
        self.node_classes = pack.NODE_CLASS_MAPPINGS
        from benchmarks import reference_fia

        self.ref = reference_fia
        self.results: dict = {}

    # models
    def build_model(self):
        H = self.H
        if self.cfg["unet"] is None:
            return H.tiny_sd15_model(seed=0), H.tiny_clip(seed=1)
        if self.config_name == "full":
            # the real-format SD1.5 file of devkit/fullsize.py (random weights, fp16, full
            # CLIP-L), loaded and detected by ComfyUI as a user's checkpoint would be
            import comfy.sd
            from devkit import fullsize

            model, clip = comfy.sd.load_checkpoint_guess_config(str(fullsize.ensure_checkpoint("sd15")))[:2]
            return model, clip
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models as sm

        config = sm.SD15(dict(self.cfg["unet"]))
        params = 860_000_000 if self.config_name == "full" else 40_000_000
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes))
        config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, mm.get_torch_device(),
                                                              config.supported_inference_dtypes))
        model = config.get_model({})
        H.fill_weights_(model.diffusion_model, 0)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        clip = self.build_clip(self.cfg["clip_hidden"]) if self.cfg["clip_hidden"] else H.tiny_clip(seed=1)
        return patcher, clip

    def build_clip(self, hidden: int):
        """An SD1 CLIP (real tokenizer) of the given width with 2 layers: conditioning of
        SD1.5's shape at a fraction of CLIP-L's encoding cost (not part of the UNet counts)."""
        import comfy.sd1_clip as sd1_clip

        config = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": 2,
                  "num_attention_heads": max(1, hidden // 64), "projection_dim": hidden}
        return zoo.make_clip(zoo.clip_model_class("BenchClipModel", config), sd1_clip.SD1Tokenizer,
                             seed=1, parameters=30_000_000)

    def settings(self):
        c = self.cfg
        return self.runner.SaliencySettings(
            steps=c["steps"], saliency_steps=c["saliency_steps"], cfg=7.5, sampler_name="euler",
            scheduler="normal", seed=0, width=c["size"], height=c["size"], mode="fast",
            batch_size=c["pairs"], r1=R1)

    # ------------------------------------------------------------------- (a) (b) (c)
    def run_pack(self, model, clip, concept, pairs, settings):
        sal = self.runner.run_concept_saliency(model, clip, concept, pairs, settings)
        return sal

    def run_bare(self, model, clip, pairs, settings):
        """The pack's sampling calls (same batches, same window), without any hook."""
        import comfy.sample

        r = self.sampling
        prompts = r.EncodedPrompts.of(clip, pairs)
        batches = r.row_batches(prompts, 2 * settings.batch_size)
        noise_row = r.shared_noise(model, settings)
        with Timer(self.device) as timer:
            for batch in batches:
                positive = r.batch_conditioning([prompts.row(row) for row in batch])
                latent = self.torch.zeros((len(batch),) + tuple(noise_row.shape[1:]))
                noise = noise_row.expand(len(batch), *noise_row.shape[1:]).contiguous()
                comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler_name,
                                    settings.scheduler, positive, [list(prompts.negative)], latent, denoise=1.0,
                                    start_step=0, last_step=settings.saliency_steps, force_full_denoise=False,
                                    disable_pbar=True, seed=settings.seed)
        return timer.seconds

    def run_reference(self, model, clip, pairs, settings, modules):
        import comfy.sample

        h = w = settings.height // 8

        def sample_one(m, positive, negative, noise_index):
            latent = comfy.sample.fix_empty_latent_channels(m, self.torch.zeros([1, 4, h, w]))
            noise = comfy.sample.prepare_noise(latent, settings.seed, noise_inds=[noise_index])
            comfy.sample.sample(m, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                                positive, negative, latent, denoise=1.0, disable_pbar=True, seed=settings.seed)

        return self.ref.reference_saliency(model, clip, pairs, settings, modules, self.H.encode, sample_one)

    def saliency_section(self):
        torch, cfg = self.torch, self.cfg
        model, clip = self.build_model()
        settings = self.settings()
        layers = self.adapter.target_layers(model)
        modules = {l.key: l.module for l in layers}
        shapes = {l.key: l.shape for l in layers}
        # |W| held like ComfyUI's node cache holds the saliency outputs: shared by all concepts
        weight_abs = self.adapter.abs_weights(model, layers)
        # warm-up: loads the model on its device, first-call allocations
        warm_pairs = self.core.build_prompt_pairs("warm up", "objects", 2, 0)
        self.run_bare(model, clip, warm_pairs, dataclasses.replace(settings, steps=2, saliency_steps=1, batch_size=2))
        procs = ("pack", "pack_1pair", "reference", "bare")
        rows = {k: {"saliency_s": [], "mask_s": [], "calls": [], "rows": [], "peak_bytes": []} for k in procs}
        equal_masks = []
        order = list(procs)
        settings_1pair = dataclasses.replace(settings, batch_size=1)
        for rep in range(cfg["repeats"]):
            concept = CONCEPTS[rep % len(CONCEPTS)]
            pairs = self.core.build_prompt_pairs(concept, "objects", cfg["pairs"], rep)
            masks = {}
            for proc in order[rep % len(order):] + order[:rep % len(order)]:
                _trim()
                r = rows[proc]
                with PeakMemory(self.device) as mem, EvalCounter(model) as count:
                    if proc in ("pack", "pack_1pair"):
                        with Timer(self.device) as t_sal:
                            sal = self.run_pack(model, clip, concept, pairs, settings if proc == "pack" else settings_1pair)
                        with Timer(self.device) as t_mask:
                            mask = self.core.select_concept_mask(sal, R2)
                        masks[proc] = {k: l.indices for k, l in mask.layers.items()}
                        if proc == "pack":
                            kept = sal
                        del mask, sal
                        r["saliency_s"].append(t_sal.seconds)
                        r["mask_s"].append(t_mask.seconds)
                    elif proc == "reference":
                        with Timer(self.device) as t_sal:
                            columns = self.run_reference(model, clip, pairs, settings, modules)
                        with Timer(self.device) as t_mask:
                            w_abs = {k: m.weight.detach().float().abs().cpu() for k, m in modules.items()}
                            masks[proc] = self.ref.straightforward_masks(w_abs, columns, R1, R2)
                        del columns, w_abs
                        r["saliency_s"].append(t_sal.seconds)
                        r["mask_s"].append(t_mask.seconds)
                    else:
                        r["saliency_s"].append(self.run_bare(model, clip, pairs, settings))
                r["calls"].append(count.calls)
                r["rows"].append(count.rows)
                r["peak_bytes"].append(mem.peak)
            # the reference's statistic differs (CFG rows mixed in), so its masks differ; the
            # pack's mask is checked against the dense path on the pack's own saliency (untimed)
            sal = kept
            dense = self.ref.straightforward_masks({k: sal.weight_abs[k] for k in sal.columns}, sal.columns, R1, R2)
            equal_masks.append(all(torch.equal(dense[k], masks["pack"][k]) for k in dense))
            del sal, kept, dense
            log(f"  repeat {rep + 1}/{cfg['repeats']} ({concept}): "
                + ", ".join(f"{p} {rows[p]['saliency_s'][-1]:.2f}s" for p in order))
        del weight_abs
        out = {p: {"saliency_s": summary(r["saliency_s"]),
                   "mask_s": summary(r["mask_s"]) if r["mask_s"] else None,
                   "per_concept_s": summary([a + b for a, b in zip(r["saliency_s"], r["mask_s"])]) if r["mask_s"] else None,
                   "unet_calls": median(r["calls"]), "unet_rows": median(r["rows"]),
                   "peak_bytes": summary(r["peak_bytes"])}
               for p, r in rows.items()}
        pack, ref = out["pack"], out["reference"]
        out["ratios"] = {
            "unet_rows_pack_over_reference": pack["unet_rows"] / ref["unet_rows"],
            "unet_calls_pack_over_reference": pack["unet_calls"] / ref["unet_calls"],
            "reference_over_pack_saliency_time": median(rows["reference"]["saliency_s"]) / median(rows["pack"]["saliency_s"]),
            "pack_over_bare_saliency_time": median(rows["pack"]["saliency_s"]) / median(rows["bare"]["saliency_s"]),
            "reference_over_pack_per_concept_time": ref["per_concept_s"]["median"] / pack["per_concept_s"]["median"],
            # per repeat, the same concept: paired ratios are less sensitive to load drift
            "pack_over_bare_paired": summary([a / b for a, b in zip(rows["pack"]["saliency_s"], rows["bare"]["saliency_s"])]),
            "reference_over_pack_paired": summary([a / b for a, b in zip(rows["reference"]["saliency_s"], rows["pack"]["saliency_s"])]),
            "pack_over_reference_peak_memory": (pack["peak_bytes"]["max"] / ref["peak_bytes"]["max"]
                                                if ref["peak_bytes"]["max"] > 0 else float("nan")),
            "pack_1pair_over_reference_peak_memory": (out["pack_1pair"]["peak_bytes"]["max"] / ref["peak_bytes"]["max"]
                                                      if ref["peak_bytes"]["max"] > 0 else float("nan")),
            "reference_over_pack_1pair_saliency_time": median(rows["reference"]["saliency_s"]) / median(rows["pack_1pair"]["saliency_s"]),
        }
        out["model"] = {
            "unet_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
            "dtype": str(model.model.get_dtype()), "ffn2_layers": len(shapes),
            "ffn2_connections": sum(a * b for a, b in shapes.values()), "latent": [cfg["size"] // 8] * 2,
            "steps": cfg["steps"], "saliency_steps": cfg["saliency_steps"], "prompt_pairs": cfg["pairs"],
            "cfg": 7.5, "sampler": "euler", "r1": R1, "r2": R2,
        }
        out["pack_mask_equals_dense_path"] = all(equal_masks)
        self.results["saliency"] = out
        self.model, self.clip = model, clip
        self.last_pack_masks = None

    # ------------------------------------------------------------------- mask building
    def synthetic_layers(self):
        torch = self.torch
        if self.cfg["mask_shapes"] == "tiny":
            shapes = {f"layer{i}.ff.net.2": s for i, s in enumerate([(32, 128), (64, 256), (64, 256), (32, 128)])}
        else:
            shapes = dict(SD15_FFN2)
        g = torch.Generator().manual_seed(0)
        weights = {k: (torch.randn(s, generator=g) * 0.02).abs_() for k, s in shapes.items()}
        return shapes, weights

    def synthetic_columns(self, shapes, concept_index: int, steps: int = 10) -> dict:
        """Saliency columns shaped like real ones: a per-column level that persists over the
        steps, step noise, clamped at 0 (about 60 % zeros)."""
        torch = self.torch
        g = torch.Generator().manual_seed(1000 + concept_index)
        out = {}
        for k, (c_out, c_in) in shapes.items():
            level = torch.randn(c_in, generator=g).abs_()
            out[k] = (level[None, :] * (1 + 0.2 * torch.randn(steps, c_in, generator=g))
                      + 0.3 * torch.randn(steps, c_in, generator=g) - 1.0).clamp_min_(0) * 0.05
        return out

    def mask_section(self):
        torch = self.torch
        shapes, weights = self.synthetic_layers()
        n_conn = sum(a * b for a, b in shapes.values())
        shared = self.column_order.SharedAbsWeights(weights)
        cols0 = self.synthetic_columns(shapes, 0)
        out = {"layers": len(shapes), "connections": n_conn, "steps": 10, "r1": R1, "r2": R2,
               "torch_threads": torch.get_num_threads()}
        _trim()
        with PeakMemory("cpu") as mem_order, Timer("cpu") as t_order:
            for k in shapes:
                shared.column_order(k)
        out["column_orders_build_s"] = t_order.seconds
        out["column_orders_bytes"] = shared.order_nbytes()
        out["column_orders_peak_bytes"] = mem_order.peak
        n_concepts = max(self.cfg["fusion_concepts"])
        all_cols = [cols0] + [self.synthetic_columns(shapes, i) for i in range(1, n_concepts)]
        masks, times, peaks = [], [], []
        for i, cols in enumerate(all_cols):
            _trim()
            with PeakMemory("cpu") as mem, Timer("cpu") as t:
                layers = {k: self.core.LayerMask(shapes[k], self.neurons.fast_layer_indices(shared, k, cols[k], R1, R2))
                          for k in shapes}
            times.append(t.seconds)
            peaks.append(mem.peak)
            masks.append(self.core.ConceptMask((f"concept {i}",), "ffn2", layers))
        out["select_warm_s"] = summary(times)
        out["select_cold_s"] = out["column_orders_build_s"] + times[0]
        out["select_peak_bytes"] = summary(peaks)
        out["selected_per_concept"] = median([sum(l.count for l in m.layers.values()) for m in masks])
        # the straightforward dense path on concept 0 (slow: once), and exact equality
        if not self.args.skip_dense:
            _trim()
            with PeakMemory("cpu") as mem, Timer("cpu") as t:
                dense = self.ref.straightforward_masks(weights, cols0, R1, R2)
            out["dense_reference_s"] = t.seconds
            out["dense_reference_peak_bytes"] = mem.peak
            out["fast_equals_dense"] = all(torch.equal(dense[k], masks[0].layers[k].indices) for k in shapes)
            out["dense_over_fast_warm"] = t.seconds / median(times)
            out["dense_over_fast_cold"] = t.seconds / out["select_cold_s"]
        self.results["mask_building"] = out
        log(f"  orders {t_order.seconds:.2f}s, select warm median {median(times):.3f}s over {len(times)} concepts")

        # fusion of 1, 10, 50 concepts, interleaved repeats
        fus = {}
        for rep in range(self.cfg["mask_repeats"]):
            for c in self.cfg["fusion_concepts"]:
                _trim()
                with PeakMemory("cpu") as mem, Timer("cpu") as t:
                    fused = self.core.fuse_masks(masks[:c], ALPHA)
                f = fus.setdefault(c, {"s": [], "peak": []})
                f["s"].append(t.seconds)
                f["peak"].append(mem.peak)
                f["pruned"] = fused.stats()["total_pruned"]
                f["agnostic_kept"] = fused.stats()["agnostic_kept"]
                f["fused_index_bytes"] = sum(l.indices.numel() * l.indices.element_size() for l in fused.layers.values())
                del fused
        self.results["fusion"] = {str(c): {"s": summary(f["s"]), "peak_bytes": max(f["peak"]), "pruned": f["pruned"],
                                           "agnostic_kept": f["agnostic_kept"],
                                           "fused_index_bytes": f["fused_index_bytes"]} for c, f in fus.items()}

    # ------------------------------------------------------------------- apply
    def apply_section(self):
        torch = self.torch
        model = self.model
        layers = self.adapter.target_layers(model)
        weight_abs = self.adapter.abs_weights(model, layers)
        shapes = {l.key: l.shape for l in layers}
        masks = []
        for i in range(2):
            cols = self.synthetic_columns(shapes, 100 + i, self.cfg["saliency_steps"])
            layers_m = {k: self.core.LayerMask(shapes[k], self.neurons.fast_layer_indices(weight_abs, k, cols[k], R1, R2))
                        for k in shapes}
            masks.append(self.core.ConceptMask((f"c{i}",), "ffn2", layers_m,
                                               fingerprint=weight_abs.fingerprint))
        fused = self.core.fuse_masks(masks, None)  # union: something to prune on every layer
        with Timer(self.device) as t_apply:
            patched = self.adapter.apply_mask(model, fused, 1.0)
        def tensor_bytes(obj, seen=None) -> int:
            if isinstance(obj, torch.Tensor):
                return obj.numel() * obj.element_size()
            if isinstance(obj, (list, tuple)):
                return sum(tensor_bytes(o) for o in obj)
            if hasattr(obj, "__dict__"):  # a patch object: count each tensor it holds once
                found = {id(v): v for v in vars(obj).values() if isinstance(v, torch.Tensor)}
                for v in vars(obj).values():
                    if isinstance(v, (list, tuple)):
                        found.update({id(t): t for t in v if isinstance(t, torch.Tensor)})
                return sum(t.numel() * t.element_size() for t in found.values())
            return 0

        held = sum(tensor_bytes(patch[1]) for key in shapes
                   for patch in patched.patches.get(self.adapter.state_dict_key(key), []))
        dense_equiv = sum(a * b * 4 for a, b in shapes.values())
        with Timer(self.device) as t_patch:
            patched.patch_model(device_to=model.load_device)
        unpatched = False
        with Timer(self.device) as t_unpatch:
            patched.unpatch_model(device_to=model.offload_device)
            unpatched = True
        self.results["apply"] = {
            "apply_mask_s": t_apply.seconds, "patch_model_s": t_patch.seconds, "unpatch_model_s": t_unpatch.seconds,
            "patch_tensor_bytes": held, "dense_float_mask_bytes": dense_equiv,
            "pruned": sum(l.count for l in fused.layers.values()), "unpatched": unpatched,
            "note": "the patches hold only the sparse int64 indices (FIAMaskPatch); the patched weights "
                    "themselves are ComfyUI's business, as for any LoRA",
        }

    # ------------------------------------------------------------------- re-run
    def rerun_section(self):
        """FIAForgetConcepts twice; the second run changes only r2, alpha and strength."""
        H = self.H
        model, clip = H.tiny_sd15_model(seed=3), H.tiny_clip(seed=4)
        node = self.node_classes["FIAForgetConcepts"]()
        common = dict(concepts="golf ball\nparachute", template="objects", r1=R1, fusion="concept-agnostic",
                      steps=4, saliency_steps=2, cfg=7.5, sampler_name="euler", scheduler="normal", seed=0,
                      width=64, height=64, mode="fast", batch_size=4, num_prompts=2)
        counts = []
        for r2, alpha, strength in ((0.01, 0.6, 1.0), (0.03, 0.8, 0.5)):
            with EvalCounter(model) as count:
                node.forget(model, clip, r2=r2, alpha=alpha, strength=strength, **common)
            counts.append(count.calls)
        self.results["rerun"] = {"first_run_unet_calls": counts[0], "rerun_unet_calls": counts[1],
                                 "changed": ["r2", "alpha", "strength"]}

    # ------------------------------------------------------------------- report
    def targets(self) -> list[dict]:
        s, m, f = self.results.get("saliency"), self.results.get("mask_building"), self.results.get("fusion")
        t = []

        def add(name, value, goal, met, unit=""):
            t.append({"target": name, "value": value, "goal": goal, "met": bool(met), "unit": unit})

        if s:
            r = s["ratios"]
            add("UNet evaluations (batch rows) per concept, pack / reference", r["unet_rows_pack_over_reference"],
                "<= 0.2", r["unet_rows_pack_over_reference"] <= 0.2 + 1e-9)
            add("saliency wall time, reference / pack", r["reference_over_pack_saliency_time"], ">= 10",
                r["reference_over_pack_saliency_time"] >= 10)
            add("saliency wall time, pack / bare UNet evaluations", r["pack_over_bare_saliency_time"], "<= 1.25",
                r["pack_over_bare_saliency_time"] <= 1.25)
            add(f"peak memory, pack ({self.cfg['pairs']} pairs per batch) / reference", r["pack_over_reference_peak_memory"],
                "<= 1", r["pack_over_reference_peak_memory"] <= 1.0)
            add("peak memory, pack (1 pair per batch) / reference", r["pack_1pair_over_reference_peak_memory"], "<= 1",
                r["pack_1pair_over_reference_peak_memory"] <= 1.0)
            peaks = s["pack"]["peak_bytes"]["all"]
            add("pack peak memory, last concept / first concept", peaks[-1] / max(peaks[0], 1), "~1 (flat)",
                peaks[-1] <= 1.25 * max(peaks[0], 1) + 32e6)
        if m and self.cfg["mask_shapes"] == "sd15":
            add("mask building, one SD1.5 concept, warm (column orders built)", m["select_warm_s"]["median"], "< 2 s",
                m["select_warm_s"]["median"] < 2, "s")
            add("mask building, one SD1.5 concept, cold (incl. per-model column orders)", m["select_cold_s"], "< 2 s",
                m["select_cold_s"] < 2, "s")
            pk = m["select_peak_bytes"]
            add(f"mask building peak memory, max / median over {len(pk['all'])} concepts (flat in concepts)",
                pk["max"] / max(pk["median"], 1), "~1", pk["max"] <= 1.5 * max(pk["median"], 1) + 16e6)
            if "fast_equals_dense" in m:
                add("fast mask == straightforward dense mask (SD1.5 shapes)", m["fast_equals_dense"], "True",
                    m["fast_equals_dense"])
        if f and "50" in f:
            add("fusion of 50 concepts (SD1.5 shapes)", f["50"]["s"]["median"], "< 5 s", f["50"]["s"]["median"] < 5, "s")
        a = self.results.get("apply")
        if a:
            add("fused-mask patch: tensor bytes held / dense float mask bytes", a["patch_tensor_bytes"] / a["dense_float_mask_bytes"],
                "sparse (<< 1)", a["patch_tensor_bytes"] < 0.1 * a["dense_float_mask_bytes"])
        rr = self.results.get("rerun")
        if rr:
            add("UNet calls when re-running with only r2/alpha/strength changed", rr["rerun_unet_calls"], "0",
                rr["rerun_unet_calls"] == 0)
        return t

    def environment(self) -> dict:
        torch = self.torch
        env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": self.device,
               "comfyui": self.ns.version or comfyui.COMFYUI_VERSION, "config": self.config_name}
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
        if self.device == "cuda":
            env["gpu"] = torch.cuda.get_device_name()
        return env


def log(msg: str) -> None:
    print(msg, flush=True)


def _fmt(v, unit=""):
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if unit == "s":
            return f"{v:.3f} s"
        return f"{v:.3f}"
    return str(v)


def mb(x) -> str:
    return f"{x / 2**20:.1f} MiB"


def render_markdown(res: dict) -> str:
    lines = [f"# FIA performance benchmark: {res['name']}", ""]
    env = res["environment"]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- load average at start / end: {res.get('load_start')} / {res.get('load_end')}",
              f"- total benchmark time: {res.get('total_s', 0):.0f} s", ""]
    lines += ["## Targets (issue 6)", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {_fmt(t['value'], t['unit'])} | {t['goal']} | {'yes' if t['met'] else 'NO'} |")
    s = res.get("saliency")
    if s:
        mdl = s["model"]
        lines += ["", "## Saliency per concept: pack vs reference vs bare UNet", "",
                  f"Model: SD1.x-shaped UNet, {mdl['unet_params'] / 1e6:.1f} M params ({mdl['dtype']}), "
                  f"{mdl['ffn2_layers']} FFN2 layers ({mdl['ffn2_connections'] / 1e6:.2f} M connections), latent "
                  f"{mdl['latent'][0]}x{mdl['latent'][1]}; {mdl['prompt_pairs']} prompt pairs, {mdl['steps']} steps, "
                  f"saliency window {mdl['saliency_steps']}, CFG {mdl['cfg']}, {mdl['sampler']}. Medians over "
                  f"{len(s['pack']['saliency_s']['all'])} interleaved repeats (min-max in brackets).", "",
                  "| procedure | saliency time | mask time | per concept | UNet calls | UNet rows | peak memory |",
                  "|---|---|---|---|---|---|---|"]
        for p in ("pack", "pack_1pair", "reference", "bare"):
            r = s[p]
            sal = r["saliency_s"]
            mask = f"{r['mask_s']['median']:.3f} s" if r["mask_s"] else "-"
            per = f"{r['per_concept_s']['median']:.2f} s" if r["per_concept_s"] else "-"
            lines.append(f"| {p} | {sal['median']:.2f} s [{sal['min']:.2f}-{sal['max']:.2f}] | {mask} | {per} | "
                         f"{r['unet_calls']:.0f} | {r['unet_rows']:.0f} | {mb(r['peak_bytes']['max'])} |")
        lines += ["", "| ratio | value |", "|---|---|"]
        for k, v in s["ratios"].items():
            val = v["median"] if isinstance(v, dict) else v
            extra = f" [{v['min']:.3f}-{v['max']:.3f}]" if isinstance(v, dict) else ""
            lines.append(f"| {k} | {val:.3f}{extra} |")
    m = res.get("mask_building")
    if m:
        lines += ["", "## Mask building (Eq. 3-6), synthetic saliency on "
                  + ("SD1.5 FFN2 shapes" if m["connections"] > 4e7 else "small shapes"), "",
                  f"{m['layers']} layers, {m['connections'] / 1e6:.1f} M connections, {m['steps']} steps, r1 {m['r1']}, "
                  f"r2 {m['r2']}, torch threads {m['torch_threads']}.", "", "| measure | value |", "|---|---|",
                  f"| column orders of abs(W) (once per model) | {m['column_orders_build_s']:.3f} s, {mb(m['column_orders_bytes'])} |",
                  f"| select, warm, median over {len(m['select_warm_s']['all'])} concepts | {m['select_warm_s']['median']:.3f} s "
                  f"[{m['select_warm_s']['min']:.3f}-{m['select_warm_s']['max']:.3f}] |",
                  f"| select, cold (orders + first concept) | {m['select_cold_s']:.3f} s |",
                  f"| select peak memory | {mb(m['select_peak_bytes']['max'])} |",
                  f"| selected connections per concept | {m['selected_per_concept']:.0f} |"]
        if "dense_reference_s" in m:
            lines += [f"| straightforward dense path (one concept) | {m['dense_reference_s']:.2f} s, peak "
                      f"{mb(m['dense_reference_peak_bytes'])} |",
                      f"| dense / fast (warm, cold) | {m['dense_over_fast_warm']:.1f}x, {m['dense_over_fast_cold']:.1f}x |",
                      f"| fast result == dense result | {m['fast_equals_dense']} |"]
    f = res.get("fusion")
    if f:
        lines += ["", "## Fusion (Eq. 7-8, alpha 0.6)", "", "| concepts | time | peak memory | pruned | agnostic kept |",
                  "|---|---|---|---|---|"]
        for c, v in f.items():
            lines.append(f"| {c} | {v['s']['median']:.3f} s [{v['s']['min']:.3f}-{v['s']['max']:.3f}] | "
                         f"{mb(v['peak_bytes'])} | {v['pruned']} | {v['agnostic_kept']} |")
    a = res.get("apply")
    if a:
        lines += ["", "## Applying a fused mask (benchmark model)", "", "| measure | value |", "|---|---|",
                  f"| apply_mask (clone + add_patches) | {a['apply_mask_s']:.4f} s |",
                  f"| patch_model (weights written) | {a['patch_model_s']:.4f} s |",
                  f"| tensor bytes held by the patches | {a['patch_tensor_bytes']} ({a['pruned']} pruned connections) |",
                  f"| a dense float32 mask would hold | {a['dense_float_mask_bytes']} |"]
    rr = res.get("rerun")
    if rr:
        lines += ["", "## Re-running with only r2 / alpha / strength changed (FIAForgetConcepts, tiny model)", "",
                  f"UNet calls: first run {rr['first_run_unet_calls']}, re-run {rr['rerun_unet_calls']}."]
    return "\n".join(lines) + "\n"


def print_table(res: dict) -> None:
    log("")
    log(f"{'target':<78} {'measured':>14}  {'goal':<14} met")
    for t in res["targets"]:
        log(f"{t['target']:<78} {_fmt(t['value'], t['unit']):>14}  {t['goal']:<14} {'yes' if t['met'] else 'NO'}")
    s = res.get("saliency")
    if s:
        log("")
        log(f"{'procedure':<10} {'saliency s':>11} {'mask s':>9} {'per concept s':>14} {'calls':>6} {'rows':>6} {'peak MiB':>9}")
        for p in ("pack", "pack_1pair", "reference", "bare"):
            r = s[p]
            log(f"{p:<10} {r['saliency_s']['median']:>11.2f} {(r['mask_s'] or {}).get('median', float('nan')):>9.3f} "
                f"{(r['per_concept_s'] or {}).get('median', float('nan')):>14.2f} {r['unet_calls']:>6.0f} "
                f"{r['unet_rows']:>6.0f} {r['peak_bytes']['max'] / 2**20:>9.1f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model and shapes: checks that everything runs (seconds)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--full-size", action="store_true", help="SD1.5 at 512x512: the random-weight real-format checkpoint of devkit/fullsize.py")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for <name>.json and <name>.md")
    ap.add_argument("--repeats", type=int, default=0, help="saliency repeats (default: 3, smoke 1)")
    ap.add_argument("--pairs", type=int, default=0, help="prompt pairs per concept (default: 4 small, 8 full)")
    ap.add_argument("--size", type=int, default=0, help="override the image size (pixels)")
    ap.add_argument("--steps", type=int, default=0, help="override the schedule length")
    ap.add_argument("--saliency-steps", type=int, default=0, help="override the saliency window")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: 1 on --device cpu, see Bench.__init__; torch's own on cuda)")
    ap.add_argument("--skip-dense", action="store_true", help="skip the slow dense mask-building reference")
    ap.add_argument("--only", default="", help="comma list of sections: saliency,masks,apply,rerun")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown next to an existing result JSON")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render_markdown(res))
        return res
    t0 = time.perf_counter()
    bench = Bench(args)
    name = f"{args.device}-{bench.config_name}" + (f"-t{args.threads}" if args.threads else "")
    res = {"name": name, "load_start": load_average()}
    sections = set(filter(None, args.only.split(","))) or {"saliency", "masks", "apply", "rerun"}
    log(f"FIA benchmark {name}: {bench.cfg['repeats']} repeats, {bench.cfg['pairs']} prompt pairs")
    if "saliency" in sections or "apply" in sections:
        log("saliency: pack / reference / bare, interleaved")
        bench.saliency_section()
    if "masks" in sections:
        log("mask building and fusion")
        bench.mask_section()
    if "apply" in sections:
        bench.apply_section()
    if "rerun" in sections:
        bench.rerun_section()
    res.update(bench.results)
    res["environment"] = bench.environment()
    res["targets"] = bench.targets()
    if "saliency" in bench.results and args.full_size:
        res["paper"] = {"seconds_per_concept": PAPER_SECONDS_PER_CONCEPT, "peak_gb": PAPER_PEAK_GB,
                        "pack_seconds_per_concept": bench.results["saliency"]["pack"]["per_concept_s"]["median"]}
    res["load_end"] = load_average()
    res["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(render_markdown(res))
    print_table(res)
    log(f"\nwrote {out / (name + '.json')} and {out / (name + '.md')} ({res['total_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
