"""Convert a workflow saved by the ComfyUI editor (UI format) to the API format /prompt takes.

Mirrors what the editor of ComfyUI 0.3.75 (comfyui-frontend-package 1.32.9) does in
``graphToPrompt`` (src/utils/executionUtil.ts), using the server's ``/object_info``:

* Widgets are created in ``input_order`` (required, then optional, then any rest), one per
  input whose type has a widget (INT, FLOAT, STRING, BOOLEAN, COMBO) unless it has
  ``forceInput`` (litegraphService ``#addInputs``). ``widgets_values`` holds their values
  in that order, plus the values of extra frontend-only widgets, which the prompt leaves
  out:
  - an INT with ``control_after_generate`` (or, when the option is absent, an INT named
    ``seed`` / ``noise_seed``) is followed by its control widget ("fixed", "randomize", ...);
  - a COMBO with ``control_after_generate`` is followed by the control and a filter widget.
* A linked input (``node.inputs[*].link``) becomes ``[str(origin node id), origin slot]``
  and wins over a widget value of the same name.
* Muted (mode 2) and bypassed (mode 4) nodes and frontend-only nodes (Note,
  MarkdownNote, Reroute, PrimitiveNode: not in /object_info) are left out. (Bypass
  re-routing and primitive nodes are not needed by this pack's workflows and raise.)

``convert`` raises :class:`ConversionError` for anything it does not understand, so a
workflow that would silently convert wrongly fails a test instead.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class ConversionError(ValueError):
    """The workflow cannot be converted faithfully."""


def ordered_inputs(info: Mapping[str, Any]) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the editor creates them."""
    spec = info.get("input", {})
    order = info.get("input_order") or {}
    out: list[tuple[str, list]] = []
    seen = set()
    for section in ("required", "optional"):
        names = order.get(section) or list((spec.get(section) or {}).keys())
        for name in names:
            if name in (spec.get(section) or {}) and name not in seen:
                out.append((name, spec[section][name]))
                seen.add(name)
    for section in ("required", "optional"):
        for name, s in (spec.get(section) or {}).items():
            if name not in seen:
                out.append((name, s))
                seen.add(name)
    return out


def _widget_kind(spec: list) -> str | None:
    kind = spec[0]
    if isinstance(kind, list):
        return "COMBO"
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if kind in WIDGET_TYPES and not options.get("forceInput"):
        return kind
    return None


def widget_layout(info: Mapping[str, Any]) -> list[str | None]:
    """Names of the values in ``widgets_values`` (None for a frontend-only value)."""
    layout: list[str | None] = []
    for name, spec in ordered_inputs(info):
        kind = _widget_kind(spec)
        if kind is None:
            continue
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        layout.append(name)
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
            layout.append(None)
        elif kind == "COMBO" and control:
            layout.extend([None, None])
    return layout


def convert(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """API-format prompt ``{node id: {"class_type", "inputs"}}`` of a UI-format workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("subgraphs are not supported")
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:  # [id, origin_id, origin_slot, target_id, target_slot, type]
            links[link[0]] = (link[1], link[2])
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    skipped = set()
    prompt: dict[str, dict] = {}
    for node in nodes.values():
        ntype = node["type"]
        if node.get("mode", 0) == MUTED:
            skipped.add(node["id"])
            continue
        if ntype in FRONTEND_ONLY and ntype not in object_info:
            if ntype != "Note" and ntype != "MarkdownNote":
                raise ConversionError(f"node {node['id']}: {ntype} needs the editor's graph resolution")
            skipped.add(node["id"])
            continue
        if node.get("mode", 0) == BYPASSED:
            raise ConversionError(f"node {node['id']} ({ntype}) is bypassed: not supported")
        info = object_info.get(ntype)
        if info is None:
            raise ConversionError(f"node {node['id']}: unknown node type {ntype!r} (missing node)")
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            raise ConversionError(f"node {node['id']} ({ntype}): dict widgets_values are not supported")
        layout = widget_layout(info)
        if len(values) != len(layout):
            raise ConversionError(f"node {node['id']} ({ntype}): {len(values)} widget values, "
                                  f"expected {len(layout)} for {layout}")
        inputs: dict[str, Any] = {}
        for name, value in zip(layout, values):
            if name is not None:
                inputs[name] = {"__value__": copy.deepcopy(value)} if isinstance(value, list) else copy.deepcopy(value)
        for slot in node.get("inputs") or []:
            link_id = slot.get("link")
            if link_id is None:
                continue
            if link_id not in links:
                raise ConversionError(f"node {node['id']}: input {slot['name']!r} has unknown link {link_id}")
            origin, origin_slot = links[link_id]
            inputs[slot["name"]] = [str(origin), int(origin_slot)]
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title", ntype)}}
    # Inputs linked to left-out nodes are dropped, as the editor does.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                if int(value[0]) not in skipped:
                    raise ConversionError(f"input {name!r} links to missing node {value[0]}")
                del entry["inputs"][name]
    return prompt


def set_inputs(prompt: dict[str, dict], class_type: str, **values: Any) -> int:
    """Set widget inputs on every node of ``class_type`` that has them; returns how many nodes."""
    count = 0
    for entry in prompt.values():
        if entry["class_type"] != class_type:
            continue
        for name, value in values.items():
            if name in entry["inputs"] and not isinstance(entry["inputs"][name], list):
                entry["inputs"][name] = value
        count += 1
    return count
