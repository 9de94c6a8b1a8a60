// FIA Fuse Masks: a new mask input appears when the last one is connected, and trailing
// unconnected inputs go away when masks are disconnected (mask_1 and mask_2, declared in
// Python, always stay). The backend accepts mask_3, mask_4, ... through **kwargs.
// A loaded workflow keeps the inputs it was saved with: nothing changes while the graph
// is being configured (app.configuringGraph), only on the user's own connection changes.
import { app } from "../../../scripts/app.js";
import { chainCallback, fitNode } from "./common/fia_widgets.js";

const NODE = "FIAFuseMasks";
const TYPE = "FIA_MASK";
const DECLARED = 2; // mask_1 (required) and mask_2 (optional) come from INPUT_TYPES
const MASK_NAME = /^mask_(\d+)$/;
const INPUT = 1; // LiteGraph.INPUT

function maskSlots(node) {
  const slots = [];
  (node.inputs ?? []).forEach((input, index) => {
    const m = MASK_NAME.exec(input.name);
    if (m) slots.push({ input, index, n: Number(m[1]) });
  });
  return slots;
}

/** Exactly one unconnected mask input at the end (never fewer inputs than declared). */
export function normaliseMaskInputs(node) {
  let slots = maskSlots(node);
  let changed = false;
  while (slots.length > DECLARED) {
    const last = slots[slots.length - 1];
    const prev = slots[slots.length - 2];
    if (last.input.link != null || prev.input.link != null) break;
    node.removeInput(last.index);
    slots = maskSlots(node);
    changed = true;
  }
  const last = slots[slots.length - 1];
  if (last && last.input.link != null) {
    const n = Math.max(...slots.map((s) => s.n)) + 1;
    // Same look as the declared optional mask_2 (a hollow socket).
    const shape = slots.find((s) => s.n === DECLARED)?.input.shape;
    const input = node.addInput(`mask_${n}`, TYPE, shape != null ? { shape } : undefined);
    if (input) input.tooltip = "Another concept mask (a new input appears when this one is connected).";
    changed = true;
  }
  if (changed) fitNode(node);
  return changed;
}

app.registerExtension({
  name: "FIA.FuseMasks.DynamicInputs",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE) return;
    chainCallback(nodeType.prototype, "onConnectionsChange", function (type, slot, connected, link, input) {
      if (type !== INPUT || app.configuringGraph || !MASK_NAME.test(input?.name ?? "")) return;
      // Deferred until the current pointer/link operation is over: moving a link from
      // one mask input to another first disconnects it, and must not remove its target.
      if (!this.__fiaNormalisePending) {
        this.__fiaNormalisePending = true;
        queueMicrotask(() => {
          this.__fiaNormalisePending = false;
          if (this.graph) normaliseMaskInputs(this);
        });
      }
    });
  },
});
