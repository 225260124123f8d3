// Identity Portrait frontend extension. Plain ES module served from web/ (no build step).
//
// * Face-box editor: nodes with a box (a STRING widget "face_box"/"region_box" holding "x0,y0,x1,y1", or
//   FlashFace's four FLOAT widgets face_x1..face_y2; fractions of the image) get a DOM widget showing the canvas (aspect from the node's width/height widgets or a connected latent) where
//   the artist drags a rectangle; the drag writes the widget value, typing in the widget moves the box.
// * Identity chips: nodes producing an OMNI_ID show how many images (and tokens) the identity came from,
//   from the "idp_identity" UI data the backend sends after execution.
// * Saved workflows keep their meaning: inputs added later with a new default (nodes/migrations.py ADDED_INPUTS)
//   get the value the node used before, when a workflow saved without them is loaded.
// DOM widgets only (they work in both the classic canvas and the Vue "Nodes 2.0" renderer).
import { app } from "../../../scripts/app.js";

// Mirror of nodes/migrations.py ADDED_INPUTS (tests/test_browser.py checks the two agree).
export const ADDED_INPUTS = {
  IDP_RBGuidanceGuider: { oldWidgets: 11, values: { match: "cosine", reduction: "mean" } },
  IDP_RBGuidanceSampler: { oldWidgets: 16, values: { match: "cosine", reduction: "mean" } },
};

function keepOldMeaning(node) {
  const added = ADDED_INPUTS[node.comfyClass ?? node.type];
  if (!added) return;
  const onConfigure = node.onConfigure;
  node.onConfigure = function (info) {
    const r = onConfigure?.apply(this, arguments);
    if (Array.isArray(info?.widgets_values) && info.widgets_values.length === added.oldWidgets) {
      for (const [name, value] of Object.entries(added.values)) {
        const w = this.widgets?.find((x) => x.name === name);
        if (w) w.value = value;
      }
    }
    return r;
  };
}

// A box is either one STRING widget ("x0,y0,x1,y1") or four FLOAT widgets (FlashFace's face_x1..face_y2).
const BOX_STRING_WIDGETS = ["face_box", "region_box"];
const BOX_FLOAT_WIDGETS = ["face_x1", "face_y1", "face_x2", "face_y2"];

function boxBinding(node) {
  const str = node.widgets?.find((w) => BOX_STRING_WIDGETS.includes(w.name));
  if (str) {
    return { widgets: [str], get: () => parseBox(str.value), set: (b) => { str.value = formatBox(b); } };
  }
  const fl = BOX_FLOAT_WIDGETS.map((n) => node.widgets?.find((w) => w.name === n));
  if (fl.every(Boolean)) {
    return {
      widgets: fl,
      get: () => {
        const b = fl.map((w) => Number(w.value));
        return b[2] > b[0] && b[3] > b[1] ? b : null;   // all zero = no box (FlashFace's convention)
      },
      set: (b) => fl.forEach((w, i) => { w.value = Math.round(b[i] * 1000) / 1000; }),
    };
  }
  return null;
}

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

function addFaceBoxEditor(node, binding) {
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
    const b = binding.get();
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
  const boxFrom = (a, p) => [Math.min(a[0], p[0]), Math.min(a[1], p[1]), Math.max(a[0], p[0]), Math.max(a[1], p[1])];
  let start = null;
  wrap.addEventListener("pointerdown", (ev) => {
    start = frac(ev);
    wrap.setPointerCapture?.(ev.pointerId);
    ev.preventDefault();
    ev.stopPropagation();
  });
  wrap.addEventListener("pointermove", (ev) => {
    if (!start) return;
    binding.set(boxFrom(start, frac(ev)));
    draw();
  });
  const end = (ev) => {
    if (!start) return;
    binding.set(boxFrom(start, frac(ev)));
    start = null;
    binding.widgets.forEach((w) => w.callback?.(w.value));
    node.setDirtyCanvas?.(true, true);
    draw();
  };
  wrap.addEventListener("pointerup", end);
  wrap.addEventListener("pointercancel", end);

  for (const w of binding.widgets) {   // typing a value moves the drawn box
    const orig = w.callback;
    w.callback = function () {
      draw();
      return orig?.apply(this, arguments);
    };
  }
  wrap.style.minHeight = "120px";
  const dom = node.addDOMWidget("face_box_editor", "idp_facebox", wrap, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 160, getHeight: () => 200,
  });
  dom.serialize = false; // never part of widgets_values: saved workflows keep their positional layout
  const size = node.computeSize?.();
  if (size) node.setSize?.([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
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
    window.__IDPORTRAIT__ = { parseBox, formatBox, ADDED_INPUTS };
  },
  async nodeCreated(node) {
    keepOldMeaning(node);
    const binding = boxBinding(node);
    if (binding) addFaceBoxEditor(node, binding);
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
