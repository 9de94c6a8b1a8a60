"""Concept and base prompt sets (paper Tables 6 and 7), as the reference code builds them.

Each concept prompt is paired with a base prompt that keeps its context but drops the
concept ("a golf ball in a park" / "a park"); every prompt of a concept is sampled from
the same starting noise so that the contrast isolates the concept.

Built-in templates give exactly the reference's pair set, one pair per placeholder value
in Table 7's order:
- objects: place i -> "a <c> in a <place>" (even i) or "a <c> near the <place>" (odd i),
  base "a <place>": 30 pairs;
- art_style: "a <object> in the style of <c>" / "a <object>": 30 pairs;
- explicit: "a photo of a <c> <person>" / "a photo of a <person>": 18 pairs.
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
    """Concept templates (template i % len of placeholder value i) and the base template,
    sharing one placeholder."""

    concept: tuple[str, ...]
    base: str
    placeholder: str

    @property
    def size(self) -> int:
        """Pairs in the reference set: one per value of the placeholder."""
        return len(PLACEHOLDERS[self.placeholder])


TEMPLATES: dict[str, PromptTemplate] = {
    "objects": PromptTemplate(
        ("a {concept} in a {place}", "a {concept} near the {place}"), "a {place}", "place"
    ),
    "explicit": PromptTemplate(("a photo of a {concept} {person}",), "a photo of a {person}", "person"),
    "art_style": PromptTemplate(("a {object} in the style of {concept}",), "a {object}", "object"),
}
#: pairs of a custom template without placeholder when num_prompts is None
CUSTOM_DEFAULT_COUNT = 8


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


def _check_count(num_prompts: int) -> None:
    if num_prompts < 2:
        raise ValueError(f"num_prompts must be at least 2 (the base std of Eq. 2 needs two), got {num_prompts}")


def _reference_pairs(concept: str, t: PromptTemplate, num_prompts: int | None, seed: int,
                     bases: list[str]) -> list[PromptPair]:
    """The reference set of a built-in template, or a seeded subset of it (table order)."""
    values = PLACEHOLDERS[t.placeholder]
    if num_prompts is None:
        num_prompts = t.size
    _check_count(num_prompts)
    if num_prompts > t.size:
        raise ValueError(f"num_prompts is {num_prompts}, but this template's reference set has {t.size} pairs "
                         f"(one per {t.placeholder} of Table 7): use at most {t.size}, or a custom template")
    rng = random.Random(seed)
    chosen = range(t.size) if num_prompts == t.size else sorted(rng.sample(range(t.size), num_prompts))
    # base prompts may use another placeholder: its values are drawn as for a custom template
    others = {name: _sample_values(PLACEHOLDERS[name], num_prompts, rng)
              for name in _placeholders_in(*bases) if name != t.placeholder}
    pairs = []
    for n, i in enumerate(chosen):
        fill = {t.placeholder: values[i], **{name: v[n] for name, v in others.items()}}
        concept_prompt = fill_placeholders(t.concept[i % len(t.concept)], concept=concept, **fill)
        base = bases[n % len(bases)] if bases else t.base
        pairs.append(PromptPair(concept_prompt, fill_placeholders(base, **fill)))
    return pairs


def _custom_pairs(concept: str, custom_template: str, num_prompts: int | None, seed: int,
                  bases: list[str]) -> list[PromptPair]:
    """Pairs of a custom template: placeholder values drawn without repetition until the
    list is exhausted (then reshuffled), base prompts cycled."""
    found = _placeholders_in(custom_template)
    base_template = _CONTEXT_BASE[found[0]] if found else custom_template.replace("{concept}", "")
    if num_prompts is None:
        num_prompts = len(PLACEHOLDERS[found[0]]) if found else CUSTOM_DEFAULT_COUNT
    _check_count(num_prompts)
    rng = random.Random(seed)
    names = _placeholders_in(custom_template, base_template, *bases)
    values = {name: _sample_values(PLACEHOLDERS[name], num_prompts, rng) for name in names}
    pairs = []
    for i in range(num_prompts):
        fill = {name: values[name][i] for name in names}
        concept_prompt = fill_placeholders(custom_template, concept=concept, **fill)
        base = bases[i % len(bases)] if bases else base_template
        pairs.append(PromptPair(concept_prompt, fill_placeholders(base, **fill)))
    return pairs


def build_prompt_pairs(
    concept: str,
    template: str = "objects",
    num_prompts: int | None = None,
    seed: int = 0,
    custom_template: str | None = None,
    base_prompts: Sequence[str] | None = None,
) -> list[PromptPair]:
    """Paired concept/base prompts for one concept; the same arguments give the same list.

    ``template`` is one of TEMPLATES or "custom".
    Built-in templates: ``num_prompts`` None gives the reference's full set (objects 30,
    art_style 30, explicit 18 pairs); fewer gives a subset of those same pairs chosen by
    ``seed`` (in table order); more is an error naming the maximum.
    A custom template must contain "{concept}" and may use one of {place}, {person},
    {object}; its values are drawn by ``seed`` without repetition until the list is
    exhausted. Its default count (``num_prompts`` None) is the length of its first
    placeholder's list (in the order place, person, object), or CUSTOM_DEFAULT_COUNT (8)
    without a placeholder. Without ``base_prompts`` its base prompt is the bare context of
    that placeholder ("a {place}", "a photo of a {person}", "a {object}"), or the template
    with "{concept}" removed.
    ``base_prompts`` (any template) replace the base side; they may use the template's
    placeholder and are cycled.
    """
    concept = concept.strip()
    if not concept:
        raise ValueError("concept is empty")
    if num_prompts is not None:
        _check_count(num_prompts)
    bases = [b.strip() for b in (base_prompts or []) if b.strip()]
    if template == "custom":
        if not custom_template or "{concept}" not in custom_template:
            raise ValueError('a custom template must contain "{concept}", e.g. "a {concept} in a {place}"')
        return _custom_pairs(concept, custom_template, num_prompts, seed, bases)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES) + ['custom']}")
    return _reference_pairs(concept, TEMPLATES[template], num_prompts, seed, bases)
