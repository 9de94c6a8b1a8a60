"""Shared parts of the FIA nodes: input definitions (paper defaults, Appendix B), input
checks, prompt pairs, the error type users see, and the warnings a node run collects.

Node modules import this module and never each other.
"""
from __future__ import annotations

import logging
import math
import threading

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..fia_core import build_prompt_pairs
from ..fia_core.prompts import TEMPLATES
from ..fia_core import ConceptListError, normalize_concept, parse_concept_list
from .saliency_settings import SaliencySettings, SaliencySettingsError, check_sampler

log = logging.getLogger(__name__)

SALIENCY = "FIA_SALIENCY"
MASK = "FIA_MASK"
TEMPLATE_CHOICES = list(TEMPLATES) + ["custom"]
MAX_RESOLUTION = 8192
#: the pack's root package: ComfyUI names it after the pack's folder (an absolute path)
PACK_LOGGER = __name__.rsplit(".", 2)[0]


class FIAError(ValueError):
    """A problem the user must fix; the message starts with the node's name."""

    # ComfyUI shows an error's type as module + qualified name, and names the pack's
    # modules after its absolute folder path: a short public module name keeps that
    # path out of what the user sees (numpy does the same for its public types).
    __module__ = "fia"


class FIAInputError(FIAError):
    """Bad node input: the message names the node, the input and what was expected."""

    __module__ = "fia"

    def __init__(self, node: str, name: str, expected: str):
        super().__init__(f"{node}: input '{name}' {expected}")


# -- input definitions ------------------------------------------------------------------

def r1_input():
    return ("FLOAT", {"default": 0.05, "min": 0.001, "max": 1.0, "step": 0.001,
                      "tooltip": "r1 - temporal sparsity (Eq. 3): fraction of connections per step counted "
                                 "as active. Paper: 0.05 (0.06 for 'sexual')."})


def r2_input(default: float = 0.01):
    return ("FLOAT", {"default": default, "min": 0.0001, "max": 0.5, "step": 0.0001,
                      "tooltip": "r2 - spatial sparsity (Eq. 4-5): fraction of each row and of the layer that "
                                 "may be selected. Paper: 0.01 objects (0.007 easy, 0.03 hard), 0.02 art styles "
                                 "(0.03 Van Gogh)."})


def alpha_input():
    return ("FLOAT", {"default": 0.6, "min": 0.01, "max": 1.0, "step": 0.01,
                      "tooltip": "alpha - concept-agnostic threshold (Eq. 8): connections chosen by at least "
                                 "max(3, ceil(alpha x concepts)) concepts are kept; with one or two concepts "
                                 "the fused mask is their union. Paper: 0.6 objects/nudity, 0.8 art styles."})


def fusion_input():
    return (["concept-agnostic", "union"], {"default": "concept-agnostic",
            "tooltip": "concept-agnostic: keep connections shared by many concepts (Eq. 7-8, the paper). "
                       "union: prune every selected connection (naive baseline, for comparison)."})


def strength_input(tooltip: str):
    return ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": tooltip})


def template_inputs() -> dict:
    return {
        "template": (TEMPLATE_CHOICES, {"default": "objects",
                     "tooltip": "Prompt template (paper Table 6): objects 'a <concept> in a <place>' vs 'a <place>'; "
                                "art_style 'a <object> in the style of <concept>' vs 'a <object>'; explicit "
                                "'a photo of a <concept> <person>' vs 'a photo of a <person>'; custom uses custom_template."}),
    }


def custom_prompt_inputs() -> dict:
    """Optional inputs of template 'custom' (and base prompts for any template)."""
    return {
        "custom_template": ("STRING", {"default": "", "multiline": False,
                                       "tooltip": "Used when template is custom: must contain {concept}; may use "
                                                  "{place}, {person} or {object}."}),
        "base_prompts": ("STRING", {"default": "", "multiline": True,
                                    "tooltip": "Optional base prompts, one per line (the context without the "
                                               "concept); they replace the template's base side."}),
    }


def sampling_inputs() -> dict:
    """Inputs that define the saliency sampling run (all part of the cache key)."""
    return {
        "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                          "tooltip": "Length of the sampling schedule the saliency steps are taken from (paper: 50)."}),
        "saliency_steps": ("INT", {"default": 10, "min": 1, "max": 1000,
                                   "tooltip": "T - how many first steps of the schedule are sampled and recorded "
                                              "(paper: 10). The rest of the schedule is never run."}),
        "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale of the saliency run (paper: 7.5). "
                                     "Only the conditional branch is recorded."}),
        "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                         "tooltip": "Sampler of the saliency run. Samplers that choose their own steps "
                                    "(dpm_fast, dpm_adaptive) cannot record per-step saliency and are refused."}),
        "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal",
                      "tooltip": "Noise schedule of the saliency run."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                         "tooltip": "Seed of the starting noise (a concept prompt and its base prompt share it) "
                                    "and of the prompt placeholder choice."}),
        "width": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                          "tooltip": "Image width of the saliency run (SD1.5: 512, SDXL: 1024)."}),
        "height": ("INT", {"default": 512, "min": 64, "max": MAX_RESOLUTION, "step": 8,
                           "tooltip": "Image height of the saliency run."}),
        "mode": (["fast", "exact"], {"default": "fast",
                 "tooltip": "fast: the reference code's Wanda-style statistic (|W| x token-normalised input norm), "
                            "tiny memory. exact: Eq. 1 with the cosine term; every prompt in one batch and "
                            "about five layer-size float32 tensors of extra memory."}),
        "batch_size": ("INT", {"default": 4, "min": 1, "max": 256,
                               "tooltip": "Prompt pairs per sampling batch (rows = 2 x batch_size, x2 with CFG). "
                                          "Lower it if you run out of VRAM; results do not change."}),
        "num_prompts": ("INT", {"default": 8, "min": 2, "max": 512,
                                "tooltip": "Concept/base prompt pairs per concept (placeholders from paper Table 7)."}),
    }


# -- input checks -----------------------------------------------------------------------

def check_inputs(node: str, spec: dict, values: dict) -> None:
    """Widget values against their declaration: numbers finite and in range, choices from
    their list, a sampler that can record per-step saliency.

    ComfyUI's own validation lets NaN through (every comparison with NaN is false) and
    does not see linked values or in-process calls, so the node checks again.
    """
    for group in ("required", "optional"):
        for name, (kind, *opts) in spec.get(group, {}).items():
            value = values.get(name)
            if value is None:
                continue
            options = opts[0] if opts else {}
            if kind in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise FIAInputError(node, name, f"must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise FIAInputError(node, name, f"must be a finite number, got {value}")
                low, high = options.get("min"), options.get("max")
                if (low is not None and value < low) or (high is not None and value > high):
                    raise FIAInputError(node, name, f"must be in [{low}, {high}], got {value}")
            elif isinstance(kind, list) and value not in kind:
                shown = kind if len(kind) <= 12 else kind[:12] + ["..."]
                raise FIAInputError(node, name, f"must be one of {shown}, got {value!r}")
    if values.get("sampler_name") is not None:
        problem = sampler_problem(values["sampler_name"])
        if problem:
            raise FIAInputError(node, "sampler_name", problem)


def sampler_problem(name: str) -> str | None:
    """Why ``name`` cannot be the saliency run's sampler, or None."""
    if name not in comfy.samplers.KSampler.SAMPLERS:
        return f"{name!r} is not one of ComfyUI's samplers"
    try:
        check_sampler(name)
    except ValueError as e:
        why = getattr(e, "expected", None) or str(e)  # the runner's errors name the input themselves
        return why if name in why else f"{name!r} cannot record per-step saliency: {why}"
    return None


def validate_sampler(sampler_name=None):
    """VALIDATE_INPUTS body of the saliency nodes: refuses a sampler before the prompt runs
    (ComfyUI then skips its own list check for this input, so membership is checked here)."""
    if sampler_name is None:  # linked: checked when the node runs
        return True
    return sampler_problem(sampler_name) or True


def concept_entries(node: str, text: str, default_r2: float) -> list:
    """The concepts of a FIAForgetConcepts list (fia_core.parse_concept_list), errors named."""
    try:
        entries = parse_concept_list(text or "", default_r2)
    except ConceptListError as e:
        raise FIAInputError(node, "concepts", str(e)) from None
    if not entries:
        raise FIAInputError(node, "concepts", "is empty: list the concepts to erase, one per line")
    return entries


def concept_name(node: str, text: str) -> str:
    """One concept, normalised as in concept lists."""
    name = normalize_concept(text or "")
    if not name:
        raise FIAInputError(node, "concept", "is empty: type the concept to erase, e.g. 'golf ball'")
    return name


def split_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def make_pairs(node: str, concept: str, template: str, num_prompts: int, seed: int,
               custom_template: str = "", base_prompts: str = ""):
    """The concept's prompt pairs; template problems are named as node inputs."""
    if not concept.strip():
        raise FIAInputError(node, "concept", "is empty: type the concept to erase, e.g. 'golf ball'")
    if template == "custom" and "{concept}" not in (custom_template or ""):
        raise FIAInputError(node, "custom_template", 'must contain "{concept}" when template is custom, '
                                                      'e.g. "a {concept} in a {place}"')
    try:
        return build_prompt_pairs(concept.strip(), template, num_prompts, seed,
                                  custom_template or None, split_lines(base_prompts) or None)
    except ValueError as e:
        raise FIAInputError(node, "template", f"could not build prompts: {e}") from None


def settings_from(node: str, kwargs: dict, r1: float) -> SaliencySettings:
    if kwargs["saliency_steps"] > kwargs["steps"]:
        raise FIAInputError(node, "saliency_steps", f"({kwargs['saliency_steps']}) must not exceed steps ({kwargs['steps']})")
    settings = SaliencySettings(
        steps=kwargs["steps"], saliency_steps=kwargs["saliency_steps"], cfg=kwargs["cfg"],
        sampler_name=kwargs["sampler_name"], scheduler=kwargs["scheduler"], seed=kwargs["seed"],
        width=kwargs["width"], height=kwargs["height"], mode=kwargs["mode"], batch_size=kwargs["batch_size"],
        r1=r1,
    )
    try:  # the runner's own checks (resolution caps, non-finite values, samplers)
        settings.validate()
    except SaliencySettingsError as e:
        raise FIAInputError(node, e.input_name, e.expected) from None
    return settings


_FILE_SUFFIX = "_00000_.safetensors"  # what FIASaveMask appends to the prefix
_NAME_MAX = 255  # bytes per path component on common file systems


def check_file_prefix(node: str, name: str, prefix: str) -> str:
    """A file-name prefix the file system will take, or a message saying why not."""
    if any(ord(ch) < 32 or ch == "\x7f" for ch in prefix):
        raise FIAInputError(node, name, f"{prefix[:40]!r} contains a control character (such as NUL); "
                                        "use letters, digits, '_', '-' and '/' for subfolders")
    parts = prefix.replace("\\", "/").split("/")
    for i, part in enumerate(parts):
        room = _NAME_MAX - (len(_FILE_SUFFIX) if i == len(parts) - 1 else 0)
        if len(part.encode("utf-8")) > room:
            raise FIAInputError(node, name, f"has a name part of {len(part.encode('utf-8'))} bytes "
                                            f"({part[:24]!r}...); at most {room} fit in a file name")
    return prefix


def progress_bar(total: int):
    """A (done, total) callback that drives a ComfyUI progress bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(max(1, total))

    def update(done: int, of: int) -> None:
        bar.update_absolute(done, of)
        comfy.model_management.throw_exception_if_processing_interrupted()

    return update


# -- one node run: errors with the node's name, warnings on the node ----------------------

_SHOWN = "fia_on_node"  # log-record attribute: this warning is on a node summary already


def unique(items) -> list:
    return list(dict.fromkeys(items))


class _WarningCollector(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and not getattr(record, _SHOWN, False):
            self.messages.append(record.getMessage())


class NodeRun:
    """The body of a node (``with NodeRun(node) as run:``).

    - ValueErrors from fia_core and the runner (what the user must fix) leave as FIAError
      with the node's name in front;
    - warnings the pack logs meanwhile (in this thread) are collected, and
      :meth:`summary` puts them on the node's summary beside its own warnings, which it
      logs: every warning is both in the log and on the canvas.
    """

    def __init__(self, node: str):
        self.node = node
        self._collector = _WarningCollector()

    def __enter__(self) -> "NodeRun":
        logging.getLogger(PACK_LOGGER).addHandler(self._collector)
        return self

    def __exit__(self, typ, error, tb) -> bool:
        logging.getLogger(PACK_LOGGER).removeHandler(self._collector)
        if isinstance(error, ValueError) and not isinstance(error, FIAError):
            message = str(error)
            if not message.startswith(f"{self.node}:"):
                message = f"{self.node}: {message}"
            raise FIAError(message) from None
        return False

    def summary(self, entry: dict, warnings=()) -> dict:
        """``entry`` with "warnings": its own and ``warnings`` (logged here), then the
        warnings the pack logged during the run."""
        own = unique([*entry.get("warnings", ()), *warnings])
        for w in own:
            log.warning("%s: %s", self.node, w, extra={_SHOWN: True})
        entry["warnings"] = unique([*own, *(m for m in self._collector.messages if m not in own)])
        return entry

