// /ui/jobs/{id}: one job's progress, loss chart, evaluation, dataset, settings, plan and
// event log, refreshed every second until the job ends.

import {
  TERMINAL,
  answerBlock,
  api,
  el,
  fill,
  fillFacts,
  formatBytes,
  formatDuration,
  formatLoss,
  formatNumber,
  formatTime,
  poll,
  progressBar,
  showError,
  startPage,
  statusBadge,
} from "./api.js";
import { drawLossChart } from "./chart.js";

const REFRESH_SECONDS = 1;
const jobId = decodeURIComponent(window.location.pathname.split("/").pop());
const jobPath = `/jobs/${encodeURIComponent(jobId)}`;
const byId = (id) => document.getElementById(id);

// Sections that change rarely are rebuilt only when their data changed, so text a person
// is selecting in them does not vanish every second.
const drawn = new Map();
function redraw(name, value, draw) {
  const key = JSON.stringify(value ?? null);
  if (drawn.get(name) === key) return;
  drawn.set(name, key);
  draw(value);
}

function drawHeader(job) {
  document.title = `${job.id} · tuneserve`;
  byId("job-id").textContent = job.id;
  byId("job-status").replaceChildren(statusBadge(job.status));
  const cancel = byId("cancel-job");
  cancel.hidden = TERMINAL.has(job.status);
  cancel.disabled = job.cancel_requested;
  cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel job";
  const tryAdapter = byId("try-adapter");
  tryAdapter.hidden = !job.adapter;
  if (job.adapter) {
    tryAdapter.setAttribute("href", `/ui/playground?adapter=${encodeURIComponent(job.adapter.id)}`);
  }
}

function drawProgress(job) {
  const progress = job.progress ?? {};
  const details = [
    typeof progress.epoch === "number" ? `epoch ${progress.epoch.toFixed(2)}` : null,
    TERMINAL.has(job.status) ? null : `ETA ${formatDuration(progress.eta_seconds)}`,
    typeof progress.tokens_per_second === "number"
      ? `${progress.tokens_per_second.toFixed(0)} tokens/s`
      : null,
    typeof progress.reward_mean === "number"
      ? `mean reward ${progress.reward_mean.toFixed(3)}`
      : `train loss ${formatLoss(progress.train_loss)}`,
    typeof progress.reward_mean === "number" ? null : `eval loss ${formatLoss(progress.eval_loss)}`,
  ].filter(Boolean);
  byId("job-progress").replaceChildren(
    progressBar(job.progress, job.status),
    el("p", { class: "muted", id: "progress-details" }, details.join(" · ")),
  );
  const failure = byId("job-failure");
  failure.hidden = !job.error;
  failure.replaceChildren(
    ...(job.error
      ? [el("strong", {}, `Failed: ${job.error.code}`), el("p", {}, job.error.message)]
      : []),
  );
}

function describeDevice(device) {
  if (!device) return null;
  const name = device.name ?? device.kind;
  return device.count > 1 ? `${device.count} × ${name}` : name;
}

function drawSummary(job) {
  fillFacts(byId("job-summary"), [
    ["Base model", job.base_model],
    ["Quantization", job.quantization ? `${job.quantization} (QLoRA)` : null],
    ["Distributed", { fsdp: "fsdp (sharded)", ddp: "ddp" }[job.distributed] ?? null],
    ["Adapter", job.adapter?.name],
    ["Suffix", job.suffix],
    ["Dataset URL", job.dataset_url],
    ["Validation URL", job.validation_url],
    ["Queue", job.queue],
    ["Worker", job.worker],
    ["Device", describeDevice(job.device)],
    ["Attempt", job.attempt > 1 ? String(job.attempt) : null],
    ["Created", formatTime(job.created_at)],
    ["Started", job.started_at ? formatTime(job.started_at) : null],
    ["Finished", job.finished_at ? formatTime(job.finished_at) : null],
    ...Object.entries(job.metadata ?? {}).map(([key, value]) => [`metadata.${key}`, value]),
  ]);
}

function describe(value) {
  if (typeof value === "number") return formatNumber(value);
  if (value !== null && typeof value === "object") return JSON.stringify(value);
  return value === null || value === undefined ? null : String(value);
}

const DATASET_FACTS = [
  ["filename", "File"],
  ["format", "Format"],
  ["rows", "Rows"],
  ["held_out_rows", "Held out for evaluation"],
  ["tokens", "Tokens"],
  ["max_row_tokens", "Longest row (tokens)"],
  ["bytes", "Size"],
  ["sha256", "sha256"],
  ["etag", "ETag"],
];

function drawDataset(dataset) {
  const list = byId("dataset");
  if (!dataset) {
    list.replaceChildren(el("p", { class: "muted" }, "Known once the worker has validated it."));
    return;
  }
  const known = new Set(DATASET_FACTS.map(([key]) => key));
  const validation = dataset.validation;
  fillFacts(list, [
    ...DATASET_FACTS.map(([key, term]) => [
      term,
      key === "bytes" && dataset.bytes !== undefined
        ? formatBytes(dataset.bytes)
        : describe(dataset[key]),
    ]),
    [
      "Validation set",
      validation
        ? `${formatNumber(validation.rows)} rows, ` +
          `${formatNumber(validation.tokens)} tokens (${validation.format})`
        : null,
    ],
    ...Object.entries(dataset)
      .filter(([key]) => !known.has(key) && key !== "validation")
      .map(([key, value]) => [key, describe(value)]),
  ]);
}

function drawSettings(job) {
  const auto = new Set(job.auto_hyperparameters ?? []);
  fillFacts(
    byId("hyperparameters"),
    Object.entries(job.hyperparameters ?? {}).map(([name, value]) => [
      name,
      `${describe(value) ?? "default"}${auto.has(name) && value !== "auto" ? " (auto)" : ""}`,
    ]),
  );
  fillFacts(
    byId("lora"),
    Object.entries(job.lora ?? {}).map(([name, value]) => [name, describe(value)]),
  );
  const method = job.method ?? { type: "supervised" };
  fillFacts(byId("method"), [
    ["type", method.type],
    ...Object.entries(method[method.type] ?? {}).map(([name, value]) => [name, describe(value)]),
    ...(job.parent
      ? [["trained on from", `${job.parent.kind} ${job.parent.reference} (${job.parent.id})`]]
      : []),
  ]);
}

const SPLITS = {
  validation: "the validation set",
  held_out: "rows held out of training",
  training_rows: "training rows (too few rows to hold any out)",
};

const SAMPLE_COLUMNS = ["Prompt", "Reference", "Base model", "Adapter"];

function drawEvaluation(job) {
  const section = byId("evaluation");
  const evaluation = job.evaluation;
  section.hidden = !evaluation && job.status !== "succeeded";
  const body = byId("evaluation-body");
  if (!evaluation) {
    body.replaceChildren(el("p", { class: "muted" }, "No evaluation was recorded for this job."));
    return;
  }
  const rewarded = evaluation.adapter_mean_reward != null;
  const better = evaluation.improvement >= 0;
  const facts = el("dl", { class: "facts" });
  fillFacts(facts, [
    ["Rows", `${formatNumber(evaluation.rows)}, ${SPLITS[evaluation.split] ?? evaluation.split}`],
    ...(rewarded
      ? [
          ["Base model mean reward", evaluation.base_mean_reward.toFixed(3)],
          ["Adapter mean reward", evaluation.adapter_mean_reward.toFixed(3)],
        ]
      : [
          ["Base model eval loss", formatLoss(evaluation.base_eval_loss)],
          ["Adapter eval loss", formatLoss(evaluation.adapter_eval_loss)],
          [
            "Improvement",
            `${(Math.abs(evaluation.improvement) * 100).toFixed(1)}% ` +
              `${better ? "lower" : "higher"} loss than the base model`,
          ],
        ]),
    ...(evaluation.adapter_preference_accuracy == null
      ? []
      : [
          [
            "Preference accuracy",
            `base ${(evaluation.base_preference_accuracy * 100).toFixed(0)}%, ` +
              `adapter ${(evaluation.adapter_preference_accuracy * 100).toFixed(0)}% ` +
              "(chosen answer likelier than the rejected one)",
          ],
        ]),
    ["Took", formatDuration(evaluation.seconds)],
  ]);
  const samples = evaluation.samples ?? [];
  fill(
    body,
    facts,
    samples.length
      ? el(
          "table",
          { class: "samples" },
          el("thead", {}, el("tr", {}, SAMPLE_COLUMNS.map((name) => el("th", {}, name)))),
          el(
            "tbody",
            {},
            samples.map((sample) =>
              el(
                "tr",
                {},
                el("td", {}, el("pre", {}, sample.prompt)),
                el(
                  "td",
                  {},
                  sample.reference === null
                    ? el("span", { class: "muted" }, "—")
                    : el("pre", {}, sample.reference),
                ),
                el("td", {}, answerBlock(sample.base)),
                el("td", {}, answerBlock(sample.adapter)),
              ),
            ),
          ),
        )
      : null,
  );
}

function drawPlan(plan) {
  const memory = plan.memory ?? {};
  const device = memory.device ?? {};
  const fits =
    memory.fits === true
      ? "fits"
      : memory.fits === false
        ? "does NOT fit"
        : "fit unknown (the device's memory is unknown)";
  const facts = el("dl", { class: "facts" });
  fillFacts(facts, [
    ["Steps", formatNumber(plan.steps)],
    [
      "Estimated time",
      typeof plan.time?.estimated_seconds === "number"
        ? formatDuration(plan.time.estimated_seconds)
        : `unknown${plan.time?.reason ? `: ${plan.time.reason}` : ""}`,
    ],
    [
      "Estimated peak memory",
      `${formatBytes(memory.estimated_bytes)}: ${fits}` +
        (typeof memory.usable_bytes === "number"
          ? ` (${formatBytes(memory.usable_bytes)} usable)`
          : ""),
    ],
    ["Device", [device.accelerator, device.name].filter(Boolean).join(" · ") || null],
    ["Suggestion", memory.suggestion?.message],
  ]);
  const problems = (plan.problems ?? []).map((problem) =>
    el("li", { class: "error" }, `${problem.code}: ${problem.message}`),
  );
  const previews = (plan.loss_mask_preview ?? []).map((preview) =>
    el(
      "figure",
      { class: "mask-preview" },
      el(
        "figcaption",
        { class: "muted" },
        `Line ${preview.line}: ${preview.tokens} tokens, ${preview.trained_tokens} trained`,
      ),
      el(
        "pre",
        { class: "mask" },
        preview.segments.map((segment) =>
          el(
            segment.trained ? "mark" : "span",
            {
              class: segment.trained ? "trained" : "masked",
              title: `${segment.tokens} ${segment.trained ? "trained" : "masked"} tokens`,
            },
            segment.text,
          ),
        ),
      ),
    ),
  );
  fill(
    byId("plan"),
    facts,
    problems.length ? el("ul", { class: "problems" }, problems) : null,
    previews.length
      ? el(
          "div",
          {},
          el("h3", {}, "Loss mask"),
          el(
            "p",
            { class: "muted" },
            "The first examples as rendered for training; ",
            el("mark", { class: "trained" }, "highlighted"),
            " text is trained on, the rest only read.",
          ),
          previews,
        )
      : null,
  );
}

async function loadPlan() {
  try {
    drawPlan(await api(`${jobPath}/plan`));
  } catch (failure) {
    const why = failure.status === 404 ? "Plan unavailable" : "The plan could not be loaded";
    byId("plan").replaceChildren(
      el("p", { class: "muted", id: "plan-unavailable" }, `${why}: ${failure.message}`),
    );
  }
}

let lastSeq = 0;
function appendEvents(events) {
  if (events.length === 0) return;
  const box = byId("events").closest(".scroll");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  byId("events")
    .querySelector("tbody")
    .append(
      ...events.map((event) =>
        el(
          "tr",
          { class: `level-${event.level}`, "data-seq": event.seq },
          el("td", { class: "nowrap" }, new Date(event.created_at).toLocaleTimeString()),
          el("td", {}, el("span", { class: `badge level-${event.level}` }, event.level)),
          el("td", { class: "nowrap" }, event.type),
          el("td", {}, event.message),
        ),
      ),
    );
  lastSeq = events[events.length - 1].seq;
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function drawJob(job) {
  drawHeader(job);
  drawProgress(job);
  redraw("summary", { ...job, progress: null }, () => drawSummary(job));
  redraw("dataset", job.dataset, drawDataset);
  const settings = [job.hyperparameters, job.lora, job.auto_hyperparameters];
  redraw("settings", settings, () => drawSettings(job));
  redraw("evaluation", [job.status, job.evaluation], () => drawEvaluation(job));
}

function main() {
  const errors = byId("job-errors");
  byId("job-id").textContent = jobId;
  byId("cancel-job").addEventListener("click", async () => {
    if (!window.confirm(`Cancel ${jobId}? Training stops at the next step.`)) return;
    try {
      drawJob(await api(`${jobPath}/cancel`, { method: "POST" }));
    } catch (failure) {
      showError(errors, failure.message);
    }
  });
  let planRequested = false;
  let finalRefresh = true; // once more after the end, for points and events written last
  poll(
    async () => {
      const job = await api(jobPath);
      const [metrics, events] = await Promise.all([
        api(`${jobPath}/metrics`),
        api(`${jobPath}/events?after=${lastSeq}&limit=1000`),
      ]);
      drawJob(job);
      byId("loss-title").textContent = job.method?.type === "reinforcement" ? "Reward" : "Loss";
      drawLossChart(byId("loss-chart"), metrics.data, job.progress?.total_steps);
      appendEvents(events.data);
      if (!planRequested) {
        planRequested = true;
        loadPlan();
      }
      if (events.has_more || !TERMINAL.has(job.status)) return true;
      const again = finalRefresh;
      finalRefresh = false;
      return again;
    },
    () => REFRESH_SECONDS,
    errors,
  );
}

startPage(main);
