#!/usr/bin/env python
"""Full-size benchmark (issue 13 item 6): FIAForgetConcepts on random-weight, real-format
SD1.5 and SDXL checkpoints through a real ComfyUI server.

    $PY -m benchmarks.fullsize                       # both, CPU defaults below
    $PY -m benchmarks.fullsize --arch sd15 --size 256 --saliency-steps 10

The checkpoints come from devkit/fullsize.py (written once into
${FIA_CACHE:-~/.cache/fia-comfyui}/fullsize/: SD1.5 2.0 GB, SDXL 6.9 GB, float16) and are
detected by ComfyUI itself (no test registration). For each: the server starts, a first
prompt loads the checkpoint (CheckpointLoaderSimple -> VAEDecode of an empty latent), a
second runs FIAForgetConcepts + FIAMaskInfo, a third samples once with the erased model.
Reported: wall time of each, peak resident memory of the server process (RSS as psutil
reports it, and its anonymous part: RSS also counts the checkpoint's mmapped file pages,
which are reclaimable page cache), ComfyUI's detected model type and weight dtype, and the
node's fia_summary. Writes benchmarks/results/fullsize-<device>.md / .json.

Defaults fit a 2-core CPU machine: 128 x 128 pixels, 2 prompt pairs, one concept,
50-step schedule with a saliency window of 5 steps, CFG 7.5, euler. SDXL: ComfyUI on CPU
keeps the UNet in float32 (10.3 GB) and the text encoders in float32 (3.3 GB), so by
default SDXL runs with ComfyUI's own --fp16-unet --fp16-text-enc (weights stored in
float16, computed in float32 by manual casting), under an anonymous-memory limit
(--anon-limit-gb, default 11): past it the server is killed and the run is reported as
detection + load only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the server (see tests/conftest.py)

from devkit import harness as H  # noqa: E402
from devkit import fullsize as F  # noqa: E402

log = logging.getLogger("fullsize")
SDXL_DEFAULT_ARGS = ("--fp16-unet", "--fp16-text-enc")


def gb(x) -> str:
    return f"{x / 1e9:.2f} GB" if x else "-"


def render(res: dict) -> str:
    lines = ["# FIA on full-size checkpoints (random weights, real format), real ComfyUI server", ""]
    for k, v in res["environment"].items():
        lines.append(f"- {k}: {v}")
    s = res["settings"]
    lines += [f"- FIAForgetConcepts: concepts {s['concepts']!r}, {s['width']}x{s['height']}, num_prompts "
              f"{s['num_prompts']} (batch {s['batch_size']}), steps {s['steps']}, saliency_steps "
              f"{s['saliency_steps']}, cfg {s['cfg']}, {s['sampler_name']}/{s['scheduler']}, mode {s['mode']}, "
              f"r1 {s['r1']}, r2 {s['r2']}, alpha {s['alpha']}",
              "- no GPU was available for this run: no GPU figures (the paper: 11.28 s / 2.95 GB per concept "
              "on an A6000 at its settings)" if res["environment"]["device"] == "cpu" else "", "",
              "| checkpoint | detected | server args | startup | load | FIAForgetConcepts | sample | peak RSS "
              "| peak anon RSS | pruned | layers touched |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        sm = r.get("summary") or {}
        fmt = lambda k: f"{r[k]:.0f} s" if k in r else "-"  # noqa: E731
        lines.append(
            f"| {r['arch']} ({gb(r['checkpoint_bytes'])}) | {r['detected']['model_type']} | "
            f"{' '.join(r['server_args']) or '-'} | {fmt('startup_s')} | {fmt('load_s')} | {fmt('forget_s')} | "
            f"{fmt('sample_s')} | {gb(r['peak_rss_bytes'])} | {gb(r['peak_anon_bytes'])} | "
            f"{sm.get('pruned', '-')} ({100 * sm.get('pruned_fraction', 0):.3f} %) | "
            f"{sm.get('layers_touched', '-')}/{sm.get('layers', '-')} |")
    lines += ["", "Peak RSS is what psutil reports for the server process; it counts the checkpoint's mmapped "
              "file pages while ComfyUI loads it (reclaimable page cache), so the load dominates it. Peak anon "
              "RSS is the anonymous part (weights as converted, activations, the pack's state). Each "
              "checkpoint's memory_samples in the JSON give the timeline (s, anon, file) every ~5 s. "
              "Runs of separate invocations (--append) keep their own settings; the environment lines are "
              "those of the last invocation. Timings on a shared 2-core machine vary with its load."]
    for r in res["runs"]:
        i = r["inputs"]
        lines += ["", f"## {r['arch']}", "", f"- settings: {i['width']}x{i['height']}, num_prompts {i['num_prompts']}, "
                  f"steps {i['steps']}, saliency_steps {i['saliency_steps']}, final sample {r['sample_steps']} steps",
                  f"- detection: {json.dumps(r['detected'])}",
                  f"- completed prompts: {', '.join(r['completed']) or 'none'}"]
        if r.get("error"):
            lines.append(f"- stopped: {r['error']}")
        if r.get("summary"):
            lines.append(f"- fia_summary: `{json.dumps(r['summary'])}`")
        lines += ["- server log (selected lines):", "", "```", *r["server_log"][-15:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15,sdxl", help="comma list: sd15, sdxl")
    ap.add_argument("--concepts", default="golf ball")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--saliency-steps", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=4, help="steps of the final sample (0: skip)")
    ap.add_argument("--sdxl-args", default=" ".join(SDXL_DEFAULT_ARGS), help="extra server args for SDXL")
    ap.add_argument("--sd15-args", default="", help="extra server args for SD1.5")
    ap.add_argument("--anon-limit-gb", type=float, default=11.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="", help="result name (default fullsize-<device>)")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs of other checkpoints from an existing result file (each run keeps its settings)")
    ap.add_argument("--load-only", action="store_true", help="only detect and load each checkpoint (memory)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the Markdown next to an existing result JSON")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render(res))
        return res
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = "cpu" if H.use_cpu() else "cuda"
    H.import_comfy(tempfile.mkdtemp(prefix="fia_fullsize_ns_"))
    inputs = F.fia_inputs(args.concepts, args.size, args.num_prompts, args.steps, args.saliency_steps)
    import torch
    res = {"environment": {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                           "comfyui": H.COMFYUI_VERSION, "cpu_count": os.cpu_count(),
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                           "load_average_start": [round(x, 2) for x in os.getloadavg()]},
           "settings": inputs, "runs": []}
    for arch in filter(None, args.arch.split(",")):
        extra = tuple((args.sdxl_args if arch == "sdxl" else args.sd15_args).split())
        log.info("%s: server args %s", arch, extra)
        with tempfile.TemporaryDirectory(prefix=f"fia_fullsize_{arch}_") as base:
            r = F.run_forget_on_server(arch, base, inputs=inputs, sample_steps=args.sample_steps,
                                       extra_args=extra, anon_limit_gb=args.anon_limit_gb,
                                       load_only=args.load_only)
        r.pop("image", None)
        log.info("%s: %s", arch, {k: r.get(k) for k in ("startup_s", "load_s", "forget_s", "sample_s",
                                                         "peak_rss_bytes", "peak_anon_bytes", "summary", "error")})
        res["runs"].append(r)
    res["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or f"fullsize-{device}"
    if args.append and (out / f"{name}.json").is_file():
        done = {r["arch"] for r in res["runs"]}
        old = [r for r in json.loads((out / f"{name}.json").read_text())["runs"] if r["arch"] not in done]
        res["runs"] = sorted(old + res["runs"], key=lambda r: r["arch"])
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(render(res))
    print(render(res))
    return res


if __name__ == "__main__":
    main()
