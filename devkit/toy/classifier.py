"""The judge of the toy benchmark: which concept (shape) a 16 x 16 image shows.

    python -m devkit.toy.classifier            # train (seeded, ~1-2 min) and report accuracy

A small CNN on decoded pixels ([B, 3, 16, 16] in [-1, 1]): from a KSampler latent
through ``model.latent_to_pixels`` (exactly what the hand-set VAE decodes, one value per
8 x 8 block), or from a ComfyUI IMAGE through ``model.image_to_pixels``. Eleven classes:
the ten concepts and "none" (background only), so an erased shape that leaves an empty
place is not forced into some shape class.

Trained on freshly drawn procedural images (data.classifier_batch, generator seeded by
(seed, step)) with augmentations that mimic the small defects of generated images
(Gaussian noise, colour and contrast jitter, slight blur), so it judges the diffusion
model's samples and not only clean renders.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from . import data as D
from . import model as M


class ToyClassifier(nn.Module):
    def __init__(self, num_classes: int = len(D.CLASS_NAMES)):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(),  # 4x4
        )
        self.head = nn.Linear(128 * 16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=g)
    shift = 0.15 * (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1)
    x = x * contrast + shift
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.3
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    x = torch.where(blur, 0.5 * x + 0.5 * blurred, x)
    x = x + torch.randn(x.shape, generator=g) * (0.2 * torch.rand(b, 1, 1, 1, generator=g))
    return x.clamp(-1.2, 1.2)


def train(steps: int = 1500, batch: int = 128, lr: float = 2e-3, seed: int = 0, log=print) -> ToyClassifier:
    torch.manual_seed(seed)
    net = ToyClassifier()
    g0 = torch.Generator().manual_seed(seed)
    for m in net.modules():  # seeded init, independent of torch's global RNG use elsewhere
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            bound = 1.0 / (m.weight[0].numel() ** 0.5)
            with torch.no_grad():
                m.weight.copy_((torch.rand(m.weight.shape, generator=g0) * 2 - 1) * bound * 3 ** 0.5)
                m.bias.zero_()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        rng = np.random.default_rng([seed, 991, step])
        x, y = D.classifier_batch(rng, batch)
        g = torch.Generator().manual_seed(seed * 7919 + step)
        x = augment(torch.from_numpy(x), g)
        loss = F.cross_entropy(net(x), torch.from_numpy(y), label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log(f"[classifier] step {step + 1}/{steps} loss {loss.item():.4f} {time.time() - t0:.0f} s")
    net.eval()
    return net


@torch.no_grad()
def accuracy(net: ToyClassifier, n: int = 2200, seed: int = 12345, noisy: bool = False) -> dict:
    rng = np.random.default_rng([seed])
    x, y = D.classifier_batch(rng, n)
    x = torch.from_numpy(x)
    if noisy:
        x = augment(x, torch.Generator().manual_seed(seed))
    pred = net(x).argmax(1).numpy()
    per = {D.CLASS_NAMES[k]: float((pred[y == k] == k).mean()) for k in range(len(D.CLASS_NAMES))}
    return {"overall": float((pred == y).mean()), "per_class": per, "n": n}


def save(net: ToyClassifier, path: Path = M.CLASSIFIER, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"classes": ",".join(D.CLASS_NAMES), **(metadata or {})})
    return path


def load(path: Path = M.CLASSIFIER) -> ToyClassifier:
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise FileNotFoundError(f"no toy classifier at {path}; train it: python -m devkit.toy.classifier")
    net = ToyClassifier()
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net


@torch.no_grad()
def classify(net: ToyClassifier, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, 16, 16] in [-1, 1] -> predicted class indices [B] (10 = none)."""
    return net(pixels.float()).argmax(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a 2-core machine shared with other jobs, 2 threads thrashed)")
    p.add_argument("--out", type=Path, default=M.CLASSIFIER)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    net = train(args.steps, args.batch, seed=args.seed, log=lambda s: print(s, flush=True))
    minutes = (time.time() - t0) / 60
    clean, noisy = accuracy(net), accuracy(net, noisy=True)
    save(net, args.out, {"steps": str(args.steps), "seed": str(args.seed)})
    report = {"minutes": round(minutes, 2), "steps": args.steps, "batch": args.batch, "seed": args.seed,
              "held_out_clean": clean, "held_out_augmented": noisy}
    args.out.with_suffix(".train.json").write_text(json.dumps(report, indent=1))
    print(f"[classifier] wrote {args.out}: held-out accuracy {100 * clean['overall']:.1f} % clean, "
          f"{100 * noisy['overall']:.1f} % augmented ({minutes:.1f} min)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
