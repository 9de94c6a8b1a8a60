"""The pack's main job, headless: forget two concepts with the pack's example workflow in a
real ComfyUI, on the embedded default model. From the repository root:

    bash demo/run.sh                                        # sets up the env, writes ./out/demo
    $PY -m demo.forget_concepts --forget ring,star --out /tmp/demo   # the same, env already set up

What it does, with nothing but the repository and the shipped toy weights
(benchmarks/toy/weights, see benchmarks/toy/README.md):
1. starts the test ComfyUI (``python main.py --cpu``, devkit.server.ComfyServer; 0.3.75
   unless FIA_COMFYUI_VERSION says otherwise) in a temporary base directory, with this pack
   in custom_nodes/, the toy checkpoint in models/checkpoints/ and devkit's test-only
   package that registers the toy model's config for ComfyUI's model detection (it is an
   SD1.5-family model far smaller than SD1.5);
2. converts example_workflows/FIA_before_after.json to the API format with the
   server's /object_info (as the editor does) and fills in the toy checkpoint, the
   concepts to forget, the toy image size (128 x 128) and sampling settings;
3. queues it once per concept (prompt "a <concept> in a <place>"): the saliency, mask
   and fusion nodes run once (ComfyUI caches them), the two KSamplers ("before" with the
   original model, "after" with the FIA-patched one) run for every prompt from the same
   seed;
4. writes to --out: before_after.png (rows = concepts, erased ones in red; left the
   original model, right after FIA), mask_report.txt (FIAMaskInfo's report),
   metrics.json (the toy classifier's verdict on every saved image: forgetting and
   preserving accuracy, overall score, pruned fraction), workflow_api.json (the graph
   that ran) and comfyui-server.log.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from devkit import server as S
from devkit import workflow_convert as WC
from devkit.comfyui import REPO_ROOT
from devkit.toy import data as D
from devkit.toy import model as M

WORKFLOW = REPO_ROOT / "example_workflows" / "FIA_before_after.json"

#: Defaults of the demo: mode, r2 and alpha are the FIA settings the benchmark chose on
#: its validation split (benchmarks/results/toy_benchmark.md: exact saliency, r2 0.3,
#: alpha 0.8). The two concepts are cross and triangle: with heart, the only ones this
#: model cannot draw without FFN2 (with every FFN2 connection zeroed they are recognised
#: 0 % / 8 % of the time; circle, moon and the rest mostly still are), so the only ones
#: FFN2 pruning can reach on this model. With these defaults both are erased (forgetting
#: accuracy 100 % -> 12.5 %, preserving 100 %; two concepts fuse to the union of their
#: masks, since a connection counts as concept-agnostic only when three concepts share it:
#: benchmarks/results/demo_metrics.json). The rest of
#: the settings mirror the benchmark (20 euler steps, CFG 5; saliency: first 10 of 50
#: steps, the reference's full set of 30 prompt pairs).
DEFAULTS = dict(forget=("cross", "triangle"), mode="exact", r1=0.05, r2=0.3, alpha=0.8, fusion="concept-agnostic",
                steps=20, cfg=5.0, seed=42, images=4, saliency_schedule=50, saliency_steps=10, num_prompts=0,
                saliency_batch=10)
FAST = dict(concepts=("circle", "heart", "square"), images=2, steps=6, saliency_schedule=6, saliency_steps=3,
            num_prompts=2, saliency_batch=2)

def nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == class_type]


def upstream_model_is_patched(prompt: dict, ksampler_id: str) -> bool:
    """True when the KSampler's model comes through FIAApplyMask / FIAForgetConcepts."""
    seen = set()
    link = prompt[ksampler_id]["inputs"]["model"]
    while isinstance(link, list) and link[0] not in seen:
        seen.add(link[0])
        node = prompt[link[0]]
        if node["class_type"] in ("FIAApplyMask", "FIAForgetConcepts"):
            return True
        link = node["inputs"].get("model")
    return False


def prepare(prompt: dict, opts: dict) -> dict:
    """Fill the converted example workflow with the toy model's settings. Returns node ids
    {"before": SaveImage, "after": SaveImage, "positive": CLIPTextEncode, "info": FIAMaskInfo}."""
    (ckpt,) = nodes_of(prompt, "CheckpointLoaderSimple")
    prompt[ckpt]["inputs"]["ckpt_name"] = M.CHECKPOINT_NAME
    sal = nodes_of(prompt, "FIAConceptSaliency")
    if len(sal) != len(opts["forget"]):
        raise SystemExit(f"the example workflow has {len(sal)} FIAConceptSaliency nodes; "
                         f"--forget must name as many concepts")
    for nid, concept in zip(sorted(sal, key=int), opts["forget"]):
        prompt[nid]["inputs"].update(concept=concept, template="objects", r1=opts["r1"], mode=opts["mode"],
                                     steps=opts["saliency_schedule"], saliency_steps=opts["saliency_steps"],
                                     cfg=opts["cfg"], width=8 * D.SIZE, height=8 * D.SIZE,
                                     num_prompts=opts["num_prompts"], batch_size=opts["saliency_batch"], seed=0)
    for nid in nodes_of(prompt, "FIABuildConceptMask"):
        prompt[nid]["inputs"]["r2"] = opts["r2"]
    for nid in nodes_of(prompt, "FIAFuseMasks"):
        prompt[nid]["inputs"].update(alpha=opts["alpha"], fusion=opts["fusion"])
    for nid in nodes_of(prompt, "EmptyLatentImage"):
        prompt[nid]["inputs"].update(width=8 * D.SIZE, height=8 * D.SIZE, batch_size=opts["images"])
    ids = {}
    for nid in nodes_of(prompt, "KSampler"):
        prompt[nid]["inputs"].update(seed=opts["seed"], steps=opts["steps"], cfg=opts["cfg"],
                                     sampler_name="euler", scheduler="normal", denoise=1.0)
        side = "after" if upstream_model_is_patched(prompt, nid) else "before"
        ids.setdefault("positive", prompt[nid]["inputs"]["positive"][0])
        prompt[prompt[nid]["inputs"]["negative"][0]]["inputs"]["text"] = ""
        for save in nodes_of(prompt, "SaveImage"):
            dec = prompt[save]["inputs"]["images"][0]
            if prompt[dec]["inputs"]["samples"][0] == nid:
                ids[side] = save
                prompt[save]["inputs"]["filename_prefix"] = f"fia_demo/{side}"
    info = nodes_of(prompt, "FIAMaskInfo")
    ids["info"] = info[0] if info else None
    ids["fuse"] = (nodes_of(prompt, "FIAFuseMasks") or [None])[0]
    if not {"before", "after", "positive"} <= set(ids):
        raise SystemExit("could not find the before/after KSampler -> VAEDecode -> SaveImage chains in "
                         f"{WORKFLOW.name}")
    return ids


def row_prompt(concept: str, i: int) -> str:
    place = D.PLACE_NAMES[(7 * i + 3) % len(D.PLACE_NAMES)]
    return f"a {concept} in a {place}"


def load_images(base: Path, entry: dict, node_id: str) -> list[np.ndarray]:
    from PIL import Image
    out = []
    for im in entry["outputs"][node_id]["images"]:
        path = base / "output" / im.get("subfolder", "") / im["filename"]
        out.append(np.asarray(Image.open(path).convert("RGB")))
    return out


def grid(rows: list[tuple[str, bool, list, list]], path: Path, title: str) -> None:
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:
        font = ImageFont.load_default()
    k = max(len(r[2]) for r in rows)
    tile, gap, label_w, top = 96, 6, 130, 50
    W = label_w + 2 * k * (tile + gap) + 30
    W = max(W, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 16)
    H = top + len(rows) * (tile + gap) + 8
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=(0, 0, 0), font=font)
    d.text((label_w, 28), "before (original model)", fill=(0, 0, 0), font=font)
    d.text((label_w + k * (tile + gap) + 24, 28), "after FIA (same seeds)", fill=(0, 0, 0), font=font)
    for r, (concept, erased, before, after) in enumerate(rows):
        y = top + r * (tile + gap)
        d.text((8, y + tile // 2 - 8), concept + (" (erased)" if erased else ""),
               fill=(200, 0, 0) if erased else (0, 0, 0), font=font)
        for j, a in enumerate(before):
            img.paste(Image.fromarray(a).resize((tile, tile), Image.NEAREST), (label_w + j * (tile + gap), y))
        for j, a in enumerate(after):
            img.paste(Image.fromarray(a).resize((tile, tile), Image.NEAREST),
                      (label_w + k * (tile + gap) + 24 + j * (tile + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def judge(images: list[np.ndarray]) -> list[str]:
    import torch
    from devkit.toy import classifier as C
    net = C.load()
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    pred = C.classify(net, M.image_to_pixels(x))
    return [D.CLASS_NAMES[int(k)] for k in pred]


def run(out: Path, opts: dict, log=print) -> dict:
    t0 = time.time()
    ckpt = Path(opts.get("checkpoint") or M.CHECKPOINT)
    if not ckpt.is_file():
        raise SystemExit(f"missing {ckpt}: train it with python -m benchmarks.toy.train")
    out.mkdir(parents=True, exist_ok=True)
    workflow = json.loads(WORKFLOW.read_text())
    # One torch thread in the server unless the caller chose: on a small machine shared with
    # other jobs, two OpenMP threads made each sampling step up to 80x slower.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="fia_demo_") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        # tiny_models: devkit's server plugin, which registers the toy model's config too
        server = S.ComfyServer(base, custom_nodes={S.PACK_DIR_NAME: REPO_ROOT}, tiny_models=True,
                               models={f"checkpoints/{M.CHECKPOINT_NAME}": ckpt},
                               wait_for="/object_info/FIAConceptSaliency", log_path=tmp / "server.log")
        try:
            with server:
                log(f"[demo] ComfyUI ready at {server.url} ({time.time() - t0:.0f} s)")
                object_info = server.get("/object_info")
                prompt = WC.convert(workflow, object_info)
                ids = prepare(prompt, opts)
                (out / "workflow_api.json").write_text(json.dumps(prompt, indent=1))
                queued = []
                for i, concept in enumerate(opts["concepts"]):
                    p = json.loads(json.dumps(prompt))
                    p[ids["positive"]]["inputs"]["text"] = row_prompt(concept, i)
                    queued.append((concept, row_prompt(concept, i), server.post_prompt(p)))
                rows, report, fuse_summary = [], None, None
                for concept, text, pid in queued:
                    entry = server.wait(pid, timeout=600)
                    before = load_images(base, entry, ids["before"])
                    after = load_images(base, entry, ids["after"])
                    rows.append((concept, concept in opts["forget"], before, after, text))
                    if report is None and ids["info"] and ids["info"] in entry["outputs"]:
                        report = entry["outputs"][ids["info"]]["text"][0]
                    if fuse_summary is None and ids["fuse"] and ids["fuse"] in entry["outputs"]:
                        fuse_summary = entry["outputs"][ids["fuse"]].get("fia_summary", [None])[0]
                    log(f"[demo] {text}: done ({time.time() - t0:.0f} s)")
        finally:
            if (tmp / "server.log").is_file():
                shutil.copy(tmp / "server.log", out / "comfyui-server.log")

    grid([r[:4] for r in rows], out / "before_after.png",
         f"FIA on the toy model: forget {', '.join(opts['forget'])} "
         f"({opts['mode']} saliency, r2 {opts['r2']}, {opts['fusion']}"
         f"{' alpha ' + str(opts['alpha']) if opts['fusion'] != 'union' else ''}, example workflow FIA_before_after)")
    (out / "mask_report.txt").write_text((report or "(FIAMaskInfo gave no report)") + "\n")
    verdict = {}
    for concept, erased, before, after, text in rows:
        pb, pa = judge(before), judge(after)
        verdict[concept] = {"prompt": text, "erased": erased, "before": pb, "after": pa,
                            "acc_before": float(np.mean([p == concept for p in pb])),
                            "acc_after": float(np.mean([p == concept for p in pa]))}
    forget = [c for c in verdict if verdict[c]["erased"]]
    keep = [c for c in verdict if not verdict[c]["erased"]]

    def mean(cs, key):
        return float(np.mean([verdict[c][key] for c in cs])) if cs else float("nan")

    f_b, f_a, p_b, p_a = mean(forget, "acc_before"), mean(forget, "acc_after"), mean(keep, "acc_before"), mean(keep, "acc_after")
    h = 0.0 if p_a + (1 - f_a) == 0 else 2 * p_a * (1 - f_a) / (p_a + 1 - f_a)
    metrics = {
        "forget": list(opts["forget"]), "settings": {k: v for k, v in opts.items() if k != "concepts"},
        "forgetting_accuracy": {"before": f_b, "after": f_a},
        "preserving_accuracy": {"before": p_b, "after": p_a},
        "overall_score_after": h,
        "mask": fuse_summary,
        "checkpoint": ckpt.name,
        "per_concept": verdict,
        "seconds": round(time.time() - t0, 1),
        "judge": "benchmarks/toy/weights/fia_toy_classifier.safetensors on the saved PNGs (8x8 block means)",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log(f"[demo] forgetting accuracy {100 * f_b:.0f} % -> {100 * f_a:.0f} %, preserving "
        f"{100 * p_b:.0f} % -> {100 * p_a:.0f} %, overall {100 * h:.0f} %")
    log(f"[demo] wrote {out}/before_after.png, mask_report.txt, metrics.json ({time.time() - t0:.0f} s)")
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.add_argument("--forget", default=",".join(DEFAULTS["forget"]),
                   help=f"two concepts to forget, comma-separated, from: {', '.join(D.CONCEPTS)}")
    p.add_argument("--r2", type=float, default=DEFAULTS["r2"])
    p.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    p.add_argument("--mode", choices=("fast", "exact"), default=DEFAULTS["mode"], help="saliency mode (FIAConceptSaliency)")
    p.add_argument("--fusion", choices=("concept-agnostic", "union"), default=DEFAULTS["fusion"],
                   help="FIAFuseMasks fusion (union = the naive baseline)")
    p.add_argument("--fast", action="store_true", help="three concepts, two images, few steps (for tests)")
    p.add_argument("--checkpoint", type=Path, default=M.CHECKPOINT, help="toy checkpoint (default: the shipped one)")
    args = p.parse_args(argv)
    forget = tuple(c.strip() for c in args.forget.split(",") if c.strip())
    unknown = [c for c in forget if c not in D.CONCEPTS]
    if unknown:
        p.error(f"unknown concepts {unknown}; choose from {', '.join(D.CONCEPTS)}")
    opts = {**DEFAULTS, "forget": forget, "r2": args.r2, "alpha": args.alpha, "mode": args.mode,
            "fusion": args.fusion, "concepts": D.CONCEPTS,
            "checkpoint": str(args.checkpoint)}
    if args.fast:
        opts.update(FAST)
        opts["concepts"] = tuple(dict.fromkeys(forget + FAST["concepts"]))[:3]
    run(args.out, opts, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
