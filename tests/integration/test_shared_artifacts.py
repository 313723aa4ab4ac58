"""An api and a worker that share nothing but SQL, the broker and an S3 bucket (moto's real HTTP
S3 server): the upload, the training job and the generation all go through the bucket."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.service import (
    Service,
    auth,
    create_api_key,
    free_port,
    start,
    stop,
    wait_until_healthy,
)
from tests.integration.test_storage_s3 import (  # noqa: F401  (fixture)
    ACCESS_KEY,
    BUCKET,
    REGION,
    SECRET_KEY,
    s3_endpoint,
)


@pytest.fixture(scope="module")
def split_service(
    s3_endpoint: str,  # noqa: F811
    tiny_model: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Service, Path, Path, str]]:
    from app.cli.processes import api_command, worker_command
    from app.migrate import upgrade_database

    root = tmp_path_factory.mktemp("split")
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    database = f"sqlite:///{root / 'shared.sqlite'}"
    upgrade_database(database)
    common = {
        "TUNESERVE_DATABASE_URL": database,
        "TUNESERVE_BROKER_URL": f"sqla+sqlite:///{root / 'broker.sqlite'}",
        "TUNESERVE_DEFAULT_QUEUE": "training-split",
        "TUNESERVE_ARTIFACTS_URL": f"s3://{BUCKET}/{prefix}",
        "TUNESERVE_S3_ENDPOINT_URL": s3_endpoint,
        "TUNESERVE_S3_ACCESS_KEY_ID": ACCESS_KEY,
        "TUNESERVE_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "TUNESERVE_S3_REGION": REGION,
    }
    api_dir, worker_dir = root / "api-node", root / "worker-node"
    saved = dict(os.environ)
    logs = root / "logs"
    logs.mkdir()
    port = free_port()
    try:
        os.environ.update({**common, "TUNESERVE_DATA_DIR": str(api_dir)})
        api = start("api", api_command("127.0.0.1", port), logs)
        os.environ.update({**common, "TUNESERVE_DATA_DIR": str(worker_dir)})
        worker = start("worker", worker_command(["training-split"]), logs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, api)
        headers = auth(create_api_key("split", database_url=database))
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            yield Service(url=url, client=client, logs=logs), api_dir, worker_dir, prefix
    finally:
        stop(api)
        stop(worker)


def test_api_and_worker_share_artifacts_only_through_s3(
    split_service: tuple[Service, Path, Path, str],
    tiny_model: str,
    s3_endpoint: str,  # noqa: F811
) -> None:
    service, api_dir, worker_dir, prefix = split_service
    file_id = service.upload("sums.jsonl", jsonl(arithmetic_rows(8)))
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=file_id,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "max_seq_length": 64},
    )
    job = service.wait_for(created["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    adapter_id = job["adapter"]["id"]

    answer = service.client.post(
        "/generate",
        json={"adapter": job["id"], "prompt": "What is 1 plus 1?", "max_new_tokens": 4},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["adapter"] == adapter_id

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
    )
    keys = {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert f"{prefix}/files/{file_id}" in keys
    assert f"{prefix}/adapters/{adapter_id}/adapter_model.safetensors" in keys
    assert f"{prefix}/adapters/{adapter_id}/adapter_config.json" in keys
    # Neither node kept the other's files on its own disk: the api never saw the worker's
    # adapter directory except through its download cache, the worker read the upload from S3.
    assert not (api_dir / "artifacts" / "adapters").exists()
    assert (
        api_dir / "artifact-cache" / "adapters" / adapter_id / "adapter_model.safetensors"
    ).is_file()
    assert not (worker_dir / "artifacts" / "files").exists()
