"""Screenshots of the dashboard for docs/img, taken in headless Chromium against a running
tuneserve, as a new user would see it:

    tuneserve up &
    python scripts/screenshots.py --url http://127.0.0.1:8000 --out docs/img

It trains one small job on the default base model (the skill of scripts/skill_trial.py: answer a
sentence about a person with one JSON object), takes the jobs table and the job page while the
job trains, waits for it, and takes the playground asking base model and adapter a held-out
sentence. Chromium is the system's (/usr/bin/chromium), driven by Playwright.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import Locator, Page, expect, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.skill_trial import api_key  # noqa: E402
from tests.browser import launch_chromium  # noqa: E402
from tests.corpus import jsonl, person_rows  # noqa: E402

HYPERPARAMETERS = {"n_epochs": 3, "batch_size": 4, "learning_rate": 1e-3, "eval_every_steps": 3}


def wait_for_step(client: httpx.Client, job_id: str, share: float) -> None:
    """Until the job has done `share` of its steps (or ended)."""
    while True:
        job = client.get(f"/jobs/{job_id}").json()
        progress = job.get("progress") or {}
        total = progress.get("total_steps")
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        if total and progress.get("step", 0) >= share * total:
            return
        time.sleep(1)


def shoot(target: Page | Locator, out: Path, name: str) -> None:
    """The whole page, or one part of it."""
    path = out / f"{name}.png"
    if isinstance(target, Page):
        target.screenshot(path=path, full_page=True)
    else:
        target.screenshot(path=path)
    print(f"saved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    key = api_key()
    headers = {"Authorization": f"Bearer {key}"}
    client = httpx.Client(base_url=args.url, headers=headers, timeout=600)

    train = person_rows(args.rows, seed=7)
    validation = person_rows(8, seed=99)
    dataset = client.post("/files", files={"file": ("people.jsonl", jsonl(train))}).json()
    held_out = client.post("/files", files={"file": ("people-held.jsonl", jsonl(validation))})
    created = client.post(
        "/jobs",
        json={
            "dataset_url": dataset["id"],
            "validation_url": held_out.json()["id"],
            "suffix": "people",
            "hyperparameters": HYPERPARAMETERS,
        },
    )
    created.raise_for_status()
    job_id = created.json()["id"]
    print(f"POST /jobs -> {job_id}")

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(base_url=args.url, viewport={"width": 1280, "height": 900})
        page.goto("/ui")
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator(f"tr[data-job-id='{job_id}']")).to_be_visible()

        wait_for_step(client, job_id, 0.4)
        expect(page.locator(f"tr[data-job-id='{job_id}'] .badge")).to_have_text("running")
        shoot(page, args.out, "dashboard-jobs")
        page.goto(f"/ui/jobs/{job_id}")
        expect(page.locator("#plan dl")).to_be_visible(timeout=120_000)
        expect(page.locator("#loss-chart circle.eval-point").first).to_be_visible()
        shoot(page, args.out, "dashboard-job")

        status = page.locator("#job-status .badge")
        expect(status).to_have_text("succeeded", timeout=3_600_000)
        evaluation = page.locator("#evaluation table.samples")
        if client.get(f"/jobs/{job_id}").json().get("evaluation"):
            expect(evaluation).to_be_visible()
            shoot(page.locator("#evaluation"), args.out, "dashboard-evaluation")
        page.get_by_role("link", name="Try the adapter in the playground").click()
        page.get_by_label("Prompt").fill(person_rows(30, seed=1234)[-1]["messages"][0]["content"])
        page.get_by_role("button", name="Generate").click()
        for panel in ("#base-answer", "#adapter-answer"):
            expect(page.locator(panel)).to_have_attribute("data-state", "done", timeout=300_000)
        shoot(page, args.out, "dashboard-playground")
        browser.close()


if __name__ == "__main__":
    main()
