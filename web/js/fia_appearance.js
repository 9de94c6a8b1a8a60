// Makes FIA nodes recognisable: the canvas "cyan" node colour (one of LGraphCanvas.node_colors,
// so users can still recolour nodes from the node menu and saved colours win on load) and
// an "FIA" title badge next to ComfyUI's own node badges.
import { app } from "../../../scripts/app.js";
import { chainCallback, isFIANode } from "./common/fia_widgets.js";

export const FIA_BADGE = { text: "✂", fgColor: "#e8fbfb", bgColor: "#2b6e6e" };

app.registerExtension({
  name: "FIA.Appearance",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isFIANode(nodeData)) return;
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
      const colours = window.LGraphCanvas?.node_colors?.cyan;
      if (colours && !this.color && !this.bgcolor) {
        this.color = colours.color;
        this.bgcolor = colours.bgcolor;
      }
      const Badge = window.LGraphBadge;
      if (Badge && Array.isArray(this.badges)) this.badges.push(new Badge(FIA_BADGE));
    });
  },
});
