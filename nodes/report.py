"""Human-readable mask reports: a one-line summary, a text table and a per-layer chart."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..fia_core import NeuronMask, mask_warnings


def short_summary(mask: NeuronMask) -> dict:
    """Compact facts for the node's UI (concepts, pruned fraction, layers, agnostic kept)."""
    s = mask.stats()
    return {
        "kind": s["kind"],
        "concepts": s["concepts"],
        "pruned": s["total_pruned"],
        "pruned_fraction": s["pruned_fraction"],
        "layers_touched": s["layers_touched"],
        "layers": len(s["layers"]),
        "agnostic_kept": s["agnostic_kept"],
    }


def mask_summary(mask: NeuronMask, warnings=()) -> dict:
    """short_summary with "warnings": ``warnings`` first, then what fia_core.mask_warnings
    says about the mask (prunes nothing or far less than asked, identical sources, sources
    from different checkpoints)."""
    return dict(short_summary(mask), warnings=list(dict.fromkeys([*warnings, *mask_warnings(mask)])))


def summary_line(mask: NeuronMask) -> str:
    s = short_summary(mask)
    names = ", ".join(s["concepts"])
    line = (f"{names}: pruned {s['pruned']:,} connections ({100 * s['pruned_fraction']:.3f} %) "
            f"in {s['layers_touched']}/{s['layers']} layers")
    if s["kind"] == "fused":
        line += f", {s['agnostic_kept']:,} concept-agnostic kept"
    return line


def text_report(mask: NeuronMask) -> str:
    s = mask.stats()
    lines = [summary_line(mask), f"target: {s['target']}  params: {s['params']}"]
    if s.get("per_concept"):
        lines.append("per concept: " + ", ".join(f"{c} {n:,}" for c, n in s["per_concept"].items()))
    lines.append(f"{'layer':<52} {'pruned':>9} {'fraction':>9} {'agnostic':>9}")
    for key, info in s["layers"].items():
        lines.append(f"{key:<52} {info['pruned']:>9,} {100 * info['fraction']:>8.3f}% {info.get('agnostic_kept', 0):>9,}")
    return "\n".join(lines)


def layer_chart(mask: NeuronMask, width: int = 640) -> torch.Tensor:
    """Horizontal bar chart of the pruned fraction per layer as a ComfyUI IMAGE [1, H, W, 3]."""
    s = mask.stats()
    rows = list(s["layers"].items())
    row_h, top, label_w = 16, 26, 300
    height = top + row_h * max(1, len(rows)) + 8
    img = Image.new("RGB", (width, height), (32, 32, 36))
    draw = ImageDraw.Draw(img)
    peak = max((info["fraction"] for _, info in rows), default=0.0) or 1.0
    draw.text((6, 6), f"pruned fraction per layer (max {100 * peak:.3f} %) - {', '.join(s['concepts'])}"[:100],
              fill=(230, 230, 230))
    bar_w = width - label_w - 70
    for i, (key, info) in enumerate(rows):
        y = top + i * row_h
        label = key.replace(".transformer_blocks.", ".tb.").replace(".ff.net.2", "")
        draw.text((6, y + 2), label[:46], fill=(200, 200, 200))
        length = int(bar_w * info["fraction"] / peak)
        draw.rectangle([label_w, y + 3, label_w + max(1, length), y + row_h - 3], fill=(90, 160, 230))
        draw.text((label_w + bar_w + 6, y + 2), f"{100 * info['fraction']:.3f}%", fill=(200, 200, 200))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
