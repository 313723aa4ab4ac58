"""What the CLI prints and sends, from the api's JSON, without a service (the commands against
the live service are in tests/integration/test_cli.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
import typer
from rich.console import Console, RenderableType

from app.cli.adapters import pack_folder
from app.cli.client import Client
from app.cli.common import human_bytes, human_seconds, output_path
from app.cli.job_views import job_summary, plan_summary
from app.cli.jobs import JobOptions, job_body

JOB: dict[str, Any] = {
    "id": "ftjob-1",
    "object": "job",
    "status": "succeeded",
    "base_model": "tiny-llama",
    "dataset_url": "file-1",
    "validation_url": None,
    "suffix": None,
    "hyperparameters": {"n_epochs": 3, "learning_rate": 0.0002, "batch_size": 4},
    "auto_hyperparameters": ["n_epochs"],
    "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
    "progress": {"step": 30, "total_steps": 30, "epoch": 3.0, "train_loss": 0.51234},
    "dataset": {"rows": 120, "format": "chat", "tokens": 9000, "held_out_rows": 12},
    "adapter": {"id": "adapter-1", "name": "ft:tiny-llama:local:x:adapter-1"},
    "evaluation": None,
    "error": None,
    "metadata": None,
    "attempt": 1,
    "queue": "training",
    "worker": "host:1",
    "device": {"kind": "cuda", "name": "H100", "count": 2, "memory_bytes": 80 << 30},
    "cancel_requested": False,
    "created_at": "2026-01-02T03:04:05.123456Z",
    "started_at": "2026-01-02T03:04:06Z",
    "finished_at": "2026-01-02T03:09:06Z",
}

EVALUATION = {
    "split": "held_out",
    "rows": 12,
    "base_eval_loss": 2.0,
    "adapter_eval_loss": 1.5,
    "improvement": 0.25,
    "samples": [
        {"prompt": "What is 2 plus 2?", "reference": "4", "base": "five", "adapter": "4"},
    ],
    "seconds": 75.0,
}


def rendered(renderable: RenderableType) -> str:
    console = Console(file=io.StringIO(), width=200, markup=False, emoji=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


def test_job_summary_shows_progress_adapter_dataset_and_evaluation() -> None:
    shown = rendered(job_summary({**JOB, "evaluation": EVALUATION}))
    assert "step 30/30" in shown and "train loss 0.5123" in shown
    assert "n_epochs 3 (auto)" in shown and "learning_rate 0.0002," in shown
    assert "adapter-1  ft:tiny-llama:local:x:adapter-1" in shown
    assert "120 rows" in shown and "12 held out for the evaluation" in shown
    assert "on cuda: H100 x2 (80.0 GiB)" in shown
    assert "eval loss base 2.0000 -> adapter 1.5000 (25.0% lower), on 12 held-out rows" in shown
    assert "What is 2 plus 2?" in shown and "five" in shown
    assert "created 2026-01-02 03:04:05" in shown


def test_job_summary_shows_the_error_code_and_message_as_given() -> None:
    failed = {
        **JOB,
        "status": "failed",
        "adapter": None,
        "error": {"code": "dataset_invalid", "message": "line 3: [bad] :smile: row"},
    }
    shown = rendered(job_summary(failed))
    # Text from the api is printed as it is, not read as rich markup or emoji codes.
    assert "dataset_invalid: line 3: [bad] :smile: row" in shown
    running = {**JOB, "status": "running", "cancel_requested": True}
    assert "running (cancel requested)" in rendered(job_summary(running))


def test_plan_summary_shows_steps_time_memory_and_problems() -> None:
    plan = {
        "base_model": "tiny-llama",
        "queue": "training",
        "dataset": {
            "rows": 8,
            "format": "chat",
            "tokens": 400,
            "max_row_tokens": 60,
            "mean_row_tokens": 50.0,
            "p99_row_tokens": 60,
            "too_long_count": 2,
            "too_long": [{"line": 3, "tokens": 60}, {"line": 7, "tokens": 59}],
            "filename": "train.jsonl",
        },
        "hyperparameters": {"n_epochs": 10, "batch_size": 1},
        "auto_hyperparameters": ["n_epochs"],
        "steps": 80,
        "time": {"estimated_seconds": 125.0, "measured_jobs": 3},
        "memory": {
            "estimated_bytes": 12 << 30,
            "batch": 1,
            "seq": 60,
            "device": {"accelerator": "cuda", "name": "L4", "source": "recorded"},
            "usable_bytes": 20 << 30,
            "fits": False,
            "suggestion": {"message": "Lower batch_size to 1.", "hyperparameters": None},
        },
        "problems": [{"code": "rows_too_long", "message": "2 rows are too long"}],
        "loss_mask_preview": [
            {
                "line": 1,
                "tokens": 9,
                "trained_tokens": 2,
                "segments": [
                    {"text": "Q? ", "trained": False, "tokens": 7},
                    {"text": "A.", "trained": True, "tokens": 2},
                ],
            }
        ],
    }
    shown = rendered(plan_summary(plan))
    assert "steps            80" in shown
    assert "about 2m05s (from 3 earlier jobs)" in shown
    assert "12.0 GiB at its peak (1 row of 60 tokens), 20.0 GiB usable on cuda L4" in shown
    assert "does not fit" in shown and "Lower batch_size to 1." in shown
    assert "2 rows (lines 3, 7)" in shown
    assert "problem          rows_too_long: 2 rows are too long" in shown
    assert "Q? A." in shown


class NoUploads(Client):
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected {method} {path}")


def body(**options: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "dataset": "file-abc",
        "base_model": None,
        "validation": None,
        "epochs": None,
        "learning_rate": None,
        "batch_size": None,
        "max_seq_length": None,
        "lora_r": None,
        "lora_alpha": None,
        "seed": None,
        "suffix": None,
        "metadata": None,
    }
    return job_body(NoUploads("http://127.0.0.1:9"), JobOptions(**{**defaults, **options}))


def test_job_body_sends_only_what_was_given() -> None:
    assert body() == {"dataset_url": "file-abc"}
    sent = body(
        epochs="auto",
        learning_rate="2e-4",
        batch_size="8",
        seed=0,
        lora_r=8,
        metadata=["team=ml", "note=a=b"],
        webhook_url="https://example.com/hook",
    )
    assert sent == {
        "dataset_url": "file-abc",
        "hyperparameters": {"n_epochs": "auto", "learning_rate": 2e-4, "batch_size": 8, "seed": 0},
        "lora": {"r": 8},
        "metadata": {"team": "ml", "note": "a=b"},
        "webhook_url": "https://example.com/hook",
    }
    levers = body(lora_r=16, adalora=6, quantization="4bit", distributed="fsdp")
    assert levers == {
        "dataset_url": "file-abc",
        "lora": {"r": 16, "type": "adalora", "target_r": 6},
        "quantization": "4bit",
        "distributed": "fsdp",
    }


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"epochs": "2.5"}, "'2.5' is not a whole number or auto"),
        ({"learning_rate": "fast"}, "'fast' is not a number or auto"),
        ({"metadata": ["team"]}, "'team' is not KEY=VALUE"),
    ],
)
def test_job_body_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(typer.BadParameter, match=message):
        body(**options)


def test_a_folder_is_packed_with_what_the_api_keeps(tmp_path: Path) -> None:
    folder = tmp_path / "my-adapter"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (folder / name).write_text(name)
    (folder / "training_args.bin").write_bytes(b"pickle")  # the api refuses pickles
    with tarfile.open(fileobj=io.BytesIO(pack_folder(folder))) as archive:
        assert sorted(archive.getnames()) == [
            "my-adapter/README.md",
            "my-adapter/adapter_config.json",
            "my-adapter/adapter_model.safetensors",
        ]
        member = archive.extractfile("my-adapter/adapter_config.json")
        assert member is not None and member.read() == b"adapter_config.json"


def test_a_folder_without_safetensors_weights_is_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(typer.Exit) as exited:
        pack_folder(tmp_path)
    assert exited.value.exit_code == 1
    error = capsys.readouterr().err
    assert "no adapter_model.safetensors" in error and "safe_serialization=True" in error


def test_sizes_times_and_output_paths(tmp_path: Path) -> None:
    assert [human_bytes(n) for n in (None, 512, 2048, 5 << 20, 3 << 30)] == [
        "-",
        "512 B",
        "2.0 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
    assert [human_seconds(s) for s in (None, 4.4, 65, 3700)] == ["-", "4s", "1m05s", "1h01m"]
    assert output_path(None, "a.tar.gz") == Path("a.tar.gz")
    assert output_path(str(tmp_path), "a.tar.gz") == tmp_path / "a.tar.gz"
    assert output_path(f"{tmp_path}/new/", "a.tar.gz") == tmp_path / "new" / "a.tar.gz"
    assert output_path(f"{tmp_path}/b.tgz", "a.tar.gz") == tmp_path / "b.tgz"
