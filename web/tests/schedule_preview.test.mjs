// Tests of web/js/schedule_preview.js without a browser: the extension module is loaded with a fake
// `app` (its ComfyUI import swapped for a stub), a fake `document` and fake nodes whose
// addDOMWidget records the widget as the frontend would; the plot is drawn onto recording 2D
// contexts.
// Run: node --test web/tests/
// The real-browser checks (both frontends, classic and Nodes 2.0) are web/tests/run_browser_checks.sh.

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, beforeEach, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { PREVIEW_STEPS, shapeCaption, sigmaCaption } from "../js/schedule_math.js";
import { FakeElement, removeFakeFrontend } from "./fakes.mjs";

const source = fileURLToPath(new URL("../js/schedule_preview.js", import.meta.url));
const mathUrl = new URL("../js/schedule_math.js", import.meta.url).href;
const widgetUrl = new URL("../js/plot_widget.js", import.meta.url).href;
const PREVIEW_TYPE = "gk_schedule_preview";
let extension;
let dir;

const fakeDocument = {
  body: null, // set per test where a Vue node body is looked up
  queried: [],
  createElement: (tag) => new FakeElement(tag),
  querySelector(selector) {
    this.queried.push(selector);
    return this.body;
  },
};
const frames = [];
const graphCanvas = new FakeElement("canvas");
graphCanvas.dispatched = [];
graphCanvas.dispatchEvent = (e) => graphCanvas.dispatched.push(e);

before(async () => {
  const text = readFileSync(source, "utf8");
  const appImport = 'import { app } from "../../../scripts/app.js";';
  assert.ok(text.includes(appImport), "served at /extensions/<pack>/js/, app.js is three levels up");
  assert.ok(text.includes('from "./schedule_math.js"'));
  assert.ok(text.includes('from "./plot_widget.js"'));
  dir = mkdtempSync(join(tmpdir(), "gk-preview-"));
  const file = join(dir, "schedule_preview.mjs");
  writeFileSync(file, text
    .replace(appImport, "const app = globalThis.__gkFakeApp;")
    .replace('from "./schedule_math.js"', `from ${JSON.stringify(mathUrl)}`)
    .replace('from "./plot_widget.js"', `from ${JSON.stringify(widgetUrl)}`));
  globalThis.__gkFakeApp = { registerExtension: (ext) => (extension = ext), canvas: { canvas: graphCanvas } };
  globalThis.document = fakeDocument;
  globalThis.requestAnimationFrame = (f) => frames.push(f);
  globalThis.LiteGraph = { vueNodesMode: false };
  await import(pathToFileURL(file).href);
});

after(() => removeFakeFrontend(dir));

beforeEach(() => {
  globalThis.LiteGraph.vueNodesMode = false;
  fakeDocument.body = null;
  fakeDocument.queried = [];
  graphCanvas.dispatched = [];
  frames.length = 0;
});

function flushFrames() {
  const pending = frames.splice(0);
  pending.forEach((f) => f());
  return pending.length;
}

/**
 * A minimal LiteGraph node class with the given widgets (name → value). addDOMWidget appends a
 * widget as the frontend does; computeSize counts a DOM widget's getMinHeight like LiteGraph.
 */
function nodeClass() {
  return class FakeNode {
    constructor(widgets) {
      this.id = 7;
      this.widgets = Object.entries(widgets).map(([name, value]) => ({ name, value, type: "number" }));
      this.flags = {};
      this.comfyClass = "GuidanceKit_Test";
      this.size = this.computeSize();
      this.removed = 0;
    }
    computeSize() {
      let h = 30;
      for (const w of this.widgets) h += (w.options?.getMinHeight ? w.options.getMinHeight() : 20) + 4;
      return [320, h + 8];
    }
    setSize(s) {
      this.size = [...s];
    }
    addDOMWidget(name, type, element, options = {}) {
      const widget = { name, type, element, options: { hideOnZoom: true, ...options }, value: "" };
      this.widgets.push(widget);
      return widget;
    }
    onRemoved() {
      this.removed++;
    }
  };
}

const CFG_INPUTS = {
  required: {
    model: ["MODEL"], schedule: [["constant"]], power: ["FLOAT"], step_values: ["STRING"],
    start_percent: ["FLOAT"], end_percent: ["FLOAT"], sigma_high: ["FLOAT"], sigma_low: ["FLOAT"],
  },
};
const CFG_WIDGETS = {
  schedule: "constant", power: 2, step_values: "1, 1, 0.5, 0", start_percent: 0, end_percent: 1,
  sigma_high: 1000, sigma_low: 0,
};

function register(name, input, widgets) {
  const cls = nodeClass();
  extension.beforeRegisterNodeDef(cls, { name, input }, {});
  const node = new cls(widgets);
  extension.nodeCreated(node);
  return node;
}

function previewOf(node) {
  return node.widgets.find((w) => w.type === PREVIEW_TYPE);
}

/** Lay the preview out as the page would: the element in the page, each plot w × h. */
function layout(node, w = 300, h = 110, zoom = 1) {
  const widget = previewOf(node);
  widget.element.attached = true;
  for (const c of widget.element.children) Object.assign(c, { clientWidth: w, clientHeight: h, zoom });
  return widget;
}

/** Draw as the canvas does (the widget's onDraw); the contexts of the plots, calls reset before. */
function draw(node) {
  const widget = previewOf(node);
  for (const c of widget.element.children) c.context = null;
  widget.options.onDraw(widget);
  return widget.element.children.map((c) => c.context);
}

function texts(ctx) {
  return ctx?.calls.filter((c) => c[0] === "fillText").map((c) => c[1]) ?? [];
}

function set(node, name, value) {
  node.widgets.find((w) => w.name === name).value = value;
}

test("registers one extension with both hooks", () => {
  assert.equal(extension.name, "GuidanceKit.SchedulePreview");
  assert.equal(typeof extension.beforeRegisterNodeDef, "function");
  assert.equal(typeof extension.nodeCreated, "function");
});

test("CFG Schedule node: one DOM widget, last, never serialized, room for the plot", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  const widget = previewOf(node);
  assert.ok(widget, "a preview widget");
  assert.equal(node.widgets.at(-1), widget, "added after the node's own widgets");
  assert.equal(node.widgets.filter((w) => w.type === PREVIEW_TYPE).length, 1);
  assert.equal(widget.serialize, false, "not in widgets_values");
  assert.equal(widget.options.serialize, false, "not sent to the server");
  assert.equal(widget.options.surfaces?.panel, "never", "kept out of the properties panel");
  assert.equal(widget.options.surfaces?.vueNode, "shown");
  assert.equal(widget.options.surfaces?.canvas, "shown");
  assert.equal(widget.element.tagName, "DIV");
  assert.equal(widget.element.children.length, 1);
  assert.equal(widget.element.children[0].tagName, "CANVAS");

  const min = widget.options.getMinHeight();
  assert.ok(min >= 100, `asks for room (${min})`);
  assert.ok(node.size[1] >= 30 + 7 * 24 + min, `node enlarged (height ${node.size[1]})`);
  assert.ok(parseFloat(widget.element.style.minHeight) > 80, "the element keeps a height in a Vue node");
});

test("workflow values keep their places (1.27 serialize / configure, widgets_values order)", () => {
  const workflow = JSON.parse(readFileSync(new URL("../../workflows/cfg_schedule_sdxl.json", import.meta.url), "utf8"));
  const saved = workflow.nodes.find((n) => n.type === "GuidanceKit_CFGSchedule");
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);

  // LGraphNode.configure: widgets_values go to the widgets with serialize !== false, in order
  const own = node.widgets.filter((w) => w.serialize !== false);
  saved.widgets_values.forEach((v, i) => (own[i].value = v));
  assert.deepEqual(
    Object.fromEntries(node.widgets.filter((w) => w.type !== PREVIEW_TYPE).map((w) => [w.name, w.value])),
    Object.fromEntries(Object.keys(CFG_WIDGETS).map((k, i) => [k, saved.widgets_values[i]])),
  );
  // LGraphNode.serialize (1.27): widgets_values[i] for each serialized widget i; nothing for the preview
  const out = [];
  for (const [i, w] of node.widgets.entries()) {
    if (w.serialize === false) continue;
    out[i] = w.value;
  }
  assert.deepEqual(out, saved.widgets_values);
  assert.equal(Object.keys(out).length, out.length, "no holes");
});

test("draws the curve into its canvas with the current values; redraws only on a change", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  const widget = layout(node);
  let [ctx] = draw(node);
  assert.ok(ctx.calls.some((c) => c[0] === "lineTo"), "a curve is drawn");
  const pts = ctx.calls.filter((c) => c[0] === "lineTo" || c[0] === "moveTo");
  assert.ok(pts.every(([, x, y]) => x >= 0 && x <= 300 && y >= 0 && y <= 110), "inside the plot");
  assert.ok(texts(ctx).includes(shapeCaption(CFG_WIDGETS, PREVIEW_STEPS)), texts(ctx).join(" | "));
  assert.ok(texts(ctx).some((t) => t.includes("guidance × over sampling progress")));
  assert.equal(widget.element.dataset.error, undefined);

  // nothing changed: no redraw
  [ctx] = draw(node);
  assert.equal(ctx, null, "no drawing when nothing changed");

  // values are read at every check (no callback needed), e.g. set by a script
  set(node, "schedule", "cosine_increasing");
  set(node, "sigma_low", 0.28);
  set(node, "sigma_high", 5.42);
  [ctx] = draw(node);
  const values = { ...CFG_WIDGETS, schedule: "cosine_increasing", sigma_low: 0.28, sigma_high: 5.42 };
  assert.ok(texts(ctx).includes(shapeCaption(values, PREVIEW_STEPS)), texts(ctx).join(" | "));
  assert.ok(texts(ctx).includes(sigmaCaption(values)), texts(ctx).join(" | "));

  // a resize or zoom redraws at the new size: the bitmap follows the on-screen size
  layout(node, 400, 120, 2);
  [ctx] = draw(node);
  const canvas = widget.element.children[0];
  assert.equal(canvas.width, 800);
  assert.equal(canvas.height, 240);
  assert.ok(ctx.calls.some((c) => c[0] === "setTransform" && c[1] === 2 && c[4] === 2));
});

test("an edit redraws: wrapped callbacks and triggerDraw schedule one frame", () => {
  let called = 0;
  const cls = nodeClass();
  extension.beforeRegisterNodeDef(cls, { name: "GuidanceKit_CFGSchedule", input: CFG_INPUTS }, {});
  const node = new cls(CFG_WIDGETS);
  node.widgets.find((w) => w.name === "end_percent").callback = () => called++;
  extension.nodeCreated(node);
  const widget = layout(node);
  draw(node);

  const w = node.widgets.find((w) => w.name === "end_percent");
  w.value = 0.7;
  w.callback(0.7);
  assert.equal(called, 1, "the original callback still runs");
  node.widgets.find((w) => w.name === "power").callback?.(3);
  widget.element.children[0].context = null;
  assert.equal(flushFrames(), 1, "one frame for several changes");
  const ctx = widget.element.children[0].context;
  assert.ok(ctx?.calls.some((c) => c[0] === "lineTo"), "redrawn");
  const xs = ctx.calls.filter((c) => c[0] === "lineTo").map((c) => c[1]);
  assert.ok(Math.max(...xs) > 0, "drawn");

  // Vue nodes call triggerDraw on every widget of the node after an edit
  assert.equal(typeof widget.triggerDraw, "function");
  widget.triggerDraw();
  assert.equal(flushFrames(), 1);
});

test("an invalid value shows its message instead of a curve; drawing never throws", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, { ...CFG_WIDGETS, schedule: "step_list", step_values: "1, x" });
  const widget = layout(node);
  let [ctx] = draw(node);
  assert.ok(texts(ctx).some((t) => t.includes("'x' is not a number")), texts(ctx).join(" | "));
  assert.ok(!ctx.calls.some((c) => c[0] === "lineTo"));
  assert.ok(ctx.calls.some((c) => c[0] === "set fillStyle" && c[1] === "#ff7a7a"), "in red");
  assert.match(widget.element.dataset.error, /'x' is not a number/);
  assert.match(widget.element.children[0].title, /'x' is not a number/);

  set(node, "step_values", "1, 0");
  set(node, "start_percent", 0.9);
  set(node, "end_percent", 0.1);
  [ctx] = draw(node);
  assert.ok(texts(ctx).some((t) => t.includes("window is empty")), texts(ctx).join(" | "));

  set(node, "start_percent", 0);
  set(node, "end_percent", 1);
  [ctx] = draw(node);
  assert.ok(ctx.calls.some((c) => c[0] === "lineTo"));
  assert.equal(widget.element.dataset.error, undefined, "the message goes with the error");

  // a context that throws on every call: still no exception out of the draw hook
  const canvas = widget.element.children[0];
  canvas.getContext = () => new Proxy({}, { get: () => () => { throw new Error("boom"); } });
  set(node, "power", 3);
  const warn = console.warn;
  console.warn = () => {};
  try {
    assert.doesNotThrow(() => widget.options.onDraw(widget));
  } finally {
    console.warn = warn;
  }
});

test("generic: window-only and prefixed widgets, one plot per group; other nodes untouched", () => {
  const windowOnly = register("GuidanceKit_PAG", { required: { scale: ["FLOAT"], start_percent: ["FLOAT"], end_percent: ["FLOAT"] } },
    { scale: 3, start_percent: 0.25, end_percent: 0.5 });
  layout(windowOnly);
  let [ctx] = draw(windowOnly);
  assert.ok(ctx.calls.some((c) => c[0] === "lineTo"));
  assert.ok(texts(ctx).includes(shapeCaption({ start_percent: 0.25, end_percent: 0.5 }, PREVIEW_STEPS)));

  const prefixed = register("GuidanceKit_PAG2",
    { required: { pag_schedule: [["constant"]], pag_start_percent: ["FLOAT"], pag_end_percent: ["FLOAT"] } },
    { pag_schedule: "linear_decreasing", pag_start_percent: 0, pag_end_percent: 0.5 });
  layout(prefixed);
  [ctx] = draw(prefixed);
  assert.ok(texts(ctx).some((t) => t.startsWith("pag · ")), texts(ctx).join(" | "));

  const two = register("GuidanceKit_Two",
    { required: { schedule: [["constant"]], seg_schedule: [["constant"]], seg_start_percent: ["FLOAT"], seg_end_percent: ["FLOAT"] } },
    { schedule: "constant", seg_schedule: "linear_increasing", seg_start_percent: 0, seg_end_percent: 1 });
  const widget = previewOf(two);
  assert.equal(widget.element.children.length, 2, "one canvas per group");
  assert.ok(widget.options.getMinHeight() > previewOf(windowOnly).options.getMinHeight());
  layout(two);
  const ctxs = draw(two);
  assert.ok(ctxs.every((c) => c.calls.some((call) => call[0] === "lineTo")));

  const other = nodeClass();
  extension.beforeRegisterNodeDef(other, { name: "KSampler", input: CFG_INPUTS }, {});
  const ks = new other(CFG_WIDGETS);
  ks.comfyClass = "KSampler";
  extension.nodeCreated(ks);
  assert.equal(previewOf(ks), undefined);
  const noSchedule = nodeClass();
  extension.beforeRegisterNodeDef(noSchedule, { name: "GuidanceKit_APG", input: { required: { eta: ["FLOAT"] } } }, {});
  const apg = new noSchedule({ eta: 0 });
  extension.nodeCreated(apg);
  assert.equal(previewOf(apg), undefined);
});

test("collapsed nodes and elements without a size draw nothing", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  layout(node, 0, 0);
  assert.equal(draw(node)[0], null, "no size yet");
  layout(node);
  node.flags.collapsed = true;
  assert.equal(draw(node)[0], null, "collapsed");
  node.flags.collapsed = false;
  assert.ok(draw(node)[0], "drawn again");
});

test("classic canvas: the wheel and the middle button over the preview go on to the graph canvas", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  const { element } = layout(node);
  class FakeWheelEvent {
    constructor(type, init) {
      Object.assign(this, init, { type });
      this.prevented = false;
    }
    preventDefault() {
      this.prevented = true;
    }
    stopPropagation() {}
  }
  const e = new FakeWheelEvent("wheel", { deltaY: 120, clientX: 5, clientY: 6 });
  element.dispatch(e);
  assert.equal(graphCanvas.dispatched.length, 1);
  assert.equal(graphCanvas.dispatched[0].type, "wheel");
  assert.equal(graphCanvas.dispatched[0].deltaY, 120);
  assert.ok(e.prevented);
  // the middle button pans; a left click stays with the widget (the frontend selects the node)
  element.dispatch(new FakeWheelEvent("pointerdown", { button: 1, buttons: 4 }));
  element.dispatch(new FakeWheelEvent("pointermove", { button: -1, buttons: 4 }));
  assert.equal(graphCanvas.dispatched.length, 3);
  element.dispatch(new FakeWheelEvent("pointerdown", { button: 0, buttons: 1 }));
  assert.equal(graphCanvas.dispatched.length, 3);

  // Vue nodes handle their own events
  globalThis.LiteGraph.vueNodesMode = true;
  element.dispatch(new FakeWheelEvent("wheel", { deltaY: 120 }));
  assert.equal(graphCanvas.dispatched.length, 3);
});

test("Vue nodes that do not mount DOM widgets (frontend 1.27): the element goes into the node body", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  node.id = 42;
  const widget = previewOf(node);
  const body = new FakeElement("div");
  body.attached = true;
  fakeDocument.body = body;
  const now = Date.now;
  let t = 1_000_000;
  Date.now = () => t;
  try {
    // classic canvas: never (the frontend mounts it when the node is visible)
    widget.options.onDraw(widget);
    t += 5000;
    widget.options.onDraw(widget);
    assert.equal(widget.element.parent, null);

    globalThis.LiteGraph.vueNodesMode = true;
    widget.options.onDraw(widget);
    assert.equal(widget.element.parent, null, "waits for the frontend first");
    t += 1000;
    widget.options.onDraw(widget);
    assert.equal(widget.element.parent, body);
    assert.ok(fakeDocument.queried.some((s) => s.includes("node-body-42")), fakeDocument.queried.join(" | "));
    assert.equal(widget.element.style.padding, "0 12px", "inset like the Vue node's widgets");

    // a frontend that mounts it (newer Vue nodes: WidgetDOM) keeps it where it put it
    const mount = new FakeElement("div");
    mount.attached = true;
    mount.appendChild(widget.element);
    t += 5000;
    widget.options.onDraw(widget);
    assert.equal(widget.element.parent, mount);
    assert.equal(widget.element.style.padding, "", "no inset where the frontend placed it");
  } finally {
    Date.now = now;
  }
});

test("removing the node stops its preview and keeps the node's own onRemoved; back in a graph it draws", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  node.graph = {};
  layout(node);
  assert.ok(draw(node)[0]);
  node.onRemoved();
  assert.equal(node.removed, 1);
  node.graph = null;
  set(node, "power", 3);
  assert.equal(draw(node)[0], null, "a removed node is not drawn");
  node.graph = {}; // e.g. moved into a subgraph
  assert.ok(draw(node)[0], "drawn again");
});

test("a frontend without addDOMWidget: no preview, no error", () => {
  const cls = nodeClass();
  cls.prototype.addDOMWidget = undefined;
  extension.beforeRegisterNodeDef(cls, { name: "GuidanceKit_CFGSchedule", input: CFG_INPUTS }, {});
  const node = new cls(CFG_WIDGETS);
  const warn = console.warn;
  let warned = 0;
  console.warn = () => warned++;
  try {
    assert.doesNotThrow(() => extension.nodeCreated(node));
  } finally {
    console.warn = warn;
  }
  assert.equal(previewOf(node), undefined);
  assert.equal(warned, 1);
});
