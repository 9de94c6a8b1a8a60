// After a run, FIA nodes show a compact summary (concepts, pruned fraction, layers
// touched, concept-agnostic neurons kept) sent by Python as ui.fia_summary; FIA Mask Info
// also shows its text report (ui.text). Displayed in a read-only DOM widget that is never
// saved in the workflow nor sent with the prompt.
import { app } from "../../../scripts/app.js";

const WIDGET = "fia_summary";
const LINE_HEIGHT = 15;
const MAX_LINES = 14;
const MARGIN = 5;

const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? "?"));

function fmtPercent(f) {
  if (typeof f !== "number") return "?";
  const p = 100 * f;
  return `${p >= 1 ? p.toFixed(2) : p >= 0.01 ? p.toFixed(3) : p.toExponential(1)} %`;
}

function fmtConcepts(concepts, max = 4) {
  if (!Array.isArray(concepts) || concepts.length === 0) return "";
  const clip = (c) => (c.length > 32 ? c.slice(0, 31) + "…" : c);
  const shown = concepts.slice(0, max).map(clip).join(", ");
  return concepts.length > max ? `${shown} +${concepts.length - max} more` : shown;
}

/** Lines of text for one fia_summary entry (mask facts, or a saliency node's text). */
export function summaryLines(s) {
  if (!s || typeof s !== "object") return [];
  if (typeof s.text === "string") return [s.text];
  const lines = [];
  const n = Array.isArray(s.concepts) ? s.concepts.length : 0;
  const head = s.kind === "fused" ? `${n} concept${n === 1 ? "" : "s"}: ` : "";
  lines.push(head + fmtConcepts(s.concepts));
  lines.push(`pruned ${fmtPercent(s.pruned_fraction)} (${fmtInt(s.pruned)}) · ${fmtInt(s.layers_touched)}/${fmtInt(s.layers)} layers`);
  if (s.kind === "fused") lines.push(`agnostic kept ${fmtInt(s.agnostic_kept)}`);
  if (s.file) lines.push(`saved ${s.file}`);
  return lines;
}

function summaryWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const el = document.createElement("div");
  el.className = "fia-summary";
  Object.assign(el.style, {
    font: `11px/${LINE_HEIGHT}px monospace`, whiteSpace: "pre", overflow: "auto",
    color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
    borderRadius: "6px", padding: "4px 6px", boxSizing: "border-box",
    borderLeft: "3px solid #4fb3b3", pointerEvents: "auto",
  });
  el.dataset.fiaNode = String(node.id);
  // up to MAX_LINES lines shown (the rest scrolls), plus padding and the widget margin
  const height = () => Math.min(MAX_LINES, Math.max(1, el.__fiaLines ?? 1)) * LINE_HEIGHT + 10 + 2 * MARGIN;
  widget = node.addDOMWidget(WIDGET, "fia_summary", el, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => el.textContent,
    setValue: () => {},
    margin: MARGIN,
    getMinHeight: height,
    getMaxHeight: height,
  });
  widget.serialize = false; // not part of widgets_values
  return widget;
}

export function showSummary(node, message) {
  const items = message?.fia_summary;
  if (!Array.isArray(items) || items.length === 0) return;
  const lines = items.flatMap(summaryLines);
  const report = Array.isArray(message.text) ? message.text.join("\n") : "";
  const widget = summaryWidget(node);
  const el = widget.element;
  const reportLines = report ? report.split("\n").slice(1) : []; // its first line repeats the summary
  el.textContent = [...lines, ...reportLines].join("\n");
  el.title = el.textContent;
  el.__fiaLines = lines.length + reportLines.length;
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "FIA.Summary",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FIA") || !nodeData?.category?.startsWith("FIA")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted?.apply(this, arguments);
      showSummary(this, message);
      return r;
    };
  },
});
