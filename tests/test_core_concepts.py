"""Concept text: normalisation and the concept list (one per line, optional ': r2',
double quotes for names containing ':'), against a hand-written table."""
from __future__ import annotations

import pytest

from fia_core import ConceptEntry, ConceptListError, normalize_concept, parse_concept_list

ZWSP, ZWJ, BOM, NBSP = "\u200b", "\u200d", "\ufeff", "\u00a0"


@pytest.mark.parametrize("text,expected", [
    ("golf ball", "golf ball"),
    ("  golf \t  ball  ", "golf ball"),
    (f"golf{NBSP}ball", "golf ball"),           # NFKC: no-break space -> space
    (f"golf{ZWSP} ball{ZWJ}", "golf ball"),      # invisible format characters dropped
    (f"{BOM}cross", "cross"),
    ("ｇｏｌｆ ｂａｌｌ", "golf ball"),            # NFKC: full-width letters
    ("Ⅸ", "IX"),
    (ZWSP * 3, ""),
    ("Café", "Café"),
])
def test_normalize_concept(text, expected):
    assert normalize_concept(text) == expected


GOOD = [
    ("golf ball", 0.01, [("golf ball", 0.01, 1)]),
    ("golf ball\nparachute: 0.03", 0.01, [("golf ball", 0.01, 1), ("parachute", 0.03, 2)]),
    ("\n\n  cross :0.5  \n", 0.01, [("cross", 0.5, 3)]),
    ("a: 3e-2\nb: .02\nc: 1E-3", 0.01, [("a", 0.03, 1), ("b", 0.02, 2), ("c", 0.001, 3)]),
    (f"{ZWSP}\ncross\n {ZWSP}{ZWJ} \n", 0.02, [("cross", 0.02, 2)]),  # zero-width-only lines are empty
    ('"Area: 51"', 0.01, [("Area: 51", 0.01, 1)]),
    ('"Area: 51": 0.02', 0.01, [("Area: 51", 0.02, 1)]),
    ('"Area: 51" : 0.02\n"Re: Zero"', 0.01, [("Area: 51", 0.02, 1), ("Re: Zero", 0.01, 2)]),
    (f'"golf{ZWSP}  ball"', 0.01, [("golf ball", 0.01, 1)]),
    ("Van Gogh\nvan gogh 2", 0.02, [("Van Gogh", 0.02, 1), ("van gogh 2", 0.02, 2)]),
    ("", 0.01, []),
]


@pytest.mark.parametrize("text,default,expected", GOOD)
def test_parse_concept_list(text, default, expected):
    assert parse_concept_list(text, default) == [ConceptEntry(*e) for e in expected]


BAD = [
    ("cross: abc", 1, "not a decimal number"),
    ("golf ball\ncross: -1", 2, "must be in (0, 0.5]"),
    ("cross: nan", 1, "not a decimal number"),
    ("cross: inf", 1, "not a decimal number"),
    ("cross: 0,2", 1, "decimal point"),
    ("cross: 0.6", 1, "must be in (0, 0.5]"),
    ("cross: 0", 1, "must be in (0, 0.5]"),
    ("cross:", 1, "nothing after ':'"),
    ("Area: 51abc", 1, "double quotes"),
    (": 0.1", 1, "no concept name"),
    ('"": 0.1', 1, "no concept name"),
    ('"Area: 51', 1, "closing"),
    ('"Area: 51": abc', 1, "not a decimal number"),
    ('"Area": 51', 1, None),  # valid: "Area" with r2 51 -> out of range
    ('Area "51"', 1, "quotes go around the whole concept"),
]


@pytest.mark.parametrize("text,line,fragment", BAD)
def test_parse_concept_list_errors_name_the_line(text, line, fragment):
    with pytest.raises(ConceptListError) as e:
        parse_concept_list(text, 0.01)
    msg = str(e.value)
    bad_line = text.splitlines()[line - 1]
    assert msg.startswith(f"line {line} ('{normalize_concept(bad_line)}'): "), msg
    if fragment:
        assert fragment in msg, msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text,first,second", [
    ("golf ball\nGolf Ball", "golf ball", "Golf Ball"),
    ("golf ball\ngolf  ball: 0.02", "golf ball", "golf ball"),
    (f"cross\ncross{ZWSP}", "cross", "cross"),
    ('"Area: 51"\n"area:  51": 0.02', "Area: 51", "area: 51"),
    ("ｇｏｌｆ\nGOLF", "golf", "GOLF"),
])
def test_duplicates_are_refused_naming_both(text, first, second):
    with pytest.raises(ConceptListError) as e:
        parse_concept_list(text, 0.01)
    msg = str(e.value)
    assert msg.startswith("line 2 ")
    assert f"'{second}' is the same concept as '{first}' on line 1" in msg, msg


@pytest.mark.parametrize("default", [float("nan"), float("inf"), 0.0, -0.1, 0.6])
def test_bad_default_r2_is_not_blamed_on_a_line(default):
    with pytest.raises(ValueError) as e:
        parse_concept_list("cross", default)
    assert not isinstance(e.value, ConceptListError)
    assert "default r2" in str(e.value)
