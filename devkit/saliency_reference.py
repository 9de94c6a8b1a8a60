"""Slow, independent references of the pack's glue, run on a real ComfyUI, and small
probes tests use on ModelPatchers.

:func:`reference_columns` is Eq. 2 (fast statistic) the way the authors' code computes it,
written from the method page (shared/docs/fia-method.md), not from the pack: every prompt
sampled alone as KSampler samples a batch of one (prepare_noise on a one-row latent, so
every prompt of a concept starts from the same noise), the full schedule, the step taken
from the call order, the conditional rows picked through ComfyUI's unet function wrapper,
statistics in float64 numpy, sigma_b the population std unless ``ddof`` says otherwise.
"""
from __future__ import annotations

import numpy as np

from .zoo import encode, ffn2_keys


def reference_columns(model, clip, pairs, steps: int, saliency_steps: int, cfg: float, seed: int,
                      size: int, ddof: int = 0) -> dict[str, np.ndarray]:
    """{layer key: [saliency_steps, C_in]} of max(0, mu_c - mu_b - sigma_b) on ||X̂_j||."""
    import comfy.sample
    import torch

    keys = [k[len("diffusion_model."):-len(".weight")] for k in ffn2_keys(model)]
    mods = dict(model.model.diffusion_model.named_modules())
    per_prompt: dict[str, list] = {"concept": [], "base": []}
    for pair in pairs:
        for side, text in (("concept", pair.concept_prompt), ("base", pair.base_prompt)):
            records: list[dict] = []  # per model call: {key: [rows, tokens, C_in] of cond rows}
            state = {"cond_rows": None}

            def wrapper(apply_model, args):
                chunks = args["cond_or_uncond"]
                n = args["input"].shape[0] // len(chunks)
                state["cond_rows"] = [r for c, kind in enumerate(chunks) for r in range(c * n, (c + 1) * n) if kind == 0]
                records.append({})
                return apply_model(args["input"], args["timestep"], **args["c"])

            def hook_for(key):
                def hook(mod, inp):
                    records[-1][key] = inp[0].detach().double().numpy()[state["cond_rows"]]
                return hook

            m = model.clone()
            m.set_model_unet_function_wrapper(wrapper)
            handles = [mods[k].register_forward_pre_hook(hook_for(k)) for k in keys]
            try:
                latent = torch.zeros([1, 4, size // 8, size // 8])
                noise = comfy.sample.prepare_noise(latent, seed)  # KSampler's noise for a batch of one
                comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", encode(clip, text), encode(clip, ""),
                                    latent, disable_pbar=True, seed=seed)
            finally:
                for h in handles:
                    h.remove()
            if len(records) != steps:  # euler: one model call per step, cond and uncond batched
                raise AssertionError(f"expected {steps} model calls, saw {len(records)}")
            per_prompt[side].append(records[:saliency_steps])

    def q(rec, t, key):
        x = rec[t][key][0]  # [tokens, C_in], the single conditional row
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np.sqrt((xn ** 2).sum(0))

    out = {}
    for key in keys:
        cols = []
        for t in range(saliency_steps):
            qc = np.stack([q(r, t, key) for r in per_prompt["concept"]])
            qb = np.stack([q(r, t, key) for r in per_prompt["base"]])
            cols.append(np.maximum(0, qc.mean(0) - qb.mean(0) - qb.std(0, ddof=ddof)))
        out[key] = np.stack(cols)
    return out


def unet_calls(model):
    """({"n": count}, handle): counts diffusion-model forward calls on the shared module."""
    count = {"n": 0}
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda *a: count.__setitem__("n", count["n"] + 1))
    return count, handle


def hooks_left(model) -> int:
    """Forward (pre-)hooks still registered anywhere in the diffusion model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.model.diffusion_model.modules())


def node_result(out):
    """The result tuple of a node call ({"ui", "result"} dict or a plain tuple)."""
    return out["result"] if isinstance(out, dict) else out
