"""The fine-tuning flow as a client generated from OpenAI's OpenAPI document reads it.

Against a running tuneserve (`tuneserve up`), over plain HTTP: upload a file, create a job, poll
it to the end, list jobs, events and checkpoints, list and retrieve models, chat with the result
(plain and streamed), cancel a second job, and read an error. Every answer is checked against
the document's schema for its operation (tests/openai_schema.py: a `null` where the document does
not allow one fails, as in a typed decoder). With --generated-client, each answer is also parsed
by the models of a Python client generated from the same document by openapi-python-client:

    openapi-python-client generate --path tests/data/openai_openapi.json --meta none \\
        --output-path /tmp/openai_client
    python scripts/openai_schema_trial.py --generated-client /tmp/openai_client

docs/openai.md shows a run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.openai_schema import problems, response_ref  # noqa: E402

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": json.dumps({"sum": a + b})},
        ]
    }
    for a in range(1, 6)
    for b in range(1, 5)
]
# Operation -> the generated client's model for its answer (module, class).
GENERATED = {
    "createFile": ("open_ai_file", "OpenAIFile"),
    "listFiles": ("list_files_response", "ListFilesResponse"),
    "createFineTuningJob": ("fine_tuning_job", "FineTuningJob"),
    "retrieveFineTuningJob": ("fine_tuning_job", "FineTuningJob"),
    "cancelFineTuningJob": ("fine_tuning_job", "FineTuningJob"),
    "listPaginatedFineTuningJobs": (
        "list_paginated_fine_tuning_jobs_response",
        "ListPaginatedFineTuningJobsResponse",
    ),
    "listFineTuningEvents": (
        "list_fine_tuning_job_events_response",
        "ListFineTuningJobEventsResponse",
    ),
    "listFineTuningJobCheckpoints": (
        "list_fine_tuning_job_checkpoints_response",
        "ListFineTuningJobCheckpointsResponse",
    ),
    "listModels": ("list_models_response", "ListModelsResponse"),
    "retrieveModel": ("model", "Model"),
    "createCompletion": ("create_completion_response", "CreateCompletionResponse"),
}


class Reader:
    def __init__(self, generated: Path | None) -> None:
        self.read = 0
        self.models = None
        if generated is not None:
            sys.path.insert(0, str(generated.parent))
            self.models = f"{generated.name}.models"

    def check(self, operation: str, response: httpx.Response, ref: str | None = None) -> Any:
        if response.status_code >= 400:
            body = response.json()
            found = problems("#/components/schemas/ErrorResponse", body)
        else:
            body = response.json()
            found = problems(ref or response_ref(operation), body)
        if found:
            raise SystemExit(
                f"{operation}: the answer breaks the document:\n  " + "\n  ".join(found)
            )
        parsed = ""
        if self.models and operation in GENERATED and response.status_code < 400:
            module, name = GENERATED[operation]
            model = getattr(importlib.import_module(f"{self.models}.{module}"), name)
            parsed = f", parsed as {type(model.from_dict(body)).__name__}"
        self.read += 1
        print(f"  {operation:<30} {response.status_code} conforms{parsed}")
        return body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--generated-client", type=Path, help="openapi-python-client's output")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("TUNESERVE_DATA_DIR", Path.home() / ".tuneserve"))
    key = os.environ.get("TUNESERVE_API_KEY") or (data_dir / "api_key").read_text()
    reader = Reader(args.generated_client)
    with httpx.Client(
        base_url=args.url, headers={"Authorization": f"Bearer {key.strip()}"}, timeout=300
    ) as v1:
        dataset = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
        file = reader.check(
            "createFile",
            v1.post(
                "/files", files={"file": ("sums.jsonl", dataset)}, data={"purpose": "fine-tune"}
            ),
        )
        reader.check("listFiles", v1.get("/files"))
        body = {"model": args.model, "training_file": file["id"], "suffix": "sums"}
        job = reader.check("createFineTuningJob", v1.post("/fine_tuning/jobs", json=body))
        seen = set()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = v1.get(f"/fine_tuning/jobs/{job['id']}").json()
            if job["status"] not in seen:
                seen.add(job["status"])
                job = reader.check(
                    "retrieveFineTuningJob", v1.get(f"/fine_tuning/jobs/{job['id']}")
                )
        job = reader.check("retrieveFineTuningJob", v1.get(f"/fine_tuning/jobs/{job['id']}"))
        print(f"  job {job['id']} {job['status']}: {job['fine_tuned_model']}")
        reader.check(
            "listPaginatedFineTuningJobs", v1.get("/fine_tuning/jobs", params={"limit": 5})
        )
        reader.check("listFineTuningEvents", v1.get(f"/fine_tuning/jobs/{job['id']}/events"))
        reader.check(
            "listFineTuningJobCheckpoints", v1.get(f"/fine_tuning/jobs/{job['id']}/checkpoints")
        )
        reader.check("listModels", v1.get("/models"))
        reader.check("retrieveModel", v1.get(f"/models/{job['fine_tuned_model']}"))
        chat = {
            "model": job["fine_tuned_model"],
            "messages": [{"role": "user", "content": "What is 7 + 8?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
        answer = reader.check("createChatCompletion", v1.post("/chat/completions", json=chat))
        print(f"  chat: {answer['choices'][0]['message']['content']!r}")
        streamed = v1.post("/chat/completions", json={**chat, "stream": True})
        chunk_ref = response_ref("createChatCompletion", "text/event-stream")
        for line in streamed.text.splitlines():
            if line.startswith("data: {"):
                found = problems(chunk_ref, json.loads(line.removeprefix("data: ")))
                if found:
                    raise SystemExit(
                        "a streamed chunk breaks the document:\n  " + "\n  ".join(found)
                    )
                reader.read += 1
        print("  createChatCompletion (stream)  200 every chunk conforms")
        second = reader.check("createFineTuningJob", v1.post("/fine_tuning/jobs", json=body))
        reader.check("cancelFineTuningJob", v1.post(f"/fine_tuning/jobs/{second['id']}/cancel"))
        reader.check("retrieveFineTuningJob", v1.get("/fine_tuning/jobs/ftjob-0"))
    print(f"{reader.read} answers read, each as the document describes it")


if __name__ == "__main__":
    main()
