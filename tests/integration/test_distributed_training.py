"""Data-parallel (DDP) and fully sharded (FSDP) training through torchrun: 2 CPU ranks on gloo,
with the tiny model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.jobs.schemas import LoraSpec, TrainingHyperparameters
from tests.corpus import arithmetic_rows
from tests.fixtures.env import MODEL_CACHE
from worker.distributed import (
    LAUNCHER_LOG,
    PROGRESS_FILE,
    RUN_DIR_NAME,
    STOP_FILE,
    rank_marker,
    run_distributed,
)
from worker.training import ProgressUpdate, TrainingHooks, TrainingSpec

HYPERPARAMETERS: dict[str, Any] = {
    "n_epochs": 1,
    "learning_rate": 1e-3,
    "batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_seq_length": 64,
    "warmup_ratio": 0.0,
    "lr_scheduler": "linear",
    "weight_decay": 0.0,
    "seed": 1,
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def _spec(tiny_model: str, **overrides: Any) -> TrainingSpec:
    return TrainingSpec(
        model_location=str(MODEL_CACHE / tiny_model),
        hyperparameters=TrainingHyperparameters(**{**HYPERPARAMETERS, **overrides}),
        lora=LoraSpec(**LORA),
    )


def _markers(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(rank_marker(run_dir, rank).read_text()) for rank in (0, 1)]


def test_two_gloo_ranks_train_one_adapter(tiny_model: str, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    result = run_distributed(
        _spec(tiny_model),
        arithmetic_rows(16),
        None,
        tmp_path,
        TrainingHooks(on_progress=updates.append),
        processes=2,
    )

    # 16 rows, 2 per rank per step, 2 ranks: each rank gets 8 rows, so 4 steps per epoch.
    assert result.steps == result.total_steps == 4
    assert not result.stopped_early
    assert result.train_loss is not None and result.train_loss > 0
    assert result.trained_tokens > 16 * 10  # gathered over both ranks

    run_dir = tmp_path / RUN_DIR_NAME
    ranks = _markers(run_dir)
    assert [marker["rank"] for marker in ranks] == [0, 1]
    for marker in ranks:
        assert marker["world_size"] == 2
        assert marker["backend"] == "gloo"
        assert marker["threads"] >= 1
        assert marker["steps"] == 4 and not marker["stopped_early"]
        assert marker["examples"] == 8  # half of the rows each: the data was sharded
        assert marker["tokens"] > 8 * 10
        assert marker["lora_b_abs_sum"] > 0
    # DDP all-reduced the gradients: both replicas ended with the same weights.
    assert ranks[0]["lora_checksum"] == pytest.approx(ranks[1]["lora_checksum"], rel=1e-6)
    assert ranks[0]["examples"] + ranks[1]["examples"] == 16

    # Exactly one adapter, saved by rank 0 where train_lora saves it (the Trainer's own
    # checkpoints under trainer/ hold adapter weights too: they are not the result).
    adapters = [
        path.parent
        for path in tmp_path.rglob("adapter_model.safetensors")
        if (tmp_path / "trainer") not in path.parents
    ]
    assert adapters == [tmp_path / "adapter"]
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().sum() > 0 for tensor in lora_b)

    # Rank 0's progress reached the caller's hooks, in this process.
    assert updates
    steps = [update.step for update in updates if update.train_loss is not None]
    assert steps == [1, 2, 3, 4]
    assert all(update.total_steps == 4 for update in updates)

    # The records were removed; the markers, progress and log stay for inspection.
    assert not (run_dir / "train.json").exists() and not (run_dir / "eval.json").exists()
    assert (run_dir / PROGRESS_FILE).is_file() and (run_dir / LAUNCHER_LOG).is_file()


@pytest.mark.timeout(120)
def test_stop_request_stops_every_rank_at_the_same_step(tiny_model: str, tmp_path: Path) -> None:
    updates: list[ProgressUpdate] = []
    # 400 steps if nothing stopped it: far more than the time the stop takes to arrive.
    spec = _spec(tiny_model, n_epochs=100)
    started = time.monotonic()
    result = run_distributed(
        spec,
        arithmetic_rows(16),
        None,
        tmp_path,
        TrainingHooks(on_progress=updates.append, should_stop=lambda: bool(updates)),
        processes=2,
        poll_interval=0.2,
    )
    elapsed = time.monotonic() - started

    assert result.stopped_early  # and the launcher exited 0, or run_distributed would raise
    assert result.total_steps == 400
    assert 1 <= result.steps < result.total_steps
    assert elapsed < 90
    run_dir = tmp_path / RUN_DIR_NAME
    assert (run_dir / STOP_FILE).exists()
    ranks = _markers(run_dir)
    assert all(marker["stop_seen"] and marker["stopped_early"] for marker in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] == result.steps
    assert not (tmp_path / "adapter").exists()
    assert not [
        path
        for path in tmp_path.rglob("adapter_model.safetensors")
        if (tmp_path / "trainer") not in path.parents
    ]
    assert updates


def test_a_failing_launch_raises_with_the_ranks_output(tmp_path: Path) -> None:
    spec = TrainingSpec(
        model_location=str(tmp_path / "no-such-model"),
        hyperparameters=TrainingHyperparameters(**HYPERPARAMETERS),
        lora=LoraSpec(**LORA),
    )
    with pytest.raises(RuntimeError, match="launcher exited with") as failure:
        run_distributed(spec, arithmetic_rows(4), None, tmp_path, TrainingHooks(), processes=2)
    # The failing rank's own error comes first, its traceback after.
    first_line = str(failure.value).splitlines()[0]
    assert "OSError" in first_line and "no-such-model" in first_line
    assert not (tmp_path / RUN_DIR_NAME / "train.json").exists()


def _lora_weights(directory: Path) -> dict[str, Any]:
    return load_file(directory / "adapter" / "adapter_model.safetensors")


def test_two_gloo_ranks_shard_with_fsdp_save_one_adapter_and_resume(
    tiny_model: str, tmp_path: Path
) -> None:
    """FSDP (FSDP2 on gloo): every rank holds a share of each weight, the checkpoints are
    sharded (a file per rank), the one adapter equals what DDP trains from the same seed, and a
    run resumed from a sharded checkpoint ends with the same adapter."""
    rows = arithmetic_rows(16)
    sharded = _spec(tiny_model)
    sharded = TrainingSpec(
        **{**sharded.__dict__, "distributed": "fsdp", "checkpoint_every_steps": 2}
    )
    result = run_distributed(sharded, rows, None, tmp_path / "fsdp", TrainingHooks(), processes=2)
    assert result.steps == result.total_steps == 4

    ranks = [
        json.loads(rank_marker(tmp_path / "fsdp" / RUN_DIR_NAME, r).read_text()) for r in (0, 1)
    ]
    assert all(marker["sharded"] and marker["examples"] == 8 for marker in ranks)
    assert ranks[0]["lora_checksum"] == pytest.approx(ranks[1]["lora_checksum"], rel=1e-6)
    checkpoint = tmp_path / "fsdp" / "trainer" / "checkpoint-2"
    shards = sorted(path.name for path in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each rank wrote its share
    assert not (checkpoint / "adapter_model.safetensors").exists()

    fsdp_weights = _lora_weights(tmp_path / "fsdp")
    run_distributed(_spec(tiny_model), rows, None, tmp_path / "ddp", TrainingHooks(), processes=2)
    ddp_weights = _lora_weights(tmp_path / "ddp")
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, tensor in fsdp_weights.items():
        torch.testing.assert_close(tensor, ddp_weights[name], rtol=1e-4, atol=1e-5)

    copy = shutil.copytree(checkpoint, tmp_path / "from-2")
    resumed_spec = TrainingSpec(**{**sharded.__dict__, "resume_from": str(copy)})
    resumed = run_distributed(resumed_spec, rows, None, tmp_path / "resumed", TrainingHooks(), 2)
    assert resumed.steps == 4
    markers = _markers(tmp_path / "resumed" / RUN_DIR_NAME)
    assert [marker["examples"] for marker in markers] == [4, 4]  # only steps 3 and 4 ran
    for name, tensor in _lora_weights(tmp_path / "resumed").items():
        torch.testing.assert_close(tensor, fsdp_weights[name], rtol=1e-4, atol=1e-5)
