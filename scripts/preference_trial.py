"""SFT a skill, then DPO the same adapter toward a preferred answer format, as a new user would.

Against a running tuneserve (`tuneserve up`, default model): a supervised job teaches the model
to answer sums in a sentence ("The sum of 3 and 4 is 7."); a dpo job that starts from that adapter
then learns to prefer JSON ({"sum": 7}) over the sentence. Prints both jobs' evaluations and the
answers of the base model, the SFT adapter and the DPO adapter to held-out questions. The README
shows a run.

    python scripts/preference_trial.py [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

SYSTEM = "You are a calculator. Answer with the sum."


def question(a: int, b: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What is {a} + {b}?"},
    ]


def sentence(a: int, b: int) -> str:
    return f"The sum of {a} and {b} is {a + b}."


def as_json(a: int, b: int) -> str:
    return json.dumps({"sum": a + b})


def sft_rows(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    return [
        {"messages": [*question(a, b), {"role": "assistant", "content": sentence(a, b)}]}
        for a, b in pairs
    ]


def preference_rows(pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """OpenAI's DPO format: the JSON answer preferred over the sentence."""
    return [
        {
            "input": {"messages": question(a, b)},
            "preferred_output": [{"role": "assistant", "content": as_json(a, b)}],
            "non_preferred_output": [{"role": "assistant", "content": sentence(a, b)}],
        }
        for a, b in pairs
    ]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def upload(client: httpx.Client, name: str, rows: list[dict[str, Any]]) -> str:
    answer = client.post("/files", files={"file": (name, jsonl(rows))})
    answer.raise_for_status()
    return str(answer.json()["id"])


def run(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    created = client.post("/jobs", json=body)
    created.raise_for_status()
    job: dict[str, Any] = created.json()
    started = time.monotonic()
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(3)
        job = client.get(f"/jobs/{job['id']}").json()
    took = time.monotonic() - started
    print(f"{job['id']} ({job['method']['type']}): {job['status']} in {took:.0f} s")
    if job["status"] != "succeeded":
        raise SystemExit(f"job {job['id']} {job['status']}: {job['error']}")
    return job


def answer(client: httpx.Client, adapter: str | None, a: int, b: int) -> str:
    body = {"messages": question(a, b), "max_new_tokens": 24, "temperature": 0}
    if adapter:
        body["adapter"] = adapter
    reply = client.post("/generate", json=body)
    reply.raise_for_status()
    return str(reply.json()["text"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("TUNESERVE_DATA_DIR", Path.home() / ".tuneserve"))
    key = os.environ.get("TUNESERVE_API_KEY") or (data_dir / "api_key").read_text().strip()
    train = [(a, b) for a in range(1, 11) for b in range(1, 7)]  # 60 questions
    held_out = [(a, b) for a in range(12, 16) for b in range(2, 5)]  # 12 others
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=300) as client:
        sft = run(
            client,
            {
                "dataset_url": upload(client, "sums-sentences.jsonl", sft_rows(train)),
                "suffix": "sums",
                "hyperparameters": {"n_epochs": 2, "learning_rate": 1e-3},
            },
        )
        print("  evaluation:", {k: v for k, v in sft["evaluation"].items() if k != "samples"})
        dpo = run(
            client,
            {
                "dataset_url": upload(client, "sums-prefer-json.jsonl", preference_rows(train)),
                "validation_url": upload(
                    client, "sums-prefer-val.jsonl", preference_rows(held_out)
                ),
                "adapter": sft["id"],
                # DPO with the chosen answers' SFT loss (RPO): it moves the answers toward JSON
                # and keeps them fluent (plain DPO at this learning rate ran to '{"sum":{"sum":').
                "method": {"type": "dpo", "dpo": {"beta": 0.1, "rpo_alpha": 1.0}},
                "suffix": "sums-json",
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-4},
            },
        )
        print("  parent:", dpo["parent"])
        print("  evaluation:", {k: v for k, v in dpo["evaluation"].items() if k != "samples"})
        print("held-out questions: base | SFT adapter | SFT then DPO adapter")
        for a, b in held_out[::3]:
            print(f"  {a} + {b}:")
            for name, adapter in (("base", None), ("sft", sft["id"]), ("dpo", dpo["id"])):
                print(f"    {name:>4}: {answer(client, adapter, a, b)!r}")


if __name__ == "__main__":
    main()
