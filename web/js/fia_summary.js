// After a run, FIA nodes show a compact summary (concepts, pruned fraction, layers
// touched, concept-agnostic neurons kept) sent by Python as ui.fia_summary, with one amber
// line per warning (ui.fia_summary[i].warnings: a mask that prunes nothing, a mask built
// on another checkpoint, saliency from the cache, ...); FIA Mask Info also shows its text
// report (ui.text). Displayed in a read-only DOM widget that is never saved in the
// workflow nor sent with the prompt.
import { app } from "../../../scripts/app.js";
import { chainCallback, fitNode, isFIANode, textPanel } from "./common/fia_widgets.js";

const WIDGET = "fia_summary";
const LINE_HEIGHT = 15;
const WARNING_COLOUR = "#ffcf66";
const CHAR_WIDTH = 6.6; // px of one 11px monospace character: how many fit on a line

const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? "?"));

function fmtPercent(f) {
  if (typeof f !== "number") return "?";
  const p = 100 * f;
  if (p === 0) return "0 %";
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
  if (Array.isArray(s.cached) && s.cached.length) lines.push(`saliency from cache: ${fmtConcepts(s.cached)}`);
  if (s.file) lines.push(`saved ${s.file}`);
  return lines;
}

/** The warnings of one fia_summary entry, as shown (one line each). */
export function warningLines(s) {
  const warnings = Array.isArray(s?.warnings) ? s.warnings : [];
  return warnings.filter((w) => typeof w === "string" && w).map((w) => `⚠ ${w}`);
}

function summaryWidget(node) {
  return textPanel(node, WIDGET, {
    className: "fia-summary",
    lineHeight: LINE_HEIGHT,
    padding: 10,
    minLines: 1,
    maxLines: 14,
    style: {
      font: `11px/${LINE_HEIGHT}px monospace`, whiteSpace: "pre",
      color: "var(--input-text, #ddd)", background: "var(--comfy-input-bg, #222)",
      padding: "4px 6px", borderLeft: "3px solid #4fb3b3", pointerEvents: "auto",
    },
  });
}

export function showSummary(node, message) {
  const items = message?.fia_summary;
  if (!Array.isArray(items) || items.length === 0) return;
  const report = Array.isArray(message.text) ? message.text.join("\n") : "";
  const reportLines = report ? report.split("\n").slice(1) : []; // its first line repeats the summary
  const rows = [];
  for (const item of items) {
    for (const line of summaryLines(item)) rows.push({ line });
    for (const line of warningLines(item)) rows.push({ line, warning: true });
  }
  for (const line of reportLines) rows.push({ line });
  const el = summaryWidget(node).element;
  // warnings wrap (they are sentences); the other lines keep their layout
  const perLine = Math.max(24, Math.floor(((node.size?.[0] ?? 300) - 40) / CHAR_WIDTH));
  el.replaceChildren();
  rows.forEach(({ line, warning }, i) => {
    if (i) el.append("\n");
    const span = document.createElement("span");
    span.textContent = line;
    if (warning) {
      span.className = "fia-summary-warning";
      span.style.color = WARNING_COLOUR;
      span.style.whiteSpace = "pre-wrap";
    }
    el.append(span);
  });
  el.title = el.textContent;
  el.__fiaLines = rows.reduce((n, r) => n + (r.warning ? Math.ceil(r.line.length / perLine) : 1), 0);
  el.classList.toggle("fia-has-warnings", rows.some((r) => r.warning));
  el.style.borderLeftColor = rows.some((r) => r.warning) ? WARNING_COLOUR : "#4fb3b3";
  fitNode(node);
}

app.registerExtension({
  name: "FIA.Summary",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isFIANode(nodeData)) return;
    chainCallback(nodeType.prototype, "onExecuted", function (message) {
      showSummary(this, message);
    });
  },
});
