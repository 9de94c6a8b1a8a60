"""Random-weight, real-format SD1.5 and SDXL checkpoint files (benchmarks and slow tests).

The files have exactly the layout ComfyUI's own CheckpointSave writes for the real models,
so ComfyUI's model detection recognises them as ``SD15`` / ``SDXL`` with no test-only
registration, and CheckpointLoaderSimple builds the full text encoders from them:

* SD1.5: UNet with 320 channels and context 768 (860 M params) under
  ``model.diffusion_model.``, full CLIP-L (123 M) under
  ``cond_stage_model.transformer.text_model.``, a TAESD-shaped VAE (2.4 M) under
  ``first_stage_model.`` (ComfyUI detects TAESD from its keys). float16: 2.0 GB.
* SDXL: UNet 2.57 B params (context 2048, ADM 2816, transformer depths 2 and 10), CLIP-L
  under ``conditioner.embedders.0.transformer.text_model.`` and OpenCLIP-G (695 M) in its
  open_clip layout under ``conditioner.embedders.1.model.``, the same TAESD. float16: 6.9 GB.

How the key list is obtained: ComfyUI's own model classes are built on the ``meta``
device (no memory) and ``BaseModel.state_dict_for_saving`` (what CheckpointSave calls)
gives every key, shape and the per-architecture renaming (e.g. SDXL's clip_g to the
open_clip format). Values are then generated one tensor at a time and streamed into a
safetensors file, so writing needs a few hundred MB whatever the model size.

Values (deterministic: each tensor from its own ``torch.Generator`` seeded by the file's
seed and a CRC of the key, so they do not depend on the write order): normalisation
weights 1, normalisation biases 0, every other tensor N(0, 0.02^2). Small weights keep a
random UNet's activations in range (random UNets with PyTorch-default init can overflow
to inf/NaN in float16; :func:`unet_output_finite` checks it). The VAE is a TAESD filled by
``devkit.harness.fill_weights_`` (seeded). Images decoded from these models are noise;
timings and memory are those of the real architectures.

Files live in ``${FIA_CACHE:-~/.cache/fia-comfyui}/fullsize/`` (outside the repository)
and are reused when present with the same spec (checked from the file's metadata).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

from . import harness as H

log = logging.getLogger(__name__)

#: Bump when the generated values or layout change: cached files are then rewritten.
GENERATOR_VERSION = "1"
WEIGHT_STD = 0.02

#: SD1.5's UNet config as ComfyUI's detect_unet_config gives it for the real checkpoint.
SD15_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
#: SDXL base's UNet config (detect_unet_config of sd_xl_base_1.0).
SDXL_UNET: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
#: architecture name: (supported_models class name, UNet config, sdxl?)
ARCHS = {"sd15": ("SD15", SD15_UNET), "sdxl": ("SDXL", SDXL_UNET)}
#: FFN2 layers (ff.net.2 of every transformer block) of the real UNets.
FFN2_COUNT = {"sd15": 16, "sdxl": 70}

# Normalisation tensors by name, in the saved layouts: UNet GroupNorms (ResBlock
# in_layers.0 / out_layers.0, the final out.0, SpatialTransformer norm) and LayerNorms
# (norm1..3), CLIP-L (layer_norm1/2, final_layer_norm), open_clip (ln_1, ln_2, ln_final).
_NORM = re.compile(r"(^|\.)(norm\d?|layer_norm\d|final_layer_norm|ln_\d|ln_final|in_layers\.0|out_layers\.0|out\.0)"
                   r"\.(weight|bias)$")

_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4), "int64": ("I64", 8)}


def fullsize_dir() -> Path:
    """``${FIA_CACHE:-~/.cache/fia-comfyui}/fullsize``."""
    return H.cache_dir() / "fullsize"


def is_norm_key(key: str) -> bool:
    return bool(_NORM.search(key))


def _model_config(arch: str, dtype):
    import comfy.supported_models as sm
    name, unet = ARCHS[arch]
    config = getattr(sm, name)(dict(unet))
    config.set_inference_dtype(dtype, None)
    return config


def checkpoint_layout(arch: str, dtype_name: str = "float16") -> dict[str, Any]:
    """``{key: tensor}`` of the full checkpoint in ComfyUI's saved layout: meta tensors
    (shape and dtype only) for UNet and text encoders, real CPU tensors for the TAESD VAE."""
    H.import_comfy()
    import torch
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    import comfy.taesd.taesd

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, not {arch!r}")
    dtype = getattr(torch, dtype_name)
    config = _model_config(arch, dtype)
    model = config.get_model({}, device="meta")
    clip_cls = sdxl_clip.SDXLClipModel if arch == "sdxl" else sd1_clip.SD1ClipModel
    clip = clip_cls(device="meta", dtype=dtype)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    H.fill_weights_(taesd, 7)
    sd = model.state_dict_for_saving(clip.state_dict(), {k: v.to(dtype) for k, v in taesd.state_dict().items()})
    return dict(sd)


def _spec_hash(layout: Mapping[str, Any], seed: int, dtype_name: str) -> str:
    h = hashlib.sha256(f"{GENERATOR_VERSION}|{seed}|{dtype_name}|{WEIGHT_STD}".encode())
    for k in sorted(layout):
        h.update(f"{k}:{tuple(layout[k].shape)};".encode())
    return h.hexdigest()[:16]


def _make_tensor(key: str, ref, seed: int, dtype):
    """The value of one tensor (see the module docstring)."""
    import torch
    if ref.device.type != "meta":  # the TAESD's values; integer buffers (position_ids) as they are
        return ref.to(dtype) if ref.is_floating_point() else ref
    shape = tuple(ref.shape)
    if key.endswith("logit_scale"):  # CLIP's trained value, ln(100); unused for text conditioning
        return torch.full(shape, 4.6052, dtype=dtype)
    if is_norm_key(key):
        return (torch.ones if key.endswith(".weight") else torch.zeros)(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return (torch.randn(shape, generator=g) * WEIGHT_STD).to(dtype)


def write_safetensors_streaming(path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], str]],
                                make: Callable[[str], Any], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file tensor by tensor: ``specs`` = {key: (shape, dtype name)},
    ``make(key)`` returns the tensor (its shape and dtype must match). Only one tensor is
    in memory at a time. Written to ``<path>.part`` and renamed when complete."""
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    keys = sorted(specs)
    offset = 0
    for k in keys:
        shape, dt = specs[k]
        code, size = _DTYPES[dt]
        n = size
        for s in shape:
            n *= s
        header[k] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            t = make(k)
            shape, dt = specs[k]
            if tuple(t.shape) != tuple(shape) or str(t.dtype).replace("torch.", "") != dt:
                raise ValueError(f"{k}: made {tuple(t.shape)} {t.dtype}, header says {shape} {dt}")
            f.write(t.contiguous().view(-1).view(_byte_dtype()).numpy().tobytes())
    os.replace(part, path)
    return path


def _byte_dtype():
    import torch
    return torch.uint8


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (header only)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {}) or {}


def checkpoint_path(arch: str, seed: int = 0, dtype_name: str = "float16") -> Path:
    return fullsize_dir() / f"fia-random-{arch}-{dtype_name}-seed{seed}.safetensors"


def ensure_checkpoint(arch: str, seed: int = 0, dtype_name: str = "float16") -> Path:
    """The random-weight real-format checkpoint of ``arch`` ("sd15" or "sdxl"), written
    when missing or stale (its spec hash in the metadata differs). Returns its path."""
    layout = checkpoint_layout(arch, dtype_name)
    spec = _spec_hash(layout, seed, dtype_name)
    path = checkpoint_path(arch, seed, dtype_name)
    if path.is_file():
        try:
            if read_metadata(path).get("fia_fullsize_spec") == spec:
                return path
        except (OSError, ValueError, struct.error):
            pass
        log.info("rewriting stale %s", path)
    import torch
    dtype = getattr(torch, dtype_name)
    t0 = time.monotonic()
    specs = {k: (tuple(v.shape), dtype_name if v.is_floating_point() else str(v.dtype).replace("torch.", ""))
             for k, v in layout.items()}
    write_safetensors_streaming(
        path, specs, lambda k: _make_tensor(k, layout[k], seed, dtype),
        metadata={"fia_fullsize_spec": spec, "fia_fullsize": f"random-weight {arch} seed {seed} {dtype_name}, "
                  f"N(0, {WEIGHT_STD}) weights, norms 1/0; generated by devkit/fullsize.py (not a trained model)",
                  "modelspec.architecture": {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[arch]})
    log.info("wrote %s (%.1f GB) in %.0f s", path, path.stat().st_size / 1e9, time.monotonic() - t0)
    return path


def detect(path: str | os.PathLike) -> dict[str, Any]:
    """What ComfyUI's detection makes of a checkpoint file, without building the model:
    the ``supported_models`` class name, the UNet config, params per component."""
    H.import_comfy()
    import comfy.model_detection
    import comfy.utils
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        # detection reads a few tensors' values (e.g. SD20's norm-bias test); shapes come
        # from the meta-free slices: load only the UNet's small tensors
        sd = {}
        for k in keys:
            sl = f.get_slice(k)
            shape = sl.get_shape()
            n = 1
            for s in shape:
                n *= s
            sd[k] = f.get_tensor(k) if n <= 1_000_000 else _ShapeOnly(shape)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    params = {}
    for k, v in sd.items():
        part = k.split(".")[0] if not k.startswith("model.diffusion_model.") else "unet"
        n = 1
        for s in v.shape:
            n *= s
        params[part] = params.get(part, 0) + n
    return {"model_type": type(config).__name__ if config is not None else None, "unet_prefix": prefix,
            "keys": len(keys), "params": params}


class _ShapeOnly:
    """Stand-in for a large tensor during detection (only ``.shape`` is read)."""

    def __init__(self, shape):
        import torch
        self.shape = torch.Size(shape)
        self.ndim = len(shape)

    def __len__(self):
        return self.shape[0]


def unet_output_finite(model_patcher, size: int, dtype=None, seed: int = 0) -> bool:
    """One UNet evaluation of a loaded model at ``size`` x ``size`` pixels (conditioning
    zeros of the right shape): True when every output value is finite. ``dtype``: compute
    dtype (default the model's own)."""
    import torch
    import comfy.model_management as mm

    mm.load_models_gpu([model_patcher])
    base = model_patcher.model
    dm = base.diffusion_model
    dtype = dtype or base.get_dtype()
    dev = mm.get_torch_device()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, size // 8, size // 8), generator=g).to(dev, dtype)
    ctx_dim = base.model_config.unet_config["context_dim"]
    ctx = torch.zeros((1, 77, ctx_dim), device=dev, dtype=dtype)
    kw = {}
    adm = base.model_config.unet_config.get("adm_in_channels")
    if adm:
        kw["y"] = torch.zeros((1, adm), device=dev, dtype=dtype)
    t = torch.tensor([500.0], device=dev, dtype=dtype)
    orig = {n: p.dtype for n, p in dm.named_parameters()} if dtype != base.get_dtype() else None
    try:
        if orig is not None:
            dm.to(dtype)
        with torch.no_grad():
            out = dm(x, t, context=ctx, **kw)
    finally:
        if orig is not None:
            dm.to(base.get_dtype())
    return bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------------
# FIAForgetConcepts on a real ComfyUI server
# ---------------------------------------------------------------------------------

class MemoryLimitExceeded(RuntimeError):
    """The server's anonymous resident memory passed the limit; it was killed."""


def _proc_memory(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile + RssShmem) in bytes of one process, from /proc/<pid>/status."""
    anon = file = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith(("RssFile:", "RssShmem:")):
                file += int(line.split()[1]) * 1024
    return anon, file


class ServerMemory:
    """Samples the server process's resident set every ``interval`` s in a thread.

    ``peak_rss`` (RssAnon + RssFile: what psutil's rss reports), ``peak_anon`` (anonymous
    memory only: the checkpoint's mmapped file pages are reclaimable page cache, counted
    in RSS while mapped). When ``anon_limit`` bytes is passed the process group is killed
    and ``exceeded`` is set (the waiting client then sees a dead server)."""

    def __init__(self, pid: int, anon_limit: int | None = None, interval: float = 0.25):
        import threading
        self.pid, self.anon_limit, self.interval = pid, anon_limit, interval
        self.peak_rss = self.peak_anon = 0
        self.exceeded = False
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._t0 = time.monotonic()

    def _watch(self) -> None:
        import signal
        while not self._stop.is_set():
            try:
                anon, file = _proc_memory(self.pid)
            except (OSError, ValueError):
                return
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_rss = max(self.peak_rss, anon + file)
            if not self.samples or time.monotonic() - self.samples[-1][0] - self._t0 > 5:
                self.samples.append((time.monotonic() - self._t0, anon, file))
            if self.anon_limit and anon > self.anon_limit:
                self.exceeded = True
                log.warning("server anonymous RSS %.1f GB > limit %.1f GB: killing it", anon / 1e9,
                            self.anon_limit / 1e9)
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "ServerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _graphs(ckpt_name: str, fia_inputs: Mapping[str, Any], size: int, sample_steps: int) -> tuple[dict, dict, dict]:
    """(load, forget, sample) API graphs sharing node ids, so later prompts reuse the
    cached outputs of earlier ones (the checkpoint is loaded once, FIA runs once)."""
    ckpt = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
    load = {"ckpt": ckpt,
            "latent0": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "decode0": {"class_type": "VAEDecode", "inputs": {"samples": ["latent0", 0], "vae": ["ckpt", 2]}},
            "preview0": {"class_type": "PreviewImage", "inputs": {"images": ["decode0", 0]}}}
    forget = {"ckpt": ckpt,
              "fia": {"class_type": "FIAForgetConcepts", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                     **fia_inputs}},
              "info": {"class_type": "FIAMaskInfo", "inputs": {"mask": ["fia", 1]}}}
    sample = {**forget,
              "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a golf ball", "clip": ["ckpt", 1]}},
              "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
              "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
              "ksampler": {"class_type": "KSampler", "inputs": {
                  "model": ["fia", 0], "seed": 0, "steps": sample_steps, "cfg": 7.5, "sampler_name": "euler",
                  "scheduler": "normal", "positive": ["pos", 0], "negative": ["neg", 0],
                  "latent_image": ["latent", 0], "denoise": 1.0}},
              "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["ksampler", 0], "vae": ["ckpt", 2]}},
              "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "fia_fullsize"}}}
    return load, forget, sample


def fia_inputs(concepts: str = "golf ball", size: int = 128, num_prompts: int = 2, steps: int = 50,
               saliency_steps: int = 5, seed: int = 0) -> dict[str, Any]:
    """FIAForgetConcepts widget values (only the inputs every version of the node has)."""
    return {"concepts": concepts, "template": "objects", "r1": 0.05, "r2": 0.01, "alpha": 0.6, "strength": 1.0,
            "fusion": "concept-agnostic", "steps": steps, "saliency_steps": saliency_steps, "cfg": 7.5,
            "sampler_name": "euler", "scheduler": "normal", "seed": seed, "width": size, "height": size,
            "mode": "fast", "batch_size": num_prompts, "num_prompts": num_prompts}


def run_forget_on_server(arch: str, base_dir: str | os.PathLike, *, inputs: Mapping[str, Any] | None = None,
                         sample_steps: int = 4, extra_args: tuple[str, ...] = (), anon_limit_gb: float | None = None,
                         timeout: float = 3600.0, load_only: bool = False) -> dict[str, Any]:
    """Write (or reuse) the ``arch`` checkpoint, start a real ComfyUI server with the pack
    and no test registration (``tiny_models=False``), and run three prompts: load the
    checkpoint; FIAForgetConcepts (+ FIAMaskInfo); sample once with the erased model
    (skipped when ``sample_steps`` is 0); ``load_only``: the first prompt only. Returns times, peak memory of the server
    process, ComfyUI's model detection and the node's ``fia_summary``."""
    inputs = dict(inputs or fia_inputs())
    path = ensure_checkpoint(arch)
    info: dict[str, Any] = {"arch": arch, "checkpoint": str(path), "checkpoint_bytes": path.stat().st_size,
                            "detected": detect(path), "inputs": inputs, "sample_steps": sample_steps,
                            "server_args": list(extra_args), "completed": []}
    name = path.name
    load, forget, sample = _graphs(name, inputs, int(inputs["width"]), sample_steps)
    srv = H.ComfyServer(base_dir, tiny_models=False, models={f"checkpoints/{name}": path},
                        wait_for="/object_info/FIAForgetConcepts", extra_args=extra_args)
    t0 = time.monotonic()
    srv.start()
    info["startup_s"] = time.monotonic() - t0
    mem = ServerMemory(srv.proc.pid, int(anon_limit_gb * 1e9) if anon_limit_gb else None)
    try:
        with mem:
            for label, graph in (("load", load), ("forget", forget), ("sample", sample)):
                if (label == "sample" and not sample_steps) or (load_only and label != "load"):
                    continue
                t = time.monotonic()
                try:
                    entry = srv.run(graph, timeout=timeout)
                except H.ComfyServerError:
                    if mem.exceeded:
                        raise MemoryLimitExceeded(
                            f"{arch}: the server passed {anon_limit_gb} GB anonymous RSS during '{label}' "
                            f"(peak RSS {mem.peak_rss / 1e9:.1f} GB) and was killed") from None
                    raise
                info[f"{label}_s"] = time.monotonic() - t
                info["completed"].append(label)
                if label == "forget":
                    info["summary"] = entry["outputs"]["fia"]["fia_summary"][0]
                    info["report_head"] = entry["outputs"]["info"]["text"][0].splitlines()[:3]
                if label == "sample":
                    img = entry["outputs"]["save"]["images"][0]
                    info["image"] = str(Path(srv.base_dir) / img["type"] / img["subfolder"] / img["filename"])
    except MemoryLimitExceeded as e:
        info["error"] = str(e)
    finally:
        info["peak_rss_bytes"] = mem.peak_rss
        info["peak_anon_bytes"] = mem.peak_anon
        info["memory_samples"] = mem.samples
        log_text = srv.log_tail(200_000)
        srv.stop()
    info["server_log"] = [l for l in log_text.splitlines()
                          if any(s in l for s in ("model weight dtype", "model_type", "CLIP/text encoder model load",
                                                  "Requested to load", "loaded completely", "Prompt executed",
                                                  "FIA:", "WARNING", "Error", "error"))][-40:]
    return info
