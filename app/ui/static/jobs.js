// /ui: the jobs table, newest first, refreshed while any job is still going.

import {
  TERMINAL,
  api,
  el,
  formatDuration,
  formatLoss,
  formatShortTime,
  formatTime,
  poll,
  progressBar,
  startPage,
  statusBadge,
} from "./api.js";

const PAGE_SIZE = 100;
const ACTIVE_SECONDS = 2;
const IDLE_SECONDS = 10; // new jobs still show up without a reload

function jobRow(job) {
  const link = `/ui/jobs/${encodeURIComponent(job.id)}`;
  const progress = job.progress ?? {};
  const eta = TERMINAL.has(job.status) ? "—" : formatDuration(progress.eta_seconds);
  return el(
    "tr",
    { "data-job-id": job.id, "data-status": job.status },
    el(
      "td",
      {},
      el("a", { href: link, class: "job-link" }, job.id),
      job.adapter ? el("div", { class: "muted small" }, job.adapter.name) : null,
      job.suffix && !job.adapter ? el("div", { class: "muted small" }, job.suffix) : null,
    ),
    el("td", {}, statusBadge(job.status)),
    el("td", { class: "nowrap" }, job.base_model),
    el("td", { class: "progress-col" }, progressBar(job.progress, job.status)),
    el(
      "td",
      { class: "number" },
      `${formatLoss(progress.train_loss)} / ${formatLoss(progress.eval_loss)}`,
    ),
    el("td", { class: "number" }, eta),
    el(
      "td",
      { class: "nowrap", title: formatTime(job.created_at) },
      formatShortTime(job.created_at),
    ),
  );
}

function main() {
  const body = document.querySelector("#jobs tbody");
  const empty = document.getElementById("jobs-empty");
  const summary = document.getElementById("jobs-summary");
  let active = true;
  poll(
    async () => {
      const page = await api(`/jobs?limit=${PAGE_SIZE}`);
      const jobs = page.data;
      body.replaceChildren(...jobs.map(jobRow));
      empty.hidden = jobs.length > 0;
      document.getElementById("jobs").hidden = jobs.length === 0;
      const running = jobs.filter((job) => !TERMINAL.has(job.status)).length;
      const count = `${jobs.length} job${jobs.length === 1 ? "" : "s"}`;
      summary.textContent =
        (page.has_more ? `the newest ${count}` : count) +
        (running ? `, ${running} in progress` : "");
      active = running > 0;
      return true;
    },
    () => (active ? ACTIVE_SECONDS : IDLE_SECONDS),
    document.getElementById("jobs-error"),
  );
}

startPage(main);
