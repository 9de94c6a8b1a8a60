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

    _NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")
    _QUOTED = re.compile(r'"(?P<name>[^"]*)"\s*(?::\s*(?P<value>.*))?')

    def parse_concept_list(text: str, default_r2: float) -> list:  # INTERIM: replaced at merge by fia_core
        """Same rules as the wave-2 fia_core: an unquoted line's text after its last ':' must
        be an r2 in (0, 0.5]; a concept containing ':' is quoted; duplicates (normalised,
        case-folded) are refused naming both; an empty list gives []."""
        out: list[ConceptEntry] = []
        seen: dict[str, ConceptEntry] = {}
        for number, raw in enumerate((text or "").splitlines(), 1):
            line = normalize_concept(raw)
            if not line:
                continue

            def fail(why: str):
                return ConceptListError(f"line {number} ('{line}'): {why}")

            def r2_of(value: str) -> float:
                value = value.strip()
                if _NUMBER.fullmatch(value) is None or not 0.0 < float(value) <= 0.5:
                    raise fail(f"r2 must be in (0, 0.5], got '{value}'; to use ':' inside a concept, write the "
                               'concept in double quotes, e.g. "Area: 51" or "Area: 51": 0.02')
                return float(value)

            if line.startswith('"'):
                m = _QUOTED.fullmatch(line)
                if m is None:
                    raise fail('a quoted concept needs its closing \'"\', optionally followed by ": r2", '
                               'e.g. "Area: 51": 0.02')
                name, r2 = m["name"], default_r2 if m["value"] is None else r2_of(m["value"])
            elif '"' in line:
                raise fail('quotes go around the whole concept, e.g. "Area: 51": 0.02')
            elif ":" in line:
                name, _, value = line.rpartition(":")
                r2 = r2_of(value)
            else:
                name, r2 = line, default_r2
            name = normalize_concept(name)
            if not name:
                raise fail("no concept name (type the concept before ':')")
            first = seen.get(name.casefold())
            if first is not None:
                raise fail(f"'{name}' is the same concept as '{first.name}' on line {first.line} (names are "
                           "compared ignoring case, spacing and invisible characters): list each concept once")
            seen[name.casefold()] = ConceptEntry(name, r2, number)
            out.append(seen[name.casefold()])
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
