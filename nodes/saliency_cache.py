"""Disk cache of fast-mode saliency: an identity key over everything that changes a
concept's saliency, and entries validated on read (a bad entry is recomputed, never served).

The key (sha256 of a JSON payload, CACHE_VERSION included) covers:

- the UNet: a content fingerprint of the unpatched diffusion model (every tensor's name,
  shape, dtype and a strided sample of 1024 values; computed once per loaded model and
  kept on its model_state), the model config class, model type (eps / v / ...), dtypes,
  and the model_sampling object (class and its sigmas);
- every weight patch on the ModelPatcher: per key, each patch's strengths, offset,
  function and content (tensors up to 2^20 elements hashed whole, e.g. LoRA factors and
  mask indices; larger ones, e.g. "diff" patches, by shape, dtype and a strided sample),
  memoised per patches_uuid (an in-process memo key only: the digest is content-based);
- what changes the forward besides weights: model_options (transformer_options patches
  and replacements, CFG functions, ...), object patches, wrappers (ours excluded),
  callbacks, hook patches and injections, described stably: callables by module,
  qualified name, bytecode digest, defaults and closure contents; objects by class and
  attributes; never by id() or repr(). Anything that cannot be described so (a uuid, an
  opaque object, too deep a structure) disables the cache for that run, with a note;
- the text side: the content of every encoded prompt (concept, base and the empty
  negative: cond and pooled outputs), which covers the text encoder's weights, its
  patches and its layer setting (CLIPSetLastLayer) exactly, plus clip.layer_idx;
- the concept, its prompt pairs, every SaliencySettings field except batch_size (which
  does not change results) and the recorder's statistic (sigma_b's ddof, probed).
"""
from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import logging
import os
import types
from typing import Any

import torch

import folder_paths

from .. import fia_core
from ..fia_core import ConceptSaliency, PromptPair
from .comfy_adapter import model_type_name
from .model_state import ModelIdentity, state_of, tensor_digest
from .saliency_sampling import WRAPPER_KEY, EncodedPrompts
from .saliency_settings import SaliencySettings

log = logging.getLogger(__name__)

CACHE_VERSION = 2
CACHE_FOLDER = "fia_cache"
_MAX_NODES = 50_000
_MAX_DEPTH = 12


class Undescribable(ValueError):
    """Part of the model's setup cannot be described stably: do not use the cache."""


# -- stable descriptions ------------------------------------------------------------------
def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


class _Describer:
    """Turns a structure into JSON-able data that is equal across processes for equal setups."""

    def __init__(self):
        self.nodes = 0
        self._stack: set[int] = set()

    def __call__(self, obj: Any, depth: int = 0, where: str = "") -> Any:
        self.nodes += 1
        if self.nodes > _MAX_NODES or depth > _MAX_DEPTH:
            raise Undescribable(f"{where or 'a patch'} is too large or deep to describe")
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return repr(obj)
        if isinstance(obj, torch.Tensor):
            h = hashlib.sha256()
            tensor_digest(obj, h)
            return {"tensor": h.hexdigest()[:24]}
        if isinstance(obj, (torch.dtype, torch.device)):
            return str(obj)
        if isinstance(obj, enum.Enum):
            return {"enum": f"{_qualname(type(obj))}.{obj.name}"}
        if id(obj) in self._stack:
            return {"cycle": type(obj).__qualname__}
        self._stack.add(id(obj))
        try:
            return self._compound(obj, depth + 1, where)
        finally:
            self._stack.discard(id(obj))

    def _compound(self, obj: Any, depth: int, where: str) -> Any:
        if isinstance(obj, (list, tuple)):
            return [type(obj).__name__] + [self(v, depth, where) for v in obj]
        if isinstance(obj, dict):
            items = [[str(self(k, depth, where)), self(v, depth, f"{where}.{k}")] for k, v in obj.items()]
            return {"dict": sorted(items, key=lambda kv: kv[0])}
        if isinstance(obj, (set, frozenset)):
            return {"set": sorted(json.dumps(self(v, depth, where), sort_keys=True) for v in obj)}
        if isinstance(obj, functools.partial):
            return {"partial": self(obj.func, depth, where), "args": self(obj.args, depth, where),
                    "kw": self(obj.keywords, depth, where)}
        if inspect.ismethod(obj):
            return {"method": _qualname(obj.__func__), "code": self._code(obj.__func__),
                    "self": self(obj.__self__, depth, where)}
        if isinstance(obj, types.FunctionType):
            cells = [c.cell_contents for c in (obj.__closure__ or ())]
            return {"function": _qualname(obj), "code": self._code(obj),
                    "defaults": self(obj.__defaults__, depth, where), "closure": self(cells, depth, where)}
        if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType, type)):
            return {"callable": _qualname(obj)}
        if type(obj).__module__ == "uuid":
            raise Undescribable(f"{where or 'a patch'} holds a uuid (different in every process)")
        state = getattr(obj, "__dict__", None)
        if state is None:
            raise Undescribable(f"{where or 'a patch'} holds a {type(obj).__qualname__} that cannot be described")
        skip = {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks",
                "_load_state_dict_pre_hooks", "_state_dict_pre_hooks", "_load_state_dict_post_hooks",
                "_backward_pre_hooks", "_is_full_backward_hook"}
        return {"object": _qualname(type(obj)),
                "state": self({k: v for k, v in state.items() if k not in skip}, depth, where)}

    @staticmethod
    def _code(fn) -> str:
        code = getattr(fn, "__code__", None)
        if code is None:
            return ""
        return hashlib.sha256(code.co_code + repr(code.co_names).encode()).hexdigest()[:16]


def describe(obj: Any, where: str = "") -> Any:
    """Stable, JSON-able description of ``obj`` (raises Undescribable)."""
    return _Describer()(obj, where=where)


def digest(obj: Any, where: str = "") -> str:
    return hashlib.sha256(json.dumps(describe(obj, where), sort_keys=True).encode()).hexdigest()[:32]


# -- the key --------------------------------------------------------------------------------
def _statistic_version() -> str:
    """Identity of the recorder's statistic: sigma_b's ddof, probed on two values (0 and 1:
    std 0.5 with ddof 0, 0.7071 with ddof 1), so entries of another ddof are never served."""
    try:
        moments = fia_core.saliency.RunningMoments()
        moments.add(torch.tensor([[0.0], [1.0]]))
        return f"std01={float(moments.std()[0]):.4f}"
    except Exception:  # a recorder without RunningMoments: its declared ddof, if any
        return f"ddof={getattr(fia_core.saliency, 'STD_DDOF', getattr(fia_core, 'STD_DDOF', '?'))}"


def model_description(model) -> dict:
    """Everything on the MODEL that changes its forward (see the module docstring)."""
    state = state_of(model)
    wrappers = {t: {k: v for k, v in per.items() if k != WRAPPER_KEY} for t, per in model.wrappers.items()}
    inner = model.model
    return {
        "unet": state.base_fingerprint(model),
        "config": model_type_name(model),
        "model_type": describe(getattr(inner, "model_type", None)),
        "dtype": str(model.model_dtype()),
        "manual_cast": str(getattr(inner, "manual_cast_dtype", None)),
        "model_sampling": digest(model.get_model_object("model_sampling"), "model_sampling"),
        "patches": state.patch_digest(model, lambda p: digest(p, "a weight patch")),
        "object_patches": digest(model.object_patches, "an object patch"),
        "model_options": digest(model.model_options, "model_options"),
        "wrappers": digest(wrappers, "a wrapper"),
        "callbacks": digest(model.callbacks, "a callback"),
        "hook_patches": digest(model.hook_patches, "a hook patch"),
        "injections": digest(model.injections, "an injection"),
        "additional_models": sorted(model.additional_models),
    }


def cache_key(model, clip, prompts: EncodedPrompts, concept: str, pairs: list[PromptPair],
              settings: SaliencySettings) -> str:
    """The entry's identity (raises Undescribable when part of the setup has none)."""
    payload = {
        "v": CACHE_VERSION,
        "statistic": _statistic_version(),
        "model": model_description(model),
        "text": {"layer_idx": describe(getattr(clip, "layer_idx", None)),
                 "encodings": digest([prompts.concept, prompts.base, prompts.negative], "a text encoding")},
        "concept": concept,
        "pairs": [[p.concept_prompt, p.base_prompt] for p in pairs],
        "settings": {k: v for k, v in settings.as_dict().items() if k != "batch_size"},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# -- files ----------------------------------------------------------------------------------
def cache_dir() -> str:
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, os.path.join(folder_paths.models_dir, CACHE_FOLDER))
    return folder_paths.get_folder_paths(CACHE_FOLDER)[0]


def cache_path(key: str) -> str:
    return os.path.join(cache_dir(), "saliency", f"{key}.safetensors")


def _fast_saliency(concept, settings: SaliencySettings, layer_shapes, columns, weight_abs, pairs,
                   identity: ModelIdentity):
    info = dict(prompts=tuple(pairs), architecture=identity.architecture, fingerprint=identity.fingerprint,
                settings={"model_type": identity.model_type, **settings.as_dict()})
    fast_type = getattr(fia_core, "FastSaliency", None)
    if fast_type is not None:  # fia_core with one saliency type per mode
        return fast_type(concept, settings.target, dict(layer_shapes), settings.saliency_steps, settings.r1,
                         columns, weight_abs, **info)
    return ConceptSaliency(concept, "fast", settings.target, dict(layer_shapes), settings.saliency_steps,
                           settings.r1, columns=columns, weight_abs=weight_abs, **info)


def _validated(tensors: dict, meta: dict, key: str, layer_shapes: dict, steps: int) -> dict[str, torch.Tensor]:
    """The entry's columns, or ValueError saying what is wrong with it."""
    if meta.get("fia_cache_version") != str(CACHE_VERSION) or meta.get("key") != key:
        raise ValueError("written by another version or for another key")
    if set(tensors) != set(layer_shapes):
        raise ValueError("its layers are not the model's")
    zero_layers = set(json.loads(meta.get("zero_layers", "[]")))
    out = {}
    for name, (_c_out, c_in) in layer_shapes.items():
        t = tensors[name]
        if tuple(t.shape) != (steps, c_in) or t.dtype != torch.float32:
            raise ValueError(f"layer {name} has shape {tuple(t.shape)} {t.dtype}, expected ({steps}, {c_in}) float32")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"layer {name} holds NaN or inf")
        if bool((t < 0).any()):
            raise ValueError(f"layer {name} holds negative saliency")
        if not bool(t.any()) and name not in zero_layers:
            raise ValueError(f"layer {name} is all zero but was not stored so")
        out[name] = t
    return out


def load_cached(key: str, weight_abs, layer_shapes: dict, concept: str, pairs, settings: SaliencySettings,
                identity: ModelIdentity):
    """A validated cached fast-mode saliency, or None (missing, unreadable or invalid)."""
    from safetensors import safe_open

    path = cache_path(key)
    if settings.mode != "fast" or not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        columns = _validated(tensors, meta, key, layer_shapes, settings.saliency_steps)
    except Exception as e:  # a damaged entry is recomputed, never trusted
        log.warning("FIA saliency cache entry %s is not usable (%s); recomputing", path, e)
        return None
    columns = {name: columns[name] for name in layer_shapes}
    return _fast_saliency(concept, settings, layer_shapes, columns, weight_abs, pairs, identity)


def store_cached(key: str, saliency) -> None:
    from safetensors.torch import save_file

    columns = getattr(saliency, "columns", None)
    if getattr(saliency, "mode", "") != "fast" or columns is None:
        return  # exact mode's integrated sensitivity is layer-sized: not worth the disk
    path = cache_path(key)
    meta = {"fia_cache_version": str(CACHE_VERSION), "key": key, "concept": saliency.concept,
            "zero_layers": json.dumps(sorted(k for k, c in columns.items() if not bool(c.any())))}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        save_file({k: c.float().contiguous() for k, c in columns.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("FIA could not write the saliency cache (%s); continuing without it", e)
