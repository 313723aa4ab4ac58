"""The `tuneserve` command line against the live service, and `tuneserve up` as a whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

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


def test_jobs_create_follow_then_generate(
    service: Service, tiny_model: str, tmp_path: Path
) -> None:
    dataset = tmp_path / "sums.jsonl"
    dataset.write_bytes(jsonl(arithmetic_rows(8)))
    created = tuneserve(
        "jobs",
        "create",
        "--dataset",
        str(dataset),
        "--base-model",
        tiny_model,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--suffix",
        "cli",
        "--follow",
        "--url",
        service.url,
    )
    assert created.returncode == 0, created.stderr + created.stdout
    assert "uploaded" in created.stderr and "submitted" in created.stderr
    assert "succeeded: adapter adapter-" in created.stdout
    assert f"ft:{tiny_model}:local:cli:" in created.stdout

    listed = tuneserve("jobs", "list", "--json", "--url", service.url)
    assert listed.returncode == 0, listed.stderr
    newest = json.loads(listed.stdout)["data"][0]
    assert newest["status"] == "succeeded" and newest["suffix"] == "cli"

    events = tuneserve("jobs", "events", newest["id"], "--url", service.url)
    assert "job.succeeded" in events.stdout

    answer = tuneserve(
        "generate",
        "--adapter",
        newest["id"],
        "--max-new-tokens",
        "5",
        "--json",
        "What is 2 plus 2?",
        "--url",
        service.url,
    )
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert body["adapter"] == newest["adapter"]["id"]
    assert body["usage"]["completion_tokens"] <= 5


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


def test_up_runs_everything_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
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
        deadline = time.monotonic() + 30
        while len(children := _children(up.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(children) == 3  # api, worker, scheduler
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "tuneserve is up" in output
    assert "Created the local API key" in output
    assert output.count(key_file.read_text().strip()) == 1  # printed once, on first start
    assert all(not Path(f"/proc/{pid}").exists() for pid in children), output


def test_up_starts_a_killed_worker_again(tmp_path: Path) -> None:
    port = free_port()
    up = start_up(tmp_path / "data", port)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", up)
        deadline = time.monotonic() + 30
        while len(children := _children(up.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        workers = [
            pid for pid in children if b"celery" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _children(up.pid)
            if len(now) == 3 and workers[0] not in now:
                break
            time.sleep(0.5)
        assert len(now) == 3 and workers[0] not in now
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        up.send_signal(signal.SIGTERM)
        output, _ = up.communicate(timeout=60)
    assert "worker exited with code -9; starting it again" in output
    assert up.returncode == 0, output
