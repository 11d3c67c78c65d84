// Real-browser check of the schedule preview and the Annealing Guidance plot (not part of
// `node --test web/tests/`; the automatic run is web/tests/run_browser_checks.sh, which installs what
// this needs and starts ComfyUI).
//
// Against a running ComfyUI with this pack, in headless Chromium, in one rendering mode:
//   --mode classic  the LiteGraph canvas (Comfy.VueNodes.Enabled = false)
//   --mode vue      "Modern Node Design (Nodes 2.0)" (Comfy.VueNodes.Enabled = true)
// The mode is set through the settings API (POST /api/settings) before the page loads (and the
// server's previous values are put back at the end). Then:
//   1. adds two GuidanceKit_CFGSchedule nodes, one set to cosine_increasing / end_percent 0.7 through
//      its widgets, one with an invalid step list;
//   2. checks on a screenshot of each node's preview element (what the page shows, not only the
//      element's own canvas) that the curve colour / the red message are painted, that the element
//      lies inside its node and is the topmost element there, and that the invalid node names the bad
//      value ('x' is not a number) in its message;
//   3. loads each --workflow (default: workflows/cfg_schedule_sdxl.json and
//      workflows/stack_apg_pag_schedule_sdxl.json): every node type is registered, each widget of a
//      Guidance Kit node holds the value at its place in the file's widgets_values (widgets the file
//      predates keep their defaults: listed under "notes"), each such node serializes to exactly its
//      own widgets' values (the preview widget adds none), and every preview draws its curve;
//   4. loads workflows/annealing_guidance_digits.json: the Annealing Guidance plot draws the policy's
//      three curves (from the pack's preview route), shows the route's message for an unknown policy
//      file, and after a real run (queued from the page with a new seed, sampled by the server on its
//      CPU) overlays the w_t the run chose (one per step, orange line and band on screen);
//   5. saves screenshots (--out, --workflow-out; one per workflow, suffixed -2, -3, ...; --out with
//      -annealing for the plot after the run).
// Prints one summary line "browser check <label>: PASS|FAIL ..." and exits 1 on a failed check or a
// console / page error, 2 on bad usage.
//
// Console noise that is not from this pack is listed and ignored (--strict counts it too): see
// KNOWN_NOISE below. Anything that mentions this pack's files (/extensions/comfyui-guidance-kit/) or
// "Guidance Kit" is always an error.
//
// Manual run:
//   apt-get install -y chromium
//   npm install --prefix ~/.cache/guidance-kit-web playwright-core
//   mkdir -p /tmp/gkweb/custom_nodes && ln -sfn "$PWD" /tmp/gkweb/custom_nodes/comfyui-guidance-kit
//   (cd ~/ComfyUI && OMP_NUM_THREADS=1 python main.py --cpu --listen 127.0.0.1 --port 8288 \
//      --base-directory /tmp/gkweb --database-url sqlite:///:memory: [--front-end-root <static dir>])
//   PLAYWRIGHT_CORE=~/.cache/guidance-kit-web/node_modules/playwright-core \
//     node web/tests/browser_check.mjs http://127.0.0.1:8288 --mode vue [--out shot.png]
//     [--workflow workflows/x.json ...] [--workflow-out wf.png] [--chromium /usr/bin/chromium]
//     [--label name] [--strict]

import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { countPixels, decodePng, isCurve, isError, isRun } from "./png.mjs";

const REPO = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const PACK_PATH = "/extensions/comfyui-guidance-kit/";
const PREVIEW_TYPE = "gk_schedule_preview";
const ANNEALING_TYPE = "gk_annealing_plot";
const ANNEALING_WORKFLOW = join(REPO, "workflows/annealing_guidance_digits.json");

// Console errors / failed requests that come from the frontend or a fresh ComfyUI, not from this pack.
// Each entry: [what, test(text, url)].
const KNOWN_NOISE = [
  // A newer frontend than the backend asks for endpoints the backend lacks (ComfyUI 0.3.64 has no
  // /api/jobs, /api/global_subgraphs, /api/assets, ...): 404 / 405 on resources outside this pack.
  ["failed resource outside the pack", (text, url) =>
    /^Failed to load resource/.test(text) && !url.includes(PACK_PATH)],
  // ... which the newer frontend then also reports in its own words.
  ["newer frontend: endpoint missing in this backend", (text) =>
    /\/api\/(jobs|global_subgraphs|assets|workflow_templates|experiment|userdata|i18n|history)/i.test(text) ||
    /global.?subgraphs|jobs? (list|queue)|Failed to (fetch|load) (jobs|queue|history|templates|global subgraphs)/i.test(text)],
  // Frontend 1.27.10's settings store on a fresh profile (happens with this pack's scripts blocked too).
  ["frontend 1.27 settings store on a fresh profile", (text, stack) =>
    text === "page error: Cannot read properties of undefined (reading 'id')" && stack.includes("addSetting")],
  // No network in the check (api.comfy.org, fonts, registry): offline fetches.
  ["offline request", (text, url) =>
    /api\.comfy\.org|registry\.comfy\.org|net::ERR_(INTERNET_DISCONNECTED|NAME_NOT_RESOLVED|CONNECTION_REFUSED)/.test(text + url) &&
    !url.includes(PACK_PATH)],
];

function usage(message) {
  console.error(`${message}\nusage: node web/tests/browser_check.mjs <comfyui-url> [--mode classic|vue] [--label name] [--out file.png] [--workflow ui.json ...] [--workflow-out file.png] [--chromium path] [--strict]`);
  process.exit(2);
}

if (process.env.NODE_TEST_CONTEXT) {
  // picked up by a test runner (e.g. a newer Node treating web/tests/ as a glob): not a unit test
  console.log("browser_check.mjs is a browser check (web/tests/run_browser_checks.sh); skipped under the test runner");
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
const workflows = [];
for (let w; (w = option("--workflow", null)); ) workflows.push(w);
if (!workflows.length) {
  workflows.push(join(REPO, "workflows/cfg_schedule_sdxl.json"), join(REPO, "workflows/stack_apg_pag_schedule_sdxl.json"));
}
const mode = option("--mode", "classic");
if (!["classic", "vue"].includes(mode)) usage("--mode is classic or vue");
const label = option("--label", mode);
const out = option("--out", `/tmp/gkweb-shots/preview-${mode}.png`);
const workflowOut = option("--workflow-out", `/tmp/gkweb-shots/workflow-${mode}.png`);
const chromiumPath = option("--chromium", process.env.CHROMIUM ?? "/usr/bin/chromium");
const strict = args.includes("--strict");
if (strict) args.splice(args.indexOf("--strict"), 1);
const url = args[0]?.replace(/\/$/, "");
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
const ignored = new Map(); // noise kind → count
const facts = {};
let browser;

function classify(text, location) {
  const ours = text.includes(PACK_PATH) || location.includes(PACK_PATH) || /guidance.?kit/i.test(text);
  if (!ours && !strict) {
    const noise = KNOWN_NOISE.find(([, test]) => test(text, location));
    if (noise) {
      ignored.set(noise[0], (ignored.get(noise[0]) ?? 0) + 1);
      return;
    }
  }
  problems.push(`${text} (${location || "no location"})`);
}

async function postSettings(settings) {
  const response = await fetch(`${url}/api/settings`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(settings),
  });
  if (!response.ok) throw new Error(`POST /api/settings: HTTP ${response.status}`);
}

/** Draw passes: the canvas redraws, Vue renders, the preview's poll runs. */
async function settle(page, ms = 1200) {
  await page.evaluate(async (ms) => {
    const app = window.comfyAPI.app.app;
    const until = performance.now() + ms;
    while (performance.now() < until) {
      app.graph.setDirtyCanvas(true, true);
      app.canvas.draw(true, true);
      await new Promise((r) => requestAnimationFrame(r));
      await new Promise((r) => setTimeout(r, 50));
    }
  }, ms);
}

/** Geometry and state of the preview element of each node (by id) in the page. */
function inspectPreviews(page, ids, type = PREVIEW_TYPE) {
  return page.evaluate(({ ids, PREVIEW_TYPE }) => {
    const app = window.comfyAPI.app.app;
    return ids.map((id) => {
      const node = app.graph.getNodeById(id);
      const widget = node?.widgets?.find((w) => w.type === PREVIEW_TYPE);
      const el = widget?.element;
      if (!el) return { id, error: "no preview widget" };
      el.dataset.gkCheck = String(id);
      const r = el.getBoundingClientRect();
      // the node on screen: the Vue node element, or the node's rectangle on the graph canvas
      let nodeRect;
      const vueEl = document.querySelector(`.lg-node[data-node-id="${id}"], [data-node-id="${id}"].lg-node`) ??
        document.querySelector(`[data-node-id="${id}"]`);
      if (window.LiteGraph.vueNodesMode && vueEl) {
        const v = vueEl.getBoundingClientRect();
        nodeRect = [v.left, v.top, v.right, v.bottom];
      } else {
        const c = app.canvas.canvas.getBoundingClientRect();
        const ds = app.canvas.ds;
        const [x0, y0] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT]);
        const [x1, y1] = ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
        nodeRect = [c.left + x0, c.top + y0, c.left + x1, c.top + y1];
      }
      const cx = r.left + r.width / 2;
      const cy = r.top + r.height / 2;
      const top = document.elementFromPoint(cx, cy);
      const style = getComputedStyle(el);
      return {
        id,
        connected: el.isConnected,
        rect: [r.left, r.top, r.right, r.bottom].map(Math.round),
        nodeRect: nodeRect.map(Math.round),
        inside: r.width > 20 && r.height > 20 && r.left >= nodeRect[0] - 1 && r.right <= nodeRect[2] + 1 &&
          r.top >= nodeRect[1] - 1 && r.bottom <= nodeRect[3] + 1,
        topmost: !!top && el.contains(top),
        visible: style.visibility !== "hidden" && style.display !== "none" && Number(style.opacity) > 0.5,
        error: el.dataset.error ?? "",
        levels: el.dataset.levels ?? null, // the Annealing Guidance plot: curves drawn, run steps overlaid
        runSteps: el.dataset.runSteps ?? null,
        serialize: widget.serialize,
        optionsSerialize: widget.options?.serialize,
      };
    });
  }, { ids, PREVIEW_TYPE: type });
}

async function screenshotCounts(page, id) {
  const handle = await page.$(`[data-gk-check="${id}"]`);
  if (!handle) return { curve: 0, error: 0, run: 0 };
  const png = decodePng(await handle.screenshot());
  return { curve: countPixels(png, isCurve), error: countPixels(png, isError), run: countPixels(png, isRun), size: [png.width, png.height] };
}

function checkPreview(info, counts, what, { wantCurve, wantError, minCurve = 150 }) {
  if (info.error && !wantError) problems.push(`${what}: unexpected message "${info.error}"`);
  if (info.error === "no preview widget") return;
  if (!info.connected) problems.push(`${what}: the preview element is not in the page`);
  if (!info.visible) problems.push(`${what}: the preview element is hidden`);
  if (!info.inside) problems.push(`${what}: the preview ${info.rect} is not inside its node ${info.nodeRect}`);
  if (!info.topmost) problems.push(`${what}: something covers the preview`);
  if (info.serialize !== false || info.optionsSerialize !== false) problems.push(`${what}: the preview widget would be serialized`);
  if (wantCurve && counts.curve < minCurve) problems.push(`${what}: no curve on screen (${counts.curve} curve-coloured pixels)`);
  if (wantError) {
    if (!/'x' is not a number/.test(info.error)) problems.push(`${what}: no message for the invalid step list ("${info.error}")`);
    if (counts.error < 30) problems.push(`${what}: the message is not on screen (${counts.error} red pixels)`);
    if (counts.curve > 30) problems.push(`${what}: a curve is drawn despite the invalid value`);
  }
}

const near = (a, b) => (typeof a === "number" && typeof b === "number" ? Math.abs(a - b) < 1e-6 : JSON.stringify(a) === JSON.stringify(b));

/**
 * The Annealing Guidance plot, on the digits workflow (workflows/annealing_guidance_digits.json): the
 * policy's curves from the server's preview route are on screen; a policy file that does not exist shows
 * the route's message in red; a real run (the prompt queued from the page, on the server's CPU) sends the
 * chosen w_t, which the plot overlays (orange line and band).
 */
async function checkAnnealingPlot(page) {
  const workflow = JSON.parse(readFileSync(ANNEALING_WORKFLOW, "utf8"));
  const id = await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf);
    const node = app.graph.nodes.find((n) => n.type === "GuidanceKit_AnnealingGuidance");
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [160 - node.pos[0], 140 - node.pos[1]];
    return node.id;
  }, workflow);
  await page.keyboard.press("Escape");
  const what = "annealing plot";
  const setPolicy = (value) => page.evaluate(({ id, value }) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((w) => w.name === "policy");
    w.value = value;
    w.callback?.(w.value, app.canvas, node);
  }, { id, value });
  const inspect = async () => {
    const [info] = await inspectPreviews(page, [id], ANNEALING_TYPE);
    return { ...info, pixels: await screenshotCounts(page, id) };
  };
  /** Settle until test(info) holds (or the time is up); the last info. */
  const waitFor = async (test, ms) => {
    const until = Date.now() + ms;
    let info;
    do {
      await settle(page, 500);
      info = await inspect();
    } while (!test(info) && Date.now() < until);
    return info;
  };
  facts.annealing = {};

  // 1. the policy's curves (three ‖δ‖ levels) for λ 0.5, fetched from the route
  const preview = await waitFor((i) => i.levels === "3", 15_000);
  facts.annealing.preview = preview;
  checkPreview(preview, preview.pixels, `${what}: the policy's curves`, { wantCurve: true });
  if (preview.levels !== "3") problems.push(`${what}: ${preview.levels} curves drawn, expected 3 ‖δ‖ levels (error: "${preview.error}")`);
  // the node serializes to its own two widgets' values (nothing for the plot)
  const serialized = await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    return app.graph.serialize().nodes.find((n) => String(n.id) === String(id))?.widgets_values;
  }, id);
  const saved = workflow.nodes.find((n) => String(n.id) === String(id)).widgets_values;
  if (JSON.stringify(serialized) !== JSON.stringify(saved)) {
    problems.push(`${what}: the node serializes to ${JSON.stringify(serialized)}, the file holds ${JSON.stringify(saved)}`);
  }

  // 2. an unknown policy file: the route's JSON error, in red, no curve
  await setPolicy("missing_policy.safetensors");
  const bad = await waitFor((i) => /no policy file/.test(i.error), 10_000);
  facts.annealing.unknownPolicy = { error: bad.error, pixels: bad.pixels };
  if (!/no policy file 'missing_policy.safetensors'/.test(bad.error)) problems.push(`${what}: no message for an unknown policy ("${bad.error}")`);
  const badCounts = bad.pixels;
  if (badCounts.error < 30) problems.push(`${what}: the unknown policy's message is not on screen (${badCounts.error} red pixels)`);
  if (badCounts.curve > 30) problems.push(`${what}: curves drawn for an unknown policy (${badCounts.curve} pixels)`);
  await setPolicy(saved[1]);
  await waitFor((i) => i.levels === "3" && !i.error, 10_000);

  // 3. a real run: the prompt queued from the page; the server sends the chosen w_t per step (a new seed:
  // the same prompt again, e.g. the other mode's check on this server, would come from ComfyUI's cache)
  const queued = await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    const api = window.comfyAPI.api.api;
    const sampler = app.graph.nodes.find((n) => n.type === "KSampler");
    const seed = sampler.widgets.find((w) => w.name === "seed");
    seed.value = Math.floor(Math.random() * 1e9);
    seed.callback?.(seed.value, app.canvas, sampler);
    if (typeof app.queuePrompt === "function") {
      await app.queuePrompt(0, 1);
      return "app.queuePrompt";
    }
    const { output } = await app.graphToPrompt();
    await api.queuePrompt(0, { output });
    return "api.queuePrompt";
  });
  const steps = workflow.nodes.find((n) => n.type === "KSampler").widgets_values[2];
  const run = await waitFor((i) => i.runSteps === String(steps), 90_000);
  facts.annealing.run = { queued, runSteps: run.runSteps, pixels: run.pixels };
  if (run.runSteps !== String(steps)) problems.push(`${what}: the run's chosen w_t did not arrive (${run.runSteps} of ${steps} steps)`);
  if (run.pixels.run < 60) problems.push(`${what}: the run's overlay is not on screen (${run.pixels.run} orange pixels)`);
  checkPreview(run, run.pixels, `${what} after the run`, { wantCurve: true });
  const shot = out.replace(/\.png$/, "-annealing.png");
  await page.screenshot({ path: shot });
  facts.screenshots.push(shot);
}

// the server's settings before the check, put back afterwards (a check against one's own ComfyUI)
let savedSettings = null;
try {
  const response = await fetch(`${url}/api/settings`);
  if (response.ok) savedSettings = await response.json();
} catch {
  // reported by postSettings below
}

try {
  await postSettings({ "Comfy.VueNodes.Enabled": mode === "vue", "Comfy.TutorialCompleted": true });

  // Playwright takes the fresh profile directory as userDataDir (it refuses --user-data-dir in args)
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 1400, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = browser.pages()[0] ?? (await browser.newPage());
  page.on("console", (msg) => {
    if (msg.type() === "error") classify(msg.text(), msg.location()?.url ?? "");
  });
  page.on("pageerror", (err) => classify(`page error: ${err.message}`, String(err.stack ?? "")));
  page.on("response", (response) => {
    if (response.status() >= 400 && response.url().includes(PACK_PATH)) {
      problems.push(`HTTP ${response.status()} for ${response.url()}`);
    }
  });

  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app;
      return !!(app?.graph && app?.canvas && window.LiteGraph?.registered_node_types?.GuidanceKit_CFGSchedule &&
        app.extensions?.some((e) => e.name === "GuidanceKit.SchedulePreview") &&
        app.extensions?.some((e) => e.name === "GuidanceKit.AnnealingPlot"));
    },
    null,
    { timeout: 90_000 },
  );
  // let the first-load work (default graph, dialogs) settle, then close any dialog
  await page.waitForTimeout(1500);
  await page.keyboard.press("Escape");
  await page.waitForTimeout(300);

  Object.assign(facts, await page.evaluate(() => ({
    frontend: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
    vueNodesMode: !!window.LiteGraph.vueNodesMode,
  })));
  if (facts.vueNodesMode !== (mode === "vue")) {
    problems.push(`mode ${mode} asked for, but LiteGraph.vueNodesMode is ${facts.vueNodesMode}`);
  }

  const ids = await page.evaluate(async () => {
    const app = window.comfyAPI.app.app;
    const LiteGraph = window.LiteGraph;
    app.graph.clear();
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [0, 0];

    const set = (node, name, value) => {
      const w = node.widgets.find((w) => w.name === name);
      if (!w) throw new Error(`no widget ${name}`);
      w.value = value;
      w.callback?.(w.value, app.canvas, node);
    };

    const good = LiteGraph.createNode("GuidanceKit_CFGSchedule");
    good.pos = [80, 130];
    app.graph.add(good);
    set(good, "schedule", "cosine_increasing");
    set(good, "end_percent", 0.7);
    set(good, "sigma_low", 0.28);
    set(good, "sigma_high", 5.42);

    const bad = LiteGraph.createNode("GuidanceKit_CFGSchedule");
    bad.pos = [good.pos[0] + good.size[0] + 80, 130];
    app.graph.add(bad);
    set(bad, "schedule", "step_list");
    set(bad, "step_values", "1, 0.5, x");
    return { good: good.id, bad: bad.id };
  });
  await settle(page);

  const [good, bad] = await inspectPreviews(page, [ids.good, ids.bad]);
  const goodCounts = await screenshotCounts(page, ids.good);
  const badCounts = await screenshotCounts(page, ids.bad);
  facts.nodes = { good: { ...good, ...goodCounts }, bad: { ...bad, ...badCounts } };
  checkPreview(good, goodCounts, "cosine_increasing node", { wantCurve: true });
  checkPreview(bad, badCounts, "invalid step list node", { wantError: true });
  const values = await page.evaluate((id) => {
    const node = window.comfyAPI.app.app.graph.getNodeById(id);
    return Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
  }, ids.good);
  if (values.schedule !== "cosine_increasing" || values.end_percent !== 0.7) {
    problems.push(`the widget values were not set: ${JSON.stringify(values)}`);
  }

  // a changed value redraws the preview (as a user's edit does)
  await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((w) => w.name === "step_values");
    w.value = "1, 0.5, 0.25";
    w.callback?.(w.value, app.canvas, node);
  }, ids.bad);
  await settle(page, 900);
  const [fixed] = await inspectPreviews(page, [ids.bad]);
  const fixedCounts = await screenshotCounts(page, ids.bad);
  checkPreview(fixed, fixedCounts, "step list node after fixing the value", { wantCurve: true });

  if (mode === "classic") {
    // the wheel over the preview still zooms / pans the graph (the events go on to the canvas)
    const moved = await page.evaluate((id) => {
      const app = window.comfyAPI.app.app;
      const el = app.graph.getNodeById(id).widgets.find((w) => w.type === "gk_schedule_preview").element;
      const r = el.getBoundingClientRect();
      const before = JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
      el.dispatchEvent(new WheelEvent("wheel", { clientX: r.left + 20, clientY: r.top + 20, deltaY: 120, bubbles: true, cancelable: true }));
      const after = JSON.stringify([app.canvas.ds.scale, ...app.canvas.ds.offset]);
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      return before !== after;
    }, ids.good);
    if (!moved) problems.push("a wheel event over the preview does not reach the graph canvas");
    await settle(page, 500);
  }

  mkdirSync(dirname(out), { recursive: true });
  // the invalid node again, for the screenshot
  await page.evaluate((id) => {
    const app = window.comfyAPI.app.app;
    const node = app.graph.getNodeById(id);
    const w = node.widgets.find((w) => w.name === "step_values");
    w.value = "1, 0.5, x";
    w.callback?.(w.value, app.canvas, node);
  }, ids.bad);
  await settle(page, 900);
  await page.screenshot({ path: out });
  facts.screenshots = [out];

  for (const [i, path] of workflows.entries()) {
    const workflow = JSON.parse(readFileSync(path, "utf8"));
    const loaded = await page.evaluate(async ({ wf, PREVIEW_TYPE }) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(wf);
      app.canvas.ds.scale = 0.75;
      app.canvas.ds.offset = [10, 10];
      const registered = window.LiteGraph.registered_node_types;
      const serialized = app.graph.serialize();
      return app.graph.nodes.map((n) => ({
        id: n.id,
        type: n.type,
        known: !!registered[n.type],
        preview: !!n.widgets?.some((w) => w.type === PREVIEW_TYPE),
        widgets: (n.widgets ?? []).filter((w) => w.type !== PREVIEW_TYPE && w.serialize !== false).map((w) => [w.name, w.value]),
        serialized: serialized.nodes.find((s) => String(s.id) === String(n.id))?.widgets_values ?? null,
      }));
    }, { wf: workflow, PREVIEW_TYPE });
    await page.keyboard.press("Escape"); // e.g. a missing-models dialog
    const name = path.split("/").pop();
    const expected = workflow.nodes.map((n) => n.type).sort();
    const got = loaded.map((n) => n.type).sort();
    if (JSON.stringify(expected) !== JSON.stringify(got)) problems.push(`${name}: nodes differ: ${got} vs ${expected}`);
    const unknown = loaded.filter((n) => !n.known && n.type !== "Note" && n.type !== "MarkdownNote");
    if (unknown.length) problems.push(`${name}: unregistered node types: ${unknown.map((n) => n.type)}`);
    const withPreview = loaded.filter((n) => n.preview);
    if (!withPreview.length) problems.push(`${name}: no node with a schedule preview`);
    for (const n of loaded.filter((n) => n.type.startsWith("GuidanceKit_"))) {
      const saved = workflow.nodes.find((s) => String(s.id) === String(n.id))?.widgets_values ?? [];
      const what = `${name}: node ${n.id} ${n.type}`;
      // each widget holds the value at its place in widgets_values ...
      const shifted = n.widgets.slice(0, saved.length).filter(([, v], k) => !near(v, saved[k]));
      if (shifted.length || saved.length > n.widgets.length) {
        problems.push(`${what}: widgets ${JSON.stringify(n.widgets)} vs widgets_values ${JSON.stringify(saved)}`);
      }
      // (inputs added to the node after the file was written keep their defaults: a note, not a failure)
      if (n.widgets.length > saved.length) {
        (facts.notes ??= []).push(`${what}: the file has no value for ${n.widgets.slice(saved.length).map(([k]) => k)} (default kept)`);
      }
      // ... and the node serializes to exactly its own widgets' values (nothing for the preview)
      const own = n.widgets.map(([, v]) => v);
      if (!n.serialized || n.serialized.length !== own.length || !n.serialized.every((v, k) => near(v, own[k]))) {
        problems.push(`${what}: serializes to ${JSON.stringify(n.serialized)}, its widgets hold ${JSON.stringify(own)}`);
      }
    }
    for (const n of withPreview) {
      // bring the node to the upper left of the view (away from toasts / the minimap), at 100 %
      await page.evaluate((id) => {
        const app = window.comfyAPI.app.app;
        const node = app.graph.getNodeById(id);
        app.canvas.ds.scale = 1;
        app.canvas.ds.offset = [160 - node.pos[0], 140 - node.pos[1]];
      }, n.id);
      await settle(page, 800);
      const [info] = await inspectPreviews(page, [n.id]);
      const counts = await screenshotCounts(page, n.id);
      // the workflows' schedules include flat ones (constant): a line, fewer pixels than a cosine
      checkPreview(info, counts, `${name}: node ${n.id} ${n.type}`, { wantCurve: true, minCurve: 60 });
    }
    await page.evaluate((id) => {
      const app = window.comfyAPI.app.app;
      const node = app.graph.getNodeById(id);
      app.canvas.ds.scale = 0.75;
      app.canvas.ds.offset = [400 / 0.75 - node.pos[0], 120 / 0.75 - node.pos[1]];
    }, withPreview[0]?.id);
    await settle(page, 800);
    const shot = i ? workflowOut.replace(/\.png$/, `-${i + 1}.png`) : workflowOut;
    await page.screenshot({ path: shot });
    facts.screenshots.push(shot);
    facts[name] = `${loaded.length} nodes, ${withPreview.length} with a preview`;
  }

  await checkAnnealingPlot(page);
} catch (e) {
  problems.push(`check failed: ${e.stack ?? e}`);
} finally {
  await browser?.close();
  rmSync(profile, { recursive: true, force: true });
  if (savedSettings) {
    await postSettings({
      "Comfy.VueNodes.Enabled": savedSettings["Comfy.VueNodes.Enabled"] ?? false,
      "Comfy.TutorialCompleted": savedSettings["Comfy.TutorialCompleted"] ?? false,
    }).catch(() => {});
  }
}

console.log(JSON.stringify(facts, null, 2));
if (ignored.size) {
  console.log(`ignored console noise (not from this pack): ${[...ignored].map(([k, n]) => `${k} ×${n}`).join("; ")}`);
}
const summary = `browser check ${label}: frontend ${facts.frontend ?? "?"}, ${mode} mode`;
if (problems.length) {
  console.error(problems.map((p) => `  - ${p}`).join("\n"));
  console.log(`${summary}: FAIL (${problems.length} problem${problems.length > 1 ? "s" : ""})`);
  process.exit(1);
}
console.log(`${summary}: PASS (curve drawn, invalid step list shows its message, ${workflows.length} workflow(s) load with their values; annealing plot: policy curves, unknown-policy message, a run's w_t overlaid)`);
