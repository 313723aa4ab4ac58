// What every dashboard page shares: the API key, calls to the JSON API, the sign-in form,
// a DOM builder that only ever inserts text, and formatting.

const KEY = "tuneserve.apiKey";

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// One call to the API with the stored key. Answers the parsed JSON; throws ApiError with the
// message of the API's error body ({"error": {"code", "message"}}). A 401 also shows the
// sign-in form: the key was revoked or mistyped.
export async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${localStorage.getItem(KEY) ?? ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (failure) {
    throw new ApiError(0, "network_error", `The service did not answer (${failure.message}).`);
  }
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const error = payload?.error ?? {};
    const failure = new ApiError(
      response.status,
      error.code ?? "http_error",
      error.message ?? `${method} ${path}: HTTP ${response.status}`,
    );
    if (response.status === 401) showSignIn(failure.message);
    throw failure;
  }
  return payload;
}

function showSignIn(message) {
  localStorage.removeItem(KEY);
  document.getElementById("page").hidden = true;
  document.getElementById("sign-out").hidden = true;
  const form = document.getElementById("sign-in");
  form.hidden = false;
  showError(document.getElementById("sign-in-error"), message);
  document.getElementById("api-key").focus();
}

// Run the page's `main` once a key is stored; until then show the sign-in form. A key is
// checked with one cheap call before it is kept; then the page loads afresh with it.
export function startPage(main) {
  const form = document.getElementById("sign-in");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("api-key").value.trim();
    localStorage.setItem(KEY, key);
    try {
      await api("/jobs?limit=1");
    } catch (failure) {
      if (failure.status !== 401) {
        localStorage.removeItem(KEY);
        showError(document.getElementById("sign-in-error"), failure.message);
      }
      return;
    }
    window.location.reload();
  });
  document.getElementById("sign-out").addEventListener("click", () => {
    localStorage.removeItem(KEY);
    window.location.reload();
  });
  if (!localStorage.getItem(KEY)) {
    showSignIn(null);
    return;
  }
  document.getElementById("sign-out").hidden = false;
  document.getElementById("page").hidden = false;
  main();
}

// Call `tick` now and again after each answer: every `seconds()` seconds, until it returns
// false, the user signs out (401) or what it follows is not there (404). Any other failure
// shows its message in `errors` and is retried.
export function poll(tick, seconds, errors) {
  const run = async () => {
    let again = true;
    try {
      again = await tick();
      showError(errors, null);
    } catch (failure) {
      if (failure.status === 401) return;
      showError(errors, failure.message);
      if (failure.status === 404) return;
    }
    if (again !== false) setTimeout(run, seconds() * 1000);
  };
  run();
}

export function showError(node, message) {
  node.textContent = message ?? "";
  node.hidden = !message;
}

// An element with attributes and children; strings become text nodes, never markup.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  setAttributes(node, attributes);
  node.append(...present(children));
  return node;
}

// Replace node's children; null and undefined ones are left out (the DOM would write "null").
export function fill(node, ...children) {
  node.replaceChildren(...present(children));
}

function present(children) {
  return children.flat().filter((child) => child !== null && child !== undefined);
}

const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  setAttributes(node, attributes);
  node.append(...present(children));
  return node;
}

function setAttributes(node, attributes) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
}

// A <dl> of [term, value] pairs; values that are missing are left out.
export function fillFacts(list, pairs) {
  list.replaceChildren(
    ...pairs
      .filter(([, value]) => value !== null && value !== undefined && value !== "")
      .flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]),
  );
}

export function statusBadge(status) {
  return el("span", { class: `badge status-${status}`, "data-status": status }, status);
}

export function progressBar(progress, status) {
  const step = progress?.step ?? 0;
  const total = progress?.total_steps;
  const done = status === "succeeded" ? 1 : total ? Math.min(step / total, 1) : 0;
  const fill = el("div", { class: "fill" });
  fill.style.width = `${(done * 100).toFixed(1)}%`;
  const label = total ? `${step} / ${total} steps` : status === "queued" ? "queued" : "—";
  return el(
    "div",
    {
      class: `progress status-${status}`,
      role: "progressbar",
      "aria-valuemin": 0,
      "aria-valuemax": total ?? 0,
      "aria-valuenow": step,
      "aria-label": label,
    },
    fill,
    el("span", { class: "label" }, label),
  );
}

export function formatLoss(value) {
  return typeof value === "number" ? value.toFixed(4) : "—";
}

export function formatNumber(value) {
  if (typeof value !== "number") return value;
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return String(Number(value.toPrecision(4)));
}

// A model's answer as shown: a blank box would read as "nothing came back", so say what did.
export function answerText(text) {
  const blank = text.trim() === "";
  if (!blank) return { blank, shown: text };
  const shown = text === "" ? "(an empty answer)" : `(only whitespace: ${JSON.stringify(text)})`;
  return { blank, shown };
}

export function answerBlock(text) {
  const { blank, shown } = answerText(text);
  return el("pre", { class: blank ? "answer-text empty" : "answer-text" }, shown);
}

export function formatDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "—";
  const whole = Math.max(0, Math.round(seconds));
  if (whole < 60) return `${whole} s`;
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
}

export function formatBytes(bytes) {
  if (typeof bytes !== "number") return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}

export function formatShortTime(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(undefined, {
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
  });
}

export function formatTime(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(undefined, {
    dateStyle: "medium",
    timeStyle: "medium",
  });
}
