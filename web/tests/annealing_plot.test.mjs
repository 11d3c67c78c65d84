// Tests of web/js/annealing_plot.js without a browser: the module is loaded with a fake `app` and `api`
// (its ComfyUI imports swapped), a fake `document` and fake nodes; the preview route answers what the
// test gives it; the plot is drawn onto recording 2D contexts.
// Run: node --test web/tests/
// The real-browser check (both frontends, classic and Nodes 2.0, a real run) is web/tests/run_browser_checks.sh.

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { FakeElement, removeFakeFrontend } from "./fakes.mjs";

const source = fileURLToPath(new URL("../js/annealing_plot.js", import.meta.url));
const widgetUrl = new URL("../js/plot_widget.js", import.meta.url).href;
let extension;
let plot; // the module's exports
let dir;
const listeners = {};
const requests = [];
let answer = () => ({ status: 200, body: {} });

const fakeApi = {
  async fetchApi(url) {
    requests.push(url);
    const { status, body } = answer(url);
    return { ok: status < 400, status, json: async () => body };
  },
  addEventListener(type, fn) {
    (listeners[type] ??= []).push(fn);
  },
};
const graph = { nodes: {}, getNodeById(id) { return this.nodes[String(id)] ?? null; } };

before(async () => {
  const text = readFileSync(source, "utf8");
  const imports = ['import { api } from "../../../scripts/api.js";', 'import { app } from "../../../scripts/app.js";'];
  for (const line of imports) assert.ok(text.includes(line), "served at /extensions/<pack>/js/: scripts/ is three levels up");
  dir = mkdtempSync(join(tmpdir(), "gk-annealing-"));
  const file = join(dir, "annealing_plot.mjs");
  writeFileSync(file, text
    .replace(imports[0], "const api = globalThis.__gkFakeApi;")
    .replace(imports[1], "const app = globalThis.__gkFakeApp;")
    .replace('from "./plot_widget.js"', `from ${JSON.stringify(widgetUrl)}`));
  globalThis.__gkFakeApi = fakeApi;
  globalThis.__gkFakeApp = { registerExtension: (ext) => (extension = ext), canvas: { canvas: new FakeElement("canvas") }, graph };
  globalThis.document = { createElement: (tag) => new FakeElement(tag), querySelector: () => null };
  globalThis.requestAnimationFrame = (f) => f();
  globalThis.LiteGraph = { vueNodesMode: false };
  plot = await import(pathToFileURL(file).href);
  extension.setup();
});

after(() => removeFakeFrontend(dir));

beforeEach(() => {
  requests.length = 0;
  graph.nodes = {};
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A preview answer as the server gives it (nodes/annealing_plot.py): three levels, w falling over progress. */
function previewAnswer(url) {
  const q = new URL(url, "http://x").searchParams;
  const lambda = Number(q.get("lambda"));
  const progress = [0, 0.25, 0.5, 0.75, 1];
  const levels = [5, 20, 40].map((d) => ({ delta_norm: d, label: `‖δ‖ ${d}`, w: progress.map((p) => 1 + lambda * 3 * (1 - p) + d / 100) }));
  return { status: 200, body: { policy: q.get("policy"), lambda, progress, timestep: progress.map((p) => 999 * (1 - p)), levels, timestep_note: "t = 999·(1 − p)" } };
}

class FakeNode {
  constructor(id, values = { guidance_lambda: 0.5, policy: "digits (shipped with the pack)" }) {
    this.id = id;
    this.comfyClass = plot.NODE_TYPE;
    this.flags = {};
    this.graph = graph;
    this.widgets = Object.entries(values).map(([name, value]) => ({ name, value, type: "combo" }));
    this.size = [300, 80];
  }
  computeSize() {
    let h = 30;
    for (const w of this.widgets) h += (w.options?.getMinHeight ? w.options.getMinHeight() : 20) + 4;
    return [300, h];
  }
  setSize(s) {
    this.size = [...s];
  }
  addDOMWidget(name, type, element, options = {}) {
    const widget = { name, type, element, options, value: "" };
    this.widgets.push(widget);
    return widget;
  }
}

function create(id, values) {
  const node = new FakeNode(id, values);
  graph.nodes[String(id)] = node;
  extension.nodeCreated(node);
  return node;
}

function widgetOf(node) {
  return node.widgets.find((w) => w.type === plot.PLOT_TYPE);
}

/**
 * Lay out and draw as the canvas does (the plot may have drawn already, on the frame after a change:
 * forget that); the plot's context, with the calls of this draw only.
 */
function draw(node, w = 320, h = 160) {
  const widget = widgetOf(node);
  widget.element.attached = true;
  const [canvas] = widget.element.children;
  Object.assign(canvas, { clientWidth: w, clientHeight: h, context: null });
  node.__gkAnnealingPlotWidget.signature = "";
  widget.options.onDraw(widget);
  return canvas.context;
}

const strokes = (ctx, color) => ctx.calls.filter((c, i) => c[0] === "stroke" && ctx.calls.slice(0, i).findLast((d) => d[0] === "set strokeStyle")?.[1] === color).length;
const texts = (ctx) => ctx.calls.filter((c) => c[0] === "fillText").map((c) => c[1]);

test("only the Annealing Guidance node gets the plot; one unserialized DOM widget, room for it", async () => {
  answer = previewAnswer;
  const other = new FakeNode(3);
  other.comfyClass = "GuidanceKit_CFGSchedule";
  extension.nodeCreated(other);
  assert.equal(widgetOf(other), undefined);

  const node = create(4);
  const widget = widgetOf(node);
  assert.equal(node.widgets.at(-1), widget);
  assert.equal(widget.serialize, false);
  assert.equal(widget.options.serialize, false);
  assert.equal(widget.options.surfaces?.panel, "never");
  assert.ok(node.size[1] >= widget.options.getMinHeight(), "node enlarged");
  await sleep(320);
  assert.deepEqual(requests, [plot.previewUrl("digits (shipped with the pack)", 0.5)]);
  assert.match(requests[0], /^\/guidance_kit\/annealing_preview\?policy=digits%20\(shipped%20with%20the%20pack\)&lambda=0\.5$/);
});

test("draws one curve per ‖δ‖ level with its label; λ or the policy changing fetches again", async () => {
  answer = previewAnswer;
  const node = create(5);
  await sleep(320);
  let ctx = draw(node);
  plot.LEVEL_COLORS.slice(0, 3).forEach((color) => assert.equal(strokes(ctx, color), 1, `one curve in ${color}`));
  assert.deepEqual(["‖δ‖ 5", "‖δ‖ 20", "‖δ‖ 40"].filter((t) => texts(ctx).includes(t)).length, 3, texts(ctx).join(" | "));
  assert.ok(texts(ctx).some((t) => t.startsWith("w_t over sampling progress · λ 0.5")), texts(ctx).join(" | "));
  assert.equal(widgetOf(node).element.dataset.levels, "3");
  assert.equal(widgetOf(node).element.dataset.error, undefined);
  const ys = ctx.calls.filter((c) => c[0] === "lineTo" || c[0] === "moveTo").map((c) => c[2]);
  assert.ok(ys.every((y) => y >= 0 && y <= 160), "inside the plot");

  // an edit (with its callback) asks again, once, after the edits stop
  const lambda = node.widgets.find((w) => w.name === "guidance_lambda");
  for (const v of [0.6, 0.7, 0.8]) {
    lambda.value = v;
    lambda.callback?.(v);
  }
  await sleep(320);
  assert.deepEqual(requests.slice(1), [plot.previewUrl("digits (shipped with the pack)", 0.8)]);
  ctx = draw(node);
  assert.ok(texts(ctx).some((t) => t.startsWith("w_t over sampling progress · λ 0.8")), texts(ctx).join(" | "));
  // a value set without a callback (a script) is seen by the next draw
  node.widgets.find((w) => w.name === "policy").value = "mine.safetensors";
  draw(node);
  await sleep(320);
  assert.equal(requests.at(-1), plot.previewUrl("mine.safetensors", 0.8));
});

test("a JSON error from the route is shown in red in place of the curves", async () => {
  answer = () => ({ status: 400, body: { error: "Annealing Guidance: no policy file 'gone.pt' in ComfyUI/models/guidance_policies." } });
  const node = create(6, { guidance_lambda: 0.5, policy: "gone.pt" });
  await sleep(320);
  const ctx = draw(node);
  assert.ok(texts(ctx).some((t) => t.includes("no policy file")), texts(ctx).join(" | "));
  assert.ok(ctx.calls.some((c) => c[0] === "set fillStyle" && c[1] === "#ff7a7a"), "in red");
  assert.equal(strokes(ctx, plot.LEVEL_COLORS[1]), 0, "no curve");
  assert.match(widgetOf(node).element.dataset.error, /no policy file 'gone.pt'/);

  // a server without the route (HTML 404) or no server at all: a message, never an exception
  answer = () => ({ status: 404, body: undefined });
  node.widgets.find((w) => w.name === "policy").value = "other.pt";
  draw(node);
  await sleep(320);
  assert.match(texts(draw(node)).join(" "), /answered HTTP 404/);
});

test("a run's message (by node id, also inside a subgraph) overlays the chosen w_t: band and mean", async () => {
  answer = previewAnswer;
  const node = create(7);
  await sleep(320);
  draw(node);
  const steps = [0.6, 0, 0.3, 0.9].map((p) => ({ progress: p, mean: 2 - p, min: 1.8 - p, max: 2.2 - p, sigma: 1, step: 0, delta_norm: 3 + p }));
  for (const fn of listeners[plot.EVENT]) fn({ detail: { node: "7", policy: "digits_guidance_policy.safetensors", lambda: 0.5, steps } });
  const ctx = draw(node, 640);
  assert.equal(widgetOf(node).element.dataset.runSteps, "4");
  assert.equal(strokes(ctx, plot.RUN_COLOR), 1, "the mean line");
  assert.equal(ctx.calls.filter((c) => c[0] === "arc").length, 4, "a dot per evaluation");
  assert.ok(ctx.calls.some((c) => c[0] === "fill") && ctx.calls.some((c) => c[0] === "closePath"), "the band");
  assert.ok(texts(ctx).some((t) => t.startsWith("last run: w_t chosen per step") && t.includes("(λ 0.5, ‖δ‖ 3–3.9)")), texts(ctx).join(" | "));
  // the mean line runs in progress order, left to right
  const runLine = ctx.calls.findIndex((c) => c[0] === "set strokeStyle" && c[1] === plot.RUN_COLOR);
  const xs = ctx.calls.slice(runLine).filter((c) => c[0] === "moveTo" || c[0] === "lineTo").slice(0, 4).map((c) => c[1]);
  assert.deepEqual(xs, [...xs].sort((a, b) => a - b));

  // the curves are asked for again at the ‖δ‖ levels the run saw (smallest, median, largest)
  await sleep(320);
  assert.equal(requests.at(-1), plot.previewUrl("digits (shipped with the pack)", 0.5, [3, 3.3, 3.9]));
  assert.match(requests.at(-1), /&delta=3,3.3,3.9$/);
  assert.deepEqual(plot.runDeltas({ steps: [{ delta_norm: 0.234 }, { delta_norm: 0.234 }] }), [0.23]);
  assert.equal(plot.runDeltas({ steps: [{ mean: 1 }] }), null);

  // inside a subgraph: "<subgraph node>:<node>"
  const inner = new FakeNode(12);
  const subgraph = { getNodeById: (id) => (String(id) === "12" ? inner : null) };
  graph.nodes["9"] = { id: 9, subgraph };
  assert.equal(plot.findNode(graph, "9:12"), inner);
  assert.equal(plot.findNode(graph, "9:13"), null);
  assert.equal(plot.findNode(graph, "8"), null);
  // a message for a node that is gone, or malformed: nothing happens
  for (const fn of listeners[plot.EVENT]) {
    assert.doesNotThrow(() => fn({ detail: { node: "99", steps } }));
    assert.doesNotThrow(() => fn({}));
  }
});

test("runSeries and plotRange", () => {
  const series = plot.runSeries({ steps: [{ progress: 0.5, mean: 2, min: 1, max: 3 }, { progress: 0.1, mean: 4, min: 3, max: 6.5 }, { progress: NaN, mean: 1, min: 1, max: 1 }] });
  assert.deepEqual(series.map((s) => s.progress), [0.1, 0.5]);
  assert.deepEqual(plot.plotRange(null, series), { yMin: 0, yMax: 7 });
  assert.deepEqual(plot.plotRange({ levels: [{ w: [0.5, 0.9] }] }, []), { yMin: 0, yMax: 1 });
  assert.deepEqual(plot.plotRange({ levels: [{ w: [-0.5, 1.2] }] }, []), { yMin: -0.5, yMax: 1.25 });
  assert.deepEqual(plot.runSeries(null), []);
});
