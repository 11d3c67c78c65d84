// Real-browser check of the schedule preview (manual; not part of `node --test web/tests/`).
//
// Loads the ComfyUI frontend in headless Chromium, adds two GuidanceKit_CFGSchedule nodes (one set
// to cosine_increasing with end_percent 0.7 through its widgets, one with an invalid step list),
// redraws, checks that the curve and the error message are painted inside the nodes, and saves a
// screenshot. Exits 1 on a console error / page error or if a node does not draw, 2 on bad usage.
// Known noise that does not come from this pack is listed and ignored (--strict counts it too):
// 404s / offline failures of resources outside /extensions/comfyui-guidance-kit/ (user.css,
// favicon, userdata of a fresh base directory, api.comfy.org) and frontend 1.27.10's own
// "reading 'id'" error from its settings store on a fresh profile (it happens with this pack's
// scripts blocked too).
//
// How to run:
//   1. Chromium and playwright-core, the latter outside the repository:
//        apt-get install -y chromium
//        npm install --prefix /tmp/gkweb-tools playwright-core
//   2. ComfyUI on CPU with this pack:
//        mkdir -p /tmp/gkweb/custom_nodes
//        ln -sfn "$PWD" /tmp/gkweb/custom_nodes/comfyui-guidance-kit
//        (cd ~/ComfyUI && OMP_NUM_THREADS=1 python main.py --cpu --listen 127.0.0.1 --port 8288 \
//           --base-directory /tmp/gkweb --database-url sqlite:///:memory:)
//   3. PLAYWRIGHT_CORE=/tmp/gkweb-tools/node_modules/playwright-core \
//        node web/tests/browser_check.mjs http://127.0.0.1:8288 [--out /tmp/gkweb/preview.png]
//        [--chromium /usr/bin/chromium] [--strict] [--workflow workflows/x.json --workflow-out shot.png]
//
// (PLAYWRIGHT_CORE may be omitted where `import("playwright-core")` resolves on its own.)

import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

function usage(message) {
  console.error(`${message}\nusage: node web/tests/browser_check.mjs <comfyui-url> [--out file.png] [--chromium path] [--strict] [--workflow ui.json] [--workflow-out file.png]`);
  process.exit(2);
}

if (process.env.NODE_TEST_CONTEXT) {
  // picked up by a test runner (e.g. a newer Node treating web/tests/ as a glob): not an automatic test
  console.log("browser_check.mjs is a manual check; skipped under the test runner");
  process.exit(0);
}

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const value = args[i + 1];
  if (!value) usage(`${name} needs a value`);
  args.splice(i, 2);
  return value;
};
const out = option("--out", "/tmp/gkweb/preview.png");
const workflowPath = option("--workflow", null); // optional: a UI workflow to load, check and screenshot too
const workflowOut = option("--workflow-out", "/tmp/gkweb/workflow.png");
const chromiumPath = option("--chromium", process.env.CHROMIUM ?? "/usr/bin/chromium");
const strict = args.includes("--strict");
if (strict) args.splice(args.indexOf("--strict"), 1);
const url = args[0];
if (!url || !/^https?:\/\//.test(url)) usage("give the ComfyUI URL, e.g. http://127.0.0.1:8288");

async function loadPlaywright() {
  const dir = process.env.PLAYWRIGHT_CORE;
  if (dir) {
    const require = createRequire(pathToFileURL(join(dir, "package.json")));
    return import(pathToFileURL(require.resolve(dir)).href);
  }
  return import("playwright-core");
}

const playwright = await loadPlaywright().catch((e) => usage(`playwright-core not found (${e.message}); set PLAYWRIGHT_CORE`));
const { chromium } = playwright.chromium ? playwright : playwright.default; // CommonJS package
const profile = mkdtempSync(join(tmpdir(), "gk-chromium-"));
const problems = [];
const ignored = [];
let browser;

const PACK_PATH = "/extensions/comfyui-guidance-kit/";
function consoleError(text, location) {
  const known = text.startsWith("Failed to load resource") && !location.includes(PACK_PATH);
  (known && !strict ? ignored : problems).push(`console error: ${text} (${location})`);
}
function pageError(err) {
  const stack = String(err.stack ?? "");
  const known = err.message === "Cannot read properties of undefined (reading 'id')" &&
    stack.includes("addSetting") && !stack.includes(PACK_PATH);
  (known && !strict ? ignored : problems).push(`page error: ${err.message}`);
}

try {
  // Playwright takes the fresh profile directory as userDataDir (it refuses --user-data-dir in args)
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.on("console", (msg) => {
    if (msg.type() === "error") consoleError(msg.text(), msg.location()?.url ?? "");
  });
  page.on("pageerror", pageError);

  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app;
      return !!(app?.graph && app?.canvas && window.LiteGraph?.registered_node_types?.GuidanceKit_CFGSchedule &&
        app.extensions?.some((e) => e.name === "GuidanceKit.SchedulePreview"));
    },
    null,
    { timeout: 60_000 },
  );
  // let the first-load work (default graph, dialogs) settle, then close any dialog
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");
  await page.waitForTimeout(1000);

  const result = await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    const LiteGraph = window.LiteGraph;
    app.graph.clear();

    const set = (node, name, value) => {
      const w = node.widgets.find((w) => w.name === name);
      if (!w) throw new Error(`no widget ${name}`);
      if (w.setValue) w.setValue(value, { node, canvas: app.canvas, e: undefined });
      else {
        w.value = value;
        w.callback?.(value, app.canvas, node);
      }
    };

    const good = LiteGraph.createNode("GuidanceKit_CFGSchedule");
    good.pos = [60, 60];
    app.graph.add(good);
    set(good, "schedule", "cosine_increasing");
    set(good, "end_percent", 0.7);
    set(good, "sigma_low", 0.28);
    set(good, "sigma_high", 5.42);

    const bad = LiteGraph.createNode("GuidanceKit_CFGSchedule");
    bad.pos = [good.pos[0] + good.size[0] + 60, 60];
    app.graph.add(bad);
    set(bad, "schedule", "step_list");
    set(bad, "step_values", "1, 0.5, x");

    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, 0];
    for (let i = 0; i < 3; i++) {
      app.graph.setDirtyCanvas(true, true);
      app.canvas.draw(true, true);
      await new Promise((r) => requestAnimationFrame(r));
    }

    // count painted pixels of a colour in the node's body below its widgets
    const canvas = app.canvas.canvas;
    const ratio = canvas.width / canvas.clientWidth;
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
    const count = (node, [r, g, b]) => {
      const bottom = Math.max(...node.widgets.map((w) => (w.y ?? 0) + (w.computedHeight ?? 24)));
      const [x0, y0] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + bottom]);
      const [x1, y1] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
      let n = 0;
      for (let y = Math.floor(y0 * ratio); y < Math.floor(y1 * ratio); y++) {
        for (let x = Math.floor(x0 * ratio); x < Math.floor(x1 * ratio); x++) {
          const i = (y * canvas.width + x) * 4;
          const d = pixels.data;
          if (Math.abs(d[i] - r) < 40 && Math.abs(d[i + 1] - g) < 40 && Math.abs(d[i + 2] - b) < 40) n++;
        }
      }
      return { n, rect: [x0, y0, x1, y1].map(Math.round) };
    };
    return {
      curve: count(good, [0x5a, 0xb0, 0xff]),
      message: count(bad, [0xff, 0x7a, 0x7a]),
      goodSize: [...good.size].map(Math.round),
      values: Object.fromEntries(good.widgets.map((w) => [w.name, w.value])),
      frontend: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    };
  });

  console.log(JSON.stringify(result, null, 2));
  if (result.values.schedule !== "cosine_increasing" || result.values.end_percent !== 0.7) {
    problems.push("the widget values were not set");
  }
  if (result.curve.n < 100) problems.push(`no curve drawn in the node (${result.curve.n} curve-coloured pixels)`);
  if (result.message.n < 20) problems.push(`no error message drawn in the invalid node (${result.message.n} pixels)`);

  await page.screenshot({ path: out });
  console.log(`screenshot: ${out}`);

  if (workflowPath) {
    const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
    const loaded = await page.evaluate(async (wf) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf);
      app.canvas.ds.scale = 0.7;
      app.canvas.ds.offset = [20, 20];
      for (let i = 0; i < 3; i++) {
        app.graph.setDirtyCanvas(true, true);
        app.canvas.draw(true, true);
        await new Promise((r) => requestAnimationFrame(r));
      }
      const registered = window.LiteGraph.registered_node_types;
      return app.graph._nodes.map((n) => ({ id: n.id, type: n.type, known: !!registered[n.type] }));
    }, workflow);
    const expected = workflow.nodes.map((n) => n.type).sort();
    const got = loaded.map((n) => n.type).sort();
    if (JSON.stringify(expected) !== JSON.stringify(got)) problems.push(`workflow nodes differ: ${got} vs ${expected}`);
    const unknown = loaded.filter((n) => !n.known && n.type !== "Note" && n.type !== "MarkdownNote");
    if (unknown.length) problems.push(`workflow has unregistered node types: ${unknown.map((n) => n.type)}`);
    console.log(`workflow ${workflowPath}: ${loaded.length} nodes loaded`);
    await page.waitForTimeout(500);
    await page.screenshot({ path: workflowOut });
    console.log(`screenshot: ${workflowOut}`);
  }
} catch (e) {
  problems.push(`check failed: ${e.stack ?? e}`);
} finally {
  await browser?.close();
  rmSync(profile, { recursive: true, force: true });
}

if (ignored.length) console.log(`ignored (known, not from this pack):\n  ${ignored.join("\n  ")}`);
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
console.log("browser check passed: no console errors, the preview is drawn");
