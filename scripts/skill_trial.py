"""Acceptance trial, as a new user would run it against a running tuneserve:

upload a chat JSONL of a few hundred rows teaching a narrow skill the base model lacks (answer a
sentence about a person with exactly one JSON object {"name", "age", "city"}), train it on the
default base model with n_epochs=2 and learning_rate=1e-3, then ask the base model and the
adapter the same held-out prompts and count the answers in the trained format.

    python scripts/skill_trial.py --url http://127.0.0.1:8000 --rows 300 --held-out 25
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.corpus import jsonl, person_rows  # noqa: E402


def exact_format(text: str, expected: dict[str, object]) -> tuple[bool, bool]:
    """(in the trained format, with the right values)."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False, False
    shaped = isinstance(value, dict) and list(value) == ["name", "age", "city"]
    return shaped, shaped and value == expected


def api_key() -> str:
    """TUNESERVE_API_KEY, or the local key `tuneserve up` saved in the data dir."""
    from app.keys.service import read_key_file
    from app.settings import get_settings

    settings = get_settings()
    key = settings.api_key.get_secret_value() if settings.api_key else None
    key = key or read_key_file(settings.api_key_file)
    if not key:
        sys.exit("No API key: set TUNESERVE_API_KEY or run where `tuneserve up` saved one.")
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=25)
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {api_key()}"}
    client = httpx.Client(base_url=args.url, headers=headers, timeout=600)

    train = person_rows(args.rows, seed=7)
    seen = {row["messages"][0]["content"] for row in train}
    held_out = [
        row
        for row in person_rows(args.held_out * 4, seed=99)
        if row["messages"][0]["content"] not in seen
    ]
    held_out = held_out[: args.held_out]

    uploaded = client.post("/files", files={"file": ("people.jsonl", jsonl(train))}).json()
    print(f"POST /files -> {uploaded['id']} ({uploaded['bytes']} bytes, {args.rows} rows)")
    job = client.post(
        "/jobs",
        json={
            "dataset_url": uploaded["id"],
            "hyperparameters": {"n_epochs": 2, "learning_rate": 1e-3},
        },
    ).json()
    print(f"POST /jobs -> {job['id']} {job['status']}")
    started = time.monotonic()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(10)
        job = client.get(f"/jobs/{job['id']}").json()
        progress = job.get("progress") or {}
        print(
            f"  {time.monotonic() - started:6.0f}s {job['status']:<10} "
            f"step {progress.get('step')}/{progress.get('total_steps')} "
            f"loss {progress.get('train_loss')} eta {progress.get('eta_seconds')}"
        )
    elapsed = time.monotonic() - started
    print(f"job {job['id']}: {job['status']} in {elapsed:.0f} s; dataset {job['dataset']}")
    if job["status"] != "succeeded":
        print(job["error"])
        sys.exit(1)

    for label, adapter in (("base model", None), ("adapter", job["id"])):
        shaped = correct = 0
        for row in held_out:
            prompt = row["messages"][0]["content"]
            expected = json.loads(row["messages"][1]["content"])
            answer = client.post(
                "/generate",
                json={
                    "adapter": adapter,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_new_tokens": 48,
                },
            ).json()["text"]
            in_format, right = exact_format(answer, expected)
            shaped += in_format
            correct += right
        print(
            f"{label}: {shaped}/{len(held_out)} answers in the trained format, "
            f"{correct}/{len(held_out)} also with the right values; last: {answer!r}"
        )


if __name__ == "__main__":
    main()
