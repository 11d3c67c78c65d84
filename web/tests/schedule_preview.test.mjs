// Tests of web/js/schedule_preview.js without a browser: the extension module is loaded with a fake
// `app` (its ComfyUI import swapped for a stub) and drawn onto a recording 2D context.
// Run: node --test web/tests/
// The real-browser check is web/tests/browser_check.mjs (manual; needs ComfyUI and Chromium).

import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

const source = fileURLToPath(new URL("../js/schedule_preview.js", import.meta.url));
const mathUrl = new URL("../js/schedule_math.js", import.meta.url).href;
let extension;
let dir;

before(async () => {
  const text = readFileSync(source, "utf8");
  const appImport = 'import { app } from "../../../scripts/app.js";';
  assert.ok(text.includes(appImport), "served at /extensions/<pack>/js/, app.js is three levels up");
  assert.ok(text.includes('from "./schedule_math.js"'));
  dir = mkdtempSync(join(tmpdir(), "gk-preview-"));
  const file = join(dir, "schedule_preview.mjs");
  writeFileSync(file, text
    .replace(appImport, "const app = globalThis.__gkFakeApp;")
    .replace('from "./schedule_math.js"', `from ${JSON.stringify(mathUrl)}`));
  globalThis.__gkFakeApp = { registerExtension: (ext) => (extension = ext) };
  await import(pathToFileURL(file).href);
});

after(() => rmSync(dir, { recursive: true, force: true }));

/** A 2D context that records calls and measures text at 6 px per character. */
function recordingContext() {
  const calls = [];
  const state = {};
  return new Proxy(state, {
    get(target, prop) {
      if (prop === "calls") return calls;
      if (prop === "measureText") return (t) => ({ width: String(t).length * 6 });
      if (prop in target) return target[prop];
      return (...args) => calls.push([prop, ...args]);
    },
    set(target, prop, value) {
      target[prop] = value;
      calls.push(["set " + String(prop), value]);
      return true;
    },
  });
}

/** A minimal LiteGraph node class with the given widgets (name → value). */
function nodeClass() {
  return class FakeNode {
    constructor(widgets) {
      this.widgets = Object.entries(widgets).map(([name, value], i) => ({ name, value, y: 30 + i * 24, computedHeight: 24 }));
      this.size = [320, 0];
      this.flags = {};
      this.comfyClass = "GuidanceKit_Test";
      this.dirty = 0;
      this.size = this.computeSize();
    }
    computeSize() {
      return [320, 30 + this.widgets.length * 24 + 8];
    }
    setSize(s) {
      this.size = [...s];
    }
    setDirtyCanvas() {
      this.dirty++;
    }
    isWidgetVisible(w) {
      return !w.hidden;
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

function texts(ctx) {
  return ctx.calls.filter((c) => c[0] === "fillText").map((c) => c[1]);
}

test("registers one extension with both hooks", () => {
  assert.equal(extension.name, "GuidanceKit.SchedulePreview");
  assert.equal(typeof extension.beforeRegisterNodeDef, "function");
  assert.equal(typeof extension.nodeCreated, "function");
});

test("CFG Schedule node: room for the plot, curve drawn below the widgets, live values", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  const widgetsBottom = 30 + 7 * 24;
  assert.ok(node.size[1] >= widgetsBottom + 100, `node enlarged (height ${node.size[1]})`);

  let ctx = recordingContext();
  node.onDrawForeground(ctx, { low_quality: false });
  assert.ok(ctx.calls.some((c) => c[0] === "lineTo"), "a curve is drawn");
  const ys = ctx.calls.filter((c) => c[0] === "lineTo" || c[0] === "moveTo").map((c) => c[2]);
  assert.ok(Math.min(...ys) > widgetsBottom, "below the widgets");
  assert.ok(Math.max(...ys) < node.size[1], "inside the node");
  assert.ok(texts(ctx).includes("constant"));

  // values are read at every draw (no callback needed), e.g. set by a script
  node.widgets.find((w) => w.name === "schedule").value = "cosine_increasing";
  node.widgets.find((w) => w.name === "sigma_low").value = 0.28;
  node.widgets.find((w) => w.name === "sigma_high").value = 5.42;
  ctx = recordingContext();
  node.onDrawForeground(ctx, {});
  assert.ok(texts(ctx).includes("mean-normalised, 20 steps"));
  assert.ok(texts(ctx).includes("σ window (0.28, 5.42]"));

  // widget callbacks are wrapped to redraw, and the original callback still runs
  const w = node.widgets.find((w) => w.name === "end_percent");
  assert.equal(typeof w.callback, "function");
  const before = node.dirty;
  w.callback(0.7);
  assert.equal(node.dirty, before + 1);
});

test("an invalid value shows a message instead of a curve, and drawing never throws", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, { ...CFG_WIDGETS, schedule: "step_list", step_values: "1, x" });
  let ctx = recordingContext();
  node.onDrawForeground(ctx, {});
  assert.ok(texts(ctx).some((t) => t.includes("'x' is not a number")), texts(ctx).join(" | "));
  assert.ok(!ctx.calls.some((c) => c[0] === "lineTo"));

  node.widgets.find((w) => w.name === "step_values").value = "1, 0";
  node.widgets.find((w) => w.name === "start_percent").value = 0.9;
  node.widgets.find((w) => w.name === "end_percent").value = 0.1;
  ctx = recordingContext();
  node.onDrawForeground(ctx, {});
  assert.ok(texts(ctx).some((t) => t.includes("window is empty")));

  // a context that throws on every call: still no exception out of the draw hook
  const broken = new Proxy({}, { get: () => () => { throw new Error("boom"); } });
  assert.doesNotThrow(() => node.onDrawForeground(broken, {}));
});

test("generic: window-only and prefixed widgets; other nodes untouched", () => {
  const windowOnly = register("GuidanceKit_PAG", { required: { scale: ["FLOAT"], start_percent: ["FLOAT"], end_percent: ["FLOAT"] } },
    { scale: 3, start_percent: 0.25, end_percent: 0.5 });
  let ctx = recordingContext();
  windowOnly.onDrawForeground(ctx, {});
  assert.ok(ctx.calls.some((c) => c[0] === "lineTo"));
  assert.ok(texts(ctx).includes("constant"));

  const prefixed = register("GuidanceKit_PAG2", { required: { pag_schedule: [["constant"]], pag_start_percent: ["FLOAT"], pag_end_percent: ["FLOAT"] } },
    { pag_schedule: "linear_decreasing", pag_start_percent: 0, pag_end_percent: 0.5 });
  ctx = recordingContext();
  prefixed.onDrawForeground(ctx, {});
  assert.ok(texts(ctx).some((t) => t.startsWith("pag · ")), texts(ctx).join(" | "));

  const other = nodeClass();
  extension.beforeRegisterNodeDef(other, { name: "KSampler", input: CFG_INPUTS }, {});
  assert.equal(other.prototype.onDrawForeground, undefined);
  const noSchedule = nodeClass();
  extension.beforeRegisterNodeDef(noSchedule, { name: "GuidanceKit_APG", input: { required: { eta: ["FLOAT"] } } }, {});
  assert.equal(noSchedule.prototype.onDrawForeground, undefined);
});

test("collapsed or too small nodes draw nothing", () => {
  const node = register("GuidanceKit_CFGSchedule", CFG_INPUTS, CFG_WIDGETS);
  node.flags.collapsed = true;
  let ctx = recordingContext();
  node.onDrawForeground(ctx, {});
  assert.equal(ctx.calls.length, 0);
  node.flags.collapsed = false;
  node.size = [320, 30 + 7 * 24 + 20];
  ctx = recordingContext();
  node.onDrawForeground(ctx, {});
  assert.equal(ctx.calls.filter((c) => c[0] === "lineTo").length, 0);
});
