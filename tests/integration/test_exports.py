"""Adapter exports on the live service: merged and GGUF files made by the worker, downloaded with
resume, and loaded back by readers that are not ours (transformers, and its GGUF reader) to give
the served adapter's greedy text."""

from __future__ import annotations

import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.service import Service

PROMPTS = ["What is 3 + 4?", "What is 12 + 9?"]
TOKENS = 8


def _export(service: Service, adapter_id: str, **body: Any) -> dict[str, Any]:
    created = service.client.post(f"/adapters/{adapter_id}/exports", json=body)
    assert created.status_code == 202, created.text
    export = created.json()
    deadline = time.monotonic() + 300
    while export["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, export
        time.sleep(0.3)
        export = service.client.get(f"/adapters/{adapter_id}/exports/{export['id']}").json()
    assert export["status"] == "succeeded", export["error"]
    return dict(export)


def _download(service: Service, file: dict[str, Any], target: Path) -> Path:
    """In two parts, as a client resuming a broken download does."""
    half = file["bytes"] // 2
    first = service.client.get(file["url"], headers={"Range": f"bytes=0-{half - 1}"})
    assert first.status_code == 206 and len(first.content) == half
    rest = service.client.get(file["url"], headers={"Range": f"bytes={half}-"})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes {half}-{file['bytes'] - 1}/{file['bytes']}"
    target.write_bytes(first.content + rest.content)
    assert target.stat().st_size == file["bytes"]
    return target


def _served(service: Service, adapter_id: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        answer = service.client.post(
            "/generate",
            json={
                "adapter": adapter_id,
                "messages": [{"role": "user", "content": prompt}],
                "max_new_tokens": TOKENS,
                "temperature": 0,
            },
        )
        assert answer.status_code == 200, answer.text
        texts.append(answer.json()["text"])
    return texts


def _greedy(model: Any, tokenizer: Any) -> list[str]:
    import torch

    texts = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
        texts.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return texts


@pytest.fixture(scope="module")
def trained(service: Service, tiny_model: str) -> dict[str, Any]:
    return service.trained_job(tiny_model)


def test_a_merged_export_loads_with_transformers_and_answers_as_served(
    service: Service, trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_id = trained["adapter"]["id"]
    export = _export(service, adapter_id, format="merged", precision="float32")
    assert export["precision"] == "float32" and len(export["files"]) == 1
    archive = _download(service, export["files"][0], tmp_path / export["files"][0]["name"])
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / archive.name.removesuffix(".tar")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert _greedy(model, tokenizer) == _served(service, adapter_id)

    again = service.client.post(
        f"/adapters/{adapter_id}/exports", json={"format": "merged", "precision": "float32"}
    )
    assert again.status_code == 200 and again.json()["id"] == export["id"]  # made once
    listed = service.client.get(f"/adapters/{adapter_id}/exports").json()["data"]
    assert export["id"] in [e["id"] for e in listed]


def test_a_gguf_export_loads_with_the_transformers_gguf_reader_and_answers_as_served(
    service: Service, trained: dict[str, Any], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_id = trained["adapter"]["id"]
    export = _export(service, adapter_id, format="gguf")
    assert export["precision"] == "f16"
    names = {file["name"]: file for file in export["files"]}
    gguf_name = f"{adapter_id}-f16.gguf"
    assert set(names) == {gguf_name, "Modelfile"}
    _download(service, names[gguf_name], tmp_path / gguf_name)
    modelfile = service.client.get(names["Modelfile"]["url"]).text
    assert f"FROM ./{gguf_name}" in modelfile and "<|im_start|>" in modelfile

    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_name)
    assert _greedy(model, tokenizer) == _served(service, adapter_id)


def test_bad_exports_are_refused_by_name(service: Service, trained: dict[str, Any]) -> None:
    adapter_id = trained["adapter"]["id"]
    wrong = service.client.post(
        f"/adapters/{adapter_id}/exports", json={"format": "gguf", "precision": "q4_k"}
    )
    assert wrong.status_code == 422 and "q4_k" in wrong.text and "f16, q8_0, f32" in wrong.text
    unknown = service.client.post(f"/adapters/{adapter_id}/exports", json={"format": "onnx"})
    assert unknown.status_code == 422
    missing = service.client.post("/adapters/adapter-nothere/exports", json={"format": "gguf"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "adapter_not_found"
    export = _export(service, adapter_id, format="gguf", precision="q8_0")
    not_a_file = service.client.get(
        f"/adapters/{adapter_id}/exports/{export['id']}/files/secrets.txt"
    )
    assert not_a_file.status_code == 404
    assert not_a_file.json()["error"]["code"] == "export_file_not_found"


def test_the_cli_exports_resumes_a_broken_download_and_deleting_the_adapter_removes_exports(
    service: Service, tiny_model: str, tmp_path: Path
) -> None:
    from tests.integration.test_cli import tuneserve

    adapter_id = service.trained_job(tiny_model)["adapter"]["id"]
    export = _export(service, adapter_id, format="gguf", precision="q8_0")
    gguf = next(f for f in export["files"] if f["name"].endswith(".gguf"))
    whole = service.client.get(gguf["url"]).content
    # An earlier run stopped a third of the way through this file.
    (tmp_path / f".{gguf['name']}.part").write_bytes(whole[: len(whole) // 3])
    done = tuneserve(
        "adapters", "export", adapter_id, "--format", "gguf", "--precision", "q8_0",
        "-o", str(tmp_path), "--url", service.url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / gguf["name"]).read_bytes() == whole
    assert (tmp_path / "Modelfile").is_file()
    assert not list(tmp_path.glob(".*.part"))

    from app.settings import get_settings
    from app.storage import artifact_store

    stored = f"exports/{export['id']}/{gguf['name']}"
    assert artifact_store(get_settings()).exists(stored)
    assert service.client.delete(f"/adapters/{adapter_id}").status_code == 200
    assert not artifact_store(get_settings()).exists(stored)
    gone = service.client.get(f"/adapters/{adapter_id}/exports/{export['id']}")
    assert gone.status_code == 404
