// Identity Portrait frontend extension. Plain ES module served from web/ (no build step).
//
// * Face-box editor: every STRING widget named "face_box" ("x0,y0,x1,y1", fractions of the image) gets a
//   DOM widget showing the canvas (aspect from the node's width/height widgets or a connected latent) where
//   the artist drags a rectangle; the drag writes the widget value, typing in the widget moves the box.
// * Identity chips: nodes producing an OMNI_ID show how many images (and tokens) the identity came from,
//   from the "idp_identity" UI data the backend sends after execution.
// DOM widgets only (they work in both the classic canvas and the Vue "Nodes 2.0" renderer).
import { app } from "../../../scripts/app.js";

const BOX_WIDGET = "face_box";

export function parseBox(text) {
  const v = String(text ?? "").split(",").map((s) => parseFloat(s.trim()));
  if (v.length !== 4 || v.some((x) => !Number.isFinite(x))) return null;
  const [x0, y0, x1, y1] = v.map((x) => Math.min(1, Math.max(0, x)));
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
}

export function formatBox(b) {
  return b.map((x) => (Math.round(x * 1000) / 1000).toString()).join(",");
}

function aspectOf(node) {
  const w = node.widgets?.find((x) => x.name === "width")?.value;
  const h = node.widgets?.find((x) => x.name === "height")?.value;
  return w && h ? w / h : 1;
}

function addFaceBoxEditor(node, widget) {
  const wrap = document.createElement("div");
  wrap.className = "idp-facebox";
  wrap.style.cssText = "position:relative;width:100%;background:#222;border:1px solid #555;cursor:crosshair;";
  const rect = document.createElement("div");
  rect.className = "idp-facebox-rect";
  rect.style.cssText = "position:absolute;border:2px solid #4cf;background:rgba(64,200,255,0.15);pointer-events:none;";
  wrap.appendChild(rect);
  const label = document.createElement("div");
  label.style.cssText = "position:absolute;left:4px;bottom:2px;font:11px sans-serif;color:#aaa;pointer-events:none;";
  label.textContent = "drag to draw the face box";
  wrap.appendChild(label);

  const draw = () => {
    wrap.style.aspectRatio = String(aspectOf(node));
    const b = parseBox(widget.value);
    rect.style.display = b ? "block" : "none";
    if (!b) return;
    rect.style.left = `${b[0] * 100}%`;
    rect.style.top = `${b[1] * 100}%`;
    rect.style.width = `${(b[2] - b[0]) * 100}%`;
    rect.style.height = `${(b[3] - b[1]) * 100}%`;
  };
  const frac = (ev) => {
    const r = wrap.getBoundingClientRect();
    return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
  };
  let start = null;
  wrap.addEventListener("pointerdown", (ev) => {
    start = frac(ev);
    wrap.setPointerCapture?.(ev.pointerId);
    ev.preventDefault();
    ev.stopPropagation();
  });
  wrap.addEventListener("pointermove", (ev) => {
    if (!start) return;
    const p = frac(ev);
    widget.value = formatBox([Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])]);
    draw();
  });
  const end = (ev) => {
    if (!start) return;
    const p = frac(ev);
    start = null;
    widget.callback?.(widget.value);
    node.setDirtyCanvas?.(true, true);
    draw();
  };
  wrap.addEventListener("pointerup", end);
  wrap.addEventListener("pointercancel", end);

  const origCallback = widget.callback;
  widget.callback = function (v) {
    draw();
    return origCallback?.apply(this, arguments);
  };
  const dom = node.addDOMWidget("face_box_editor", "idp_facebox", wrap, { serialize: false, hideOnZoom: false });
  dom.serialize = false; // never part of widgets_values: saved workflows keep their positional layout
  node.__idpDrawBox = draw;
  setTimeout(draw, 0);
}

function showIdentityChip(node, info) {
  let chip = node.__idpChip;
  if (!chip) {
    chip = document.createElement("div");
    chip.className = "idp-identity-chip";
    chip.style.cssText = "font:12px sans-serif;padding:2px 8px;border-radius:10px;background:#2a4;color:#fff;display:inline-block;";
    const w = node.addDOMWidget("identity_chip", "idp_chip", chip, { serialize: false });
    w.serialize = false;
    node.__idpChip = chip;
  }
  const images = info.images ?? "?";
  chip.textContent = `identity from ${images} image${images === 1 ? "" : "s"}` + (info.tokens ? ` · ${info.tokens} tokens` : "");
}

app.registerExtension({
  name: "idportrait.core",
  async setup() {
    window.__IDPORTRAIT_LOADED__ = true;
    window.__IDPORTRAIT__ = { parseBox, formatBox };
  },
  async nodeCreated(node) {
    const box = node.widgets?.find((w) => w.name === BOX_WIDGET);
    if (box) addFaceBoxEditor(node, box);
    const outputs = node.outputs ?? [];
    if (outputs.some((o) => o.type === "OMNI_ID")) {
      const onExecuted = node.onExecuted;
      node.onExecuted = function (output) {
        onExecuted?.apply(this, arguments);
        const info = output?.idp_identity?.[0];
        if (info) showIdentityChip(this, info);
      };
    }
  },
  async loadedGraphNode(node) {
    node.__idpDrawBox?.();
  },
});
