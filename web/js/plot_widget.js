// Guidance Kit: what the node plots share (the schedule preview, schedule_preview.js, and the Annealing
// Guidance plot, annealing_plot.js): the drawing helpers and the DOM widget that holds the plots.
//
// The widget: one DOM widget per node (node.addDOMWidget), a <div> holding one <canvas> per plot. Both
// renderers show DOM widgets: the classic LiteGraph canvas lays them over the node (DomWidgets), and
// "Modern Node Design (Nodes 2.0)" (Comfy.VueNodes.Enabled) mounts the element in the Vue node
// (WidgetDOM). Frontend 1.27.x (ComfyUI 0.3.64's pin) renders neither DOM widgets nor custom widget
// types in its experimental Vue nodes; there the element is appended to the Vue node's body
// (PlotWidget.ensureMounted). The widget is not serialized (serialize: false; it is the last widget, so a
// workflow's widgets_values keep their order) and not sent to the server (options.serialize: false).
// Redraws: on schedule() (a widget callback, Vue nodes' triggerDraw), when the canvas draws the widget
// (onDraw) or the element is resized and what the plot shows / the size changed, and a light poll
// (POLL_MS) for values set without a callback.
//
// No ComfyUI import here (the extensions pass their `app`), so Node can test it: node --test web/tests/.
// ComfyUI loads every .js file under web/ as an extension module; this one only exports.

export const GAP = 6; // between plots
export const MARGIN = 10; // DOM widget margin around the element (the frontend's default)
const POLL_MS = 400;
const FALLBACK_DELAY_MS = 300;

export const COLORS = {
  background: "rgba(0, 0, 0, 0.25)",
  border: "rgba(255, 255, 255, 0.15)",
  window: "rgba(90, 170, 255, 0.14)",
  unit: "rgba(255, 255, 255, 0.35)",
  curve: "#5ab0ff",
  text: "#bbb",
  error: "#ff7a7a",
};

/** A round upper bound of an axis (at least 1). */
export function niceMax(v) {
  if (v <= 1) return 1;
  for (const step of [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100]) {
    if (v / step <= 8) return Math.ceil(v / step - 1e-9) * step;
  }
  return v;
}

/** An axis label: at most two decimals. */
export function label(v) {
  return String(Number(v.toFixed(2)));
}

export function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let t = text;
  while (t.length > 1 && ctx.measureText(t + "…").width > width) t = t.slice(0, -1);
  return t + "…";
}

export function wrapText(ctx, text, width, maxLines) {
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

/** A message in red, wrapped into the rectangle (shown in place of a curve). */
export function drawMessage(ctx, text, x, y, w, h) {
  ctx.fillStyle = COLORS.error;
  ctx.font = "11px Arial";
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const lines = wrapText(ctx, text, w - 8, Math.max(1, Math.floor((h - 8) / 14)));
  lines.forEach((line, i) => ctx.fillText(line, x + 4, y + 4 + i * 14));
}

/** The plot's background and border. */
export function drawFrame(ctx, x, y, w, h) {
  ctx.fillStyle = COLORS.background;
  ctx.strokeStyle = COLORS.border;
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
}

/** A dashed horizontal line (e.g. the 1× line). */
export function dashedLine(ctx, x0, x1, y, color = COLORS.unit) {
  ctx.strokeStyle = color;
  ctx.lineWidth = 1;
  ctx.setLineDash([4, 3]);
  ctx.beginPath();
  ctx.moveTo(x0, y);
  ctx.lineTo(x1, y);
  ctx.stroke();
  ctx.setLineDash([]);
}

/** A polyline through screen points [[x, y], ...]. */
export function polyline(ctx, points, color, width = 2) {
  ctx.strokeStyle = color;
  ctx.lineWidth = width;
  ctx.lineJoin = "round";
  ctx.beginPath();
  points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
  ctx.stroke();
  ctx.lineWidth = 1;
}

export function textColor() {
  return globalThis.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? COLORS.text;
}

export function vueNodesMode() {
  return !!globalThis.LiteGraph?.vueNodesMode;
}

/** Height a widget of n plots asks for (node coordinates, margins included). */
export function minWidgetHeight(n, plotHeight) {
  return n * plotHeight + Math.max(0, n - 1) * GAP + 2 * MARGIN;
}

const widgets = new Set(); // live PlotWidgets (one per node and kind)
let pollTimer = null;

function startPolling() {
  if (pollTimer) return;
  pollTimer = setInterval(() => {
    for (const p of widgets) p.update();
  }, POLL_MS);
  pollTimer?.unref?.(); // Node (tests): do not keep the process alive
}

/**
 * The DOM widget of a node's plots. spec:
 *   name, type        the widget's name and type (no input of any node has that name)
 *   className         the element's class; plotClassName: each canvas's
 *   plotHeight        minimum height per plot (px, node coordinates)
 *   count()           how many plots (canvases)
 *   values()          what the drawing depends on besides the size (JSON-able)
 *   draw(ctx, i, w, h)  draw plot i into a w × h context; returns the message shown instead, or ""
 *   name of the log   logName (console warnings), ariaLabel (the canvas's label without a message)
 */
export class PlotWidget {
  constructor(node, app, spec) {
    const doc = globalThis.document;
    this.node = node;
    this.app = app;
    this.spec = spec;
    this.signature = "";
    this.pending = false;
    this.detachedSince = 0;
    this.element = doc.createElement("div");
    this.element.className = spec.className;
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
    const forward = (event) => this.forwardToCanvas(event);
    for (const type of ["wheel", "pointerdown", "pointermove", "pointerup"]) {
      this.element.addEventListener?.(type, forward, type === "wheel" ? { passive: false } : undefined);
    }
    this.element.addEventListener?.("contextmenu", (e) => {
      if (!vueNodesMode()) e.preventDefault();
    });
    this.syncCanvases();

    this.widget = node.addDOMWidget(spec.name, spec.type, this.element, {
      serialize: false,
      hideOnZoom: true,
      margin: MARGIN,
      // one element can only be in one place: keep it in the node, out of the properties panel
      // (newer frontends mount DOM widgets there too); older frontends ignore these options
      hideInPanel: true,
      surfaces: { canvas: "shown", vueNode: "shown", panel: "never" },
      getMinHeight: () => minWidgetHeight(Math.max(1, this.canvases.length), spec.plotHeight),
      onDraw: () => this.update(),
    });
    this.widget.serialize = false;
    this.widget.label = ""; // no caption row for it in the Vue node / properties panel
    this.widget.triggerDraw = () => this.schedule();

    const RO = globalThis.ResizeObserver;
    if (RO) this.resizeObserver = new RO(() => this.update());
    this.watch();
  }

  /**
   * Classic canvas: the wheel and the middle button over the plot go on to the graph canvas (zoom,
   * pan), as the frontend does for its own media widgets; a left click selects the node (DomWidget).
   */
  forwardToCanvas(event) {
    if (vueNodesMode()) return; // Vue nodes handle their own events
    if (event.type !== "wheel" && !(event.button === 1 || (event.buttons & 4) !== 0)) return;
    const target = this.app?.canvas?.canvas;
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

  /** Redraw on resizes and from the poll. */
  watch() {
    this.resizeObserver?.observe(this.element);
    widgets.add(this);
    startPolling();
  }

  /** One <canvas> per plot. */
  syncCanvases() {
    const n = Math.max(1, this.spec.count());
    const doc = globalThis.document;
    while (this.canvases.length < n) {
      const c = doc.createElement("canvas");
      c.className = this.spec.plotClassName;
      Object.assign(c.style, { display: "block", width: "100%", flex: "1 1 0", minHeight: "0" });
      c.setAttribute?.("role", "img");
      this.element.appendChild(c);
      this.canvases.push(c);
    }
    while (this.canvases.length > n) this.canvases.pop().remove?.();
    this.element.style.minHeight = `${minWidgetHeight(n, this.spec.plotHeight) - 2 * MARGIN}px`;
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
    return JSON.stringify([parts, this.spec.values()]);
  }

  /** Redraw when what is shown or the size changed (cheap otherwise). */
  update(force = false) {
    try {
      if (this.node.graph) {
        this.added = true;
        if (!widgets.has(this)) this.watch(); // back in a graph (e.g. moved into a subgraph)
      } else if (this.added) {
        return this.remove(); // removed without onRemoved
      }
      this.ensureMounted();
      this.spec.beforeDraw?.();
      const signature = this.currentSignature();
      if (!signature || (!force && signature === this.signature)) return;
      this.signature = signature;
      this.render();
    } catch (e) {
      // never break the canvas / the Vue node
      console.warn(`${this.spec.logName}:`, e);
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
    if (this.spec.count() !== this.canvases.length) this.syncCanvases();
    const messages = [];
    this.canvases.forEach((c, i) => {
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
        message = this.spec.draw(ctx, i, w, h);
      } catch (e) {
        message = `${this.spec.ariaLabel}: ` + (e?.message ?? String(e));
        try {
          drawMessage(ctx, message, 0, 0, w, h);
        } catch {
          // a broken context: the message stays in the title
        }
      } finally {
        ctx.restore();
      }
      c.title = message;
      c.setAttribute?.("aria-label", message || this.spec.ariaLabel);
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
    const shown = this.app?.canvas?.graph ?? this.app?.graph;
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
    widgets.delete(this);
    if (!widgets.size && pollTimer) {
      clearInterval(pollTimer);
      pollTimer = null;
    }
  }
}

/**
 * A PlotWidget on the node (stored as node[key]) whose removal stops it, sized to fit; null on a
 * frontend without addDOMWidget (with one warning).
 */
export function attachPlotWidget(node, app, key, spec) {
  if (node[key]) return node[key];
  if (typeof node.addDOMWidget !== "function" || !globalThis.document) {
    console.warn(`${spec.logName}: this frontend has no node.addDOMWidget; no plot`);
    return null;
  }
  const plot = new PlotWidget(node, app, spec);
  node[key] = plot;
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    plot.remove();
    return onRemoved?.apply(this, args);
  };
  return plot;
}

/** Make room for the plot (the node was sized before the widget existed). */
export function fitNode(node) {
  const min = node.computeSize?.();
  if (min && (node.size[1] < min[1] || node.size[0] < min[0])) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}
