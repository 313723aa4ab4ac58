"""The `tuneserve` command line against the live service, and `tuneserve up` as a whole."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import Service, free_port, wait_until_healthy


def tuneserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def on_api(
    service: Service, *commands: list[str], check: bool = True
) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands against the service, side by side: each is a fresh Python process
    with most of a second of start-up, and this module must stay quick. With `check`, each
    must succeed."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda args: tuneserve(*args, "--url", service.url), commands))
    for result in results if check else ():
        assert result.returncode == 0, (result.args, result.stderr, result.stdout)
    return results


@pytest.fixture(scope="module")
def followed(
    service: Service, tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """One job created and followed to success through the CLI (the module's only training),
    and the job as the api then shows it. Tests below read it and use its adapter."""
    dataset = tmp_path_factory.mktemp("cli") / "sums.jsonl"
    dataset.write_bytes(jsonl(arithmetic_rows(8)))
    options = (
        "--epochs 1 --batch-size 4 --learning-rate auto --max-seq-length 64 --lora-r 8 "
        "--lora-alpha 16 --seed 7 --metadata team=ml --metadata note=a=b --suffix cli"
    ).split()
    created = tuneserve(
        "jobs", "create", "--dataset", str(dataset), "--base-model", tiny_model, *options,
        "--follow", "--url", service.url,
    )  # fmt: skip
    submitted = re.search(r"job (ftjob-\S+) submitted", created.stderr)
    assert submitted, created.stderr + created.stdout
    return created, service.client.get(f"/jobs/{submitted[1]}").json()


def test_jobs_create_follows_the_job_to_its_adapter(
    followed: tuple[subprocess.CompletedProcess[str], dict[str, Any]], tiny_model: str
) -> None:
    created, job = followed
    assert created.returncode == 0, created.stderr + created.stdout
    assert "uploaded" in created.stderr and "submitted" in created.stderr
    assert "succeeded: adapter adapter-" in created.stdout
    assert f"ft:{tiny_model}:local:cli:" in created.stdout
    assert job["status"] == "succeeded" and job["suffix"] == "cli"
    assert job["metadata"] == {"team": "ml", "note": "a=b"}
    assert job["lora"]["r"] == 8 and job["lora"]["alpha"] == 16
    hyperparameters = job["hyperparameters"]
    assert hyperparameters["seed"] == 7 and hyperparameters["n_epochs"] == 1
    assert job["auto_hyperparameters"] == ["learning_rate"]
    assert isinstance(hyperparameters["learning_rate"], float)


def test_jobs_read_commands_print_the_api_json_or_a_summary(
    service: Service, followed: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    job_id = followed[1]["id"]
    listed, shown, summary, first, second, metrics, table = on_api(
        service,
        ["jobs", "list", "--json"],
        ["jobs", "get", job_id, "--json"],
        ["jobs", "get", job_id],
        ["jobs", "events", job_id, "--limit", "2", "--json"],
        ["jobs", "events", job_id, "--after", "2", "--limit", "1"],
        ["jobs", "metrics", job_id, "--json"],
        ["jobs", "metrics", job_id],
    )
    assert json.loads(listed.stdout)["data"][0]["id"] == job_id
    assert json.loads(shown.stdout) == service.client.get(f"/jobs/{job_id}").json()
    for fact in ("succeeded", "step 2/2", "train loss", followed[1]["adapter"]["id"], "8 rows"):
        assert fact in summary.stdout, summary.stdout

    page = json.loads(first.stdout)
    assert [event["seq"] for event in page["data"]] == [1, 2] and page["has_more"]
    third = service.events(job_id)[2]
    assert second.stdout.split()[2:4] == [third["type"], third["message"].split()[0]]
    assert "more: --after 3" in second.stderr

    points = json.loads(metrics.stdout)["data"]
    assert [point["step"] for point in points] == [1, 2]
    assert "train loss" in table.stdout and "tokens/s" in table.stdout
    assert f"{points[-1]['train_loss']:.4f}" in table.stdout


def test_generate_streams_the_same_text_as_a_whole_answer(
    service: Service, followed: tuple[subprocess.CompletedProcess[str], dict[str, Any]]
) -> None:
    job = followed[1]
    ask = ["generate", "The sea is", "--raw", "--adapter", job["id"], "--max-new-tokens", "12"]
    whole, streamed, as_json, events = on_api(
        service, ask, [*ask, "--stream"], [*ask, "--json"], [*ask, "--stream", "--json"]
    )
    assert streamed.stdout == whole.stdout and len(whole.stdout.strip()) > 0

    answer = json.loads(as_json.stdout)
    assert answer["adapter"] == job["adapter"]["id"]
    assert answer["usage"]["completion_tokens"] == 12
    assert whole.stdout == answer["text"] + "\n"
    *chunks, final = [json.loads(line) for line in events.stdout.splitlines()]
    assert "".join(chunk["text"] for chunk in chunks) == answer["text"]
    assert final == answer


def test_adapters_download_upload_list_get_delete(
    service: Service,
    followed: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
    tiny_model: str,
    tmp_path: Path,
) -> None:
    trained = followed[1]["adapter"]["id"]
    (saved,) = on_api(service, ["adapters", "download", trained, "-o", f"{tmp_path}/"])
    archive = tmp_path / f"{trained}.tar.gz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / trained
    assert (folder / "adapter_model.safetensors").is_file()

    upload = ["adapters", "upload", "--base-model", tiny_model]
    from_archive, from_folder = on_api(
        service, [*upload, str(archive), "--name", "back", "--json"], [*upload, str(folder)]
    )
    imported = json.loads(from_archive.stdout)
    assert ":back:" in imported["name"]
    assert "packed" in from_folder.stderr
    folder_id = from_folder.stdout.split()[0]

    original = service.client.get(f"/adapters/{trained}").json()
    shown, summary, listed, table = on_api(
        service,
        ["adapters", "get", imported["id"], "--json"],
        ["adapters", "get", folder_id],
        ["adapters", "list", "--json"],
        ["adapters", "list"],
    )
    assert json.loads(shown.stdout)["sha256"] == original["sha256"]  # the same weights again
    assert original["sha256"] in summary.stdout and "imported" in summary.stdout
    assert {imported["id"], folder_id, trained} <= {
        a["id"] for a in json.loads(listed.stdout)["data"]
    }
    assert imported["id"] in table.stdout and folder_id in table.stdout

    deleted, deleted_too = on_api(
        service,
        ["adapters", "delete", imported["id"], "--json"],
        ["adapters", "delete", folder_id],
    )
    assert json.loads(deleted.stdout) == {
        "id": imported["id"],
        "object": "adapter",
        "deleted": True,
    }
    assert deleted_too.stdout.strip() == f"deleted {folder_id}"
    gone = tuneserve("adapters", "get", folder_id, "--url", service.url)
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr.startswith(f"error: No adapter '{folder_id}'")
    assert "[adapter_not_found, HTTP 404]" in gone.stderr
    assert service.client.get(f"/adapters/{trained}").status_code == 200


def test_files_upload_list_get_content_delete(service: Service, tmp_path: Path) -> None:
    dataset = tmp_path / "rows.jsonl"
    dataset.write_bytes(jsonl(arithmetic_rows(4)))
    (uploaded,) = on_api(service, ["files", "upload", str(dataset), "--json"])
    file = json.loads(uploaded.stdout)
    assert file["filename"] == "rows.jsonl" and file["bytes"] == dataset.stat().st_size

    listed, shown, content, saved = on_api(
        service,
        ["files", "list", "--json"],
        ["files", "get", file["id"], "--json"],
        ["files", "content", file["id"]],
        ["files", "content", file["id"], "-o", f"{tmp_path}/out/"],
    )
    assert json.loads(listed.stdout)["data"][0] == file
    assert json.loads(shown.stdout) == file
    assert content.stdout == dataset.read_text()
    assert (tmp_path / "out" / "rows.jsonl").read_bytes() == dataset.read_bytes()

    (deleted,) = on_api(service, ["files", "delete", file["id"]])
    assert deleted.stdout.strip() == f"deleted {file['id']}"
    gone = tuneserve("files", "content", file["id"], "--url", service.url)
    assert gone.returncode == 1 and gone.stdout == ""
    assert "[file_not_found, HTTP 404]" in gone.stderr


def test_jobs_plan_shows_steps_time_memory_and_problems(
    service: Service, tiny_model: str, tmp_path: Path
) -> None:
    dataset = tmp_path / "plan.jsonl"
    dataset.write_bytes(jsonl(arithmetic_rows(8)))
    file_id = service.upload("plan.jsonl", dataset.read_bytes())
    ask = ["jobs", "plan", "--base-model", tiny_model, "--batch-size", "2"]
    planned, too_short, from_disk = on_api(
        service,
        [*ask, "--dataset", file_id, "--epochs", "auto", "--json"],
        [*ask, "--dataset", file_id, "--epochs", "1", "--max-seq-length", "16"],
        [*ask, "--dataset", str(dataset)],
    )
    plan = json.loads(planned.stdout)
    assert plan["object"] == "job.plan" and plan["dataset"]["rows"] == 8
    assert plan["hyperparameters"]["batch_size"] == 2 and "n_epochs" in plan["auto_hyperparameters"]
    assert plan["steps"] == plan["hyperparameters"]["n_epochs"] * 4 and plan["problems"] == []

    lines = {line.split("  ")[0]: line for line in too_short.stdout.splitlines()}
    assert lines["steps"].split() == ["steps", "4"]
    assert "fits" in lines["memory"] and "time" in lines
    assert lines["problem"].split()[1] == "rows_too_long:"
    assert "uploaded" in from_disk.stderr and "steps" in from_disk.stdout


def test_errors_are_one_line_on_stderr_and_exit_1(service: Service, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    missing, *no_such, not_adapter, bad_epochs = on_api(
        service,
        ["jobs", "get", "ftjob-nothere", "--json"],
        ["files", "upload", str(tmp_path / "nothere.jsonl")],
        ["adapters", "upload", str(tmp_path / "nothere"), "--base-model", "tiny-llama"],
        ["jobs", "create", "--dataset", str(tmp_path / "nothere.jsonl")],
        ["adapters", "upload", str(tmp_path / "folder"), "--base-model", "tiny-llama"],
        ["jobs", "create", "--dataset", "file-x", "--epochs", "many"],
        check=False,
    )
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.splitlines() == [
        "error: No job 'ftjob-nothere'. GET /jobs lists your jobs. [job_not_found, HTTP 404]"
    ]
    for result in no_such:
        assert result.returncode == 1, result
        assert result.stderr.startswith("error: no such") and "Traceback" not in result.stderr
    assert not_adapter.returncode == 1 and "no adapter_config.json" in not_adapter.stderr
    assert bad_epochs.returncode == 2  # a usage error, before anything is sent
    assert "'many' is not a whole number or auto" in bad_epochs.stderr


def test_models_and_keys_list_json(service: Service, tiny_model: str) -> None:
    models, table = on_api(service, ["models", "--json"], ["models"])
    assert tiny_model in {model["id"] for model in json.loads(models.stdout)["data"]}
    assert tiny_model in table.stdout
    keys = tuneserve("keys", "list", "--json")  # on the database, not the api
    assert keys.returncode == 0, keys.stderr
    assert json.loads(keys.stdout)["object"] == "list"


def test_failed_job_exits_non_zero_with_the_reason(
    service: Service, tiny_model: str, tmp_path: Path
) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = tuneserve(
        "jobs",
        "create",
        "--dataset",
        str(dataset),
        "--base-model",
        tiny_model,
        "--follow",
        "--url",
        service.url,
    )
    assert result.returncode == 1
    assert "failed (dataset_invalid)" in result.stdout
    assert "line 1" in result.stdout


def test_cli_explains_an_unreachable_api() -> None:
    result = tuneserve("jobs", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "Cannot reach the tuneserve api" in result.stderr
    assert "tuneserve up" in result.stderr


def _children(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.add(int(status.parent.name))
    return found


def start_up(data_dir: Path, port: int) -> subprocess.Popen[str]:
    """`tuneserve up` on its embedded defaults in data_dir."""
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(data_dir)}
    env.pop("TUNESERVE_DATABASE_URL", None)
    env.pop("TUNESERVE_BROKER_URL", None)
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli.main", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_children(pid: int, count: int, gone: int | None = None) -> set[int]:
    """The children of `pid` once there are `count` of them (none of them `gone`), within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = _children(pid)
        if len(children) == count and gone not in children:
            break
        time.sleep(0.5)
    return children


def test_up_runs_everything_restarts_a_killed_worker_and_stops_cleanly(tmp_path: Path) -> None:
    # One `up` for the whole life cycle: each start of the stack costs the module seconds.
    port = free_port()
    up = start_up(tmp_path / "data", port)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, up)
        assert (tmp_path / "data" / "tuneserve.sqlite").is_file()  # migrated on start
        key_file = tmp_path / "data" / "api_key"
        assert key_file.stat().st_mode & 0o777 == 0o600  # the local key, for the owner only
        assert httpx.get(f"{url}/jobs").status_code == 401
        headers = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        assert httpx.get(f"{url}/jobs", headers=headers).json()["data"] == []
        children = _wait_for_children(up.pid, 3)
        assert len(children) == 3  # api, worker, scheduler

        workers = [
            pid for pid in children if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        children = _wait_for_children(up.pid, 3, gone=workers[0])
        assert len(children) == 3 and workers[0] not in children
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "tuneserve is up" in output
    assert "Created the local API key" in output
    assert output.count(key_file.read_text().strip()) == 1  # printed once, on first start
    assert "worker exited with code -9; starting it again" in output
    assert all(not Path(f"/proc/{pid}").exists() for pid in children), output
