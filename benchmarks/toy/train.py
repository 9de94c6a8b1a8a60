"""Train the toy text-to-image model (seeded, resumable) and write its checkpoint.

    python -m benchmarks.toy.train                 # 3000 steps: 15-20 min on one CPU core
    python -m benchmarks.toy.train --steps 50      # a quick smoke run (to another --out)

Recipe: v-prediction on SD's own sigma schedule (``model_sampling`` of ComfyUI's
BaseModel with ModelType.V_PREDICTION, as SD 2.x 768-v): x_t = x_0 + sigma_t * eps with
t uniform over the 1000 training steps; the UNet sees x_t / sqrt(sigma_t^2 + 1) and the
timestep index, as in ComfyUI's ``BaseModel.apply_model``, and predicts
v = (eps - sigma_t * x_0) / sqrt(sigma_t^2 + 1); plain MSE on v. UNet and text encoder
are trained together from a seeded initialisation; a tenth of the prompts are empty
(classifier-free-guidance dropout).

Why not EPS (SD 1.5's parametrisation): three EPS attempts (plain eps-MSE, then
v-weighted eps-MSE) left this 1 M-parameter UNet, after 800-1000 steps, with x_0
estimates off by 0.5 RMS at sigma 5 and 0.9 at sigma 11 (eps errors are multiplied by
sigma, up to 14.6) and samples that were noisy, over-saturated blobs. v-prediction has
no such amplification. FIA does not depend on the parametrisation: it reads FFN2
activations during sampling, whatever the UNet's output means.
AdamW, linear warm-up then a constant learning rate, gradient clipping, EMA of the
weights (the EMA weights are what is saved). Every batch is drawn from a generator seeded by (seed, step),
so a resumed run sees the same data as an uninterrupted one. bfloat16 autocast on the
CPU halves the time; the result is deterministic for a given machine and thread count
(oneDNN's bfloat16 kernels may round differently on another CPU).

Progress is checkpointed to ``--state-dir`` every ``--save-every`` steps; running the
same command again resumes. ``--max-minutes`` stops early (resumable) and still writes
the checkpoint from the EMA weights so far.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from devkit import comfyui, zoo
from devkit.toy import data as D
from devkit.toy import model as M

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a 2-core machine shared with other jobs, 2 threads thrashed)")
    p.add_argument("--out", type=Path, default=M.CHECKPOINT)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="training state for resuming (default: $FIA_CACHE/toy-train or ~/.cache/fia-comfyui/toy-train)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--snapshot-every", type=int, default=500,
                   help="keep the full training state at these steps (resume or stop at any of them)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time (resumable)")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (about 2x slower on CPU)")
    p.add_argument("--preview", default=str(RESULTS / "toy_training_samples.png"),
                   help="sample grid written after training ('' to skip)")
    return p.parse_args(argv)


def recipe_hash(args) -> str:
    # not "steps": the schedule does not depend on it, so a run can be extended or cut at a snapshot
    keys = {k: getattr(args, k) for k in ("batch", "lr", "warmup", "ema", "seed", "no_bf16")}
    keys["unet"] = M.UNET_CONFIG
    keys["clip"] = M.CLIP_L_CONFIG
    keys["data"] = D.DATA_VERSION
    keys["loss"] = "v-prediction"
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:12]


class TokenCache:
    """prompt -> the 77 SD1 token ids (ComfyUI's tokenizer)."""

    def __init__(self, clip):
        self.clip = clip
        self.ids: dict[str, list[int]] = {}

    def __call__(self, prompts):
        out = []
        for p in prompts:
            if p not in self.ids:
                self.ids[p] = [int(t) for t, _ in self.clip.tokenize(p)["l"][0]]
            out.append(self.ids[p])
        return out


def trainable_clip_layers(text) -> None:
    """ComfyUI's CLIPLayer.forward adds in place (x += attn(ln(x))), which autograd refuses;
    give each layer of this training copy the same math without the in-place adds."""
    import comfy.clip_model

    for mod in text.modules():
        if isinstance(mod, comfy.clip_model.CLIPLayer):
            def forward(x, mask=None, optimized_attention=None, _m=mod):
                x = x + _m.self_attn(_m.layer_norm1(x), mask, optimized_attention)
                return x + _m.mlp(_m.layer_norm2(x))
            mod.forward = forward


def lr_at(step: int, args) -> float:
    """Linear warm-up, then constant (the EMA does the averaging), so that the recipe does
    not depend on the total number of steps."""
    return args.lr * min(1.0, (step + 1) / args.warmup)


def main(argv=None) -> int:
    args = parse_args(argv)

    state_dir = args.state_dir or comfyui.cache_dir() / "toy-train"
    state_dir.mkdir(parents=True, exist_ok=True)
    comfyui.import_comfy(state_dir / "comfy_base")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = M.build_model()
    clip = M.build_clip()
    zoo.fill_weights_(model.model.diffusion_model, args.seed)
    zoo.fill_weights_(clip.cond_stage_model, args.seed + 1)
    unet = model.model.diffusion_model
    text = clip.cond_stage_model.clip_l
    sigmas = model.model.model_sampling.sigmas.float().cpu()
    trainable_clip_layers(text)
    unet.train()
    text.train()
    params = list(unet.parameters()) + list(text.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {f"u.{k}": v.detach().clone().float() for k, v in unet.state_dict().items()}
    ema.update({f"t.{k}": v.detach().clone().float() for k, v in text.state_dict().items()})
    history: list[dict] = []
    start, elapsed_before = 0, 0.0

    rh = recipe_hash(args)
    latest = state_dir / f"state_{rh}_latest.pt"

    def snapshot(step):
        return state_dir / f"state_{rh}_{step:06d}.pt"

    candidates = sorted(state_dir.glob(f"state_{rh}_*.pt"))
    best = None
    for path in candidates:
        try:
            st_step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
        except Exception as e:  # a damaged state is skipped, never trusted
            print(f"[train] ignoring {path}: {e}", flush=True)
            continue
        if st_step <= args.steps and (best is None or st_step > best[0]):
            best = (st_step, path)
    if best is not None:
        st = torch.load(best[1], map_location="cpu", weights_only=True)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        opt.load_state_dict(st["opt"])
        ema = st["ema"]
        start = int(st["step"])
        history = [h for h in json.loads(st["history"]) if h["step"] <= start]
        elapsed_before = float(st["elapsed"])
        print(f"[train] resumed {best[1]} at step {start}", flush=True)
        del st

    def save_state(step, elapsed, path=None):
        path = path or latest
        tmp = path.with_suffix(".tmp")
        torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema,
                    "step": step, "history": json.dumps(history), "elapsed": elapsed}, tmp)
        os.replace(tmp, path)

    tokens = TokenCache(clip)
    t0 = time.time()
    running = history[-1]["loss"] if history else None
    step = start
    stopped_early = False
    for step in range(start, args.steps):
        elapsed = elapsed_before + time.time() - t0
        if args.max_minutes is not None and elapsed > args.max_minutes * 60:
            stopped_early = True
            break
        rng = np.random.default_rng([args.seed, step])
        samples, images = D.batch(rng, args.batch)
        x0 = M.pixels_to_latent(torch.from_numpy(images)) * M.LATENT_SCALE  # what the UNet sees: pixels in [-1, 1]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        x_in = (x0 + sigma * eps) / (sigma ** 2 + 1).sqrt()  # EPS.calculate_input
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            context, _ = text(tokens([s.prompt for s in samples]))
            pred = unet(x_in, t.float(), context=context)
        target = (eps - sigma * x0) / (sigma ** 2 + 1).sqrt()  # v; ComfyUI's V_PREDICTION.calculate_denoised inverts it
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for prefix, mod in (("u.", unet), ("t.", text)):
                for k, v in mod.state_dict().items():
                    e = ema[prefix + k]
                    if v.is_floating_point():
                        e.mul_(decay).add_(v.float(), alpha=1 - decay)
                    else:
                        e.copy_(v)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % args.log_every == 0 or step == start:
            el = elapsed_before + time.time() - t0
            history.append({"step": step + 1, "loss": round(running, 5), "minutes": round(el / 60, 2)})
            print(f"[train] step {step + 1}/{args.steps} loss {running:.4f} lr {lr_at(step, args):.2e} "
                  f"{el / 60:.1f} min", flush=True)
        if (step + 1) % args.save_every == 0:
            save_state(step + 1, elapsed_before + time.time() - t0)
        if (step + 1) % args.snapshot_every == 0:
            save_state(step + 1, elapsed_before + time.time() - t0, snapshot(step + 1))
    else:
        step = args.steps
    elapsed = elapsed_before + time.time() - t0
    save_state(step, elapsed)

    # the EMA weights are the model
    with torch.no_grad():
        unet.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("u.")})
        text.load_state_dict({k[2:]: v for k, v in ema.items() if k.startswith("t.")})
    unet.eval()
    text.eval()
    meta = {"fia_toy": "FIA toy benchmark model (benchmarks/toy)", "recipe": json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
         if k not in ("out", "state_dir", "preview", "max_minutes", "save_every", "log_every")}),
        "steps_done": str(step), "train_minutes": f"{elapsed / 60:.1f}",
        "final_loss": f"{running if running is not None else float('nan'):.5f}"}
    M.save_checkpoint(args.out, model, clip, metadata=meta)
    log = {"steps_done": step, "steps": args.steps, "minutes": round(elapsed / 60, 2),
           "final_loss_ema": running, "stopped_early": stopped_early, "history": history,
           "recipe": json.loads(meta["recipe"]), "threads": args.threads}
    args.out.with_suffix(".train.json").write_text(json.dumps(log, indent=1))
    print(f"[train] wrote {args.out} after {step} steps, {elapsed / 60:.1f} min, loss {running}", flush=True)
    if stopped_early:
        print("[train] stopped by --max-minutes; run the same command again to continue", flush=True)

    if args.preview:
        preview(args.out, Path(args.preview))
    return 0


def preview(ckpt: Path, out: Path, per_concept: int = 10) -> None:
    """Sample grid from the saved checkpoint: one row per concept, eval prompts."""
    model, clip, _ = M.load_checkpoint(ckpt)
    prompts = [p for c in D.CONCEPTS for p in D.eval_prompts(c, per_concept, seed=123)]
    prompts += [f"a {p}" for p in D.PLACE_NAMES[:per_concept]]
    lat = M.generate(model, clip, prompts, seed=123, steps=20, cfg=5.0)
    out.parent.mkdir(parents=True, exist_ok=True)
    D.contact_sheet(M.latent_to_pixels(lat).numpy(), per_concept, scale=4).save(out)
    print(f"[train] preview {out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
