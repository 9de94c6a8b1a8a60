#!/usr/bin/env python
"""How many prompt pairs does a concept mask need? (issue 10, item 3)

    $PY -m benchmarks.prompt_study            # the study, ~15 min on 2 shared CPU cores
    $PY -m benchmarks.prompt_study --smoke --out /tmp/fia   # seconds: tiny model, 2 counts, 1 seed

(run from the repository root; $PY is the test environment's python, tests/setup_env.sh)

For num_prompts in (2, 4, 8, 12, 16, 24, full) and three seeds, every concept's mask
(paper settings: fast saliency, r1 0.05, r2 0.01; 50-step schedule, 10 saliency steps,
CFG 7.5, euler / normal) is compared with the mask from the FULL reference pair set of
the same concept, seed and starting noise: Jaccard |A ∩ B| / |A ∪ B| of the selected
connections pooled over all FFN2 layers of the model (the per-layer minimum is kept in
the JSON). Seed s gives the starting noise (every prompt of the concept starts from the
noise of seed s) and the subset (build_prompt_pairs(..., num_prompts, seed=s)).

Two models, both built through ComfyUI's classes:
- toy: the trained toy model of devkit/toy (weights shipped in benchmarks/toy/weights), 128 x 128 (its native
  size, latent 16 x 16), concepts cross, triangle, heart;
- sd15: a random-weight UNet of SD1.5's layout (bench_fia.sd15_unet_config) at
  model_channels 64 / context 64 (34 M parameters, 16 FFN2 layers) at 64 x 64 (latent
  8 x 8), with the harness's tiny CLIP (width 64, real tokenizer), concepts golf ball,
  parachute, church.
Cost per concept and count: UNet batch rows evaluated (counted on the diffusion model's
forward) and seconds of the saliency run (one torch thread; the machine is shared, so the
seconds are indicative; the rows do not depend on the model's size).

Fidelity: on each model, for the first concept at seed 0, the pack's full-set mask against
benchmarks/reference_fia.py's mask (the authors' procedure: full schedule per prompt, one
prompt at a time, re-seeded noise, population std, conditional rows) on identical weights,
prompts and noise: Jaccard, selected counts and the UNet rows of each.

Recommendation: the smallest count whose masks reach Jaccard >= 0.9 with the full-set mask
on BOTH models, taking the minimum over seeds and concepts (else the full set).

Writes <out>/prompt_study.{json,md,png} (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from devkit import comfyui, zoo
from devkit.comfyui import REPO_ROOT as REPO

log = logging.getLogger("fia.prompt_study")

R1, R2 = 0.05, 0.01
THRESHOLD = 0.9
FULL = "full"


@dataclass
class ModelSpec:
    name: str
    description: str
    size: int
    concepts: tuple[str, ...]


@dataclass
class StudyConfig:
    counts: tuple = (2, 4, 8, 12, 16, 24, None)  # None = the full reference set
    seeds: tuple = (0, 1, 2)
    steps: int = 50
    saliency_steps: int = 10
    cfg: float = 7.5
    batch_size: int = 30  # pairs per sampling batch (the runner's memory guard may lower it)
    models: tuple = ("toy", "sd15")
    concepts_per_model: int = 3
    fidelity: bool = True
    fidelity_rows_variant: bool = False  # also the reference with the CFG rows mixed in
    smoke: bool = False
    reference_only: bool = False  # only the reference runs (fills the reference cache)
    reference_cache: Path | None = None
    extra: dict = field(default_factory=dict)


SMOKE = dict(counts=(2, None), seeds=(0,), steps=4, saliency_steps=2, models=("tiny",), concepts_per_model=1,
             fidelity_rows_variant=True, smoke=True)

MODEL_SPECS = {
    "toy": ModelSpec("toy", "toy model of devkit/toy (trained, weights shipped in benchmarks/toy/weights; 1.7 M UNet params, "
                            "7 FFN2 layers of 64 x 256), 128 x 128 px (latent 16 x 16), v-prediction",
                     128, ("cross", "triangle", "heart")),
    "sd15": ModelSpec("sd15", "random-weight UNet of SD1.5's layout (bench_fia.sd15_unet_config(64, 64): "
                              "model_channels 64, context 64; 16 FFN2 layers), tiny CLIP (width 64, real "
                              "tokenizer), 64 x 64 px (latent 8 x 8), eps-prediction",
                      64, ("golf ball", "parachute", "church")),
    "tiny": ModelSpec("tiny", "the test harness's tiny SD15 (random weights, 7 FFN2 layers), 64 x 64 px", 64,
                      ("golf ball",)),
}


# --------------------------------------------------------------------------- the pack
def pack_api(pack):
    """The interfaces the study uses, bound to the loaded pack: fia_core.build_prompt_pairs
    (None = the reference's full set, fewer = a seeded subset) and select_concept_mask,
    nodes.saliency.concept_saliency -> SaliencyRun, nodes.saliency_settings.SaliencySettings."""
    import importlib

    name = pack.__name__
    core = importlib.import_module(f"{name}.fia_core")
    saliency = importlib.import_module(f"{name}.nodes.saliency")
    settings = importlib.import_module(f"{name}.nodes.saliency_settings")
    adapter = importlib.import_module(f"{name}.nodes.comfy_adapter")
    return SimpleNamespace(build_prompt_pairs=core.build_prompt_pairs, select_concept_mask=core.select_concept_mask,
                           concept_saliency=saliency.concept_saliency, SaliencySettings=settings.SaliencySettings,
                           target_layers=adapter.target_layers,
                           source="the pack's interfaces (fia_core.build_prompt_pairs, fia_core.select_concept_mask, "
                                  "nodes.saliency.concept_saliency)")


class Study:
    def __init__(self, cfg: StudyConfig):
        from benchmarks.bench_fia import EvalCounter, Timer, sd15_unet_config

        self.cfg = cfg
        self.EvalCounter, self.Timer, self.sd15_unet_config = EvalCounter, Timer, sd15_unet_config
        self.tmp = tempfile.TemporaryDirectory(prefix="fia_prompt_study_")
        self.ns = comfyui.import_comfy(self.tmp.name)
        import torch

        self.torch = torch
        torch.set_num_threads(1)  # this script's process only: see bench_fia.Bench
        self.ns.comfy.utils.PROGRESS_BAR_ENABLED = False
        self.pack = comfyui.load_pack()
        self.api = pack_api(self.pack)
        from benchmarks import reference_fia

        self.ref = reference_fia

    # models
    def build(self, name: str):
        torch = self.torch
        if name == "tiny":
            return zoo.tiny_sd15_model(seed=0), zoo.tiny_clip(seed=1)
        if name == "toy":
            from devkit.toy import model as M

            model, clip, _vae = M.load_checkpoint()
            return model, clip
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.supported_models as sm

        config = sm.SD15(dict(self.sd15_unet_config(64, 64)))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        zoo.fill_weights_(model.diffusion_model, 0)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        return patcher, zoo.tiny_clip(seed=1)

    def settings(self, spec: ModelSpec, seed: int):
        c = self.cfg
        return self.api.SaliencySettings(
            steps=c.steps, saliency_steps=c.saliency_steps, cfg=c.cfg, sampler_name="euler", scheduler="normal",
            seed=seed, width=spec.size, height=spec.size, mode="fast", batch_size=c.batch_size, r1=R1)

    # one saliency run through the pack's interfaces, measured
    def pack_mask(self, model, clip, concept, pairs, settings):
        with self.EvalCounter(model) as count, self.Timer("cpu") as timer:
            run = self.api.concept_saliency(model, clip, concept, pairs, settings, use_cache=False)
        mask = self.api.select_concept_mask(run.saliency, R2)
        layers = {k: l.indices.cpu() for k, l in mask.layers.items()}
        return layers, {"unet_rows": count.rows, "unet_calls": count.calls, "seconds": timer.seconds,
                        "notes": list(getattr(run, "notes", ()))}

    def reference_mask(self, model, clip, pairs, settings, rows: str):
        """The reference procedure's mask and cost; read from the reference cache when the
        same model weights, text encoder, prompt set, settings and reference code ran before
        (it costs minutes and does not depend on the pack)."""
        torch = self.torch
        modules = {l.key: l.module for l in self.api.target_layers(model)}
        key = self.reference_key(model, clip, pairs, settings, rows)
        path = self.cfg.reference_cache / f"{key}.pt" if self.cfg.reference_cache else None
        if path is not None and path.is_file():
            hit = torch.load(path, weights_only=True)
            log.info("  reference mask from the cache %s (measured %s)", path, hit["cost"]["measured_at"])
            return hit["layers"], {**hit["cost"], "from_cache": True}
        with self.EvalCounter(model) as count, self.Timer("cpu") as timer:
            columns = self.ref.reference_saliency(model, clip, pairs, settings, modules, zoo.encode,
                                                  self.ref.comfy_sample_one(settings), rows=rows)
        w_abs = {k: m.weight.detach().float().abs().cpu() for k, m in modules.items()}
        layers = self.ref.straightforward_masks(w_abs, columns, R1, R2)
        cost = {"unet_rows": count.rows, "unet_calls": count.calls, "seconds": timer.seconds,
                "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                "load_average": [round(x, 2) for x in os.getloadavg()]}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"layers": layers, "cost": cost}, path)
        return layers, {**cost, "from_cache": False}

    def reference_key(self, model, clip, pairs, settings, rows: str) -> str:
        """Identity of a reference run: weights of the UNet and the text encoder, the prompt
        set (order-free), the sampling settings, the row mode and the reference's source."""
        import hashlib

        h = hashlib.sha256()
        for module in (model.model.diffusion_model, clip.cond_stage_model):
            for name, t in sorted(module.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        payload = {"pairs": sorted([p.concept_prompt, p.base_prompt] for p in pairs), "rows": rows, "r1": R1, "r2": R2,
                   "settings": {k: getattr(settings, k) for k in ("steps", "saliency_steps", "cfg", "sampler_name",
                                                                  "scheduler", "seed", "width", "height")}}
        h.update(json.dumps(payload, sort_keys=True).encode())
        h.update(reference_source(self.ref).encode())
        return h.hexdigest()[:32]

    def run_model(self, name: str) -> dict:
        spec = MODEL_SPECS[name]
        cfg = self.cfg
        concepts = spec.concepts[:cfg.concepts_per_model]
        model, clip = self.build(name)
        shapes = {l.key: tuple(l.shape) for l in self.api.target_layers(model)}
        if cfg.reference_only:
            settings = self.settings(spec, cfg.seeds[0])
            pairs = self.api.build_prompt_pairs(concepts[0], "objects", None, cfg.seeds[0])
            for rows in (("cond", "cfg") if cfg.fidelity_rows_variant else ("cond",)):
                log.info("  reference procedure (%s rows), %s, %d pairs", rows, concepts[0], len(pairs))
                _, cost = self.reference_mask(model, clip, pairs, settings, rows)
                log.info("  reference: %s", cost)
            return {}
        # warm-up (first-call allocations, model load), not measured
        warm = self.api.build_prompt_pairs("warm up", "objects", 2, 0)
        self.api.concept_saliency(model, clip, "warm up", warm, self.settings(spec, 0), use_cache=False)
        records, fidelity = [], {}
        for concept in concepts:
            for seed in cfg.seeds:
                settings = self.settings(spec, seed)
                full_pairs = self.api.build_prompt_pairs(concept, "objects", None, seed)
                full_mask = None
                for n in sorted(cfg.counts, key=lambda v: -1 if v is None else v):  # full set first
                    pairs = full_pairs if n is None else self.api.build_prompt_pairs(concept, "objects", n, seed)
                    if n is not None:
                        extra = {(p.concept_prompt, p.base_prompt) for p in pairs} - \
                                {(p.concept_prompt, p.base_prompt) for p in full_pairs}
                        assert not extra, f"subset of {n} pairs is not within the full set: {sorted(extra)[:3]}"
                    layers, cost = self.pack_mask(model, clip, concept, pairs, settings)
                    if n is None:
                        full_mask = layers
                    agree = jaccard(layers, full_mask)
                    records.append({"concept": concept, "seed": seed, "count": FULL if n is None else n,
                                    "pairs": len(pairs), **agree, **cost,
                                    "selected": sum(int(v.numel()) for v in layers.values())})
                    log.info("  %s %-10s seed %d n=%-4s J=%.3f (layer min %.3f) sel %d rows %d %.1fs", name, concept,
                             seed, FULL if n is None else n, agree["jaccard"], agree["jaccard_layer_min"],
                             records[-1]["selected"], cost["unet_rows"], cost["seconds"])
                if cfg.fidelity and concept == concepts[0] and seed == cfg.seeds[0]:
                    fidelity = self.fidelity(model, clip, concept, full_pairs, settings, full_mask,
                                             next(r for r in records if r["count"] == FULL and r["concept"] == concept
                                                  and r["seed"] == seed))
        del model, clip
        return {"description": spec.description, "size": spec.size, "concepts": list(concepts),
                "layers": {k: list(v) for k, v in shapes.items()},
                "connections": sum(a * b for a, b in shapes.values()),
                "records": records, "table": table(records, cfg.counts), "fidelity": fidelity}

    def fidelity(self, model, clip, concept, pairs, settings, pack_layers, pack_cost) -> dict:
        out = {"concept": concept, "seed": settings.seed, "pairs": len(pairs)}
        variants = ("cond", "cfg") if self.cfg.fidelity_rows_variant else ("cond",)
        for rows in variants:
            log.info("  reference procedure (%s rows), %s, %d pairs, full %d-step schedule per prompt", rows, concept,
                     len(pairs), settings.steps)
            ref_layers, ref_cost = self.reference_mask(model, clip, pairs, settings, rows)
            agree = jaccard(pack_layers, ref_layers)
            key = "reference" if rows == "cond" else "reference_cfg_rows"
            out[key] = {**ref_cost, "selected": sum(int(v.numel()) for v in ref_layers.values()),
                        "jaccard_with_pack": agree["jaccard"], "jaccard_layer_min": agree["jaccard_layer_min"],
                        "identical": all(self.torch.equal(pack_layers[k], ref_layers[k]) for k in ref_layers)}
            log.info("  pack vs reference (%s rows): J=%.4f, selected %d / %d, rows %d / %d", rows, agree["jaccard"],
                     sum(int(v.numel()) for v in pack_layers.values()), out[key]["selected"], pack_cost["unet_rows"],
                     ref_cost["unet_rows"])
        out["pack"] = {k: pack_cost[k] for k in ("unet_rows", "unet_calls", "seconds", "selected")}
        out["pack_over_reference_rows"] = pack_cost["unet_rows"] / out["reference"]["unet_rows"]
        return out


def reference_source(ref) -> str:
    """The source of what the reference procedure computes (its saliency and the dense Eq.
    3-6; not the import of the shared rounding helper), part of the reference cache key."""
    import inspect

    names = ("_contrast", "comfy_sample_one", "reference_saliency", "straightforward_kth_largest",
             "straightforward_top_k_flat", "straightforward_top_k_rows", "straightforward_sensitivity",
             "straightforward_select", "straightforward_fast_mode", "straightforward_masks")
    return "\n".join(inspect.getsource(getattr(ref, n)) for n in names)


# --------------------------------------------------------------------------- figures
def jaccard(a: dict, b: dict) -> dict:
    """Jaccard of two masks ({layer key: flat indices}) pooled over the layers, and the
    lowest per-layer Jaccard (two empty layers agree: 1)."""
    import torch

    inter = union = 0
    per_layer = []
    for key in b:
        x, y = a[key], b[key]
        i = int(torch.isin(x, y).sum())
        u = int(x.numel() + y.numel() - i)
        inter, union = inter + i, union + u
        per_layer.append(i / u if u else 1.0)
    return {"jaccard": inter / union if union else 1.0, "jaccard_layer_min": min(per_layer) if per_layer else 1.0}


def table(records: list[dict], counts) -> dict:
    """Per count: mean and min Jaccard over seeds and concepts, median cost per concept."""
    out = {}
    for n in counts:
        key = FULL if n is None else n
        rows = [r for r in records if r["count"] == key]
        if not rows:
            continue
        j = [r["jaccard"] for r in rows]
        out[str(key)] = {"pairs": rows[0]["pairs"], "jaccard_mean": statistics.fmean(j), "jaccard_min": min(j),
                         "jaccard_layer_min": min(r["jaccard_layer_min"] for r in rows),
                         "unet_rows": statistics.median(r["unet_rows"] for r in rows),
                         "seconds": statistics.median(r["seconds"] for r in rows),
                         "selected_mean": statistics.fmean(r["selected"] for r in rows), "runs": len(rows)}
    return out


def recommend(models: dict, counts) -> dict:
    """The smallest count whose minimum Jaccard (over seeds and concepts) reaches the
    threshold on every model; else the full set."""
    chosen = FULL
    for n in sorted(c for c in counts if c is not None):
        if all(m["table"].get(str(n), {}).get("jaccard_min", 0) >= THRESHOLD for m in models.values()):
            chosen = n
            break
    by_mean = FULL
    for n in sorted(c for c in counts if c is not None):
        if all(m["table"].get(str(n), {}).get("jaccard_mean", 0) >= THRESHOLD for m in models.values()):
            by_mean = n
            break
    return {"num_prompts": chosen, "rule": f"smallest count with Jaccard >= {THRESHOLD} against the full-set mask, "
            "minimum over seeds and concepts, on every model; else the full set",
            "by_mean_instead_of_min": by_mean}


def render_markdown(res: dict) -> str:
    models = res["models"]
    names = list(models)
    counts = list(next(iter(models.values()))["table"])
    lines = ["# Prompt-count study (issue 10, item 3)", "",
             f"- interfaces: {res['interface']}; commit {res['environment'].get('commit', '?')}",
             f"- settings: {res['settings']}",
             f"- machine: {res['environment'].get('cpu', '?')}, {res['environment']['torch_threads']} torch thread, "
             f"load average {res['load_start']} -> {res['load_end']}; total {res['total_s']:.0f} s", ""]
    for n in names:
        m = models[n]
        lines.append(f"- **{n}**: {m['description']}; {m['connections']:,} FFN2 connections; concepts "
                     f"{', '.join(m['concepts'])}")
    lines += ["", f"Jaccard of each concept mask with the full-set mask (same concept, seed, noise), pooled over "
              f"the model's FFN2 layers; mean and min over {len(res['settings']['seeds'])} seeds x the concepts. "
              "Cost per concept: UNet batch rows (CFG included) and seconds of the saliency run (median).", ""]
    head = "| num_prompts |" + "".join(f" {n} J mean | {n} J min |" for n in names) + " UNet rows |" + \
           "".join(f" {n} s |" for n in names)
    lines += [head, "|" + "---|" * (1 + 3 * len(names) + 1)]
    for c in counts:
        row = models[names[0]]["table"][c]
        label = f"full ({row['pairs']})" if c == FULL else c
        cells = "".join(f" {models[n]['table'][c]['jaccard_mean']:.3f} | {models[n]['table'][c]['jaccard_min']:.3f} |"
                        for n in names)
        secs = "".join(f" {models[n]['table'][c]['seconds']:.1f} |" for n in names)
        lines.append(f"| {label} |{cells} {row['unet_rows']:.0f} |{secs}")
    st = res["settings"]
    lines += ["", f"UNet rows per concept do not depend on the model: 2 (CFG) x 2 n prompts x {st['saliency_steps']} "
              f"window steps = {4 * st['saliency_steps']} n for the pack; the reference procedure evaluates 2 (CFG) x 60 "
              f"prompts x {st['steps']} steps = {4 * 30 * st['steps']} rows per concept. Seconds at full size (SD1.5, "
              "512 x 512) are not measured here; see the full-size benchmark (benchmarks/fullsize.py) for seconds per "
              "UNet row there."]
    rec = res["recommendation"]
    lines += ["", f"**Recommended default num_prompts: {rec['num_prompts']}** ({rec['rule']}). "
              f"With the mean instead of the minimum the rule would give {rec['by_mean_instead_of_min']}.", ""]
    lines += ["## Fidelity: the pack's full-set mask vs the reference procedure", "",
              "Identical weights, prompts and starting noise; reference = benchmarks/reference_fia.py (the authors' "
              "procedure: full schedule per prompt, one prompt at a time, re-seeded noise, population std, "
              "conditional rows, dense Eq. 3-6).", "",
              "| model | concept | pairs | Jaccard | identical | selected pack / reference | UNet rows pack / reference "
              "| rows ratio | seconds pack / reference |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        f = models[n].get("fidelity")
        if not f:
            continue
        for key in ("reference", "reference_cfg_rows"):
            if key not in f:
                continue
            r = f[key]
            label = n if key == "reference" else f"{n} (reference with CFG rows mixed in)"
            lines.append(f"| {label} | {f['concept']} | {f['pairs']} | {r['jaccard_with_pack']:.4f} | {r['identical']} "
                         f"| {f['pack']['selected']} / {r['selected']} | {f['pack']['unet_rows']} / {r['unet_rows']} | "
                         f"{f['pack']['unet_rows'] / r['unet_rows']:.3f} | {f['pack']['seconds']:.1f} / "
                         f"{r['seconds']:.1f} |")
    notes = []
    for n in names:
        f = models[n].get("fidelity") or {}
        for key in ("reference", "reference_cfg_rows"):
            r = f.get(key)
            if r and r.get("from_cache"):
                notes.append(f"- {n}: the reference ({key}) was read from the reference cache; it ran at "
                             f"{r.get('measured_at')} (load average {r.get('load_average')}), on the same weights, "
                             "prompt set, settings and reference code (the cache key covers all of them).")
        if f.get("reference"):
            r = f["reference"]
            agree = "identical" if r["identical"] else f"Jaccard {r['jaccard_with_pack']:.4f}"
            notes.append(f"- {n}: moonshot (the reference's masks at <= 1/3 of its UNet evaluations): "
                         f"masks {agree} at "
                         f"{f['pack_over_reference_rows']:.3f} of its UNet rows (full set; the pack samples only "
                         f"the {res['settings']['saliency_steps']}-step window, batched).")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def render_plot(res: dict, path: Path) -> None:
    """Jaccard (mean: solid, min: dashed) against num_prompts, one colour per model."""
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 760, 460, 70, 190, 30, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    models = res["models"]
    counts = list(next(iter(models.values()))["table"])
    xs = {c: L + (W - L - R) * i / max(1, len(counts) - 1) for i, c in enumerate(counts)}
    lo = min(0.0, min(m["table"][c]["jaccard_min"] for m in models.values() for c in counts))

    def y(v):
        return T + (H - T - B) * (1 - (v - lo) / (1 - lo))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(6):
        v = lo + (1 - lo) * k / 5
        d.line([L - 4, y(v), L, y(v)], fill="black")
        d.text((L - 40, y(v) - 6), f"{v:.1f}", fill="black")
    d.line([L, y(THRESHOLD), W - R, y(THRESHOLD)], fill=(150, 150, 150))
    d.text((L + 6, y(THRESHOLD) - 14), f"J = {THRESHOLD}", fill=(120, 120, 120))
    for c in counts:
        p = models[next(iter(models))]["table"][c]["pairs"]
        d.text((xs[c] - 10, H - B + 6), f"full\n({p})" if c == FULL else str(c), fill="black")
    d.text((L + (W - L - R) / 2 - 60, H - 22), "num_prompts (pairs)", fill="black")
    d.text((8, T - 22), "Jaccard with the full-set mask (pooled over FFN2 layers)", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for i, (name, m) in enumerate(models.items()):
        col = colours[i % len(colours)]
        for stat, dash in (("jaccard_mean", False), ("jaccard_min", True)):
            pts = [(xs[c], y(m["table"][c][stat])) for c in counts]
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                if dash:
                    for s in range(10):
                        if s % 2 == 0:
                            a, b = s / 10, (s + 1) / 10
                            d.line([x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b],
                                   fill=col, width=2)
                else:
                    d.line([x0, y0, x1, y1], fill=col, width=2)
            for x, yy in pts:
                d.ellipse([x - 3, yy - 3, x + 3, yy + 3], fill=col)
        ly = T + 20 + 40 * i
        d.line([W - R + 10, ly, W - R + 40, ly], fill=col, width=2)
        d.text((W - R + 45, ly - 6), f"{name} mean", fill=col)
        for s in range(3):
            d.line([W - R + 10 + 10 * s, ly + 16, W - R + 15 + 10 * s, ly + 16], fill=col, width=2)
        d.text((W - R + 45, ly + 10), f"{name} min", fill=col)
    img.save(path)


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return env


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny harness model, counts (2, full), one seed (seconds)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for prompt_study.*")
    ap.add_argument("--models", default="", help="comma list of models (default toy,sd15)")
    ap.add_argument("--concepts", type=int, default=0, help="concepts per model (default 3)")
    ap.add_argument("--seeds", type=int, default=0, help="number of seeds (default 3)")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the reference procedure")
    ap.add_argument("--cfg-rows-variant", action="store_true",
                    help="also run the reference with the unconditional CFG rows mixed in")
    ap.add_argument("--reference-only", action="store_true",
                    help="only run the reference procedure (fills the reference cache for a later run)")
    ap.add_argument("--reference-cache", default="",
                    help="folder of cached reference masks (default: <FIA cache>/prompt_study_reference; "
                         "'none' = never cache)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown and PNG next to a result JSON")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="merge the models of several result JSONs (e.g. one process per model) into --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render_markdown(res))
        render_plot(res, Path(args.render).with_suffix(".png"))
        return res
    if args.combine:
        return write(combine([json.loads(Path(p).read_text()) for p in args.combine]), Path(args.out))
    cfg = StudyConfig(**(SMOKE if args.smoke else {}))
    if args.models:
        cfg.models = tuple(args.models.split(","))
    if args.concepts:
        cfg.concepts_per_model = args.concepts
    if args.seeds:
        cfg.seeds = tuple(range(args.seeds))
    cfg.fidelity = not args.no_fidelity
    cfg.reference_only = args.reference_only
    if args.reference_cache != "none" and not cfg.smoke:
        cfg.reference_cache = Path(args.reference_cache) if args.reference_cache else \
            comfyui.cache_dir() / "prompt_study_reference"
    cfg.fidelity_rows_variant = cfg.fidelity_rows_variant or args.cfg_rows_variant
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    study = Study(cfg)
    log.info("prompt study: models %s, counts %s, seeds %s; interfaces: %s", cfg.models, cfg.counts, cfg.seeds,
             study.api.source)
    models = {}
    for name in cfg.models:
        log.info("model %s", name)
        models[name] = study.run_model(name)
    if cfg.reference_only:
        return {}
    res = {"interface": study.api.source,
           "settings": {"r1": R1, "r2": R2, "mode": "fast", "steps": cfg.steps, "saliency_steps": cfg.saliency_steps,
                        "cfg": cfg.cfg, "sampler": "euler", "scheduler": "normal", "template": "objects",
                        "counts": [FULL if c is None else c for c in cfg.counts], "seeds": list(cfg.seeds),
                        "batch_size": cfg.batch_size, "smoke": cfg.smoke},
           "models": models, "recommendation": recommend(models, cfg.counts), "environment": environment(),
           "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()],
           "total_s": time.perf_counter() - t0}
    return write(res, Path(args.out))


def write(res: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompt_study.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "prompt_study.md").write_text(render_markdown(res))
    render_plot(res, out / "prompt_study.png")
    log.info("recommended num_prompts: %s; wrote %s (%.0f s)", res["recommendation"]["num_prompts"],
             out / "prompt_study.json", res["total_s"])
    return res


def combine(parts: list[dict]) -> dict:
    """One result from runs of the same settings on different models (run side by side:
    total_s is the longest run's, the load averages the first run's)."""
    first = parts[0]
    for p in parts[1:]:
        if {k: v for k, v in p["settings"].items()} != first["settings"] or p["interface"] != first["interface"]:
            raise SystemExit("--combine: the runs differ in settings or interfaces")
    models = {name: m for p in parts for name, m in p["models"].items()}
    counts = [None if c == FULL else c for c in first["settings"]["counts"]]
    return {**first, "models": models, "recommendation": recommend(models, counts),
            "total_s": max(p["total_s"] for p in parts), "load_end": parts[-1]["load_end"],
            "runs": [{"models": list(p["models"]), "total_s": p["total_s"], "load_start": p["load_start"],
                      "load_end": p["load_end"]} for p in parts]}


if __name__ == "__main__":
    main()
