"""HTTP routes for the FIA frontend extension (web/js/fia_concept_warnings.js).

POST /fia/check_concepts (also /api/fia/check_concepts) counts the CLIP tokens of the
prompts a concept list turns into, so the editor can warn about text CLIP would cut:
SD1 CLIP reads 77 tokens, 75 of them text. (The FIA reference code truncates there;
ComfyUI splits a longer prompt into separately encoded 75-token chunks, and the
saliency node's exact mode refuses it.) The SD1 tokenizer files shipped with ComfyUI
(comfy/sd1_tokenizer) are loaded with transformers' CLIPTokenizer on the first request.

Registered on import when a ComfyUI server is running; a no-op otherwise (in-process
tests, scripts).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys
from typing import Callable, Sequence

from ..fia_core import normalize_concept
from ..fia_core.prompts import PLACEHOLDERS, TEMPLATES, fill_placeholders

log = logging.getLogger(__name__)

ROUTE = "/fia/check_concepts"
#: Text tokens CLIP reads in one pass (77 minus the start and end tokens).
TOKEN_LIMIT = 75
MAX_LINES = 512
MAX_CHARS = 4000


def _concept_templates(template: str, custom_template: str = "") -> tuple[str, ...]:
    if template == "custom":
        return (custom_template,) if "{concept}" in (custom_template or "") else ("{concept}",)
    t = TEMPLATES.get(template)
    return t.concept if t else ("{concept}",)


def token_report(concepts: Sequence[str], template: str, count: Callable[[str], int],
                 custom_template: str = "", base_prompts: Sequence[str] = ()) -> dict:
    """Token counts of each concept's longest prompt and of each base prompt.

    ``count(text)`` returns the number of text tokens (without start/end tokens). The
    longest prompt fills every placeholder ({place}, {person}, {object}) with its longest
    value: CLIP's tokenizer splits words before encoding them, so counts add up per word.
    """
    longest = {name: max(values, key=count) for name, values in PLACEHOLDERS.items()}

    def worst(text: str, **values: str) -> tuple[int, str]:
        prompt = fill_placeholders(text, **values, **{n: v for n, v in longest.items() if "{" + n + "}" in text})
        return count(prompt), prompt

    out_concepts = []
    for concept in concepts:
        tokens, prompt = max(worst(t, concept=concept) for t in _concept_templates(template, custom_template))
        out_concepts.append({"concept": concept, "tokens": count(concept), "prompt_tokens": tokens,
                             "longest_prompt": prompt, "truncated": tokens > TOKEN_LIMIT})
    out_bases = []
    for base in base_prompts:
        tokens, prompt = worst(base)
        out_bases.append({"prompt": base, "prompt_tokens": tokens, "longest_prompt": prompt,
                          "truncated": tokens > TOKEN_LIMIT})
    return {"limit": TOKEN_LIMIT, "concepts": out_concepts, "base_prompts": out_bases}


@functools.cache
def _tokenizer():
    import comfy.sd1_clip
    from transformers import CLIPTokenizer

    path = os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")
    return CLIPTokenizer.from_pretrained(path)


def count_tokens(text: str) -> int:
    """SD1 CLIP text tokens of ``text`` (start and end tokens not counted)."""
    return len(_tokenizer()(text, add_special_tokens=False)["input_ids"])


def _strings(value, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"'{name}' must be a list of strings")
    if len(value) > MAX_LINES or any(len(v) > MAX_CHARS for v in value):
        raise ValueError(f"'{name}': at most {MAX_LINES} lines of {MAX_CHARS} characters")
    return [v.strip() for v in value if v.strip()]


async def check_concepts(request):
    """Body: {"concepts": [str], "template": str, "custom_template": str, "base_prompts": [str]}."""
    from aiohttp import web

    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        # counted as the nodes will use them (normalised like fia_core.parse_concept_list does)
        concepts = [c for c in map(normalize_concept, _strings(body.get("concepts"), "concepts")) if c]
        bases = _strings(body.get("base_prompts"), "base_prompts")
        template = body.get("template", "objects")
        custom = body.get("custom_template", "") or ""
        if not isinstance(template, str) or not isinstance(custom, str) or len(custom) > MAX_CHARS:
            raise ValueError("'template' and 'custom_template' must be strings")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return web.json_response({"error": str(e)}, status=400)
    loop = asyncio.get_running_loop()
    report = await loop.run_in_executor(None, lambda: token_report(concepts, template, count_tokens, custom, bases))
    return web.json_response(report)


def register() -> bool:
    """Add the routes to the running ComfyUI server; False (and nothing done) without one.

    Looks the server module up in sys.modules instead of importing it: outside a
    running ComfyUI there is no PromptServer instance to register on.
    """
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.post(ROUTE)(check_concepts)
    return True


register()
