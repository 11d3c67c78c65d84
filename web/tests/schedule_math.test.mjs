// Tests of web/js/schedule_math.js (the editor preview's copy of guiders/schedules.py).
// Run: node --test web/tests/        (Node ≥ 20, no npm install)
// Expected values are computed here from the formulas, independently of the module.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  DEFAULTS,
  PREVIEW_STEPS,
  SHAPES,
  ScheduleError,
  buildSchedule,
  shapeValue,
  multiplier,
  parsePythonFloat,
  parseStepValues,
  sampleCurve,
  shapeCaption,
  sigmaCaption,
} from "../js/schedule_math.js";

const NORMALISED = SHAPES.filter((s) => s !== "constant" && s !== "step_list");

function close(actual, expected, tol = 1e-12, msg = "") {
  assert.ok(Math.abs(actual - expected) <= tol * Math.max(1, Math.abs(expected)), `${msg} ${actual} ≠ ${expected}`);
}

function grid(n) {
  return Array.from({ length: n }, (_, i) => (n > 1 ? i / (n - 1) : 0));
}

test("preview constants match the Python node", () => {
  assert.equal(PREVIEW_STEPS, 20);
  assert.deepEqual([...SHAPES], [
    "constant", "linear_increasing", "linear_decreasing", "cosine_increasing", "cosine_decreasing",
    "power_increasing", "power_decreasing", "step_list",
  ]);
  assert.deepEqual({ ...DEFAULTS }, {
    schedule: "constant", power: 2, step_values: "1, 1, 0.5, 0", start_percent: 0, end_percent: 1,
    sigma_high: 1000, sigma_low: 0,
  });
});

test("linear and cosine are the paper's formulas", () => {
  for (const u of [0, 0.1, 0.25, 0.5, 0.73, 1]) {
    close(multiplier(u, { schedule: "linear_increasing" }), 2 * u);
    close(multiplier(u, { schedule: "linear_decreasing" }), 2 * (1 - u));
    close(multiplier(u, { schedule: "cosine_increasing" }), 1 - Math.cos(Math.PI * u));
    close(multiplier(u, { schedule: "cosine_decreasing" }), 1 + Math.cos(Math.PI * u));
  }
});

test("power shapes: endpoints and mean 1 over progress ((k + 1)·u^k)", () => {
  close(multiplier(0, { schedule: "power_increasing", power: 2 }), 0);
  close(multiplier(1, { schedule: "power_increasing", power: 2 }), 3);
  close(multiplier(0.5, { schedule: "power_increasing", power: 2 }), 0.75);
  close(multiplier(0, { schedule: "power_decreasing", power: 2 }), 3);
  close(multiplier(1, { schedule: "power_decreasing", power: 2 }), 0);
  close(multiplier(0.8, { schedule: "power_increasing", power: 1 }), 1.6);
});

test("every built-in shape has mean 1 over progress (trapezoid rule)", () => {
  for (const shape of ["linear_increasing", "linear_decreasing", "cosine_increasing", "cosine_decreasing",
    "power_increasing", "power_decreasing"]) {
    const n = 20000;
    let sum = 0;
    for (let i = 0; i <= n; i++) sum += (i === 0 || i === n ? 0.5 : 1) * shapeValue(shape, 3, i / n);
    close(sum / n, 1, 1e-6);
  }
});

test("constant is 1 and ignores the step count", () => {
  for (const n of [1, 2, 20]) for (const u of [0, 0.3, 1]) assert.equal(multiplier(u, {}, n), 1);
});

test("step_list: values spread over [0, 1] and interpolated linearly", () => {
  const p = { schedule: "step_list", step_values: "1, 1, 0.5, 0" };
  // knots at 0, 1/3, 2/3, 1
  close(multiplier(0, p), 1);
  close(multiplier(1 / 3, p), 1);
  close(multiplier(2 / 3, p), 0.5);
  close(multiplier(1, p), 0);
  close(multiplier(0.5, p), 0.75); // halfway between 1 (1/3) and 0.5 (2/3)
  close(multiplier(5 / 6, p), 0.25);
  close(multiplier(0.2, p), 1);
  // values are taken as given (not normalised), negatives allowed
  close(multiplier(0.25, { schedule: "step_list", step_values: "-2 2" }), -1);
  // one value = constant
  for (const u of [0, 0.4, 1]) close(multiplier(u, { schedule: "step_list", step_values: "0.7" }), 0.7);
  // the step count does not matter
  close(multiplier(0.5, p, 3), 0.75);
});

test("step_values parse like the Python (comma, semicolon, space, newline)", () => {
  assert.deepEqual(parseStepValues("1, 1, 0.5, 0"), [1, 1, 0.5, 0]);
  assert.deepEqual(parseStepValues("1;2 3\n4,,  ,5"), [1, 2, 3, 4, 5]);
  assert.deepEqual(parseStepValues(" .5, 1e-1, +2., 1_000, -0 "), [0.5, 0.1, 2, 1000, -0]);
  assert.deepEqual(parseStepValues(""), []);
  assert.deepEqual(parseStepValues("1\r\n2"), [1, 2]);
});

test("step_values: a non-number is an error naming it", () => {
  for (const [text, bad] of [["1, x, 0", "x"], ["1, 0.5.5", "0.5.5"], ["1 2a", "2a"], ["0x10", "0x10"],
    ["1__0", "1__0"], ["1\t2", "1\t2"]]) {
    assert.throws(() => parseStepValues(text), (e) => e instanceof ScheduleError && e.message.includes(`'${bad}'`),
      text);
    assert.throws(() => multiplier(0.5, { schedule: "step_list", step_values: text }), ScheduleError);
  }
});

test("Python float syntax", () => {
  assert.equal(parsePythonFloat("inf"), Infinity);
  assert.equal(parsePythonFloat("-Infinity"), -Infinity);
  assert.ok(Number.isNaN(parsePythonFloat("nan")));
  assert.equal(parsePythonFloat("1e5_0"), 1e50);
  for (const bad of ["", "e5", "1e", "_1", "1_", "--1", "infinit", "1.5.2"]) assert.equal(parsePythonFloat(bad), null, bad);
});

test("step_list validation: empty and non-finite lists are errors; ignored by other shapes", () => {
  assert.throws(() => buildSchedule({ schedule: "step_list", step_values: " , ;" }), /at least one value/);
  assert.throws(() => buildSchedule({ schedule: "step_list", step_values: "1, inf" }), /finite/);
  assert.throws(() => buildSchedule({ schedule: "step_list", step_values: "nan" }), /finite/);
  // other shapes never parse step_values (as the Python)
  assert.equal(multiplier(0.5, { schedule: "constant", step_values: "garbage" }), 1);
});

test("progress window: 0 outside start ≤ u ≤ end, unchanged inside", () => {
  const p = { schedule: "cosine_increasing", start_percent: 0.2, end_percent: 0.7 };
  for (const u of [0, 0.1, 0.19, 0.71, 0.9, 1]) assert.equal(multiplier(u, p), 0, `u=${u}`);
  for (const u of [0.2, 0.45, 0.7]) close(multiplier(u, p), 1 - Math.cos(Math.PI * u), 1e-12, `u=${u}`);
  // bounds are inclusive with the Python's 1e-6 tolerance
  close(multiplier(0.7 + 5e-7, p), 1 - Math.cos(Math.PI * (0.7 + 5e-7)));
  assert.equal(multiplier(0.7 + 1e-5, p), 0);
  // a window of one point
  assert.equal(multiplier(0.3, { start_percent: 0.3, end_percent: 0.3 }), 1);
  assert.equal(multiplier(0.31, { start_percent: 0.3, end_percent: 0.3 }), 0);
});

test("invalid windows and powers are errors (as Schedule.validate)", () => {
  assert.throws(() => buildSchedule({ start_percent: 0.8, end_percent: 0.2 }), /window is empty/);
  assert.throws(() => buildSchedule({ end_percent: 1.5 }), /between 0 and 1/);
  assert.throws(() => buildSchedule({ sigma_low: -1 }), /sigma_low/);
  assert.throws(() => buildSchedule({ sigma_low: 5, sigma_high: 5 }), /sigma window is empty/);
  assert.throws(() => buildSchedule({ schedule: "power_increasing", power: 0 }), /power/);
  assert.throws(() => buildSchedule({ schedule: "nope" }), /unknown schedule/);
  // power is only checked for the power shapes
  assert.equal(multiplier(0.5, { schedule: "constant", power: 0 }), 1);
  // sigma_high ≥ 1000 is "no limit", so sigma_low may be anything below infinity
  buildSchedule({ sigma_low: 2000, sigma_high: 1000 });
});

test("missing widgets take their defaults", () => {
  const s = buildSchedule({ start_percent: 0.1 });
  assert.equal(s.shape, "constant");
  assert.equal(s.end, 1);
  assert.equal(s.sigmaLow, 0);
  assert.equal(s.sigmaHigh, Infinity);
  assert.equal(buildSchedule({ schedule: "power_increasing", power: undefined }).power, 2);
});

test("sigma caption only for a non-default sigma window", () => {
  assert.equal(sigmaCaption({}), "");
  assert.equal(sigmaCaption({ sigma_high: 1000, sigma_low: 0 }), "");
  assert.equal(sigmaCaption({ sigma_high: 5000 }), "");
  assert.equal(sigmaCaption({ sigma_low: 0.28, sigma_high: 5.42 }), "σ window (0.28, 5.42]");
  assert.equal(sigmaCaption({ sigma_low: 0.28 }), "σ window (0.28, ∞)");
  assert.equal(sigmaCaption({ sigma_high: 1 }), "σ window (0, 1]");
});

test("shape caption", () => {
  assert.equal(shapeCaption({ schedule: "cosine_increasing" }), "mean 1 over the run");
  assert.equal(shapeCaption({}), "constant");
  assert.equal(shapeCaption({ schedule: "step_list" }), "step_list: 4 values, interpolated");
});

test("sampleCurve: vertical window edges, step dots, knots, range", () => {
  const p = { schedule: "cosine_increasing", start_percent: 0.2, end_percent: 0.7 };
  const c = sampleCurve(p, { nSteps: 20, samples: 50 });
  assert.deepEqual(c.points.slice(0, 2), [[0, 0], [0.2, 0]]);
  assert.deepEqual(c.points.slice(-2), [[0.7, 0], [1, 0]]);
  close(c.points[2][1], 1 - Math.cos(Math.PI * 0.2));
  close(c.points.at(-3)[1], 1 - Math.cos(Math.PI * 0.7));
  for (let i = 1; i < c.points.length; i++) assert.ok(c.points[i][0] >= c.points[i - 1][0], "sorted in u");
  for (const [u, v] of c.points) {
    // on the curve, or the 0 end of a vertical edge at a window bound
    const edge = v === 0 && (u <= 0.2 || u >= 0.7);
    assert.ok(edge || Math.abs(v - multiplier(u, p)) < 1e-12, `point (${u}, ${v})`);
  }
  assert.equal(c.steps.length, 20);
  c.steps.forEach(([u, v], i) => {
    close(u, i / 19);
    close(v, multiplier(i / 19, p));
  });
  assert.equal(c.min, 0);
  close(c.max, 1 - Math.cos(Math.PI * 0.7));
  assert.deepEqual(c.window, { start: 0.2, end: 0.7 });

  const full = sampleCurve({}, { samples: 10 });
  assert.equal(full.points[0][0], 0);
  assert.equal(full.points.at(-1)[0], 1);
  assert.ok(full.points.every(([, v]) => v === 1));

  // step_list knots are sample points, so the polyline is exact
  const sl = sampleCurve({ schedule: "step_list", step_values: "0 3 0" }, { samples: 7 });
  assert.ok(sl.points.some(([u, v]) => u === 0.5 && v === 3));
  assert.equal(sl.max, 3);

  assert.throws(() => sampleCurve({ schedule: "step_list", step_values: "1, oops" }), ScheduleError);
});
