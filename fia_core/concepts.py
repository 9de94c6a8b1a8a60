"""Concept text: normalisation and the one-concept-per-line list with optional r2.

Every concept is normalised before use (``normalize_concept``): Unicode NFKC, invisible
format characters (category Cf: zero-width spaces, joiners, BOM, bidi marks) dropped,
whitespace collapsed to single spaces, stripped. Two concepts are the same concept when
their normalised names agree ignoring case (``concept_key``).

List syntax (``parse_concept_list``), one concept per line:
    golf ball            -> r2 = the default
    parachute: 0.03      -> r2 = 0.03 (a decimal in (0, 0.5], e.g. 0.03 or 3e-2)
    "Area: 51"           -> a concept containing ':' is written in double quotes
    "Area: 51": 0.02     -> ... with its own r2
Lines that are empty after normalisation (blank, or only invisible characters) are
skipped. Text after an unquoted line's last ':' must be a valid r2: ``cross: abc``,
``cross: -1``, ``cross: nan``, ``cross: 0,2`` are errors naming the line, never a concept
literally named "cross: abc". A quoted name cannot itself contain '"'.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass

R2_MAX = 0.5
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")
_QUOTED = re.compile(r'"(?P<name>[^"]*)"\s*(?::\s*(?P<value>.*))?')


class ConceptListError(ValueError):
    """A line of a concept list cannot be used; the message starts with "line N ('<line>'): "."""


@dataclass(frozen=True)
class ConceptEntry:
    """One concept of a list: its normalised name, its r2 and its 1-based line number."""

    name: str
    r2: float
    line: int


def normalize_concept(text: str) -> str:
    """NFKC, invisible format characters (Cf) dropped, whitespace collapsed, stripped."""
    text = unicodedata.normalize("NFKC", text or "")
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return re.sub(r"\s+", " ", text).strip()


def concept_key(text: str) -> str:
    """What two concepts must share to be the same concept: normalised, case-folded."""
    return normalize_concept(text).casefold()


def _fail(number: int, line: str, why: str) -> ConceptListError:
    return ConceptListError(f"line {number} ('{line}'): {why}")


def _check_r2_value(value: float, what: str) -> float:
    if not (math.isfinite(value) and 0.0 < value <= R2_MAX):
        raise ValueError(f"{what} must be a number in (0, {R2_MAX}], got {value}")
    return value


def _parse_r2(text: str, number: int, line: str) -> float:
    value = text.strip()
    hint = ('; to use ":" inside a concept, write the concept in double quotes, '
            'e.g. "Area: 51" or "Area: 51": 0.02')
    if not value:
        raise _fail(number, line, f"nothing after ':' (expected r2, a decimal in (0, {R2_MAX}]){hint}")
    if re.fullmatch(r"-\s*" + _NUMBER.pattern, value):
        raise _fail(number, line, f"r2 must be in (0, {R2_MAX}], got {value}")
    if _NUMBER.fullmatch(value) is None:
        extra = " (use a decimal point, not a comma)" if re.fullmatch(r"[0-9]*,[0-9]+", value) else ""
        raise _fail(number, line, f"r2 '{value}' is not a decimal number in (0, {R2_MAX}]{extra}{hint}")
    r2 = float(value)
    if not 0.0 < r2 <= R2_MAX:
        raise _fail(number, line, f"r2 must be in (0, {R2_MAX}], got {value}")
    return r2


def _parse_line(line: str, number: int, default_r2: float) -> tuple[str, float]:
    """(raw name, r2) of one non-empty normalised line."""
    if line.startswith('"'):
        m = _QUOTED.fullmatch(line)
        if m is None:
            raise _fail(number, line, 'a quoted concept needs its closing \'"\', optionally followed by ": r2", '
                                      'e.g. "Area: 51": 0.02')
        value = m["value"]
        return m["name"], default_r2 if value is None else _parse_r2(value, number, line)
    if '"' in line:
        raise _fail(number, line, 'quotes go around the whole concept, e.g. "Area: 51": 0.02')
    if ":" not in line:
        return line, default_r2
    name, _, value = line.rpartition(":")
    return name, _parse_r2(value, number, line)


def parse_concept_list(text: str, default_r2: float) -> list[ConceptEntry]:
    """Concepts of a multi-line list (syntax in the module docstring), in order.

    Raises ConceptListError naming the line for a bad r2, an empty name or a duplicate
    (normalised names compared ignoring case; the message names both spellings), and a
    plain ValueError when ``default_r2`` itself is not in (0, 0.5]. An empty list gives [].
    """
    _check_r2_value(float(default_r2), "the default r2")
    out: list[ConceptEntry] = []
    seen: dict[str, ConceptEntry] = {}
    for number, raw in enumerate((text or "").splitlines(), 1):
        line = normalize_concept(raw)
        if not line:
            continue
        raw_name, r2 = _parse_line(line, number, default_r2)
        name = normalize_concept(raw_name)
        if not name:
            raise _fail(number, line, "no concept name (type the concept before ':')")
        first = seen.get(concept_key(name))
        if first is not None:
            raise _fail(number, line, f"'{name}' is the same concept as '{first.name}' on line {first.line} "
                                      "(names are compared ignoring case, spacing and invisible characters): "
                                      "list each concept once")
        entry = ConceptEntry(name, r2, number)
        seen[concept_key(name)] = entry
        out.append(entry)
    return out
