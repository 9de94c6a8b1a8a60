// Warns on FIA Forget Concepts and FIA Concept Saliency nodes, in the editor, about concept
// text that CLIP would truncate (token counts from POST /fia/check_concepts, nodes/routes.py),
// duplicated concepts or base prompts, empty lines and r2 suffixes the node would refuse.
// Warnings show in a small panel on the node and as a "⚠ n" badge; they never block
// queueing (the Python nodes validate again).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { chainCallback, fitNode, textPanel } from "./common/fia_widgets.js";

const ROUTE = "/fia/check_concepts";
const WIDGET = "fia_warnings";
const LINE_HEIGHT = 15;
const DEBOUNCE_MS = 250;
// Same syntax as fia_core.parse_concept_list: "concept", "concept: r2" (the text after an
// unquoted line's last ':' must be an r2), and a concept that contains ':' in double quotes
// ("Area: 51" or "Area: 51": 0.02).
const QUOTED = /^"([^"]*)"\s*(?::\s*(.*))?$/;
const NUMBER = /^[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?$/;

/** A concept as the nodes use it: NFKC, invisible format characters dropped, whitespace collapsed. */
export const normaliseConcept = (text) =>
  String(text ?? "").normalize("NFKC").replace(/\p{Cf}/gu, "").replace(/\s+/g, " ").trim();

/** {concept, problem} of one non-empty normalised concept line; problem is null when the node accepts it. */
export function parseConceptLine(line) {
  let concept = line;
  let value = null;
  if (line.startsWith('"')) {
    const m = QUOTED.exec(line);
    if (!m) return { concept: "", problem: 'a quoted concept needs its closing \'"\' (e.g. "Area: 51": 0.02)' };
    concept = normaliseConcept(m[1]);
    value = m[2] ?? null;
  } else if (line.includes('"')) {
    return { concept: "", problem: 'quotes go around the whole concept, e.g. "Area: 51": 0.02' };
  } else if (line.includes(":")) {
    const at = line.lastIndexOf(":");
    [concept, value] = [normaliseConcept(line.slice(0, at)), line.slice(at + 1).trim()];
  }
  if (value !== null) {
    const r2 = NUMBER.test(value) ? Number(value) : NaN;
    if (!(r2 > 0 && r2 <= 0.5))
      return { concept, problem: `r2 '${value}' is not in (0, 0.5]; to use ':' inside a concept, write it in double quotes ("Area: 51")` };
  }
  if (!concept) return { concept, problem: "no concept name before ':'" };
  return { concept, problem: null };
}

const WATCHED = {
  FIAForgetConcepts: ["concepts", "template", "custom_template", "base_prompts"],
  FIAConceptSaliency: ["concept", "template", "custom_template", "base_prompts"],
};

const widgetValue = (node, name) => node.widgets?.find((w) => w.name === name)?.value;
const quote = (s) => `'${s.length > 40 ? s.slice(0, 39) + "…" : s}'`;

/** Text lines with their 1-based numbers; a single empty line at the very end is ignored. */
function numberedLines(text, clean = (s) => s.trim()) {
  const lines = String(text ?? "").split(/\r?\n/);
  if (lines.length > 1 && lines[lines.length - 1].trim() === "") lines.pop();
  return lines.map((raw, i) => ({ n: i + 1, line: clean(raw) }));
}

/** Warnings that need no server: empty lines, duplicates, r2 out of range. */
export function localChecks(nodeType, values, otherConcepts = []) {
  const warnings = [];
  const concepts = [];
  const bases = [];
  const dupes = (items, what) => {
    const seen = new Map();
    for (const { n, key, label } of items) {
      if (seen.has(key)) warnings.push(`line ${n}: ${quote(label)} repeats line ${seen.get(key)} (${what})`);
      else seen.set(key, n);
    }
  };
  if (nodeType === "FIAForgetConcepts") {
    const lines = numberedLines(values.concepts, normaliseConcept);
    const items = [];
    for (const { n, line } of lines) {
      if (!line) {
        warnings.push(`line ${n} is empty (skipped)`);
        continue;
      }
      const { concept, problem } = parseConceptLine(line);
      if (problem) warnings.push(`line ${n}: ${problem}`);
      if (!concept) continue;
      items.push({ n, key: concept.toLowerCase(), label: concept });
      concepts.push(concept);
    }
    dupes(items, "the node refuses duplicates");
    if (items.length === 0) warnings.push("no concepts: list the concepts to erase, one per line");
  } else if (nodeType === "FIAConceptSaliency") {
    const concept = normaliseConcept(values.concept);
    if (!concept) warnings.push("concept is empty");
    else {
      concepts.push(concept);
      if (otherConcepts.some((c) => c.toLowerCase() === concept.toLowerCase()))
        warnings.push(`${quote(concept)} is also the concept of another FIA Concept Saliency node`);
    }
  }
  if (String(values.base_prompts ?? "").trim()) {
    const items = [];
    for (const { n, line } of numberedLines(values.base_prompts)) {
      if (!line) warnings.push(`base_prompts line ${n} is empty (skipped)`);
      else {
        items.push({ n, key: line.toLowerCase(), label: line });
        bases.push(line);
      }
    }
    dupes(items, "base_prompts");
  }
  return { warnings, concepts, bases };
}

/** Warnings from the server's token counts. */
export function tokenWarnings(report) {
  const out = [];
  const limit = report?.limit ?? 75;
  for (const c of report?.concepts ?? []) {
    if (c.truncated)
      out.push(`${quote(c.concept)}: prompts up to ${c.prompt_tokens} CLIP tokens > ${limit}, CLIP would truncate`);
  }
  for (const b of report?.base_prompts ?? []) {
    if (b.truncated) out.push(`base prompt ${quote(b.prompt)}: ${b.prompt_tokens} CLIP tokens > ${limit}, CLIP would truncate`);
  }
  return out;
}

function warningWidget(node) {
  // hidden (no height) without warnings; up to 8 lines shown
  return textPanel(node, WIDGET, {
    className: "fia-warnings",
    lineHeight: LINE_HEIGHT,
    padding: 8,
    minLines: 0,
    maxLines: 8,
    style: {
      font: `11px/${LINE_HEIGHT}px sans-serif`, whiteSpace: "pre-wrap",
      color: "#ffcf66", background: "rgba(90, 60, 0, 0.35)", padding: "3px 6px", display: "none",
    },
  });
}

function showWarnings(node, warnings) {
  node.__fiaWarnings = warnings;
  const el = warningWidget(node).element;
  const text = warnings.map((w) => `⚠ ${w}`).join("\n");
  if (el.textContent === text) return;
  el.textContent = text;
  el.title = text;
  el.__fiaLines = warnings.length;
  el.style.display = warnings.length ? "block" : "none";
  fitNode(node);
}

async function runCheck(node) {
  const type = node.comfyClass;
  const values = Object.fromEntries(WATCHED[type].map((name) => [name, widgetValue(node, name)]));
  const others = type === "FIAConceptSaliency"
    ? (node.graph?.nodes ?? []).filter((n) => n !== node && n.comfyClass === type)
        .map((n) => String(widgetValue(n, "concept") ?? "").trim()).filter(Boolean)
    : [];
  const { warnings, concepts, bases } = localChecks(type, values, others);
  const seq = (node.__fiaCheckSeq = (node.__fiaCheckSeq ?? 0) + 1);
  showWarnings(node, warnings);
  if (!concepts.length && !bases.length) return;
  try {
    const res = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ concepts, base_prompts: bases, template: values.template ?? "objects",
                             custom_template: values.custom_template ?? "" }),
    });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const report = await res.json();
    if (seq === node.__fiaCheckSeq) showWarnings(node, [...tokenWarnings(report), ...warnings]);
  } catch (e) {
    console.warn("[FIA] token check unavailable:", e);
  }
}

function scheduleCheck(node) {
  clearTimeout(node.__fiaCheckTimer);
  node.__fiaCheckTimer = setTimeout(() => {
    if (node.graph) runCheck(node);
  }, DEBOUNCE_MS);
}

function watchWidgets(node) {
  for (const name of WATCHED[node.comfyClass]) {
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget || widget.__fiaWatched) continue;
    widget.__fiaWatched = true;
    const callback = widget.callback;
    widget.callback = function () {
      const r = callback?.apply(this, arguments);
      scheduleCheck(node);
      if (node.comfyClass === "FIAConceptSaliency" && name === "concept") {
        for (const other of node.graph?.nodes ?? [])
          if (other !== node && other.comfyClass === node.comfyClass) scheduleCheck(other);
      }
      return r;
    };
  }
}

app.registerExtension({
  name: "FIA.ConceptWarnings",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!(nodeData?.name in WATCHED)) return;
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      watchWidgets(this);
      const badge = () => new window.LGraphBadge({
        text: this.__fiaWarnings?.length ? `⚠ ${this.__fiaWarnings.length}` : "",
        fgColor: "#1e1400", bgColor: "#ffcf66",
      });
      if (window.LGraphBadge && Array.isArray(this.badges)) this.badges.push(badge);
      scheduleCheck(this);
    });
    chainCallback(nodeType.prototype, "onConfigure", function () {
      scheduleCheck(this); // widget values of a loaded workflow
    });
    chainCallback(nodeType.prototype, "onRemoved", function () {
      clearTimeout(this.__fiaCheckTimer);
    });
  },
});
