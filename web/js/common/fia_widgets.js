// Shared helpers of the FIA frontend extension: which node types are FIA's, chaining a
// node-type callback, growing a node to fit its widgets, and a read-only text panel (a DOM
// widget that is never saved in the workflow nor sent with the prompt).
// ComfyUI imports every .js file under web/ as an extension; this one only exports
// functions (it registers nothing), so loading it on its own does nothing.

/** True for the node definitions of this pack (id and category both start with FIA). */
export function isFIANode(nodeData) {
  return !!nodeData?.name?.startsWith("FIA") && !!nodeData?.category?.startsWith("FIA");
}

/** Run `fn` after the existing `name` callback of `object` (a node type's prototype);
 * returns what the original returned. */
export function chainCallback(object, name, fn) {
  const original = object[name];
  object[name] = function () {
    const r = original?.apply(this, arguments);
    fn.apply(this, arguments);
    return r;
  };
}

/** Grow the node (never shrink it) to fit its inputs and widgets, and redraw. */
export function fitNode(node) {
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas?.(true, true);
}

/** The node's read-only text panel `name` (created on first use): a div in a DOM widget
 * whose height follows `el.__fiaLines` (set by the caller): `minLines`..`maxLines` lines of
 * `lineHeight` px (the rest scrolls); with minLines 0 and no lines it takes no room. */
export function textPanel(node, name, { className, style = {}, lineHeight = 15, margin = 5, padding = 8,
                                        minLines = 1, maxLines = 14 } = {}) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) return existing;
  const el = document.createElement("div");
  el.className = className ?? name;
  Object.assign(el.style, { boxSizing: "border-box", borderRadius: "6px", overflow: "auto", ...style });
  el.dataset.fiaNode = String(node.id);
  const height = () => {
    const lines = Math.min(maxLines, Math.max(minLines, el.__fiaLines ?? 0));
    return lines ? lines * lineHeight + padding + 2 * margin : 0;
  };
  const widget = node.addDOMWidget(name, name, el, {
    serialize: false,
    margin,
    hideOnZoom: false,
    getValue: () => el.textContent,
    setValue: () => {},
    getMinHeight: height,
    getMaxHeight: height,
  });
  widget.serialize = false; // not part of widgets_values
  return widget;
}
