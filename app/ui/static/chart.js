// The chart of a job, as inline SVG: train and eval loss against the step, or for a
// reinforcement job the grader's mean reward of each step's answers with its spread.

import { el, svg } from "./api.js";

const WIDTH = 960;
const HEIGHT = 300;
const MARGIN = { top: 16, right: 20, bottom: 40, left: 60 };
const PLOT_WIDTH = WIDTH - MARGIN.left - MARGIN.right;
const PLOT_HEIGHT = HEIGHT - MARGIN.top - MARGIN.bottom;
const BOTTOM = HEIGHT - MARGIN.bottom;
const RIGHT = WIDTH - MARGIN.right;

// Ticks at round values (1, 2 or 5 times a power of ten) covering [low, high], at least
// `smallest` apart.
function ticks(low, high, count, smallest = 0) {
  const span = high - low || 1;
  const raw = Math.max(span / count, smallest);
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
  const values = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    values.push(value);
  }
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  return values.map((value) => ({ value, label: value.toFixed(decimals) }));
}

function axes(x, y, xMax, yMin, yMax, yLabel) {
  const parts = [];
  for (const tick of ticks(yMin, yMax, 5)) {
    const at = y(tick.value);
    parts.push(
      svg("line", { class: "grid", x1: MARGIN.left, x2: RIGHT, y1: at, y2: at }),
      svg(
        "text",
        { class: "tick", x: MARGIN.left - 8, y: at + 4, "text-anchor": "end" },
        tick.label,
      ),
    );
  }
  for (const tick of ticks(0, xMax, 8, 1)) {
    const at = x(tick.value);
    parts.push(
      svg("line", { class: "axis-tick", x1: at, x2: at, y1: BOTTOM, y2: BOTTOM + 5 }),
      svg("text", { class: "tick", x: at, y: BOTTOM + 18, "text-anchor": "middle" }, tick.label),
    );
  }
  const middle = MARGIN.top + PLOT_HEIGHT / 2;
  parts.push(
    svg("line", { class: "axis", x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: BOTTOM }),
    svg("line", { class: "axis", x1: MARGIN.left, x2: RIGHT, y1: BOTTOM, y2: BOTTOM }),
    svg(
      "text",
      { class: "axis-label", x: MARGIN.left + PLOT_WIDTH / 2, y: HEIGHT - 6 },
      "step",
    ),
    svg(
      "text",
      { class: "axis-label", transform: `translate(14 ${middle}) rotate(-90)` },
      yLabel,
    ),
  );
  return parts;
}

function lastOf(series) {
  return series[series.length - 1];
}

function latest(series, field) {
  return series.length ? lastOf(series)[field].toFixed(4) : "—";
}

function frame(points, totalSteps, values) {
  const lastStep = Math.max(...points.map((p) => p.step));
  const xMax = Math.max(totalSteps ?? 0, lastStep, 1);
  const low = Math.min(...values);
  const high = Math.max(...values);
  const pad = (high - low) * 0.08 || Math.abs(high) * 0.05 || 1;
  const [yMin, yMax] = [low - pad, high + pad];
  const x = (step) => MARGIN.left + (step / xMax) * PLOT_WIDTH;
  const y = (value) => MARGIN.top + (1 - (value - yMin) / (yMax - yMin)) * PLOT_HEIGHT;
  const line = (series, field) =>
    series.map((p) => `${x(p.step).toFixed(1)},${y(p[field]).toFixed(1)}`).join(" ");
  return { lastStep, xMax, yMin, yMax, x, y, line };
}

// Draw `points` (GET /jobs/{id}/metrics) into `container`. The x axis runs to the job's total
// steps when known, so the curve grows across the chart as the job trains.
export function drawLossChart(container, points, totalSteps) {
  if (points.some((p) => typeof p.reward_mean === "number")) {
    drawRewardChart(container, points, totalSteps);
    return;
  }
  const train = points.filter((p) => typeof p.train_loss === "number");
  const evals = points.filter((p) => typeof p.eval_loss === "number");
  if (train.length === 0 && evals.length === 0) {
    container.replaceChildren(
      el("p", { class: "muted chart-empty" }, "No loss yet: points appear as the job trains."),
    );
    return;
  }
  const losses = [...train.map((p) => p.train_loss), ...evals.map((p) => p.eval_loss)];
  const { lastStep, xMax, yMin, yMax, x, y, line } = frame(points, totalSteps, losses);

  const chart = svg(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label":
        `Loss over ${lastStep} steps: ` +
        `${train.length} train points, ${evals.length} eval points`,
    },
    axes(x, y, xMax, yMin, yMax, "loss"),
    train.length
      ? svg("polyline", { class: "series train", points: line(train, "train_loss") })
      : null,
    evals.length
      ? svg("polyline", { class: "series eval", points: line(evals, "eval_loss") })
      : null,
    // The newest train point as a dot: a line of one point draws nothing.
    train.length
      ? svg("circle", {
          class: "train-point",
          cx: x(lastOf(train).step),
          cy: y(lastOf(train).train_loss),
          r: 3,
        })
      : null,
    evals.map((p) =>
      svg(
        "circle",
        { class: "eval-point", cx: x(p.step), cy: y(p.eval_loss), r: 3.5 },
        svg("title", {}, `step ${p.step}: eval loss ${p.eval_loss.toFixed(4)}`),
      ),
    ),
  );
  const legend = el(
    "p",
    { class: "legend" },
    el("span", { class: "key train" }),
    `train loss ${latest(train, "train_loss")} (${train.length} points)`,
    evals.length ? el("span", { class: "key eval" }) : null,
    evals.length ? `eval loss ${latest(evals, "eval_loss")} (${evals.length} points)` : null,
  );
  container.replaceChildren(chart, legend);
}

// A reinforcement job: the mean reward of each step's answers, and a band one standard
// deviation either side of it (how far the answers of a step were apart).
function drawRewardChart(container, points, totalSteps) {
  const steps = points.filter((p) => typeof p.reward_mean === "number");
  const spread = (p) => p.reward_std ?? 0;
  const values = steps.flatMap((p) => [p.reward_mean - spread(p), p.reward_mean + spread(p)]);
  const { lastStep, xMax, yMin, yMax, x, y, line } = frame(steps, totalSteps, values);
  const band = [
    ...steps.map((p) => `${x(p.step).toFixed(1)},${y(p.reward_mean + spread(p)).toFixed(1)}`),
    ...[...steps]
      .reverse()
      .map((p) => `${x(p.step).toFixed(1)},${y(p.reward_mean - spread(p)).toFixed(1)}`),
  ].join(" ");
  const chart = svg(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-label": `Mean reward over ${lastStep} steps: ${steps.length} points`,
    },
    axes(x, y, xMax, yMin, yMax, "reward"),
    svg("polygon", { class: "spread", points: band }),
    svg("polyline", { class: "series reward", points: line(steps, "reward_mean") }),
    steps.map((p) =>
      svg(
        "circle",
        { class: "reward-point", cx: x(p.step), cy: y(p.reward_mean), r: 3 },
        svg(
          "title",
          {},
          `step ${p.step}: mean reward ${p.reward_mean.toFixed(3)} ± ${spread(p).toFixed(3)}`,
        ),
      ),
    ),
  );
  const legend = el(
    "p",
    { class: "legend" },
    el("span", { class: "key reward" }),
    `mean reward ${latest(steps, "reward_mean")} (${steps.length} points)`,
    el("span", { class: "key spread" }),
    "± one standard deviation of the step's answers",
  );
  container.replaceChildren(chart, legend);
}
