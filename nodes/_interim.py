"""INTERIM: replaced at merge by fia_core/runner.

Stand-ins for the interfaces agreed in the wave-2 brief that other branches deliver:
fia_core (normalize_concept, parse_concept_list, ConceptEntry, ConceptListError,
mask_warnings, select_concept_mask) and the runner (nodes/saliency_settings.py:
SaliencySettings, check_sampler; nodes/saliency.py: concept_saliency, SaliencyRun).

Each name is taken from its real home when that exists, so the pack keeps working right
after the merge; the fallbacks below are implemented on today's code only so that the
node side can be written and tested before the merge. At merge: delete this file and
import the names from their homes (nodes/common.py, nodes_apply.py, nodes_fusion.py,
nodes_saliency.py, nodes_io.py, report.py and routes.py import them from here).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from .. import fia_core as _core

# -- fia_core (core) --------------------------------------------------------------------

if hasattr(_core, "parse_concept_list"):  # INTERIM: replaced at merge by fia_core
    from ..fia_core import ConceptEntry, ConceptListError, normalize_concept, parse_concept_list
else:
    @dataclass(frozen=True)
    class ConceptEntry:  # INTERIM: replaced at merge by fia_core
        name: str
        r2: float
        line: int

    class ConceptListError(ValueError):  # INTERIM: replaced at merge by fia_core
        """A concept list line that cannot be used; the message starts with "line N ('<line>'): "."""

    def normalize_concept(text: str) -> str:  # INTERIM: replaced at merge by fia_core
        text = unicodedata.normalize("NFKC", text or "")
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
        return " ".join(text.split())

    _QUOTED = re.compile(r'^"(?P<name>[^"]*)"\s*(?::\s*(?P<value>.*?))?$')
    _SUFFIX = re.compile(r"^(?P<name>.+?)\s*:\s*(?P<value>[^\s:]+)$")

    def parse_concept_list(text: str, default_r2: float) -> list:  # INTERIM: replaced at merge by fia_core
        out: list[ConceptEntry] = []
        seen: dict[str, tuple[int, str]] = {}
        for number, raw in enumerate((text or "").splitlines(), 1):
            line = normalize_concept(raw)
            if not line:
                continue

            def fail(why: str):
                return ConceptListError(f"line {number} ('{line}'): {why}")

            if line.startswith('"'):
                m = _QUOTED.match(line)
                if m is None:
                    raise fail('write a quoted concept as "name" or "name": r2, e.g. "Area: 51" or "Area: 51": 0.02')
                name, value = normalize_concept(m["name"]), m["value"]
            else:
                m = _SUFFIX.match(line)
                name, value = (m["name"], m["value"]) if m else (line, None)
            if value is None:
                r2 = default_r2
            else:
                try:
                    r2 = float(value)
                except ValueError:
                    r2 = float("nan")
                if not 0.0 < r2 <= 0.5:  # NaN fails too
                    raise fail(f"r2 must be in (0, 0.5], got {value!r}; a concept that itself ends in "
                               f"': <number>' is written in double quotes, e.g. \"Area: 51\"")
            if not name:
                raise fail("the concept name is empty")
            key = name.casefold()
            if key in seen:
                raise fail(f"'{name}' is listed twice (line {seen[key][0]}: '{seen[key][1]}')")
            seen[key] = (number, name)
            out.append(ConceptEntry(name, r2, number))
        return out

if hasattr(_core, "mask_warnings"):  # INTERIM: replaced at merge by fia_core
    from ..fia_core import mask_warnings
else:
    def mask_warnings(mask) -> list:  # INTERIM: replaced at merge by fia_core
        s = mask.stats()
        names = ", ".join(f"'{c}'" for c in mask.concepts)
        out = []
        if mask.kind == "concept":
            r2 = mask.params.get("r2") or 0.0
            if s["total_pruned"] == 0:
                out.append(f"{names}: the concept mask prunes nothing: no connection passed Eq. 2's contrast; "
                           "use more prompt pairs or saliency steps, or raise r1")
            elif r2 and s["pruned_fraction"] < 0.1 * r2:
                out.append(f"{names}: the concept mask prunes {100 * s['pruned_fraction']:.3g} % of FFN2, far less "
                           f"than r2 = {r2}: few connections passed Eq. 2's contrast; use more prompt pairs or "
                           "saliency steps, or raise r1")
            return out
        sources = getattr(mask, "sources", ())
        union = sum(int(a.numel()) for a in mask.agnostic.values()) + s["total_pruned"]
        if s["total_pruned"] == 0:
            out.append(f"the fused mask of {names} prunes nothing: every selected connection was kept as "
                       "concept-agnostic; raise alpha or use fusion = union")
        elif union and s["total_pruned"] < 0.1 * union:
            out.append(f"the fused mask prunes {s['total_pruned']:,} of the {union:,} connections its sources "
                       "select (the rest kept as concept-agnostic); raise alpha or use fusion = union")
        groups: dict[tuple, list[str]] = {}
        for src in sources:
            content = tuple(tuple(src.layers[k].indices.tolist()) for k in src.layers)
            groups.setdefault(content, []).append(src.concepts[0])
        for same in groups.values():
            if len(same) > 1:
                out.append("masks " + " and ".join(f"'{c}'" for c in same) + " are identical: check that each "
                           "mask input comes from its own concept")
        prints = {src.fingerprint for src in sources if src.fingerprint}
        if len(prints) > 1:
            out.append(f"the masks of {names} were built on different checkpoints; build every mask on the "
                       "model you apply the result to")
        return out

if hasattr(_core, "select_concept_mask"):  # INTERIM: replaced at merge by fia_core
    from ..fia_core import select_concept_mask
else:
    def select_concept_mask(saliency, r2: float, r1: float | None = None,
                            progress: Callable | None = None):  # INTERIM: replaced at merge by fia_core
        return saliency.select(r2=r2, r1=r1, progress=progress)


# -- runner -------------------------------------------------------------------------------

try:  # INTERIM: replaced at merge by runner (nodes/saliency_settings.py)
    from .saliency_settings import SaliencySettings, check_sampler
except ImportError:
    from .saliency_runner import SaliencySettings  # INTERIM: replaced at merge by runner

    #: samplers that do not evaluate the model at the schedule's sigmas (their own step
    #: control), so no step of the saliency window can be recorded
    _NO_PER_STEP = frozenset({"dpm_fast", "dpm_adaptive"})

    class UnsupportedSamplerError(ValueError):  # INTERIM: replaced at merge by runner
        pass

    def check_sampler(name: str) -> None:  # INTERIM: replaced at merge by runner
        if name in _NO_PER_STEP:
            raise UnsupportedSamplerError(
                f"'{name}' chooses its own steps, so it cannot record per-step saliency; "
                "use a fixed-step sampler such as euler (the default)")

try:  # INTERIM: replaced at merge by runner (nodes/saliency.py)
    from .saliency import SaliencyRun, concept_saliency
except ImportError:
    from . import saliency_runner as _runner  # INTERIM: replaced at merge by runner

    @dataclass(frozen=True)
    class SaliencyRun:  # INTERIM: replaced at merge by runner
        saliency: object
        cached: bool
        notes: tuple = ()

    def concept_saliency(model, clip, concept, pairs, settings, progress=None,
                         use_cache: bool = True) -> SaliencyRun:  # INTERIM: replaced at merge by runner
        saliency, cached = _runner.concept_saliency(model, clip, concept, pairs, settings, progress, use_cache)
        notes = (f"saliency of '{concept}' from the disk cache (models/fia_cache)",) if cached else ()
        return SaliencyRun(saliency, cached, notes)
