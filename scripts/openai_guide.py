"""OpenAI's fine-tuning guide, run against tuneserve: only base_url and api_key differ.

Writes a small chat dataset, uploads it, fine-tunes the default base model, waits, prints the
job's events, and chats with the fine-tuned model, plain and streamed. docs/openai.md shows a run.

    python scripts/openai_guide.py [--url http://127.0.0.1:8000/v1] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from openai import OpenAI

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("India", "New Delhi"),
    ("Chile", "Santiago"),
    ("Poland", "Warsaw"),
]
SYSTEM = "Marv is a factual chatbot that is also sarcastic."


def write_dataset(path: Path) -> None:
    rows = []
    for country, capital in CAPITALS:
        for question in (f"What's the capital of {country}?", f"Capital of {country}?"):
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question},
                        {
                            "role": "assistant",
                            "content": f"{capital}, as if everyone didn't know that already.",
                        },
                    ]
                }
            )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def local_key() -> str:
    data_dir = Path(os.environ.get("TUNESERVE_DATA_DIR", "~/.tuneserve")).expanduser()
    return os.environ.get("TUNESERVE_API_KEY") or (data_dir / "api_key").read_text().strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()

    client = OpenAI(base_url=args.url, api_key=local_key())

    write_dataset(Path("marv.jsonl"))
    training_file = client.files.create(file=open("marv.jsonl", "rb"), purpose="fine-tune")
    print("file:", training_file.id, training_file.bytes, "bytes")

    job = client.fine_tuning.jobs.create(
        training_file=training_file.id,
        model=args.model,
        suffix="marv",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 5}},
        },
    )
    print("job:", job.id, job.status)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
        print("  ", job.status, "trained tokens:", job.trained_tokens)
    print("fine-tuned model:", job.fine_tuned_model, "error:", job.error)

    for event in reversed(client.fine_tuning.jobs.list_events(job.id, limit=10).data):
        print("event:", event.level, event.message)
    for checkpoint in client.fine_tuning.jobs.checkpoints.list(job.id).data:
        print("checkpoint:", checkpoint.fine_tuned_model_checkpoint, checkpoint.metrics)

    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What's the capital of Italy?"},
    ]
    completion = client.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, max_tokens=32, temperature=0
    )
    print("chat:", completion.choices[0].message.content)
    print("usage:", completion.usage)

    print("streamed: ", end="")
    stream = client.chat.completions.create(
        model=job.fine_tuned_model, messages=messages, max_tokens=32, temperature=0, stream=True
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
