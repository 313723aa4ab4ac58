// /ui/playground?adapter=<id>: one prompt to the base model and to an adapter, side by side.

import { answerText, api, el, showError, startPage } from "./api.js";

const byId = (id) => document.getElementById(id);

function panel(id) {
  const section = byId(id);
  return {
    section,
    name: section.querySelector(".model-name"),
    text: section.querySelector(".answer-text"),
    stats: section.querySelector(".answer-stats"),
    error: section.querySelector(".answer-error"),
  };
}

async function ask(target, body, view) {
  view.section.setAttribute("aria-busy", "true");
  view.section.dataset.state = "generating";
  view.text.textContent = "";
  view.stats.textContent = "generating…";
  showError(view.error, null);
  const started = performance.now();
  try {
    const answer = await api("/generate", { method: "POST", body: { ...body, ...target } });
    const seconds = (performance.now() - started) / 1000;
    const { blank, shown } = answerText(answer.text);
    view.text.classList.toggle("empty", blank);
    view.text.textContent = shown;
    view.section.dataset.tokens = answer.usage.completion_tokens;
    view.stats.textContent =
      `${answer.usage.completion_tokens} tokens · ${seconds.toFixed(2)} s · ` +
      `finish: ${answer.finish_reason}`;
    view.section.dataset.state = "done";
  } catch (failure) {
    view.stats.textContent = "";
    showError(view.error, failure.message);
    view.section.dataset.state = "failed";
  } finally {
    view.section.removeAttribute("aria-busy");
  }
}

async function main() {
  const select = byId("adapter");
  const errors = byId("playground-error");
  const button = byId("generate-button");
  const base = panel("base-answer");
  const tuned = panel("adapter-answer");
  let adapters = [];
  try {
    adapters = (await api("/adapters?limit=100")).data;
  } catch (failure) {
    showError(errors, failure.message);
    return;
  }
  if (adapters.length === 0) {
    showError(errors, "No adapters yet: a job that succeeds makes one, and it appears here.");
    button.disabled = true;
    return;
  }
  // ?adapter= takes the adapter id (as the job page links it) or the job id that trained it.
  const wanted = new URLSearchParams(window.location.search).get("adapter");
  select.replaceChildren(
    ...adapters.map((adapter) =>
      el(
        "option",
        { value: adapter.id, selected: wanted === adapter.id || wanted === adapter.job_id },
        adapter.name,
      ),
    ),
  );
  const chosen = () => adapters.find((adapter) => adapter.id === select.value);
  const describeChoice = () => {
    const adapter = chosen();
    byId("adapter-base").textContent =
      `${adapter.id} · base model ${adapter.base_model} · rank ${adapter.rank}` +
      (adapter.job_id ? ` · trained by ${adapter.job_id}` : " · imported");
    base.name.textContent = adapter.base_model;
    tuned.name.textContent = adapter.name;
  };
  select.addEventListener("change", describeChoice);
  describeChoice();

  byId("generate").addEventListener("submit", async (event) => {
    event.preventDefault();
    const adapter = chosen();
    const body = {
      messages: [{ role: "user", content: byId("prompt").value }],
      max_new_tokens: Number(byId("max-new-tokens").value),
      temperature: 0,
    };
    button.disabled = true;
    await Promise.all([
      ask({ base_model: adapter.base_model }, body, base),
      ask({ adapter: adapter.id }, body, tuned),
    ]);
    button.disabled = false;
  });
}

startPage(main);
