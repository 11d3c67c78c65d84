// Guidance Kit: the Annealing Guidance node's plot of the CFG scale w_t its policy chooses.
//
// Before a run: the policy selected on the node, evaluated by the server (GET
// /guidance_kit/annealing_preview, nodes/annealing_plot.py) for the node's λ over sampling progress p
// (0 = first step), one curve per level of ‖ε_c − ε_u‖ (labelled: the policy's defaults, after a run
// the smallest, median and largest the run saw), with t = 999·(1 − p) (SD-type discrete timesteps). It is fetched again when λ or the policy changes. An error (a policy file
// that is refused, a λ out of range) is shown in red in place of the curves.
// After a run: the scales the plan actually chose, per model evaluation (the batch mean as a line
// with dots, the min–max over the batch as a band), against the run's progress; the server sends
// them (event "guidance_kit.annealing_plot", the node's unique id) to the page that queued the
// prompt. They stay until the next run.
//
// The DOM widget and the drawing helpers are shared with the schedule preview (./plot_widget.js).

import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";
import {
  attachPlotWidget,
  COLORS,
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

export const NODE_TYPE = "GuidanceKit_AnnealingGuidance";
export const EVENT = "guidance_kit.annealing_plot";
export const PREVIEW_ROUTE = "/guidance_kit/annealing_preview";
const WIDGET = "annealing_plot"; // widget name (not an input of the node)
export const PLOT_TYPE = "gk_annealing_plot"; // widget type
const PLOT_HEIGHT = 160;
const FETCH_DELAY_MS = 250; // after the last change of λ / policy
const INPUTS = { lambda: "guidance_lambda", policy: "policy" };
// one colour per ‖δ‖ level (light → dark: small → large), the run's in orange
export const LEVEL_COLORS = ["#9fd2ff", COLORS.curve, "#2f80db", "#7fb8ff", "#4a98f0", "#1f6cc4"];
export const RUN_COLOR = "#ffa640";
const RUN_BAND = "rgba(255, 166, 64, 0.3)";

export function previewUrl(policy, lambda, deltas = null) {
  const url = `${PREVIEW_ROUTE}?policy=${encodeURIComponent(String(policy))}&lambda=${encodeURIComponent(String(lambda))}`;
  return deltas?.length ? `${url}&delta=${deltas.join(",")}` : url;
}

/**
 * The ‖ε_c − ε_u‖ levels a run saw: its smallest, median and largest batch mean (2 significant digits,
 * repeats dropped); null without values. The curves are then drawn at these levels.
 */
export function runDeltas(run) {
  const values = (run?.steps ?? []).map((s) => s?.delta_norm).filter((v) => typeof v === "number" && Number.isFinite(v) && v >= 0);
  if (!values.length) return null;
  values.sort((a, b) => a - b);
  const picks = [values[0], values[Math.floor((values.length - 1) / 2)], values.at(-1)].map((v) => Number(v.toPrecision(2)));
  return [...new Set(picks)];
}

/** A run message's evaluations in progress order: [{progress, mean, min, max}] (invalid entries left out). */
export function runSeries(run) {
  const ok = (v) => typeof v === "number" && Number.isFinite(v);
  return (run?.steps ?? [])
    .filter((s) => ok(s?.progress) && ok(s?.mean) && ok(s?.min) && ok(s?.max))
    .map(({ progress, mean, min, max }) => ({ progress, mean, min, max }))
    .sort((a, b) => a.progress - b.progress);
}

/** The y axis: from min(0, lowest value) to a round bound ≥ 1 above every curve and the run's band. */
export function plotRange(preview, series) {
  const values = [1];
  for (const level of preview?.levels ?? []) values.push(...level.w.filter(Number.isFinite));
  for (const s of series) values.push(s.min, s.max);
  return { yMin: Math.min(0, ...values), yMax: niceMax(Math.max(...values)) };
}

/**
 * The plot into (x, y, w, h) of the context: the preview's curves and the run's band and line.
 * Returns the message drawn in place of the curves (an error), or "".
 */
export function drawAnnealing(ctx, state, x, y, w, h) {
  drawFrame(ctx, x, y, w, h);
  const font = 10;
  ctx.font = `${font}px Arial`;
  if (state.error) {
    drawMessage(ctx, state.error, x, y, w, h);
    return state.error;
  }
  const preview = state.preview;
  const series = runSeries(state.run);
  ctx.fillStyle = textColor();
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  if (!preview && !series.length) {
    ctx.fillText(fitText(ctx, "w_t of the policy: loading …", w - 8), x + 4, y + 3);
    return "";
  }
  const captions = [];
  if (preview) captions.push(`progress 0 → 1 · ${preview.timestep_note ?? ""}`);
  if (series.length) {
    const deltas = (state.run.steps ?? []).map((s) => s?.delta_norm).filter((v) => typeof v === "number" && Number.isFinite(v));
    const range = deltas.length ? `, ‖δ‖ ${label(Math.min(...deltas))}–${label(Math.max(...deltas))}` : "";
    captions.push(`last run: w_t chosen per step, batch mean and min–max (λ ${label(Number(state.run.lambda))}${range})`);
  }
  const pad = { left: 28, right: 6, top: 2 * font + 16, bottom: font * captions.length + 8 };
  const px = x + pad.left;
  const py = y + pad.top;
  const pw = w - pad.left - pad.right;
  const ph = h - pad.top - pad.bottom;
  if (pw < 20 || ph < 16) return "";
  const { yMin, yMax } = plotRange(preview, series);
  const sx = (u) => px + Math.min(Math.max(u, 0), 1) * pw;
  const sy = (v) => py + ph - ((v - yMin) / (yMax - yMin)) * ph;

  // axes: 0 line and the 1× line (plain CFG's scale 1: no guidance)
  ctx.strokeStyle = COLORS.border;
  ctx.beginPath();
  ctx.moveTo(px, sy(0));
  ctx.lineTo(px + pw, sy(0));
  ctx.stroke();
  dashedLine(ctx, px, px + pw, sy(1));

  // the run: the batch's min–max band, then its mean with a dot per evaluation
  if (series.length) {
    ctx.fillStyle = RUN_BAND;
    ctx.beginPath();
    series.forEach((s, i) => (i ? ctx.lineTo(sx(s.progress), sy(s.max)) : ctx.moveTo(sx(s.progress), sy(s.max))));
    for (const s of [...series].reverse()) ctx.lineTo(sx(s.progress), sy(s.min));
    ctx.closePath();
    ctx.fill();
  }
  // the policy's curves
  const levels = preview?.levels ?? [];
  levels.forEach((level, i) => {
    const points = level.w.map((v, k) => [sx(preview.progress[k]), sy(v)]).filter(([, v]) => Number.isFinite(v));
    polyline(ctx, points, LEVEL_COLORS[i % LEVEL_COLORS.length], i === 1 || levels.length === 1 ? 2 : 1.5);
  });
  if (series.length) {
    polyline(ctx, series.map((s) => [sx(s.progress), sy(s.mean)]), RUN_COLOR, 2);
    ctx.fillStyle = RUN_COLOR;
    for (const s of series) {
      ctx.beginPath();
      ctx.arc(sx(s.progress), sy(s.mean), 2, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  // labels: the y axis, the heading, the legend of the levels, the captions
  ctx.font = `${font}px Arial`;
  ctx.fillStyle = textColor();
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  ctx.fillText("1×", px - 4, sy(1));
  ctx.fillText(label(yMax), px - 4, sy(yMax));
  ctx.fillText(label(yMin), px - 4, sy(yMin));
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  const source = preview ?? state.run;
  const heading = `w_t over sampling progress · λ ${label(Number(source.lambda))} · ${source.policy}`;
  ctx.fillText(fitText(ctx, heading, w - 8), x + 4, y + 3);
  let lx = x + 4;
  levels.forEach((level, i) => {
    const text = level.label;
    ctx.fillStyle = LEVEL_COLORS[i % LEVEL_COLORS.length];
    if (lx + ctx.measureText(text).width > x + w - 4) return;
    ctx.fillText(text, lx, y + font + 6);
    lx += ctx.measureText(text).width + 10;
  });
  if (series.length && lx + ctx.measureText("● last run").width <= x + w - 4) {
    ctx.fillStyle = RUN_COLOR;
    ctx.fillText("● last run", lx, y + font + 6);
  }
  ctx.fillStyle = textColor();
  captions.forEach((c, i) => ctx.fillText(fitText(ctx, c, w - 8), x + 4, py + ph + 4 + i * font));
  return "";
}

/** What the plot of one node shows: the fetched preview (or its error) and the last run's message. */
class AnnealingState {
  constructor(node) {
    this.node = node;
    this.key = ""; // policy | λ of the preview shown / asked for
    this.preview = null;
    this.error = "";
    this.run = null;
    this.deltas = null; // the ‖δ‖ levels of the curves: the server's defaults, or those of the last run
    this.version = 0;
    this.timer = null;
    this.plot = null;
  }

  inputs() {
    const get = (name) => this.node.widgets?.find((w) => w.name === name)?.value;
    return { policy: get(INPUTS.policy), lambda: get(INPUTS.lambda) };
  }

  /** Ask the server for the curves of the node's current λ and policy (after FETCH_DELAY_MS without a change). */
  refresh() {
    const { policy, lambda } = this.inputs();
    if (policy === undefined || lambda === undefined) return;
    const key = JSON.stringify([policy, lambda, this.deltas]);
    if (key === this.key) return;
    this.key = key;
    clearTimeout(this.timer);
    const deltas = this.deltas;
    this.timer = setTimeout(() => this.fetch(key, previewUrl(policy, lambda, deltas)), FETCH_DELAY_MS);
    this.timer?.unref?.();
  }

  async fetch(key, url) {
    let preview = null;
    let error = "";
    try {
      const response = await api.fetchApi(url);
      const body = (await response.json().catch(() => null)) ?? {};
      if (response.ok && Array.isArray(body.levels)) preview = body;
      else error = body.error ?? `Annealing Guidance plot: the server answered HTTP ${response.status}`;
    } catch (e) {
      error = `Annealing Guidance plot: no answer from the server (${e?.message ?? e})`;
    }
    if (key !== this.key) return; // λ or the policy changed meanwhile
    this.preview = preview;
    this.error = error;
    this.changed();
  }

  setRun(message) {
    this.run = message;
    this.deltas = runDeltas(message) ?? this.deltas;
    this.refresh();
    this.changed();
  }

  changed() {
    this.version++;
    this.plot?.schedule();
  }

  spec() {
    return {
      name: WIDGET,
      type: PLOT_TYPE,
      className: "gk-annealing-plot",
      plotClassName: "gk-annealing-canvas",
      plotHeight: PLOT_HEIGHT,
      logName: "Guidance Kit annealing plot",
      ariaLabel: "Annealing Guidance: the policy's CFG scale over sampling progress",
      count: () => 1,
      beforeDraw: () => this.refresh(),
      values: () => [this.key, this.version],
      draw: (ctx, i, w, h) => {
        const message = drawAnnealing(ctx, this, 0.5, 0.5, w - 1, h - 1);
        const el = this.plot?.element;
        if (el) {
          el.dataset.levels = String(this.error ? 0 : this.preview?.levels?.length ?? 0);
          el.dataset.runSteps = String(runSeries(this.run).length);
        }
        return message;
      },
    };
  }
}

/** The node of a message's id: "12", or "5:12" for a node inside subgraph node 5. */
export function findNode(graph, id) {
  let node = null;
  for (const part of String(id).split(":")) {
    const g = node ? node.subgraph : graph;
    node = g?.getNodeById?.(part) ?? g?.getNodeById?.(Number(part)) ?? null;
    if (!node) return null;
  }
  return node;
}

function addPlot(node) {
  if (node.__gkAnnealingPlot) return node.__gkAnnealingPlot;
  const state = new AnnealingState(node);
  state.plot = attachPlotWidget(node, app, "__gkAnnealingPlotWidget", state.spec());
  if (!state.plot) return null;
  node.__gkAnnealingPlot = state;
  for (const name of Object.values(INPUTS)) {
    const w = node.widgets?.find((w) => w.name === name);
    if (!w || w.__gkAnnealingWatched) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const result = callback?.apply(this, args);
      state.refresh();
      state.plot.schedule();
      return result;
    };
    w.__gkAnnealingWatched = true;
  }
  state.refresh();
  return state;
}

app.registerExtension({
  name: "GuidanceKit.AnnealingPlot",

  setup() {
    api.addEventListener(EVENT, (event) => {
      try {
        const message = event?.detail;
        const node = findNode(app.rootGraph ?? app.graph, message?.node);
        node?.__gkAnnealingPlot?.setRun(message);
      } catch (e) {
        console.warn("Guidance Kit annealing plot:", e);
      }
    });
  },

  nodeCreated(node) {
    if (String(node?.comfyClass ?? node?.type ?? "") !== NODE_TYPE) return;
    try {
      if (addPlot(node)) fitNode(node);
    } catch (e) {
      console.warn("Guidance Kit annealing plot:", e);
    }
  },
});
