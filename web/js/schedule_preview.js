// Guidance Kit: live preview of a node's guidance schedule, shown in the node body below its widgets.
//
// Applies to every GuidanceKit_* node whose inputs include `schedule` or a `start_percent` /
// `end_percent` pair. Widget names may carry a prefix ("pag_schedule", "pag_start_percent", ...):
// each prefix with such widgets gets its own plot; widgets a node lacks take their defaults.
// The plot shows the multiplier f of the guidance strength over sampling progress (0 = first step),
// normalised as the Python side does (schedule_math.js, PREVIEW_STEPS steps), the window shaded, a
// dashed line at 1 (the node's / sampler's scale) and dots at the steps. The sigma window depends on the model, so
// it is only written as a caption. An invalid value (e.g. a step list with a word in it) shows its
// message in red in place of the curve. Math: ./schedule_math.js (tested with `node --test web/tests/`).
//
// How it is shown: one DOM widget per node (node.addDOMWidget, type "gk_schedule_preview"), a <div>
// holding one <canvas> per plot. Both renderers show DOM widgets: the classic LiteGraph canvas lays
// them over the node (DomWidgets), and "Modern Node Design (Nodes 2.0)" (Comfy.VueNodes.Enabled)
// mounts the element in the Vue node (WidgetDOM). Drawing in onDrawForeground, as this file did
// before, is not shown by Vue nodes. Frontend 1.27.x (ComfyUI 0.3.64's pin) renders neither DOM
// widgets nor custom widget types in its experimental Vue nodes; there the element is appended to
// the Vue node's body (Preview.ensureMounted).
// The widget is not serialized (serialize: false; it is the last widget, so a workflow's
// widgets_values keep their order) and not sent to the server (options.serialize: false).
// Redraws: when a schedule widget's callback runs, on triggerDraw (Vue nodes call it after an edit),
// when the canvas draws the widget (onDraw) or the element is resized and the values / size changed,
// and a light poll (POLL_MS) for values set without a callback.

import { app } from "../../../scripts/app.js";
import {
  PREVIEW_STEPS,
  sampleCurve,
  shapeCaption,
  sigmaCaption,
} from "./schedule_math.js";

const NODE_PREFIX = "GuidanceKit_";
const FIELDS = ["schedule", "power", "step_values", "start_percent", "end_percent", "sigma_high", "sigma_low"];
const PREVIEW_WIDGET = "schedule_preview"; // widget name (not an input of any node)
const PREVIEW_TYPE = "gk_schedule_preview"; // widget type
const PLOT_HEIGHT = 110; // minimum height per plot (px, node coordinates)
const MIN_PLOT_HEIGHT = 50; // below this a plot only shows its message / nothing
const GAP = 6; // between plots
const MARGIN = 10; // DOM widget margin around the element (the frontend's default)
const POLL_MS = 400;
const FALLBACK_DELAY_MS = 300;

const COLORS = {
  background: "rgba(0, 0, 0, 0.25)",
  border: "rgba(255, 255, 255, 0.15)",
  window: "rgba(90, 170, 255, 0.14)",
  unit: "rgba(255, 255, 255, 0.35)",
  curve: "#5ab0ff",
  text: "#bbb",
  error: "#ff7a7a",
};

/** {prefix: {field: widget}} for the widgets that make a schedule group; {} when none. */
function scheduleGroups(node) {
  const groups = {};
  for (const w of node.widgets ?? []) {
    if (w?.type === PREVIEW_TYPE) continue;
    const name = String(w?.name ?? "");
    for (const field of FIELDS) {
      if (name === field || name.endsWith("_" + field)) {
        const prefix = name.slice(0, name.length - field.length);
        (groups[prefix] ??= {})[field] = w;
        break;
      }
    }
  }
  for (const [prefix, g] of Object.entries(groups)) {
    if (!(g.schedule || (g.start_percent && g.end_percent))) delete groups[prefix];
  }
  return groups;
}

function inputNames(nodeData) {
  const input = nodeData?.input ?? {};
  return [...Object.keys(input.required ?? {}), ...Object.keys(input.optional ?? {})];
}

function hasScheduleInputs(names) {
  const has = (field) => names.some((n) => n === field || n.endsWith("_" + field));
  return has("schedule") || (has("start_percent") && has("end_percent"));
}

function groupValues(group) {
  const values = {};
  for (const [field, w] of Object.entries(group)) values[field] = w.value;
  return values;
}

function niceMax(v) {
  if (v <= 1) return 1;
  for (const step of [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100]) {
    if (v / step <= 8) return Math.ceil(v / step - 1e-9) * step;
  }
  return v;
}

function label(v) {
  return String(Number(v.toFixed(2)));
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(t + "…").width > width) t = t.slice(0, -1);
  return t + "…";
}

function wrapText(ctx, text, width, maxLines) {
  const lines = [];
  let line = "";
  for (const word of text.split(/\s+/)) {
    const next = line ? line + " " + word : word;
    if (line && ctx.measureText(next).width > width) {
      lines.push(line);
      line = word;
    } else {
      line = next;
    }
  }
  if (line) lines.push(line);
  if (lines.length > maxLines) {
    lines.length = maxLines;
    lines[maxLines - 1] = fitText(ctx, lines[maxLines - 1] + " …", width);
  }
  return lines;
}

function drawMessage(ctx, text, x, y, w, h) {
  ctx.fillStyle = COLORS.error;
  ctx.font = "11px Arial";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const lines = wrapText(ctx, text, w - 8, Math.max(1, Math.floor((h - 8) / 14)));
  lines.forEach((line, i) => ctx.fillText(line, x + 4, y + 4 + i * 14));
}

/**
 * One plot in the rectangle (x, y, w, h) of the context's coordinates. Returns the error message
 * drawn instead of a curve, or "".
 */
function drawPlot(ctx, values, title, x, y, w, h) {
  ctx.fillStyle = COLORS.background;
  ctx.strokeStyle = COLORS.border;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();

  let curve, captions;
  try {
    curve = sampleCurve(values, { nSteps: PREVIEW_STEPS });
    captions = [shapeCaption(values, PREVIEW_STEPS), sigmaCaption(values)].filter(Boolean);
  } catch (e) {
    const message = (title ? title + ": " : "") + (e?.message ?? String(e));
    drawMessage(ctx, message, x, y, w, h);
    return message;
  }
  if (h < MIN_PLOT_HEIGHT) return "";

  const font = 10;
  const pad = { left: 26, right: 6, top: font + 12, bottom: font * captions.length + 8 };
  const px = x + pad.left;
  const py = y + pad.top;
  const pw = w - pad.left - pad.right;
  const ph = h - pad.top - pad.bottom;
  if (pw < 20 || ph < 16) return "";

  const yMin = Math.min(0, curve.min);
  const yMax = niceMax(Math.max(1, curve.max));
  const sx = (u) => px + u * pw;
  const sy = (v) => py + ph - ((v - yMin) / (yMax - yMin)) * ph;

  // window
  const start = curve.window.start;
  const end = curve.window.end;
  ctx.fillStyle = COLORS.window;
  ctx.fillRect(sx(start), py, Math.max(1, sx(end) - sx(start)), ph);

  // axes: 0 line and the 1× line
  ctx.strokeStyle = COLORS.border;
  ctx.beginPath();
  ctx.moveTo(px, sy(0));
  ctx.lineTo(px + pw, sy(0));
  ctx.stroke();
  ctx.strokeStyle = COLORS.unit;
  ctx.setLineDash([4, 3]);
  ctx.beginPath();
  ctx.moveTo(px, sy(1));
  ctx.lineTo(px + pw, sy(1));
  ctx.stroke();
  ctx.setLineDash([]);

  // curve and the steps
  ctx.strokeStyle = COLORS.curve;
  ctx.lineWidth = 2;
  ctx.lineJoin = "round";
  ctx.beginPath();
  curve.points.forEach(([u, v], i) => (i ? ctx.lineTo(sx(u), sy(v)) : ctx.moveTo(sx(u), sy(v))));
  ctx.stroke();
  ctx.lineWidth = 1;
  ctx.fillStyle = COLORS.curve;
  for (const [u, v] of curve.steps) {
    ctx.beginPath();
    ctx.arc(sx(u), sy(v), 1.6, 0, 2 * Math.PI);
    ctx.fill();
  }

  // labels
  ctx.font = `${font}px Arial`;
  ctx.fillStyle = globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? COLORS.text;
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  ctx.fillText("1×", px - 4, sy(1));
  if (yMax > 1) ctx.fillText(label(yMax), px - 4, sy(yMax));
  ctx.fillText(label(yMin), px - 4, sy(yMin));
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const heading = (title ? title + " · " : "") + "guidance × over sampling progress";
  ctx.fillText(fitText(ctx, heading, w - 8), x + 4, y + 3);
  captions.forEach((c, i) => ctx.fillText(fitText(ctx, c, w - 8), x + 4, py + ph + 4 + i * font));
  ctx.textAlign = "right";
  ctx.fillText("0 → 1", x + w - 4, py + ph + 4);
  return "";
}

// ---------------------------------------------------------------------------------------------
// The DOM widget

const previews = new Set(); // live Preview objects (one per node)
let pollTimer = null;

function vueNodesMode() {
  return !!globalThis.LiteGraph?.vueNodesMode;
}

/** Height the widget asks for (node coordinates, margins included). */
function minWidgetHeight(n) {
  return n * PLOT_HEIGHT + Math.max(0, n - 1) * GAP + 2 * MARGIN;
}

/**
 * Classic canvas: the wheel and the middle button over the preview go on to the graph canvas (zoom,
 * pan), as the frontend does for its own media widgets; a left click selects the node (DomWidget).
 */
function forwardToCanvas(event) {
  if (vueNodesMode()) return; // Vue nodes handle their own events
  if (event.type !== "wheel" && !(event.button === 1 || (event.buttons & 4) !== 0)) return;
  const target = app?.canvas?.canvas;
  if (!target?.dispatchEvent || event.target === target) return;
  const Ctor = event.constructor;
  let copy;
  try {
    copy = new Ctor(event.type, event);
  } catch {
    return;
  }
  event.preventDefault();
  event.stopPropagation();
  target.dispatchEvent(copy);
}

class Preview {
  constructor(node) {
    const doc = globalThis.document;
    this.node = node;
    this.signature = "";
    this.pending = false;
    this.detachedSince = 0;
    this.element = doc.createElement("div");
    this.element.className = "gk-schedule-preview";
    Object.assign(this.element.style, {
      display: "flex",
      flexDirection: "column",
      gap: `${GAP}px`,
      width: "100%",
      height: "100%",
      boxSizing: "border-box",
      overflow: "hidden",
    });
    this.canvases = [];
    for (const type of ["wheel", "pointerdown", "pointermove", "pointerup"]) {
      this.element.addEventListener?.(type, forwardToCanvas, type === "wheel" ? { passive: false } : undefined);
    }
    this.element.addEventListener?.("contextmenu", (e) => {
      if (!vueNodesMode()) e.preventDefault();
    });
    this.syncCanvases();

    this.widget = node.addDOMWidget(PREVIEW_WIDGET, PREVIEW_TYPE, this.element, {
      serialize: false,
      hideOnZoom: true,
      margin: MARGIN,
      // one element can only be in one place: keep it in the node, out of the properties panel
      // (newer frontends mount DOM widgets there too); older frontends ignore these options
      hideInPanel: true,
      surfaces: { canvas: "shown", vueNode: "shown", panel: "never" },
      getMinHeight: () => minWidgetHeight(Math.max(1, this.canvases.length)),
      onDraw: () => this.update(),
    });
    this.widget.serialize = false;
    this.widget.label = ""; // no caption row for it in the Vue node / properties panel
    this.widget.triggerDraw = () => this.schedule();

    const RO = globalThis.ResizeObserver;
    if (RO) this.resizeObserver = new RO(() => this.update());
    this.watch();
  }

  /** Redraw on resizes and from the poll. */
  watch() {
    this.resizeObserver?.observe(this.element);
    previews.add(this);
    startPolling();
  }

  /** One <canvas> per schedule group of the node. */
  syncCanvases() {
    const n = Math.max(1, Object.keys(scheduleGroups(this.node)).length);
    const doc = globalThis.document;
    while (this.canvases.length < n) {
      const c = doc.createElement("canvas");
      c.className = "gk-schedule-plot";
      Object.assign(c.style, { display: "block", width: "100%", flex: "1 1 0", minHeight: "0" });
      c.setAttribute?.("role", "img");
      this.element.appendChild(c);
      this.canvases.push(c);
    }
    while (this.canvases.length > n) this.canvases.pop().remove?.();
    this.element.style.minHeight = `${minWidgetHeight(n) - 2 * MARGIN}px`;
  }

  /** What the drawing depends on; "" while there is nothing to draw into. */
  currentSignature() {
    if (this.node.flags?.collapsed) return "";
    const parts = [];
    for (const c of this.canvases) {
      const w = c.clientWidth ?? 0;
      const h = c.clientHeight ?? 0;
      if (!(w > 0 && h > 0)) return "";
      const rect = c.getBoundingClientRect?.();
      const zoom = rect?.width ? rect.width / w : 1;
      parts.push([w, h, Math.round(zoom * (globalThis.devicePixelRatio || 1) * 100)]);
    }
    const values = Object.entries(scheduleGroups(this.node)).map(([p, g]) => [p, groupValues(g)]);
    return JSON.stringify([parts, values]);
  }

  /** Redraw when the values or the size changed (cheap otherwise). */
  update(force = false) {
    try {
      if (this.node.graph) {
        this.added = true;
        if (!previews.has(this)) this.watch(); // back in a graph (e.g. moved into a subgraph)
      } else if (this.added) {
        return this.remove(); // removed without onRemoved
      }
      this.ensureMounted();
      const signature = this.currentSignature();
      if (!signature || (!force && signature === this.signature)) return;
      this.signature = signature;
      this.render();
    } catch (e) {
      // never break the canvas / the Vue node
      console.warn("Guidance Kit schedule preview:", e);
    }
  }

  /** Redraw on the next frame (several changes in one frame draw once). */
  schedule() {
    if (this.pending) return;
    this.pending = true;
    const raf = globalThis.requestAnimationFrame ?? ((f) => setTimeout(f, 16));
    raf(() => {
      this.pending = false;
      this.update(true);
    });
  }

  render() {
    const groups = Object.entries(scheduleGroups(this.node));
    if (groups.length !== this.canvases.length) this.syncCanvases();
    const messages = [];
    groups.forEach(([prefix, group], i) => {
      const c = this.canvases[i];
      const w = c.clientWidth;
      const h = c.clientHeight;
      const rect = c.getBoundingClientRect?.();
      const zoom = Math.min(Math.max(rect?.width ? rect.width / w : 1, 0.25), 4);
      const ratio = (globalThis.devicePixelRatio || 1) * zoom;
      const bw = Math.max(1, Math.round(w * ratio));
      const bh = Math.max(1, Math.round(h * ratio));
      if (c.width !== bw) c.width = bw;
      if (c.height !== bh) c.height = bh;
      const ctx = c.getContext("2d");
      if (!ctx) return;
      ctx.save();
      let message = "";
      try {
        ctx.setTransform(1, 0, 0, 1, 0, 0);
        ctx.clearRect(0, 0, bw, bh);
        ctx.setTransform(bw / w, 0, 0, bh / h, 0, 0);
        message = drawPlot(ctx, groupValues(group), prefix.replace(/_$/, ""), 0.5, 0.5, w - 1, h - 1);
      } catch (e) {
        message = "schedule preview: " + (e?.message ?? String(e));
        try {
          drawMessage(ctx, message, 0, 0, w, h);
        } catch {
          // a broken context: the message stays in the title
        }
      } finally {
        ctx.restore();
      }
      c.title = message;
      c.setAttribute?.("aria-label", message || "guidance schedule preview");
      if (message) messages.push(message);
    });
    // the messages as text too (tooltip, tests, screen readers)
    this.element.title = messages.join("\n");
    if (messages.length) this.element.dataset.error = messages.join("\n");
    else delete this.element.dataset.error;
  }

  /**
   * Frontends whose Vue nodes do not render DOM widgets (1.27.x): after FALLBACK_DELAY_MS with the
   * element outside the page while Vue nodes are on, append it to the Vue node's body. A frontend
   * that mounts DOM widgets itself (classic canvas, newer Vue nodes) moves it back to its place.
   */
  ensureMounted() {
    const el = this.element;
    if (el.isConnected || !vueNodesMode() || this.node.flags?.collapsed) {
      this.detachedSince = 0;
      if (this.fallbackBody && el.parentNode !== this.fallbackBody) {
        this.fallbackBody = null; // the frontend mounted it itself (e.g. back on the classic canvas)
        el.style.padding = "";
      }
      return;
    }
    const now = Date.now();
    if (!this.detachedSince) this.detachedSince = now;
    if (now - this.detachedSince < FALLBACK_DELAY_MS) return;
    const id = String(this.node.id);
    // the body of this node, not of another one with its id (in another graph)
    const shown = app?.canvas?.graph ?? app?.graph;
    if (shown?.getNodeById && shown.getNodeById(this.node.id) !== this.node) return;
    const body = globalThis.document?.querySelector?.(`[data-testid="node-body-${globalThis.CSS?.escape?.(id) ?? id}"]`);
    if (!body) return;
    el.style.padding = "0 12px";
    body.appendChild(el);
    this.fallbackBody = body;
    this.detachedSince = 0;
    this.signature = "";
  }

  remove() {
    this.resizeObserver?.disconnect();
    previews.delete(this);
    if (!previews.size && pollTimer) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
  }
}

function startPolling() {
  if (pollTimer) return;
  pollTimer = setInterval(() => {
    for (const p of previews) p.update();
  }, POLL_MS);
  pollTimer?.unref?.(); // Node (tests): do not keep the process alive
}

function watchWidgets(node, preview) {
  for (const group of Object.values(scheduleGroups(node))) {
    for (const w of Object.values(group)) {
      if (w.__gkPreviewWatched) continue;
      const callback = w.callback;
      w.callback = function (...args) {
        const result = callback?.apply(this, args);
        preview.schedule();
        return result;
      };
      w.__gkPreviewWatched = true;
    }
  }
}

function addPreview(node) {
  if (node.__gkSchedulePreview) return node.__gkSchedulePreview;
  if (typeof node.addDOMWidget !== "function" || !globalThis.document) {
    console.warn("Guidance Kit schedule preview: this frontend has no node.addDOMWidget; no preview");
    return null;
  }
  const preview = new Preview(node);
  node.__gkSchedulePreview = preview;
  watchWidgets(node, preview);
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    preview.remove();
    return onRemoved?.apply(this, args);
  };
  return preview;
}

app.registerExtension({
  name: "GuidanceKit.SchedulePreview",

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith(NODE_PREFIX)) return;
    if (hasScheduleInputs(inputNames(nodeData))) nodeType.prototype.gkSchedulePreview = true;
  },

  nodeCreated(node) {
    if (!node?.gkSchedulePreview) return;
    if (!String(node?.comfyClass ?? node?.type ?? "").startsWith(NODE_PREFIX)) return;
    if (!Object.keys(scheduleGroups(node)).length) return;
    try {
      if (!addPreview(node)) return;
      // make room for the plot (the node was sized before the widget existed)
      const min = node.computeSize?.();
      if (min && (node.size[1] < min[1] || node.size[0] < min[0])) {
        node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
      }
    } catch (e) {
      console.warn("Guidance Kit schedule preview:", e);
    }
  },
});
