"""The reference procedure the benchmarks compare the pack against, and the straightforward
Eq. 3-6 that the pack's fast paths must reproduce exactly.

Reference procedure (what the FIA authors' implementation does, see
shared/docs/fia-method.md, "Stage 1" and "Weak points of the reference implementation"):
- every prompt (concept prompts, then base prompts) is sampled on its own, for the full
  schedule, although only the first ``saliency_steps`` are used;
- every prompt of the concept starts from the SAME noise: the generator is re-seeded
  before each prompt (``comfy_sample_one``: prepare_noise on a one-row latent with the
  seed, i.e. noise index 0), so the prompts' activations differ by their text alone;
- forward hooks on the FFN2 layers find the step from their call order (a cursor) and
  copy every hooked activation to the CPU (``.to("cpu", copy=True)``) before computing
  the Wanda-style column norm on the copy;
- by default only the conditional CFG row is recorded (``rows="cond"``, as the pack
  does, so that the two can be compared); ``rows="cfg"`` mixes the unconditional row in,
  as the authors' code does (the mean of both rows' column norms);
- Eq. 2 over the per-prompt statistics with sigma_b the POPULATION standard deviation
  (ddof 0, as the authors' code), then the straightforward dense Eq. 3-6: every
  S_t = |W| * s_t built as a layer-size tensor, tau_t by kthvalue over the whole layer.

``straightforward_*`` (devkit/dense_reference.py) is the pack's original dense
implementation, kept verbatim: tests/test_perf_equivalence.py compares the optimised code
against it.
"""
from __future__ import annotations

import torch

from devkit.dense_reference import (  # noqa: F401  (the dense Eq. 3-6, re-exported for the benchmarks)
    straightforward_kth_largest,
    straightforward_top_k_flat,
    straightforward_top_k_rows,
    straightforward_sensitivity,
    straightforward_select,
    straightforward_fast_mode,
    straightforward_masks,
)


# --------------------------------------------------------------------------- saliency
ROW_MODES = ("cond", "cfg")


def _contrast(concept: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Eq. 2 without |W|: max(0, mean_c - mean_b - std_b) over prompts (dim 0), std_b the
    population standard deviation (divide by the count, as the authors' code)."""
    return (concept.mean(0) - base.mean(0) - base.std(0, correction=0)).clamp_min(0)


def comfy_sample_one(settings):
    """``sample_one`` for :func:`reference_saliency` through ComfyUI's sampler: one prompt,
    the full ``settings.steps`` schedule, from the noise of ``settings.seed`` drawn as
    KSampler draws it for a batch of one (the generator re-seeded for every prompt)."""
    import comfy.sample

    h, w = settings.height // 8, settings.width // 8

    def sample_one(model, positive, negative, noise_index: int = 0):
        latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 4, h, w]))
        noise = comfy.sample.prepare_noise(latent, settings.seed, noise_inds=[noise_index])
        comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
                            positive, negative, latent, denoise=1.0, disable_pbar=True, seed=settings.seed)

    return sample_one


@torch.no_grad()
def reference_saliency(model, clip, pairs, settings, modules: dict, encode, sample_one, rows: str = "cond") -> dict:
    """The reference procedure's saliency: {layer key: [T, C_in] s_t columns}.

    ``model``: a ComfyUI ModelPatcher; ``modules``: {layer key: FFN2 nn.Module};
    ``encode(clip, text)`` -> CONDITIONING; ``sample_one(model, positive, negative,
    noise_index)`` samples one prompt over the full schedule (``settings.steps`` steps);
    it is called with noise index 0 for every prompt (the reference re-seeds before each
    prompt). ``rows``: "cond" records the conditional CFG row only; "cfg" mixes the
    unconditional row in (the authors' code).
    """
    if rows not in ROW_MODES:
        raise ValueError(f"rows must be one of {ROW_MODES}, got {rows!r}")
    T = settings.saliency_steps
    negative = encode(clip, "")
    # which batch rows of a model call are conditional: ComfyUI batches the CFG branches in
    # an order of its own, told to the UNet wrapper as cond_or_uncond (0 = conditional)
    call = {"cond_rows": None}

    def unet_wrapper(apply_model, args):
        chunks = args["cond_or_uncond"]
        per_chunk = args["input"].shape[0] // max(1, len(chunks))
        call["cond_rows"] = [k * per_chunk + r for k, c in enumerate(chunks) if c == 0 for r in range(per_chunk)]
        return apply_model(args["input"], args["timestep"], **args["c"])

    work = model.clone()
    work.set_model_unet_function_wrapper(unet_wrapper)
    per_side: dict[str, dict[str, list[list[torch.Tensor]]]] = {}
    for side, prompts in (("concept", [p.concept_prompt for p in pairs]), ("base", [p.base_prompt for p in pairs])):
        records = {key: [[] for _ in range(T)] for key in modules}
        for prompt in prompts:
            positive = encode(clip, prompt)
            cursor = dict.fromkeys(modules, 0)  # the step is the hook's call count (call order)

            def make_hook(key):
                def hook(module, args, output):
                    x = args[0].detach().to("cpu", copy=True).float()  # a CPU copy per hook call
                    step = cursor[key]
                    cursor[key] += 1
                    if step < T:
                        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                        q = xn.norm(dim=1)  # [rows, C_in]
                        if rows == "cond":
                            q = q[call["cond_rows"]]
                        records[key][step].append(q.mean(0))
                return hook

            handles = [m.register_forward_hook(make_hook(k)) for k, m in modules.items()]
            try:
                sample_one(work, positive, negative, 0)  # re-seeded: every prompt starts from one noise
            finally:
                for h in handles:
                    h.remove()
        per_side[side] = records
    return {
        key: torch.stack([_contrast(torch.stack(per_side["concept"][key][t]), torch.stack(per_side["base"][key][t]))
                          for t in range(T)])
        for key in modules
    }
