"""The dashboard (/ui) in headless Chromium, as a new user meets it: sign in with the key, watch
the jobs table go live, watch a running job's loss curve grow, then compare the base model's and
an adapter's answers in the playground.

Debian's chromium is driven by Playwright (never a downloaded browser). Screenshots of every
page go to $TUNESERVE_SCREENSHOT_DIR, or a temporary directory named at the end of the run
(docs/img is made by scripts/screenshots.py, on the default model).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Locator, Page, expect, sync_playwright

from tests.browser import CHROMIUM, launch_chromium
from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import TERMINAL, Service, local_key_headers

# The tiny model takes 0.1 to 0.5 s a step at batch size 1 on two cores: 600 steps are far
# more than the test watches; it cancels the job once the curve has grown.
LONG_JOB = {"n_epochs": 2, "batch_size": 1, "max_seq_length": 64, "eval_every_steps": 4}
LONG_STEPS = 600
SMALL_JOB = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 64}
PROMPT = "What is 21 plus 21?"
MARKUP = '<img src=x onerror="document.body.dataset.injected=1"><b>bold?</b>'
SLOW = 120_000  # ms: a job waiting behind another, model loading on a busy machine

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)


@pytest.fixture(scope="module")
def screenshots(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    configured = os.environ.get("TUNESERVE_SCREENSHOT_DIR")
    directory = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    yield directory
    # Past output capture, so the run names the directory even when it passes.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is not None and reporter is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\ndashboard screenshots: {directory}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def context(browser: Browser, service: Service) -> Iterator[BrowserContext]:
    """One browser profile for the module: the key signed in once stays in its localStorage."""
    context = browser.new_context(base_url=service.url, viewport={"width": 1280, "height": 900})
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    page = context.new_page()
    crashes: list[str] = []
    page.on("pageerror", lambda error: crashes.append(str(error)))
    yield page
    page.close()
    assert not crashes, f"uncaught errors in the page's scripts: {crashes}"


@pytest.fixture(scope="module")
def jobs(service: Service, tiny_model: str) -> Iterator[dict[str, str]]:
    """A small job, and behind it on the worker a long one with a validation set."""
    small = service.create_job(
        base_model=tiny_model,
        dataset_url=service.upload("sums.jsonl", jsonl(arithmetic_rows(8))),
        hyperparameters=SMALL_JOB,
        suffix="sums",
        metadata={"note": MARKUP},
    )
    long = service.create_job(
        base_model=tiny_model,
        dataset_url=service.upload("many-sums.jsonl", jsonl(arithmetic_rows(300))),
        validation_url=service.upload("held-sums.jsonl", jsonl(arithmetic_rows(4))),
        hyperparameters=LONG_JOB,
        suffix="long",
    )
    yield {"small": small["id"], "long": long["id"]}
    # The worker is shared with the rest of the suite: never leave it training.
    if service.client.get(f"/jobs/{long['id']}").json()["status"] not in TERMINAL:
        service.client.post(f"/jobs/{long['id']}/cancel")
        service.wait_for(long["id"], timeout=60)


def train_points(page: Page) -> int:
    """The points of the train loss line drawn on the job page now."""
    line = page.locator("#loss-chart polyline.train")
    if line.count() == 0:
        return 0
    return len((line.get_attribute("points") or "").split())


def fact(page: Page, facts: str, term: str) -> Locator:
    """The value next to `term` in a list of facts, as a person reads it."""
    return page.locator(f"{facts} dt:text-is('{term}') + dd")


def shoot(page: Page, directory: Path, name: str) -> None:
    page.screenshot(path=directory / f"{name}.png", full_page=True)


def test_sign_in_and_watch_the_jobs_table(
    page: Page, jobs: dict[str, str], screenshots: Path
) -> None:
    page.goto("/")  # the service's root opens the dashboard
    expect(page).to_have_url(re.compile(r"/ui$"))
    sign_in = page.get_by_role("heading", name="Sign in")
    expect(sign_in).to_be_visible()
    expect(page.locator("#jobs")).to_be_hidden()
    shoot(page, screenshots, "dashboard-sign-in")

    page.get_by_label("API key").fill("ts_not-a-key-anyone-made")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("The API key is not valid")

    key = local_key_headers()["Authorization"].removeprefix("Bearer ")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(sign_in).to_be_hidden()
    small = page.locator(f"tr[data-job-id='{jobs['small']}']")
    long = page.locator(f"tr[data-job-id='{jobs['long']}']")
    expect(small).to_be_visible()
    expect(long).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    # Newest first: the long job was created after the small one.
    order = page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.jobId)")
    assert order.index(jobs["long"]) < order.index(jobs["small"])

    # Live, without a reload: the small job ends, the long one starts and shows its progress.
    expect(small.locator(".badge")).to_have_text("succeeded", timeout=SLOW)
    expect(small).to_contain_text(f":sums:{jobs['small']}")  # the adapter's name
    expect(long.locator(".badge")).to_have_text("running", timeout=SLOW)
    expect(long.get_by_role("progressbar")).to_contain_text(f" / {LONG_STEPS} steps", timeout=SLOW)
    shoot(page, screenshots, "dashboard-jobs")

    page.get_by_role("link", name=jobs["long"]).click()
    expect(page).to_have_url(re.compile(f"/ui/jobs/{jobs['long']}$"))
    expect(page.get_by_role("heading", name=jobs["long"])).to_be_visible()


def test_running_job_shows_its_loss_curve_growing(
    page: Page, jobs: dict[str, str], screenshots: Path, service: Service
) -> None:
    service.wait_until_step(jobs["long"], 1, timeout=SLOW / 1000)
    page.goto(f"/ui/jobs/{jobs['long']}")
    status = page.locator("#job-status .badge")
    expect(status).to_have_text("running")
    expect(page.locator("#loss-chart polyline.train")).to_be_attached()
    first = train_points(page)

    # The page redraws the chart as the worker reports steps; no reload.
    page.wait_for_function(
        "n => document.querySelector('#loss-chart polyline.train')"
        ".getAttribute('points').trim().split(/\\s+/).length >= n",
        arg=first + 3,
        timeout=60_000,
    )
    assert train_points(page) >= first + 3
    expect(status).to_have_text("running")
    expect(page.get_by_role("progressbar")).to_contain_text(f" / {LONG_STEPS} steps")
    expect(page.locator("#loss-chart circle.eval-point").first).to_be_visible(timeout=30_000)

    expect(fact(page, "#dataset", "File")).to_have_text("many-sums.jsonl")
    expect(fact(page, "#dataset", "Rows")).to_have_text("300")
    expect(fact(page, "#dataset", "Format")).to_have_text("chat")
    expect(fact(page, "#dataset", "Validation set")).to_contain_text("4 rows")
    expect(fact(page, "#dataset", "sha256")).to_have_text(re.compile("^[0-9a-f]{64}$"))
    expect(fact(page, "#hyperparameters", "batch_size")).to_have_text("1")
    expect(fact(page, "#lora", "r")).to_have_text("16")
    events = page.locator("#events")
    for seen in ("job.created", "job.dataset_validated", "job.training_started"):
        expect(events).to_contain_text(seen)
    expect(events).to_contain_text(f"Training started: {LONG_STEPS} steps.")
    plan = page.locator("#plan")
    expect(plan).not_to_contain_text("Loading the plan")
    if page.locator("#plan-unavailable").count() == 0:  # GET /jobs/{id}/plan exists
        expect(fact(page, "#plan", "Steps")).to_have_text(str(LONG_STEPS))
        expect(plan.locator("mark.trained").first).to_be_visible()
    else:
        expect(plan).to_contain_text("Plan unavailable")
    shoot(page, screenshots, "dashboard-job")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel job").click()
    expect(status).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#cancel-job")).to_be_hidden()
    expect(events).to_contain_text("job.cancelled")


def test_playground_shows_base_and_adapter_answers(
    page: Page, jobs: dict[str, str], screenshots: Path, service: Service
) -> None:
    job: dict[str, Any] = service.wait_for(jobs["small"])
    assert job["status"] == "succeeded", job["error"]
    page.goto(f"/ui/jobs/{jobs['small']}")
    expect(page.locator("#job-status .badge")).to_have_text("succeeded")
    expect(page.get_by_role("progressbar")).to_contain_text("2 / 2 steps")
    expect(page.locator("#loss-chart polyline.train")).to_be_visible()
    # What users wrote is shown as text, never run as markup.
    expect(fact(page, "#job-summary", "metadata.note")).to_have_text(MARKUP)
    assert page.locator("main img, main b").count() == 0
    assert page.evaluate("document.body.dataset.injected") is None
    if job.get("evaluation"):
        evaluation = page.locator("#evaluation")
        expect(evaluation).to_contain_text("Base model eval loss")
        samples = len(job["evaluation"]["samples"])
        expect(evaluation.locator("table.samples tbody tr")).to_have_count(samples)
    shoot(page, screenshots, "dashboard-job-succeeded")

    page.get_by_role("link", name="Try the adapter in the playground").click()
    expect(page).to_have_url(re.compile(f"/ui/playground\\?adapter={job['adapter']['id']}$"))
    expect(page.get_by_role("combobox", name="Adapter")).to_have_value(job["adapter"]["id"])
    page.get_by_label("Prompt").fill(PROMPT)
    page.get_by_label("Max new tokens").fill("12")
    page.get_by_role("button", name="Generate").click()

    asked = {"messages": [{"role": "user", "content": PROMPT}], "max_new_tokens": 12}
    targets = {
        "#base-answer": {"base_model": job["base_model"]},
        "#adapter-answer": {"adapter": job["adapter"]["id"]},
    }
    for panel, target in targets.items():
        answer = page.locator(panel)
        expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
        expected = service.client.post("/generate", json={**asked, **target}).json()
        assert expected["usage"]["completion_tokens"] > 0
        shown = answer.locator(".answer-text")
        if expected["text"].strip():
            assert shown.text_content() == expected["text"]
        else:  # the tiny random model may answer newlines alone: the box says so
            expect(shown).to_contain_text("(only whitespace")
        expect(answer.locator(".answer-stats")).to_contain_text(
            f"{expected['usage']['completion_tokens']} tokens"
        )
    expect(page.locator("#base-answer .model-name")).to_have_text(job["base_model"])
    expect(page.locator("#adapter-answer .model-name")).to_have_text(job["adapter"]["name"])
    shoot(page, screenshots, "dashboard-playground")

    page.goto("/ui/jobs/ftjob-nobody-made")
    expect(page.locator("#job-errors")).to_contain_text("No job 'ftjob-nobody-made'")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_a_reinforcement_job_shows_its_reward_chart_and_mean_rewards(
    page: Page, service: Service, tiny_model: str, screenshots: Path
) -> None:
    from tests.integration.test_reinforcement import QUESTIONS, SAYS_YES, prompt_rows

    created = service.create_job(
        base_model=tiny_model,
        dataset_url=service.upload("yes-no.jsonl", jsonl(prompt_rows(QUESTIONS[:6]))),
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": SAYS_YES, "num_generations": 2, "max_completion_length": 4},
        },
        hyperparameters={"n_epochs": 1, "batch_size": 2, "max_seq_length": 64},
    )
    job = service.wait_for(created["id"])
    assert job["status"] == "succeeded", job["error"]
    page.goto(f"/ui/jobs/{job['id']}")
    sign_in = page.get_by_role("heading", name="Sign in")
    if sign_in.is_visible():  # this test alone: the module's first test has not signed in
        page.get_by_label("API key").fill(local_key_headers()["Authorization"].split()[1])
        page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#loss-title")).to_have_text("Reward", timeout=SLOW)
    expect(page.locator("#loss-chart polyline.reward")).to_be_attached()
    expect(page.locator("#loss-chart polygon.spread")).to_be_attached()
    expect(page.locator("#loss-chart .legend")).to_contain_text("mean reward")
    if job.get("evaluation"):
        expect(page.locator("#evaluation")).to_contain_text("Adapter mean reward")
    shoot(page, screenshots, "dashboard-reinforcement-job")
