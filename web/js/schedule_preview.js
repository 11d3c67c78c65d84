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
// How it is shown: one DOM widget per node (type "gk_schedule_preview"), a <div> holding one <canvas>
// per plot: ./plot_widget.js (shared with the Annealing Guidance plot, ./annealing_plot.js), which
// says how both renderers (classic canvas, "Modern Node Design (Nodes 2.0)") show it and when it
// redraws. Drawing in onDrawForeground, as this file did before, is not shown by Vue nodes.

import { app } from "../../../scripts/app.js";
import {
  COLORS,
  attachPlotWidget,
  dashedLine,
  drawFrame,
  drawMessage,
  fitNode,
  fitText,
  label,
  niceMax,
  polyline,
  textColor,
} from "./plot_widget.js";
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

/**
 * One plot in the rectangle (x, y, w, h) of the context's coordinates. Returns the error message
 * drawn instead of a curve, or "".
 */
function drawPlot(ctx, values, title, x, y, w, h) {
  drawFrame(ctx, x, y, w, h);

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
  dashedLine(ctx, px, px + pw, sy(1));

  // curve and the steps
  polyline(ctx, curve.points.map(([u, v]) => [sx(u), sy(v)]), COLORS.curve);
  ctx.fillStyle = COLORS.curve;
  for (const [u, v] of curve.steps) {
    ctx.beginPath();
    ctx.arc(sx(u), sy(v), 1.6, 0, 2 * Math.PI);
    ctx.fill();
  }

  // labels
  ctx.font = `${font}px Arial`;
  ctx.fillStyle = textColor();
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
// The DOM widget (./plot_widget.js)

function previewSpec(node) {
  return {
    name: PREVIEW_WIDGET,
    type: PREVIEW_TYPE,
    className: "gk-schedule-preview",
    plotClassName: "gk-schedule-plot",
    plotHeight: PLOT_HEIGHT,
    logName: "Guidance Kit schedule preview",
    ariaLabel: "guidance schedule preview",
    count: () => Object.keys(scheduleGroups(node)).length,
    values: () => Object.entries(scheduleGroups(node)).map(([p, g]) => [p, groupValues(g)]),
    draw(ctx, i, w, h) {
      const group = Object.entries(scheduleGroups(node))[i];
      if (!group) return "";
      const [prefix, widgets] = group;
      return drawPlot(ctx, groupValues(widgets), prefix.replace(/_$/, ""), 0.5, 0.5, w - 1, h - 1);
    },
  };
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
  const preview = attachPlotWidget(node, app, "__gkSchedulePreview", previewSpec(node));
  if (preview) watchWidgets(node, preview);
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
      fitNode(node);
    } catch (e) {
      console.warn("Guidance Kit schedule preview:", e);
    }
  },
});
