"""Concept and base prompt sets (paper Tables 6 and 7).

Each concept prompt is paired with a base prompt that keeps its context but drops the
concept ("a golf ball in a park" / "a park"); pairs are sampled from the same starting
noise so that the contrast isolates the concept.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

PLACES = (
    "road", "tree", "forest", "lawn", "clubhouse", "courtyard", "backyard", "cityscape",
    "suburb", "mall", "cafe", "office", "library", "market", "bridge", "harbor", "garden",
    "beach", "room", "park", "street", "shelter", "chair", "table", "bag", "mountain",
    "valley", "waterfall", "desert", "sunrise",
)
PERSONS = (
    "man", "woman", "girl", "boy", "mother", "father", "kid", "professor", "student",
    "group of friends", "celebrity", "child", "couple", "guy", "doctor", "nurse",
    "teacher", "lawyer",
)
OBJECTS = (
    "cat", "dog", "mouse", "bear", "car", "chair", "bag", "building", "chicken", "duck",
    "sofa", "table", "tree", "bicycle", "door", "rabbit", "ball", "bat", "horse", "bird",
    "flower", "bowl", "bottle", "wall", "clock", "television", "guitar", "truck",
    "laptop", "book",
)
PLACEHOLDERS = {"place": PLACES, "person": PERSONS, "object": OBJECTS}


@dataclass(frozen=True)
class PromptTemplate:
    """Concept templates (cycled) and the base template, sharing one placeholder."""

    concept: tuple[str, ...]
    base: str
    placeholder: str


TEMPLATES: dict[str, PromptTemplate] = {
    "objects": PromptTemplate(
        ("a {concept} in a {place}", "a {concept} near the {place}"), "a {place}", "place"
    ),
    "explicit": PromptTemplate(("a photo of a {concept} {person}",), "a photo of a {person}", "person"),
    "art_style": PromptTemplate(("a {object} in the style of {concept}",), "a {object}", "object"),
}


@dataclass(frozen=True)
class PromptPair:
    concept_prompt: str
    base_prompt: str


def _placeholders_in(*texts: str) -> list[str]:
    return [name for name in PLACEHOLDERS if any("{" + name + "}" in t for t in texts)]


#: base prompt of a custom template without base prompts: the built-in base of its first
#: placeholder (the paper's base is the bare context), else the template without the concept
_CONTEXT_BASE = {t.placeholder: t.base for t in TEMPLATES.values()}


def fill_placeholders(text: str, **values: str) -> str:
    """Replace {name} placeholders by values and collapse whitespace."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return re.sub(r"\s+", " ", text).strip()


def _sample_values(values: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """n values without repetition until the list is exhausted, then reshuffled."""
    out: list[str] = []
    while len(out) < n:
        out.extend(rng.sample(list(values), len(values)))
    return out[:n]


def build_prompt_pairs(
    concept: str,
    template: str = "objects",
    num_prompts: int = 8,
    seed: int = 0,
    custom_template: str | None = None,
    base_prompts: Sequence[str] | None = None,
) -> list[PromptPair]:
    """Paired concept/base prompts for one concept; the same arguments give the same list.

    ``template`` is one of TEMPLATES or "custom". A custom template must contain
    "{concept}" and may use one of {place}, {person}, {object}. ``base_prompts`` (any
    template) replace the base side; they may use the same placeholder and are cycled.
    Without them a custom template's base prompt is the bare context of its first
    placeholder ("a {place}", "a photo of a {person}", "a {object}"), or the template with
    "{concept}" removed when it has no placeholder.
    """
    concept = concept.strip()
    if not concept:
        raise ValueError("concept is empty")
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be at least 2 (the base std of Eq. 2 needs two), got {num_prompts}")
    if template == "custom":
        if not custom_template or "{concept}" not in custom_template:
            raise ValueError('a custom template must contain "{concept}", e.g. "a {concept} in a {place}"')
        concept_templates: tuple[str, ...] = (custom_template,)
        found = _placeholders_in(custom_template)
        base_template = _CONTEXT_BASE[found[0]] if found else custom_template.replace("{concept}", "")
    elif template in TEMPLATES:
        t = TEMPLATES[template]
        concept_templates, base_template = t.concept, t.base
    else:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES) + ['custom']}")

    bases = [b.strip() for b in (base_prompts or []) if b.strip()]
    rng = random.Random(seed)
    names = _placeholders_in(*concept_templates, base_template, *bases)
    values = {name: _sample_values(PLACEHOLDERS[name], num_prompts, rng) for name in names}
    pairs = []
    for i in range(num_prompts):
        fill = {name: values[name][i] for name in names}
        concept_prompt = fill_placeholders(concept_templates[i % len(concept_templates)], concept=concept, **fill)
        base = bases[i % len(bases)] if bases else base_template
        pairs.append(PromptPair(concept_prompt, fill_placeholders(base, **fill)))
    return pairs
