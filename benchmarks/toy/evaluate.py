"""Forget/preserve benchmark of FIA on the toy model, through the pack's ComfyUI nodes.

    python -m benchmarks.toy.evaluate            # the full benchmark (a few minutes on 2 cores)
    python -m benchmarks.toy.evaluate --quick    # a seconds-long slice (what tests/test_toy_smoke.py runs)

Protocol (the paper's Imagenette experiment, scaled down):
- Ten concepts (shapes). For each, images are generated from evaluation prompts
  (data.EVAL_TEMPLATES: "a circle in a forest", "a red circle in a beach", "a circle")
  with ComfyUI's sampler and judged by the toy classifier.
- Forgetting accuracy F: the classifier's accuracy on the erased concepts' images after
  erasure (lower is better). Preserving accuracy P: its accuracy on the other concepts'
  images (higher is better). Overall H = harmonic mean of P and 1 - F. Sparsity: the
  pruned share of all FFN2 connections (and of all UNet weights).
- Forget sets: single concepts, pairs, and half of the concepts (two complementary
  halves, like the paper's 5 / 5 split).
- Side by side, from the same noise: the unpruned model; random pruning (the same number
  of FFN2 connections in every layer as FIA prunes, chosen at random); the naive union of
  the concept masks (FIAFuseMasks fusion="union"); FIA (fusion="concept-agnostic").
  Every mask is built and applied by the pack's nodes: FIAConceptSaliency (template
  "objects", the paper's prompt template, unchanged), FIABuildConceptMask, FIAFuseMasks,
  FIAApplyMask.
- Hyper-parameters: a sweep over the saliency mode (fast = the reference code's
  statistic, exact = Eq. 1 with the cosine), r2 and alpha runs on a validation split
  (other seeds and prompts than the test split, forgetting the first half); the main
  table uses the sweep's best (mode, r2, alpha) by H and, for the half groups, also the
  paper's defaults (fast, r2 = 0.01, alpha = 0.6). Nothing is tuned on the test split.
- How much of the concepts FFN2 carries at all: accuracy with every FFN2 connection
  zeroed, and with half of them zeroed at random.
- ``--explore`` instead runs what the method offers beyond the defaults (exact saliency,
  a longer saliency window, r1, target layers FFN1 and cross-attention k/v through the
  pack's saliency runner) on the validation split: <prefix>_explore.{md,json}.
- Generations for judging run under CPU bfloat16 autocast (2x faster; weights, masks
  and the saliency sampling stay float32).

Writes <out-dir>/<prefix>_benchmark.{md,json} and <prefix>_sweep.png, <prefix>_samples.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from devkit import comfyui
from devkit.toy import classifier as C
from devkit.toy import data as D
from devkit.toy import model as M

RESULTS = Path(__file__).resolve().parents[1] / "results"
log = logging.getLogger("fia.toy")


@dataclass
class Config:
    concepts: tuple = D.CONCEPTS
    test_images: int = 12  # per concept
    val_images: int = 8
    test_seed: int = 1000
    val_seed: int = 2000
    sample_steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    # FIA (node inputs); r2 / alpha of the main table come from the sweep unless fixed
    r1: float = 0.05
    r2: float | None = None
    alpha: float | None = None
    paper_r2: float = 0.01
    paper_alpha: float = 0.6
    mode: str | None = None  # saliency mode of the main table; None = chosen by the sweep
    saliency_schedule: int = 50
    saliency_steps: int = 10
    saliency_cfg: float = 5.0
    num_prompts: int = 0  # the node's default: the reference's full pair set (30 places)
    saliency_batch: int = 10
    saliency_seed: int = 0
    # forget sets: names of concepts
    singles: tuple = ("circle", "heart", "star")
    pairs: tuple = (("circle", "triangle"), ("ring", "moon"), ("heart", "arrow"))
    halves: tuple = (("circle", "square", "triangle", "cross", "ring"), ("diamond", "heart", "moon", "arrow", "star"))
    sweep_r2: tuple = (0.01, 0.03, 0.1, 0.3)
    sweep_alpha: tuple = (0.4, 0.6, 0.8)
    sweep_modes: tuple = ("fast", "exact")  # the reference code's Wanda-style statistic, and Eq. 1 with the cosine
    sweep_halves: int = 1  # the sweep forgets the first half (the test split forgets both)
    random_seed: int = 0
    threads: int = 1  # 2 threads were up to 80x slower than 1 on a 2-core machine shared with other jobs
    bf16: bool = True  # bfloat16 autocast for the judged generations (2x faster on CPU; masks, saliency fp32)
    samples_per_concept: int = 4  # in the before/after picture
    checkpoint: str = str(M.CHECKPOINT)
    classifier: str = str(M.CLASSIFIER)

    def saliency_modes(self) -> tuple:
        """The saliency modes the sweep tries: the fixed ``mode``, or ``sweep_modes``."""
        return (self.mode,) if self.mode else tuple(self.sweep_modes)


QUICK = dict(concepts=("circle", "square", "triangle"), test_images=2, val_images=2, sample_steps=4,
             saliency_schedule=4, saliency_steps=2, num_prompts=2, saliency_batch=2,
             singles=("circle",), pairs=(("circle", "square"),), halves=(("circle",),),
             sweep_r2=(0.05,), sweep_alpha=(0.6,), samples_per_concept=2)


def harmonic(p: float, f: float) -> float:
    """Overall score of the paper: harmonic mean of P and 1 - F (fractions)."""
    a, b = p, 1.0 - f
    return 0.0 if a + b <= 0 else 2 * a * b / (a + b)


def pack_module():
    """The pack as ComfyUI loads it (once per process)."""
    return comfyui.load_pack()


class Bench:
    """Models, the judge, the pack's nodes and cached generations for one run."""

    def __init__(self, cfg: Config, log_fn=print):
        self.cfg = cfg
        self.say = log_fn
        self.pack = pack_module()
        nodes = self.pack.NODE_CLASS_MAPPINGS
        self.n_saliency = nodes["FIAConceptSaliency"]()
        self.n_build = nodes["FIABuildConceptMask"]()
        self.n_fuse = nodes["FIAFuseMasks"]()
        self.n_apply = nodes["FIAApplyMask"]()
        self.fia = self.pack.fia_core
        self.model, self.clip, self.vae = M.load_checkpoint(cfg.checkpoint)
        self.judge = C.load(Path(cfg.classifier))
        self.saliency: dict[str, object] = {}
        self.masks: dict[tuple, object] = {}
        self.timing: dict[str, float] = {}
        self._judged: dict[tuple, dict] = {}
        self.prompts = {
            split: {c: D.eval_prompts(c, n, seed=seed) for c in cfg.concepts}
            for split, n, seed in (("test", cfg.test_images, cfg.test_seed), ("val", cfg.val_images, cfg.val_seed))
        }
        n_unet = sum(p.numel() for p in self.model.model.diffusion_model.parameters())
        self.unet_params = n_unet

    # -- generation and judging ----------------------------------------------------
    def judge_model(self, model, split: str) -> dict:
        """Per-concept accuracy {concept: fraction} and predicted labels of ``split``."""
        cfg = self.cfg
        seed = cfg.test_seed if split == "test" else cfg.val_seed
        prompts = [p for c in cfg.concepts for p in self.prompts[split][c]]
        t0 = time.time()
        lat = M.generate(model, self.clip, prompts, seed=seed, steps=cfg.sample_steps, cfg=cfg.cfg,
                         sampler_name=cfg.sampler, scheduler=cfg.scheduler, bf16=cfg.bf16)
        pred = C.classify(self.judge, M.latent_to_pixels(lat)).numpy()
        self.timing["generate"] = self.timing.get("generate", 0.0) + time.time() - t0
        n = len(prompts) // len(cfg.concepts)
        acc, labels = {}, {}
        for i, c in enumerate(cfg.concepts):
            p = pred[i * n:(i + 1) * n]
            acc[c] = float((p == D.CONCEPTS.index(c)).mean())
            labels[c] = [D.CLASS_NAMES[k] for k in p]
        return {"acc": acc, "pred": labels, "latents": lat}

    # -- masks through the nodes -----------------------------------------------------
    def concept_saliency(self, concept: str, mode: str):
        key = (concept, mode)
        if key not in self.saliency:
            cfg = self.cfg
            t0 = time.time()
            out = self.n_saliency.compute(
                self.model, self.clip, concept, "objects", cfg.r1, steps=cfg.saliency_schedule,
                saliency_steps=cfg.saliency_steps, cfg=cfg.saliency_cfg, sampler_name="euler",
                scheduler="normal", seed=cfg.saliency_seed, width=8 * 16, height=8 * 16, mode=mode,
                batch_size=cfg.saliency_batch, num_prompts=cfg.num_prompts)
            self.saliency[key] = out["result"][0]
            self.timing[f"saliency_{mode}"] = self.timing.get(f"saliency_{mode}", 0.0) + time.time() - t0
        return self.saliency[key]

    def concept_mask(self, concept: str, r2: float, mode: str):
        key = (concept, r2, mode)
        if key not in self.masks:
            self.masks[key] = self.n_build.build(self.concept_saliency(concept, mode), r2)["result"][0]
        return self.masks[key]

    def fused(self, concepts, r2: float, alpha: float | None, mode: str):
        masks = [self.concept_mask(c, r2, mode) for c in concepts]
        extra = {f"mask_{i + 2}": m for i, m in enumerate(masks[1:])}
        fusion = "union" if alpha is None else "concept-agnostic"
        return self.n_fuse.fuse(masks[0], alpha if alpha is not None else 0.6, fusion, **extra)["result"][0]

    def random_like(self, mask, seed: int):
        """Random FFN2 connections, as many per layer as ``mask`` prunes."""
        fia = self.fia
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for key, lm in mask.layers.items():
            idx = torch.randperm(lm.numel, generator=g)[:lm.count].sort().values
            layers[key] = fia.LayerMask(lm.shape, idx)
        return fia.ConceptMask(concepts=("random",), target=mask.target, layers=layers,
                               architecture=mask.architecture, fingerprint=mask.fingerprint,
                               params={"random_like": list(mask.concepts), "seed": seed})

    def apply(self, mask):
        return self.n_apply.apply(self.model, mask, 1.0)["result"][0]

    def fraction_mask(self, fraction: float, seed: int, target: str = "ffn2"):
        """A mask of ``fraction`` of every target layer's connections, at random (1.0 = all)."""
        fia = self.fia
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for layer in fia.find_target_layers(self.model.model.diffusion_model, target):
            n = layer.numel
            idx = torch.arange(n) if fraction >= 1.0 else torch.randperm(n, generator=g)[:int(fraction * n)].sort().values
            layers[layer.key] = fia.LayerMask(layer.shape, idx)
        ref = (self.concept_mask(self.cfg.concepts[0], self.cfg.sweep_r2[0], self.cfg.saliency_modes()[0])
               if target == "ffn2" else None)
        return fia.ConceptMask(concepts=(f"{fraction:.0%} of {target}",), target=target, layers=layers,
                               architecture=ref.architecture if ref else "", fingerprint=ref.fingerprint if ref else "",
                               params={"fraction": fraction, "seed": seed})

    def judge_mask(self, mask, split: str) -> dict:
        """judge_model of the model patched with ``mask`` (FIAApplyMask); masks that prune the
        same connections (e.g. FIA and union for one concept) are judged once."""
        import hashlib
        h = hashlib.sha256()
        for key, lm in mask.layers.items():
            h.update(key.encode())
            h.update(lm.indices.numpy().tobytes())
        digest = (h.hexdigest(), split)
        if digest not in self._judged:
            self._judged[digest] = self.judge_model(self.apply(mask), split)
        return self._judged[digest]

    def sparsity(self, mask) -> dict:
        s = mask.stats()
        return {"ffn2_pruned": s["total_pruned"], "ffn2_fraction": s["pruned_fraction"],
                "unet_fraction": s["total_pruned"] / self.unet_params, "agnostic_kept": s.get("agnostic_kept", 0)}


def score(acc: dict, forget) -> dict:
    forget = list(forget)
    keep = [c for c in acc if c not in forget]
    f = float(np.mean([acc[c] for c in forget]))
    p = float(np.mean([acc[c] for c in keep])) if keep else float("nan")
    return {"F": f, "P": p, "H": harmonic(p, f) if keep else float("nan"),
            "forget_acc": {c: acc[c] for c in forget}}


def run(cfg: Config, out_dir: Path = RESULTS, prefix: str = "toy", log_fn=print, pictures: bool = True) -> dict:

    t_start = time.time()
    comfyui.import_comfy()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out_dir, prefix, log_fn, pictures, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: Config, out_dir: Path, prefix: str, log_fn, pictures: bool, t_start: float) -> dict:
    bench = Bench(cfg, log_fn)
    say = log_fn

    def judge(model, split):
        return bench.judge_model(model, split)

    # -- unpruned ----------------------------------------------------------------------
    base = {split: judge(bench.model, split) for split in ("val", "test")}
    say(f"[bench] unpruned: test accuracy {100 * np.mean(list(base['test']['acc'].values())):.1f} % "
        f"({time.time() - t_start:.0f} s)")

    # -- how much of the concepts FFN2 carries at all: zero all of it, or half at random ----
    ablation = {}
    for name, frac in (("all FFN2 zeroed", 1.0), ("50 % of FFN2 zeroed at random", 0.5)):
        acc = bench.judge_mask(bench.fraction_mask(frac, cfg.random_seed + 99), "test")["acc"]
        ablation[name] = acc
        say(f"[bench] {name}: accuracy {100 * np.mean(list(acc.values())):.1f} % ({time.time() - t_start:.0f} s)")

    # -- sweep on the validation split --------------------------------------------------
    sweep = []
    for mode, r2, alpha in ((m, r, a) for m in cfg.saliency_modes() for r in cfg.sweep_r2 for a in (*cfg.sweep_alpha, None)):
        rows = []
        for half in cfg.halves[:cfg.sweep_halves]:
            mask = bench.fused(half, r2, alpha, mode)
            acc = bench.judge_mask(mask, "val")["acc"]
            rows.append({**score(acc, half), **bench.sparsity(mask)})
        entry = {"mode": mode, "r2": r2, "alpha": alpha, "fusion": "union" if alpha is None else "concept-agnostic",
                 "F": float(np.mean([r["F"] for r in rows])), "P": float(np.mean([r["P"] for r in rows])),
                 "ffn2_fraction": float(np.mean([r["ffn2_fraction"] for r in rows])),
                 "agnostic_kept": float(np.mean([r["agnostic_kept"] for r in rows]))}
        entry["H"] = harmonic(entry["P"], entry["F"])
        sweep.append(entry)
        say(f"[bench] sweep {mode} r2={r2} alpha={alpha}: F {100 * entry['F']:.1f} P {100 * entry['P']:.1f} "
            f"H {100 * entry['H']:.1f} sparsity {100 * entry['ffn2_fraction']:.2f} % "
            f"({time.time() - t_start:.0f} s)")
    fia_rows = [e for e in sweep if e["alpha"] is not None]
    best = max(fia_rows, key=lambda e: (e["H"], -e["ffn2_fraction"]))
    r2 = cfg.r2 if cfg.r2 is not None else best["r2"]
    alpha = cfg.alpha if cfg.alpha is not None else best["alpha"]
    mode = best["mode"]
    say(f"[bench] chosen on the validation split: mode={mode} r2={r2} alpha={alpha}")

    # -- the main table on the test split -----------------------------------------------
    paper = ("fast", cfg.paper_r2, cfg.paper_alpha)  # the reference code's statistic and the paper's r2 / alpha
    groups = (("1 concept", [(c,) for c in cfg.singles]), ("2 concepts", [tuple(p) for p in cfg.pairs]),
              (f"half ({len(cfg.halves[0])} concepts)", [tuple(h) for h in cfg.halves]))
    table = []
    samples = {}
    test_acc0 = base["test"]["acc"]
    for group, sets in groups:
        for forget in sets:
            forget = tuple(forget)
            rows = {"unpruned": {**score(test_acc0, forget), "ffn2_fraction": 0.0, "unet_fraction": 0.0,
                                 "acc": test_acc0}}
            fia_mask = bench.fused(forget, r2, alpha, mode)
            union_mask = bench.fused(forget, r2, None, mode)
            variants = [("random", bench.random_like(fia_mask, cfg.random_seed + len(table))),
                        ("union", union_mask), ("FIA", fia_mask)]
            if paper != (mode, r2, alpha) and group.startswith("half"):
                variants.append(("FIA (paper defaults)", bench.fused(forget, cfg.paper_r2, cfg.paper_alpha, paper[0])))
            for name, mask in variants:
                res = bench.judge_mask(mask, "test")
                rows[name] = {**score(res["acc"], forget), **bench.sparsity(mask), "acc": res["acc"]}
                if name == "FIA" and forget == tuple(cfg.halves[0]):
                    samples["FIA"] = res["latents"]
            table.append({"group": group, "forget": list(forget), "rows": rows})
            say(f"[bench] {group} {'+'.join(forget)}: " + "; ".join(
                f"{k} F {100 * v['F']:.0f} P {100 * v['P']:.0f}" for k, v in rows.items()) +
                f" ({time.time() - t_start:.0f} s)")

    summary = summarize(table)
    result = {
        "config": asdict(cfg), "chosen": {"mode": mode, "r2": r2, "alpha": alpha, "selected_on": "validation split, max H forgetting half"},
        "classifier_on_unpruned": {"test": base["test"]["acc"], "val": base["val"]["acc"]},
        "table": table, "summary": summary, "sweep": sweep, "ffn2_ablation": ablation,
        "targets": targets(summary, table),
        "unet_params": bench.unet_params,
        "ffn2_connections": sum(l.numel for l in bench.concept_mask(cfg.concepts[0], r2, mode).layers.values()),
        "ffn2_layers": len(bench.concept_mask(cfg.concepts[0], r2, mode).layers),
        "seconds": round(time.time() - t_start, 1), "timing": {k: round(v, 1) for k, v in bench.timing.items()},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}_benchmark.json").write_text(json.dumps(result, indent=1))
    (out_dir / f"{prefix}_benchmark.md").write_text(markdown(result))
    if pictures:
        plot_sweep(sweep, out_dir / f"{prefix}_sweep.png", r2, alpha, mode)
        if "FIA" in samples:
            before_after_sheet(base["test"]["latents"], samples["FIA"], cfg, tuple(cfg.halves[0]),
                               out_dir / f"{prefix}_samples.png")
    say(f"[bench] wrote {out_dir}/{prefix}_benchmark.md ({result['seconds']:.0f} s)")
    return result


def summarize(table: list) -> dict:
    """Mean F / P / H / sparsity per group and method."""
    out: dict[str, dict] = {}
    for entry in table:
        g = out.setdefault(entry["group"], {})
        for method, r in entry["rows"].items():
            m = g.setdefault(method, {"F": [], "P": [], "ffn2_fraction": [], "unet_fraction": []})
            for k in m:
                m[k].append(r[k])
    for g in out.values():
        for method, m in g.items():
            f, p = float(np.mean(m["F"])), float(np.mean(m["P"]))
            g[method] = {"F": f, "P": p, "H": harmonic(p, f), "ffn2_fraction": float(np.mean(m["ffn2_fraction"])),
                         "unet_fraction": float(np.mean(m["unet_fraction"])), "sets": len(m["F"])}
    return out


def targets(summary: dict, table: list) -> dict:
    """The issue's targets, checked on the test split (half = the half-concept group)."""
    half = [g for g in summary if g.startswith("half")][0]
    fia, base = summary[half]["FIA"], summary[half]["unpruned"]
    max_random = 0.0
    for entry in table:
        acc0, accr = entry["rows"]["unpruned"]["acc"], entry["rows"]["random"]["acc"]
        max_random = max(max_random, max(abs(accr[c] - acc0[c]) for c in acc0))
    checks = {
        "fia_overall_half_>=85%": {"value": fia["H"], "ok": fia["H"] >= 0.85},
        "erased_drop_>=80pt": {"value": base["F"] - fia["F"], "ok": base["F"] - fia["F"] >= 0.80},
        "preserved_drop_<=10pt": {"value": base["P"] - fia["P"], "ok": base["P"] - fia["P"] <= 0.10},
        "random_max_change_<=10pt": {"value": max_random, "ok": max_random <= 0.10},
    }
    return checks


def pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# FIA forget/preserve benchmark on the toy model",
        "",
        f"Generated by `python -m benchmarks.toy.evaluate` in {res['seconds']:.0f} s. Model: "
        f"benchmarks/toy/weights/{M.CHECKPOINT_NAME} ({res['unet_params']:,} UNet weights, "
        f"{res['ffn2_connections']:,} FFN2 connections in {res['ffn2_layers']} layers). "
        f"{len(cfg['concepts'])} concepts, {cfg['test_images']} test images per concept "
        f"({cfg['sampler']}/{cfg['scheduler']}, {cfg['sample_steps']} steps, CFG {cfg['cfg']}), judged by the toy classifier.",
        "",
        f"FIA settings: r1 = {cfg['r1']}, saliency from the first {cfg['saliency_steps']} of {cfg['saliency_schedule']} "
        f"steps, {cfg['num_prompts'] or 'all 30 (the reference set)'} prompt pairs per concept (template 'objects'); saliency mode "
        f"{res['chosen']['mode']}, r2 = {res['chosen']['r2']}, alpha = {res['chosen']['alpha']} (chosen on the "
        f"validation split: best H when forgetting half). Union = the same concept masks, fused by naive union. "
        f"Random = as many FFN2 connections per layer as FIA prunes, at random. FIA (paper defaults) = mode fast "
        f"(the reference code's statistic), r2 = {cfg['paper_r2']}, alpha = {cfg['paper_alpha']}.",
        "",
        "F = forgetting accuracy on erased concepts (lower is better), P = preserving accuracy on the others, "
        "H = harmonic mean of P and 1 - F, sparsity = pruned share of FFN2 connections (of all UNet weights). "
        "All in %, means over the forget sets of each group.",
        "",
        "| forget | method | F | P | H | sparsity FFN2 (UNet) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group, methods in res["summary"].items():
        for method, m in methods.items():
            lines.append(f"| {group} | {method} | {pct(m['F'])} | {pct(m['P'])} | {pct(m['H'])} | "
                         f"{100 * m['ffn2_fraction']:.2f} ({100 * m['unet_fraction']:.3f}) |")
    lines += ["", "## Per forget set", "",
              "| forget | method | F per erased concept | F | P | H |", "|---|---|---|---:|---:|---:|"]
    for entry in res["table"]:
        for method, r in entry["rows"].items():
            per = ", ".join(f"{c} {pct(v)}" for c, v in r["forget_acc"].items())
            lines.append(f"| {'+'.join(entry['forget'])} | {method} | {per} | {pct(r['F'])} | {pct(r['P'])} | {pct(r['H'])} |")
    half = [e for e in res["table"] if e["group"].startswith("half")]
    if half:
        lines += ["", "## Per-concept accuracy, forgetting half (test split)", ""]
        for entry in half:
            methods = list(entry["rows"])
            lines += [f"Erased: {', '.join(entry['forget'])}", "",
                      "| concept | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
            for c in cfg["concepts"]:
                mark = " (erased)" if c in entry["forget"] else ""
                lines.append(f"| {c}{mark} | " + " | ".join(pct(entry["rows"][m]["acc"][c]) for m in methods) + " |")
            lines.append("")
    n_halves = cfg.get("sweep_halves", len(cfg["halves"]))
    which = "the first half" if n_halves == 1 else f"the first {n_halves} halves (means)"
    lines += [f"## Sweep (validation split, forgetting {which})", "",
              "| mode | r2 | fusion | alpha | F | P | H | sparsity FFN2 | agnostic kept |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for e in res["sweep"]:
        lines.append(f"| {e['mode']} | {e['r2']} | {e['fusion']} | {e['alpha'] if e['alpha'] is not None else '-'} | {pct(e['F'])} | "
                     f"{pct(e['P'])} | {pct(e['H'])} | {100 * e['ffn2_fraction']:.2f} | {e['agnostic_kept']:.0f} |")
    abl = res.get("ffn2_ablation") or {}
    if abl:
        names = list(abl)
        lines += ["", "## How much of each concept FFN2 carries (test split, unpruned = 100 % here means "
                  "the classifier recognised every image)", "",
                  "| concept | unpruned | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        base = res["classifier_on_unpruned"]["test"]
        for c in cfg["concepts"]:
            lines.append(f"| {c} | {pct(base[c])} | " + " | ".join(pct(abl[n][c]) for n in names) + " |")
        lines.append("| mean | " + pct(float(np.mean(list(base.values())))) + " | " +
                     " | ".join(pct(float(np.mean(list(abl[n].values())))) for n in names) + " |")
        lines += ["", "A concept still recognised with all of FFN2 zeroed does not need FFN2 in this model: "
                  "pruning a few FFN2 connections (FIA) is not expected to erase it."]
    lines += ["", "## Targets (issue 5, test split)", "", "| target | value | met |", "|---|---:|---|"]
    for name, t in res["targets"].items():
        lines.append(f"| {name} | {pct(t['value'])} | {'yes' if t['ok'] else 'no'} |")
    lines += ["", f"Timing (s): {res['timing']}", ""]
    return "\n".join(lines)


# -- pictures ------------------------------------------------------------------------

def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def plot_sweep(sweep: list, path: Path, r2_star: float, alpha_star: float, mode: str) -> None:
    """Two panels, for the chosen saliency mode: H vs r2 per alpha (and union); F and P vs FFN2 sparsity."""
    from PIL import Image, ImageDraw

    sweep = [e for e in sweep if e["mode"] == mode]
    W, Hh, pad = 980, 420, 60
    img = Image.new("RGB", (W, Hh), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    r2s = sorted({e["r2"] for e in sweep})
    alphas = [a for a in dict.fromkeys(e["alpha"] for e in sweep)]
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    panel_w = (W - 3 * pad) // 2

    def axes(x0, title, xlabel, xs, xfmt, logx):
        d.rectangle([x0, pad, x0 + panel_w, Hh - pad], outline=(0, 0, 0))
        d.text((x0, 15), title, fill=(0, 0, 0), font=font)
        d.text((x0 + panel_w // 2 - 40, Hh - 25), xlabel, fill=(0, 0, 0), font=font)
        for v in range(0, 101, 20):
            y = Hh - pad - (Hh - 2 * pad) * v / 100
            d.line([x0 - 4, y, x0, y], fill=(0, 0, 0))
            d.text((x0 - 30, y - 7), f"{v}", fill=(0, 0, 0), font=font)
            d.line([x0 + 1, y, x0 + panel_w - 1, y], fill=(235, 235, 235))
        lo, hi = (math.log(min(xs)), math.log(max(xs))) if logx else (min(xs), max(xs))
        span = (hi - lo) or 1.0

        def X(v):
            t = ((math.log(v) if logx else v) - lo) / span
            return x0 + 15 + (panel_w - 30) * t
        for v in xs:
            d.line([X(v), Hh - pad, X(v), Hh - pad + 4], fill=(0, 0, 0))
            d.text((X(v) - 12, Hh - pad + 6), xfmt(v), fill=(0, 0, 0), font=font)
        return X

    def Y(v):
        return Hh - pad - (Hh - 2 * pad) * v

    X = axes(pad, f"overall score H (%) vs r2 (validation, forget half, {mode} saliency)", "r2", r2s, lambda v: f"{v:g}", True)
    for i, a in enumerate(alphas):
        pts = [(X(e["r2"]), Y(e["H"])) for e in sweep if e["alpha"] == a]
        col = colors[i % len(colors)]
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
        d.text((pad + 10, pad + 8 + 15 * i), f"alpha {a}" if a is not None else "union", fill=col, font=font)
    star = [e for e in sweep if e["r2"] == r2_star and e["alpha"] == alpha_star]
    if star:
        x, y = X(star[0]["r2"]), Y(star[0]["H"])
        d.rectangle([x - 6, y - 6, x + 6, y + 6], outline=(0, 0, 0), width=2)

    fia = [e for e in sweep if e["alpha"] == alpha_star] or sweep
    xs = sorted({max(e["ffn2_fraction"], 1e-4) * 100 for e in fia})
    X2 = axes(2 * pad + panel_w, f"F and P (%) vs FFN2 sparsity (%), alpha {alpha_star}", "pruned FFN2 connections (%)",
              xs if len(xs) > 1 else xs + [xs[0] * 2], lambda v: f"{v:.2g}", True)
    for key, col in (("F", (214, 39, 40)), ("P", (44, 160, 44)), ("H", (31, 119, 180))):
        pts = sorted((X2(max(e["ffn2_fraction"], 1e-4) * 100), Y(e[key])) for e in fia)
        d.line(pts, fill=col, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=col)
    d.text((2 * pad + panel_w + 10, pad + 8), "F forgetting acc (lower is better)", fill=(214, 39, 40), font=font)
    d.text((2 * pad + panel_w + 10, pad + 23), "P preserving acc", fill=(44, 160, 44), font=font)
    d.text((2 * pad + panel_w + 10, pad + 38), "H overall", fill=(31, 119, 180), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def before_after_sheet(before, after, cfg: Config, forget, path: Path) -> None:
    """Rows = concepts (erased ones marked), left = unpruned, right = FIA; test images."""
    from PIL import Image, ImageDraw

    k = cfg.samples_per_concept
    n = cfg.test_images
    tile, gap, label_w = 48, 4, 110
    cols = 2 * k
    font = _font()
    title = f"FIA: forget {', '.join(forget)}"
    right = label_w + k * (tile + gap) + 16
    W = max(label_w + cols * (tile + gap) + 20,
            right + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 10)
    Hh = 30 + len(cfg.concepts) * (tile + gap)
    img = Image.new("RGB", (W, Hh), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((label_w, 8), "unpruned", fill=(0, 0, 0), font=font)
    d.text((right, 8), title, fill=(0, 0, 0), font=font)
    pb, pa = M.latent_to_pixels(before).numpy(), M.latent_to_pixels(after).numpy()
    for r, c in enumerate(cfg.concepts):
        y = 30 + r * (tile + gap)
        d.text((6, y + tile // 2 - 7), c + (" (erased)" if c in forget else ""),
               fill=(200, 0, 0) if c in forget else (0, 0, 0), font=font)
        for j in range(k):
            for side, arr, off in (("b", pb, 0), ("a", pa, k * (tile + gap) + 16)):
                a = ((np.clip(arr[r * n + j].transpose(1, 2, 0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
                t = Image.fromarray(a).resize((tile, tile), Image.NEAREST)
                img.paste(t, (label_w + off + j * (tile + gap), y))
    img.save(path)


#: What the method offers beyond the nodes' defaults, tried on the validation split
#: (forgetting the first half): saliency mode, saliency window, r1, target layers.
#: Target layers other than FFN2 are not exposed by the nodes; this uses the pack's own
#: saliency runner (nodes/saliency.py) with SaliencySettings(target=...).
EXPLORE = {
    "ffn2, fast, T=10/50 (nodes' default)": dict(target="ffn2", mode="fast"),
    "ffn2, exact (Eq. 1 with cosine)": dict(target="ffn2", mode="exact"),
    "ffn2, fast, T=25/50": dict(target="ffn2", mode="fast", saliency_steps=25),
    "ffn2, exact, T=25/50": dict(target="ffn2", mode="exact", saliency_steps=25),
    "ffn2, fast, r1=0.2": dict(target="ffn2", mode="fast", r1=0.2),
    "ffn1, fast": dict(target="ffn1", mode="fast"),
    "cross-attn k/v, fast": dict(target="cross_attn_kv", mode="fast"),
    "cross-attn k/v, exact": dict(target="cross_attn_kv", mode="exact"),
}
EXPLORE_R2 = (0.1, 0.3)


def explore(cfg: Config, out_dir: Path = RESULTS, prefix: str = "toy", log_fn=print, variants=None) -> dict:
    """The EXPLORE variants x r2 in EXPLORE_R2 x (alpha, union) on the validation split."""

    t0 = time.time()
    comfyui.import_comfy()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        bench = Bench(cfg, log_fn)
        runner = bench.pack.nodes.saliency
        adapter = bench.pack.nodes.comfy_adapter
        fia = bench.fia
        half = tuple(cfg.halves[0])
        alpha = cfg.alpha if cfg.alpha is not None else cfg.paper_alpha
        base = bench.judge_model(bench.model, "val")["acc"]
        rows = []
        for name, v in (variants or EXPLORE).items():
            settings = runner.SaliencySettings(
                steps=cfg.saliency_schedule, saliency_steps=v.get("saliency_steps", cfg.saliency_steps),
                cfg=cfg.saliency_cfg, seed=cfg.saliency_seed, width=8 * D.SIZE, height=8 * D.SIZE,
                mode=v["mode"], batch_size=cfg.saliency_batch, r1=v.get("r1", cfg.r1), target=v["target"])
            sal = {}
            for c in half:
                pairs = fia.build_prompt_pairs(c, "objects", cfg.num_prompts or None, cfg.saliency_seed)
                sal[c] = runner.concept_saliency(bench.model, bench.clip, c, pairs, settings).saliency
            for r2 in EXPLORE_R2:
                masks = [fia.select_concept_mask(sal[c], r2) for c in half]
                for a in (alpha, None):
                    fused = fia.fuse_masks(masks, a)
                    acc = bench.judge_model(adapter.apply_mask(bench.model, fused, 1.0), "val")["acc"]
                    s = score(acc, half)
                    st = fused.stats()
                    rows.append({"variant": name, **v, "r2": r2, "alpha": a, "F": s["F"], "P": s["P"], "H": s["H"],
                                 "fraction": st["pruned_fraction"], "pruned": st["total_pruned"], "acc": acc})
                    log_fn(f"[explore] {name} r2={r2} alpha={a}: F {100 * s['F']:.0f} P {100 * s['P']:.0f} "
                           f"H {100 * s['H']:.0f} pruned {100 * st['pruned_fraction']:.2f} % of {v['target']} "
                           f"({time.time() - t0:.0f} s)")
    finally:
        torch.set_num_threads(threads_before)
    res = {"config": asdict(cfg), "forget": list(half), "unpruned_val": base, "rows": rows,
           "seconds": round(time.time() - t0, 1)}
    lines = ["# What else the method offers, on the toy model (validation split)", "",
             f"Generated by `python -m benchmarks.toy.evaluate --explore` in {res['seconds']:.0f} s. Forgetting "
             f"{', '.join(half)} (the first half); {cfg.val_images} validation images per concept; "
             f"alpha = {alpha} or union. 'pruned' is the share of the target layers' connections. "
             "Targets other than FFN2 go through the pack's saliency runner (the nodes expose FFN2 only).", "",
             "| variant | r2 | fusion | F | P | H | pruned | " + " | ".join(c[:5] for c in cfg.concepts) + " |",
             "|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(cfg.concepts)]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['r2']} | {'union' if r['alpha'] is None else 'alpha ' + str(r['alpha'])} | "
                     f"{pct(r['F'])} | {pct(r['P'])} | {pct(r['H'])} | {100 * r['fraction']:.2f} % | " +
                     " | ".join(pct(r["acc"][c]) for c in cfg.concepts) + " |")
    lines.append("")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{prefix}_explore.json").write_text(json.dumps(res, indent=1))
    (out_dir / f"{prefix}_explore.md").write_text("\n".join(lines))
    log_fn(f"[explore] wrote {out_dir}/{prefix}_explore.md")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long slice (3 concepts, tiny sampling)")
    p.add_argument("--explore", action="store_true",
                   help="instead of the benchmark: other saliency modes, windows, r1 and target layers (toy_explore.md)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--prefix", default=None, help="output name prefix (default toy, toy_quick with --quick)")
    p.add_argument("--test-images", type=int, default=None)
    p.add_argument("--val-images", type=int, default=None)
    p.add_argument("--sample-steps", type=int, default=None)
    p.add_argument("--r1", type=float, default=None)
    p.add_argument("--r2", type=float, default=None, help="fix r2 of the main table (default: chosen by the sweep)")
    p.add_argument("--alpha", type=float, default=None, help="fix alpha of the main table (default: chosen by the sweep)")
    p.add_argument("--mode", choices=("fast", "exact"), default=None)
    p.add_argument("--sweep-r2", default=None, help="comma-separated r2 values")
    p.add_argument("--sweep-alpha", default=None, help="comma-separated alpha values")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads thrashed)")
    p.add_argument("--checkpoint", default=None, help="toy checkpoint (default: the shipped one)")
    p.add_argument("--classifier", default=None, help="toy classifier (default: the shipped one)")
    args = p.parse_args(argv)

    cfg = Config(**QUICK) if args.quick else Config()
    over = {k: v for k, v in (("test_images", args.test_images), ("val_images", args.val_images),
                              ("sample_steps", args.sample_steps), ("r1", args.r1), ("r2", args.r2),
                              ("alpha", args.alpha), ("mode", args.mode), ("threads", args.threads),
                              ("checkpoint", args.checkpoint), ("classifier", args.classifier)) if v is not None}
    if args.sweep_r2:
        over["sweep_r2"] = tuple(float(x) for x in args.sweep_r2.split(","))
    if args.sweep_alpha:
        over["sweep_alpha"] = tuple(float(x) for x in args.sweep_alpha.split(","))
    cfg = replace(cfg, **over)
    prefix = args.prefix or ("toy_quick" if args.quick else "toy")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fia_toy_bench_") as base:
        comfyui.import_comfy(base)
        import comfy.utils
        comfy.utils.PROGRESS_BAR_ENABLED = False
        if args.explore:
            explore(cfg, args.out_dir, prefix, log_fn=lambda s: print(s, flush=True))
            return 0
        res = run(cfg, args.out_dir, prefix, log_fn=lambda s: print(s, flush=True))
    for name, t in res["targets"].items():
        print(f"[bench] target {name}: {pct(t['value'])} -> {'met' if t['ok'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
