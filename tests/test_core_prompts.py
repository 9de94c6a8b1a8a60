"""Concept/base prompt builders: the paper's Table 6 formats with Table 7 placeholders; the
built-in templates give exactly the reference code's pair sets (hard-coded below from the
method page, in Table 7's order)."""
from __future__ import annotations

import re

import pytest

from fia_core import TEMPLATES, PromptPair, build_prompt_pairs

# Table 7 of the paper, copied from the method page, in its order
PLACE_LIST = """road tree forest lawn clubhouse courtyard backyard cityscape suburb mall cafe office
library market bridge harbor garden beach room park street shelter chair table bag mountain valley
waterfall desert sunrise""".split()
PERSON_LIST = ["man", "woman", "girl", "boy", "mother", "father", "kid", "professor", "student",
               "group of friends", "celebrity", "child", "couple", "guy", "doctor", "nurse", "teacher", "lawyer"]
OBJECT_LIST = """cat dog mouse bear car chair bag building chicken duck sofa table tree bicycle door
rabbit ball bat horse bird flower bowl bottle wall clock television guitar truck laptop book""".split()
PLACES, PERSONS, OBJECTS = set(PLACE_LIST), set(PERSON_LIST), set(OBJECT_LIST)


def reference_set(template, c):
    """The reference code's pairs (Table 6 formats): place i takes "in a" for even i."""
    if template == "objects":
        return {(f"a {c} in a {p}" if i % 2 == 0 else f"a {c} near the {p}", f"a {p}") for i, p in enumerate(PLACE_LIST)}
    if template == "art_style":
        return {(f"a {o} in the style of {c}", f"a {o}") for o in OBJECT_LIST}
    return {(f"a photo of a {c} {p}", f"a photo of a {p}") for p in PERSON_LIST}


def as_set(pairs):
    return {(p.concept_prompt, p.base_prompt) for p in pairs}


@pytest.mark.parametrize("template,concept,size", [("objects", "golf ball", 30), ("art_style", "Van Gogh", 30),
                                                   ("explicit", "naked", 18)])
def test_default_is_the_reference_set(template, concept, size):
    pairs = build_prompt_pairs(concept, template)
    assert len(pairs) == size == len(reference_set(template, concept))
    assert as_set(pairs) == reference_set(template, concept)
    assert as_set(build_prompt_pairs(concept, template, num_prompts=size, seed=5)) == reference_set(template, concept)


@pytest.mark.parametrize("template,size", [("objects", 30), ("art_style", 30), ("explicit", 18)])
def test_fewer_pairs_are_a_seeded_subset_of_the_reference_set(template, size):
    full = reference_set(template, "dog")
    seen = set()
    for seed in range(4):
        for n in (2, 8, size - 1):
            pairs = build_prompt_pairs("dog", template, num_prompts=n, seed=seed)
            assert len(pairs) == n and len(as_set(pairs)) == n, (seed, n)
            assert as_set(pairs) <= full
            assert pairs == build_prompt_pairs("dog", template, num_prompts=n, seed=seed)
            if n == 8:
                seen.add(frozenset(as_set(pairs)))
    assert len(seen) == 4  # the seed chooses the subset


@pytest.mark.parametrize("template,size", [("objects", 30), ("art_style", 30), ("explicit", 18)])
def test_more_pairs_than_the_reference_set_is_an_error_naming_the_maximum(template, size):
    with pytest.raises(ValueError, match=f"at most {size}"):
        build_prompt_pairs("dog", template, num_prompts=size + 1)


def test_custom_template_default_count():
    assert len(build_prompt_pairs("x", "custom", custom_template="a {concept} near the {place}")) == 30
    assert len(build_prompt_pairs("x", "custom", custom_template="a {person} with {concept}")) == 18
    assert len(build_prompt_pairs("x", "custom", custom_template="{concept} at night")) == 8
    # custom templates keep cycling past the list
    assert len(build_prompt_pairs("x", "custom", num_prompts=45, custom_template="a {concept} in a {place}")) == 45


def test_placeholder_lists_are_the_papers():
    assert len(PLACES) == 30 and len(PERSONS) == 18 and len(OBJECTS) == 30
    assert set(TEMPLATES) >= {"objects", "explicit", "art_style"}


def test_objects_template():
    pairs = build_prompt_pairs("golf ball", "objects", num_prompts=10, seed=0)
    assert len(pairs) == 10 and all(isinstance(p, PromptPair) for p in pairs)
    used = []
    for i, p in enumerate(pairs):
        m = re.fullmatch(r"a golf ball (in a|near the) (.+)", p.concept_prompt)
        assert m, p
        place = m.group(2)
        assert place in PLACES
        assert p.base_prompt == f"a {place}"
        used.append(place)
        # both concept formats of Table 6, by the place's position in Table 7
        assert m.group(1) == ("in a" if PLACE_LIST.index(place) % 2 == 0 else "near the")
    assert len(set(used)) == 10  # no repeats before the list is exhausted


def test_explicit_template():
    pairs = build_prompt_pairs("naked", "explicit", num_prompts=18, seed=1)
    persons = []
    for p in pairs:
        m = re.fullmatch(r"a photo of a naked (.+)", p.concept_prompt)
        assert m and m.group(1) in PERSONS, p
        assert p.base_prompt == f"a photo of a {m.group(1)}"
        persons.append(m.group(1))
    assert set(persons) == PERSONS  # 18 prompts use every person once


def test_art_style_template():
    pairs = build_prompt_pairs("Van Gogh", "art_style", num_prompts=6, seed=2)
    for p in pairs:
        m = re.fullmatch(r"a (.+) in the style of Van Gogh", p.concept_prompt)
        assert m and m.group(1) in OBJECTS, p
        assert p.base_prompt == f"a {m.group(1)}"


def test_deterministic_per_seed():
    a = build_prompt_pairs("church", "objects", num_prompts=8, seed=7)
    b = build_prompt_pairs("church", "objects", num_prompts=8, seed=7)
    c = build_prompt_pairs("church", "objects", num_prompts=8, seed=8)
    assert a == b
    assert a != c


def test_concept_is_stripped():
    pairs = build_prompt_pairs("  golf ball ", "objects", num_prompts=2, seed=0)
    assert all(p.concept_prompt.startswith("a golf ball ") and "  " not in p.concept_prompt for p in pairs)


def test_custom_template_with_placeholder():
    pairs = build_prompt_pairs("parachute", "custom", num_prompts=4, seed=0,
                               custom_template="a photo of a {concept} above the {place}")
    for p in pairs:
        m = re.fullmatch(r"a photo of a parachute above the (.+)", p.concept_prompt)
        assert m and m.group(1) in PLACES, p
        # the base side is the bare context, as in the paper's objects template ("a <place>")
        assert p.base_prompt == f"a {m.group(1)}"


def test_custom_template_with_two_placeholders_fills_both():
    pairs = build_prompt_pairs("Monet", "custom", num_prompts=5, seed=2,
                               custom_template="a {object} near the {place} by {concept}")
    for p in pairs:
        m = re.fullmatch(r"a (.+) near the (.+) by Monet", p.concept_prompt)
        assert m and m.group(1) in OBJECTS and m.group(2) in PLACES, p
        assert p.base_prompt == f"a {m.group(2)}"


def test_custom_template_with_object_placeholder():
    pairs = build_prompt_pairs("Monet", "custom", num_prompts=3, seed=0, custom_template="{object}, painted by {concept}")
    for p in pairs:
        m = re.fullmatch(r"(.+), painted by Monet", p.concept_prompt)
        assert m and m.group(1) in OBJECTS, p


def test_custom_template_without_placeholder():
    pairs = build_prompt_pairs("gas pump", "custom", num_prompts=3, seed=0, custom_template="{concept} at night")
    assert [p.concept_prompt for p in pairs] == ["gas pump at night"] * 3
    assert [p.base_prompt for p in pairs] == ["at night"] * 3


def test_custom_base_prompts_cycle_and_fill():
    pairs = build_prompt_pairs("golf ball", "objects", num_prompts=5, seed=0,
                               base_prompts=["an empty {place}", "  ", "a photo of a {place}"])
    for i, p in enumerate(pairs):
        place = re.fullmatch(r"a golf ball (?:in a|near the) (.+)", p.concept_prompt).group(1)
        expected = ["an empty {}", "a photo of a {}"][i % 2].format(place)  # blank entries dropped
        assert p.base_prompt == expected


def test_custom_base_prompts_without_placeholder():
    pairs = build_prompt_pairs("Van Gogh", "art_style", num_prompts=4, seed=0, base_prompts=["a painting", "a photo"])
    assert [p.base_prompt for p in pairs] == ["a painting", "a photo", "a painting", "a photo"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(template="custom", custom_template="a photo of a {place}"), "concept"),
    (dict(template="custom", custom_template=None), "concept"),
    (dict(template="custom", custom_template=""), "concept"),
    (dict(template="portraits"), "unknown template"),
    (dict(num_prompts=1), "at least 2"),
    (dict(num_prompts=0), "at least 2"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_prompt_pairs("golf ball", **kwargs)


def test_empty_concept_rejected():
    with pytest.raises(ValueError):
        build_prompt_pairs("   ", "objects")
