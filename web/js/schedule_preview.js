// Guidance Kit: live preview of a node's guidance schedule, drawn in the node body below its widgets.
//
// Applies to every GuidanceKit_* node whose inputs include `schedule` or a `start_percent` /
// `end_percent` pair. Widget names may carry a prefix ("pag_schedule", "pag_start_percent", ...):
// each prefix with such widgets gets its own plot; widgets a node lacks take their defaults.
// The plot shows the multiplier f of the guidance strength over sampling progress (0 = first step),
// mean-normalised over PREVIEW_STEPS steps like the Python side, the window shaded, a dashed line at
// 1 (the node's / sampler's scale) and dots at the steps. The sigma window depends on the model, so
// it is only written as a caption. Math: ./schedule_math.js (tested with `node --test web/tests/`).

import { app } from "../../../scripts/app.js";
import {
  PREVIEW_STEPS,
  sampleCurve,
  shapeCaption,
  sigmaCaption,
} from "./schedule_math.js";

const NODE_PREFIX = "GuidanceKit_";
const FIELDS = ["schedule", "power", "step_values", "start_percent", "end_percent", "sigma_high", "sigma_low"];
const PLOT_HEIGHT = 120; // room reserved per plot (px, node coordinates)
const MIN_PLOT_HEIGHT = 60;
const MARGIN = 10;

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

function visible(node, w) {
  return node.isWidgetVisible ? node.isWidgetVisible(w) : !w.hidden;
}

/** y just below the last visible widget (widget.y is set by the node's last layout pass). */
function widgetsBottom(node) {
  let bottom = 0;
  for (const w of node.widgets ?? []) {
    if (!visible(node, w)) continue;
    const h = w.computedHeight ?? (w.computeSize ? w.computeSize(node.size[0])[1] : 20) + 4;
    bottom = Math.max(bottom, (w.y ?? 0) + h);
  }
  return bottom;
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

/** One plot in the rectangle (x, y, w, h), node coordinates. */
function drawPlot(ctx, values, title, x, y, w, h, lowQuality) {
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
    drawMessage(ctx, (title ? title + ": " : "") + (e?.message ?? String(e)), x, y, w, h);
    return;
  }

  const font = 10;
  const pad = { left: 26, right: 6, top: font + 12, bottom: font * captions.length + 8 };
  const px = x + pad.left;
  const py = y + pad.top;
  const pw = w - pad.left - pad.right;
  const ph = h - pad.top - pad.bottom;
  if (pw < 20 || ph < 16) return;

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
  if (!lowQuality) {
    ctx.fillStyle = COLORS.curve;
    for (const [u, v] of curve.steps) {
      ctx.beginPath();
      ctx.arc(sx(u), sy(v), 1.6, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
  if (lowQuality) return;

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
}

function drawPreviews(node, ctx, canvas) {
  if (node.flags?.collapsed) return;
  // widget.y comes from the node's previous layout pass (drawn after this hook); none yet → wait
  if (!(node.widgets ?? []).some((w) => w.y > 0)) return;
  const groups = Object.entries(scheduleGroups(node));
  if (!groups.length) return;
  const top = widgetsBottom(node) + 4;
  const height = node.size[1] - top - MARGIN / 2;
  const each = (height - (groups.length - 1) * 6) / groups.length;
  if (each < MIN_PLOT_HEIGHT) return;
  const x = MARGIN;
  const w = node.size[0] - 2 * MARGIN;
  if (w < 60) return;
  const lowQuality = !!canvas?.low_quality;
  groups.forEach(([prefix, group], i) => {
    const y = top + i * (each + 6);
    ctx.save();
    try {
      drawPlot(ctx, groupValues(group), prefix.replace(/_$/, ""), x, y, w, each, lowQuality);
    } catch (e) {
      drawMessage(ctx, "schedule preview: " + (e?.message ?? String(e)), x, y, w, each);
    } finally {
      ctx.restore();
    }
  });
}

function watchWidgets(node) {
  for (const group of Object.values(scheduleGroups(node))) {
    for (const w of Object.values(group)) {
      if (w.__gkPreviewWatched) continue;
      const callback = w.callback;
      w.callback = function (...args) {
        const result = callback?.apply(this, args);
        node.setDirtyCanvas?.(true, true);
        return result;
      };
      w.__gkPreviewWatched = true;
    }
  }
}

app.registerExtension({
  name: "GuidanceKit.SchedulePreview",

  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith(NODE_PREFIX)) return;
    if (!hasScheduleInputs(inputNames(nodeData))) return;

    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function (out) {
      const size = computeSize.call(this, out);
      try {
        const n = Object.keys(scheduleGroups(this)).length;
        if (n) size[1] += n * PLOT_HEIGHT + (n - 1) * 6 + MARGIN;
      } catch (e) {
        console.warn("Guidance Kit schedule preview:", e);
      }
      return size;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, canvas, ...rest) {
      const result = onDrawForeground?.call(this, ctx, canvas, ...rest);
      try {
        drawPreviews(this, ctx, canvas);
      } catch (e) {
        // never break the canvas: leave the node as it is
      }
      return result;
    };
  },

  nodeCreated(node) {
    if (!String(node?.comfyClass ?? node?.type ?? "").startsWith(NODE_PREFIX)) return;
    if (!Object.keys(scheduleGroups(node)).length) return;
    watchWidgets(node);
    // The constructor sized the node with computeSize (which includes the plot); make sure.
    const min = node.computeSize();
    if (node.size[1] < min[1] || node.size[0] < min[0]) {
      node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
    }
  },
});
