// Guidance Kit: the guidance-schedule math of guiders/schedules.py, for the editor preview.
//
// Pure ES module (no DOM, no ComfyUI imports) so that Node can test it:
//   node --test web/tests/
// It must stay in step with guiders/schedules.py and nodes/common.py (build_schedule):
//
//   f(u) = 0 outside the progress window start ≤ u ≤ end (tolerance 1e-6), inside by shape:
//     constant 1 · linear_increasing 2u · linear_decreasing 2(1−u) · cosine_increasing 1−cos(πu)
//     cosine_decreasing 1+cos(πu) · power_increasing (k+1)·u^k · power_decreasing (k+1)·(1−u)^k
//     step_list: the values spread evenly over [0, 1], linearly interpolated (one value = constant)
//   Every shape but step_list has mean 1 over progress u ∈ [0, 1] (continuous, not over a step grid:
//   u is ComfyUI's percent of sigma, so a run split over several samplers gets the same schedule).
//
// The sigma window (sigma_low, sigma_high] depends on the model's sigmas, which the editor does not
// know; the preview only describes it (sigmaCaption).
//
// ComfyUI loads every .js file under web/ as an extension module; this one only exports.

export const SHAPES = Object.freeze([
  "constant",
  "linear_increasing",
  "linear_decreasing",
  "cosine_increasing",
  "cosine_decreasing",
  "power_increasing",
  "power_decreasing",
  "step_list",
]);

/** Number of sampling steps the preview marks with dots (evenly spaced in progress). */
export const PREVIEW_STEPS = 20;

/** sigma_high at or above this means "no upper limit" (nodes/common.py SIGMA_NO_LIMIT). */
export const SIGMA_NO_LIMIT = 1000;

/** Widget defaults (nodes/cfg_methods.py); a node without a widget gets its default. */
export const DEFAULTS = Object.freeze({
  schedule: "constant",
  power: 2.0,
  step_values: "1, 1, 0.5, 0",
  start_percent: 0.0,
  end_percent: 1.0,
  sigma_high: SIGMA_NO_LIMIT,
  sigma_low: 0.0,
});

const WINDOW_TOL = 1e-6; // as Window.contains

/** A schedule or window that cannot act (the message is shown on the node). */
export class ScheduleError extends Error {
  constructor(message) {
    super(message);
    this.name = "ScheduleError";
  }
}

// Python's float() syntax: optional sign, digits with single underscores between them, optional
// fraction and exponent, or inf / infinity / nan (any case); surrounding whitespace is stripped.
const DIGITS = String.raw`\d(?:_?\d)*`;
const PY_FLOAT = new RegExp(
  String.raw`^[+-]?(?:(?:${DIGITS}\.(?:${DIGITS})?|\.${DIGITS}|${DIGITS})(?:[eE][+-]?${DIGITS})?|inf|infinity|nan)$`,
  "i",
);

/** Python's float(text), or null where Python raises ValueError. */
export function parsePythonFloat(text) {
  const s = String(text).trim();
  if (!PY_FLOAT.test(s)) return null;
  const lower = s.toLowerCase().replace(/^[+-]/, "");
  if (lower === "nan") return NaN;
  if (lower === "inf" || lower === "infinity") return s.startsWith("-") ? -Infinity : Infinity;
  return Number(s.replace(/_/g, ""));
}

/**
 * '1, 1, 0.5, 0' → [1, 1, 0.5, 0], as schedules.parse_step_values: commas, semicolons, spaces and
 * newlines separate values; throws ScheduleError naming the first part that is not a number.
 */
export function parseStepValues(text, owner = "step_values") {
  const parts = String(text ?? "")
    .replace(/[\n; ]/g, ",")
    .split(",")
    .filter((p) => p.trim() !== "");
  return parts.map((p) => {
    const v = parsePythonFloat(p);
    if (v === null) {
      throw new ScheduleError(`${owner}: '${p.trim()}' is not a number; write e.g. '1, 1, 0.5, 0'`);
    }
    return v;
  });
}

/** f(u) of a built-in shape, mean 1 over u ∈ [0, 1] (schedules.shape_value). */
export function shapeValue(shape, power, u) {
  u = Math.min(Math.max(u, 0), 1);
  switch (shape) {
    case "constant":
      return 1;
    case "linear_increasing":
      return 2 * u;
    case "linear_decreasing":
      return 2 * (1 - u);
    case "cosine_increasing":
      return 1 - Math.cos(Math.PI * u);
    case "cosine_decreasing":
      return 1 + Math.cos(Math.PI * u);
    case "power_increasing":
      return (power + 1) * u ** power;
    case "power_decreasing":
      return (power + 1) * (1 - u) ** power;
    default:
      throw new ScheduleError(`unknown schedule shape ${shape}`);
  }
}

/** Linear interpolation of values spread evenly over [0, 1] (schedules._interpolate). */
export function interpolate(values, u) {
  if (values.length === 1) return values[0];
  const pos = Math.min(Math.max(u, 0), 1) * (values.length - 1);
  const j = Math.min(Math.floor(pos), values.length - 2);
  const t = pos - j;
  return values[j] * (1 - t) + values[j + 1] * t;
}

function num(value, fallback) {
  const v = typeof value === "number" ? value : parsePythonFloat(value ?? "");
  return v === null || Number.isNaN(v) ? fallback : v;
}

/**
 * A validated schedule from widget-style values ({schedule, power, step_values, start_percent,
 * end_percent, sigma_high, sigma_low}; missing ones take DEFAULTS), as nodes/common.build_schedule
 * plus Schedule.validate. Throws ScheduleError with a short message. Passing a built schedule
 * returns it unchanged.
 */
export function buildSchedule(params = {}) {
  if (params && params.isBuiltSchedule) return params;
  const p = { ...DEFAULTS };
  for (const [k, v] of Object.entries(params ?? {})) if (v !== undefined && v !== null) p[k] = v;
  const shape = String(p.schedule);
  if (!SHAPES.includes(shape)) {
    throw new ScheduleError(`unknown schedule '${shape}'; choose one of ${SHAPES.join(", ")}`);
  }
  const power = num(p.power, DEFAULTS.power);
  const values = shape === "step_list" ? parseStepValues(p.step_values) : [];
  const start = num(p.start_percent, DEFAULTS.start_percent);
  const end = num(p.end_percent, DEFAULTS.end_percent);
  const sigmaLow = num(p.sigma_low, DEFAULTS.sigma_low);
  const sigmaHighRaw = num(p.sigma_high, DEFAULTS.sigma_high);
  const sigmaHigh = sigmaHighRaw >= SIGMA_NO_LIMIT ? Infinity : sigmaHighRaw;

  if (shape.startsWith("power") && !(power > 0 && Number.isFinite(power))) {
    throw new ScheduleError(`power must be a positive number (got ${power})`);
  }
  if (shape === "step_list") {
    if (values.length === 0) {
      throw new ScheduleError("step_list needs at least one value, e.g. '1, 1, 0.5, 0'");
    }
    if (!values.every(Number.isFinite)) throw new ScheduleError("step values must be finite numbers");
  }
  if (!(start >= 0 && start <= 1 && end >= 0 && end <= 1)) {
    throw new ScheduleError(`start and end are fractions of the run, between 0 and 1 (got ${start}, ${end})`);
  }
  if (start > end) throw new ScheduleError(`the window is empty: start (${start}) is after end (${end})`);
  if (sigmaLow < 0) throw new ScheduleError(`sigma_low must be ≥ 0 (got ${sigmaLow})`);
  if (!(sigmaLow < sigmaHigh)) {
    throw new ScheduleError(`the sigma window is empty: sigma_low (${sigmaLow}) is not below sigma_high (${sigmaHigh})`);
  }
  return Object.freeze({ isBuiltSchedule: true, shape, power, values, start, end, sigmaLow, sigmaHigh });
}

/**
 * f(u) at progress u (Schedule.multiplier with σ inside its window): 0 outside start ≤ u ≤ end, else
 * the mean-1 shape. `params` as for buildSchedule.
 */
export function multiplier(u, params) {
  const s = buildSchedule(params);
  if (!(s.start - WINDOW_TOL <= u && u <= s.end + WINDOW_TOL)) return 0;
  if (s.shape === "step_list") return interpolate(s.values, u);
  return shapeValue(s.shape, s.power, u);
}

/**
 * Points of f over u ∈ [0, 1] for drawing: a polyline with vertical edges at the window bounds,
 * the step_list knots included so the interpolation is drawn exactly.
 * Returns {points: [[u, f], ...], steps: [[u_i, f(u_i)], ...] at nSteps evenly spaced progress values, min, max,
 * window: {start, end}}.
 */
export function sampleCurve(params, { nSteps = PREVIEW_STEPS, samples = 96 } = {}) {
  const s = buildSchedule(params);
  const f = (u) => multiplier(u, s);
  const us = new Set([s.start, s.end]);
  for (let i = 0; i <= samples; i++) {
    const u = i / samples;
    if (u > s.start && u < s.end) us.add(u);
  }
  if (s.shape === "step_list" && s.values.length > 1) {
    for (let j = 0; j < s.values.length; j++) {
      const u = j / (s.values.length - 1);
      if (u > s.start && u < s.end) us.add(u);
    }
  }
  const inside = [...us].sort((a, b) => a - b);
  const points = [];
  if (s.start > 0) points.push([0, 0], [s.start, 0]);
  for (const u of inside) points.push([u, f(u)]);
  if (s.end < 1) points.push([s.end, 0], [1, 0]);

  const steps = [];
  for (let i = 0; i < nSteps; i++) {
    const u = nSteps > 1 ? i / (nSteps - 1) : 0;
    steps.push([u, f(u)]);
  }
  const ys = points.map((p) => p[1]).concat(steps.map((p) => p[1]));
  return { points, steps, min: Math.min(...ys), max: Math.max(...ys), window: { start: s.start, end: s.end } };
}

function fmt(v) {
  return String(Number(v.toPrecision(4)));
}

/** 'σ window (0.28, 5.42]' when the sigma window is not the default (0 / ≥ 1000), else ''. */
export function sigmaCaption(params) {
  const s = buildSchedule(params);
  if (s.sigmaLow <= 0 && s.sigmaHigh === Infinity) return "";
  const hi = s.sigmaHigh === Infinity ? "∞)" : `${fmt(s.sigmaHigh)}]`;
  return `σ window (${fmt(s.sigmaLow)}, ${hi}`;
}

/** One-line description of the shape for the preview caption. */
export function shapeCaption(params) {
  const s = buildSchedule(params);
  if (s.shape === "constant") return "constant";
  if (s.shape === "step_list") {
    const n = s.values.length;
    return n === 1 ? "step_list: 1 value (constant)" : `step_list: ${n} values, interpolated`;
  }
  return "mean 1 over the run";
}
