"""The reference procedure the benchmark compares the pack against, and the straightforward
Eq. 3-6 that the pack's fast paths must reproduce exactly.

Reference procedure (mimics the FIA authors' implementation, see
shared/docs/fia-method.md "Weak points of the reference implementation"):
- every prompt (concept prompts, then base prompts) is sampled on its own, for the full
  schedule, although only the first ``saliency_steps`` are used;
- forward hooks on the FFN2 layers find the step from their call order (a cursor) and
  copy every hooked activation to the CPU (``.to("cpu", copy=True)``) before computing
  the Wanda-style column norm on the copy, the unconditional CFG row included;
- Eq. 2 over the per-prompt statistics, then the straightforward dense Eq. 3-6: every
  S_t = |W| * s_t built as a layer-size tensor, tau_t by kthvalue over the whole layer.

``straightforward_*`` is the pack's original dense implementation (fia_core/neurons.py
before the performance work), kept verbatim: tests/test_perf_equivalence.py compares the
optimised code against it.
"""
from __future__ import annotations

import torch


# --------------------------------------------------------------------------- Eq. 3-6, dense
def top_fraction_count(ratio: float, count: int) -> int:
    from fia_core.counting import top_fraction_count as count_of  # one definition of the rounding

    return count_of(ratio, count)


def straightforward_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat.kthvalue(flat.numel() - k + 1).values


def straightforward_top_k_flat(values: torch.Tensor, k: int) -> torch.Tensor:
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    thr = straightforward_kth_largest(values, k)
    above = values > thr
    tied = values == thr
    need = k - above.sum()
    return above | (tied & (tied.cumsum(0) <= need))


def straightforward_top_k_rows(values: torch.Tensor, k: int) -> torch.Tensor:
    rows, cols = values.shape
    if k >= cols:
        return torch.ones_like(values, dtype=torch.bool)
    thr = values.kthvalue(cols - k + 1, dim=1, keepdim=True).values
    above = values > thr
    tied = values == thr
    need = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= need))


def straightforward_sensitivity(steps, r1: float) -> torch.Tensor:
    """Eq. 3 as the original SensitivityIntegrator computed it, one dense S_t at a time."""
    total = hits = None
    count = 0
    for s_t in steps:
        s = s_t.float()
        tau = straightforward_kth_largest(s, top_fraction_count(r1, s.numel()))
        if total is None:
            total, hits = s.clone(), (s > tau).to(torch.int16)
        else:
            total.add_(s)
            hits.add_(s > tau)
        count += 1
    peak = total.max()
    strength = total / peak if peak > 0 else torch.zeros_like(total)
    return 0.5 * strength + 0.5 * (hits.float() / count)


def straightforward_select(a: torch.Tensor, r2: float) -> torch.Tensor:
    """Eq. 4-6 as the original select_from_sensitivity computed it."""
    a = a.float()
    c_out, c_in = a.shape
    channel = straightforward_top_k_rows(a, top_fraction_count(r2, c_in))
    layer = straightforward_top_k_flat(a.reshape(-1), top_fraction_count(r2, c_out * c_in)).view_as(a)
    return (channel & layer & (a > 0)).reshape(-1).nonzero().squeeze(1).cpu()


def straightforward_fast_mode(w_abs: torch.Tensor, columns: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """One layer of a fast-mode concept: S_t = |W| * s_t built densely for every step."""
    return straightforward_select(
        straightforward_sensitivity((w_abs.float() * col[None, :] for col in columns), r1), r2)


def straightforward_masks(weights: dict, columns: dict, r1: float, r2: float) -> dict:
    """{layer key: sorted flat indices} for a whole model, dense path."""
    return {key: straightforward_fast_mode(weights[key], columns[key], r1, r2) for key in weights}


# --------------------------------------------------------------------------- saliency
def _contrast(concept: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Eq. 2 without |W|: max(0, mean_c - mean_b - std_b) over prompts (dim 0)."""
    return (concept.mean(0) - base.mean(0) - base.std(0)).clamp_min(0)


@torch.no_grad()
def reference_saliency(model, clip, pairs, settings, modules: dict, encode, sample_one) -> dict:
    """The reference procedure's saliency: {layer key: [T, C_in] s_t columns}.

    ``modules``: {layer key: FFN2 nn.Module}; ``encode(clip, text)`` -> CONDITIONING;
    ``sample_one(model, positive, negative, noise_index)`` samples one prompt over the
    full schedule (``settings.steps`` steps).
    """
    T = settings.saliency_steps
    negative = encode(clip, "")
    per_side: dict[str, dict[str, list[list[torch.Tensor]]]] = {}
    for side, prompts in (("concept", [p.concept_prompt for p in pairs]), ("base", [p.base_prompt for p in pairs])):
        records = {key: [[] for _ in range(T)] for key in modules}
        for i, prompt in enumerate(prompts):
            positive = encode(clip, prompt)
            cursor = dict.fromkeys(modules, 0)  # the step is the hook's call count (call order)

            def make_hook(key):
                def hook(module, args, output):
                    x = args[0].detach().to("cpu", copy=True).float()  # a CPU copy per hook call
                    step = cursor[key]
                    cursor[key] += 1
                    if step < T:
                        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                        records[key][step].append(xn.norm(dim=1).mean(0))  # CFG rows mixed
                return hook

            handles = [m.register_forward_hook(make_hook(k)) for k, m in modules.items()]
            try:
                sample_one(model, positive, negative, i)
            finally:
                for h in handles:
                    h.remove()
        per_side[side] = records
    return {
        key: torch.stack([_contrast(torch.stack(per_side["concept"][key][t]), torch.stack(per_side["base"][key][t]))
                          for t in range(T)])
        for key in modules
    }
