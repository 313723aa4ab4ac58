"""The plan for big base models: their sizes read from a config.json alone (no weights), the
memory estimate on GPUs (bf16 weights, QLoRA, activation checkpointing, FSDP), the choice of
FSDP, and the plan route for an operator-registered model whose directory holds only its config
and a tokenizer."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.base_models.facts import ModelFacts, _model_facts
from app.jobs.memory import (
    GIB,
    MemoryEstimate,
    checkpointing_needed,
    choose_distributed,
    estimate_memory,
    fits,
    suggest,
)
from app.jobs.plan import choose_spread
from app.jobs.schemas import Distributed, PlanDevice
from app.settings import Settings
from tests.corpus import arithmetic_rows, jsonl
from tests.fixtures.env import REPO

CONFIGS = REPO / "bench" / "configs"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
SEQ = 2048
# Published sizes: (parameters, hidden, layers, vocabulary).
PUBLISHED = {
    "llama-2-7b": (6.74e9, 4096, 32, 32000),
    "llama-3-8b": (8.03e9, 4096, 32, 128256),
    "llama-3-70b": (70.6e9, 8192, 80, 128256),
}
# The tokenizer files of the default model that a config-only directory borrows.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@pytest.fixture(scope="module")
def facts() -> dict[str, ModelFacts]:
    return {name: _model_facts(str(CONFIGS / name), None, None) for name in PUBLISHED}


def peak(
    facts: ModelFacts,
    *,
    batch: int = 1,
    seq: int = SEQ,
    quantization: str | None = None,
    checkpointing: bool = False,
    shards: int = 1,
) -> MemoryEstimate:
    return estimate_memory(
        facts,
        batch=batch,
        seq=seq,
        lora_r=16,
        target_modules="all-linear",
        accelerator="cuda",
        quantization=quantization,
        checkpointing=checkpointing,
        shards=shards,
    )


# --- facts from a config alone -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_sizes_are_read_from_the_config_alone(facts: dict[str, ModelFacts], name: str) -> None:
    assert sorted(path.name for path in (CONFIGS / name).iterdir()) == ["config.json"]
    params, hidden, layers, vocab = PUBLISHED[name]
    model = facts[name]
    assert model.params == pytest.approx(params, rel=0.02)
    assert (model.hidden_size, model.layers, model.vocab_size) == (hidden, layers, vocab)
    assert len(model.linear_layers) == 7 * layers  # q, k, v, o, gate, up, down
    # A decoder layer: its linear weights, plus two norms of `hidden` each.
    assert model.layer_linear_params * layers == model.linear_params
    assert model.layer_params == model.layer_linear_params + 2 * hidden
    # The rest: the embeddings and the LM head (not tied), and the final norm.
    assert model.params == model.linear_params + 2 * hidden * layers + 2 * vocab * hidden + hidden


# --- the estimate on GPUs ------------------------------------------------------------------------


def test_gpus_hold_the_base_model_in_bf16(facts: dict[str, ModelFacts]) -> None:
    llama = facts["llama-2-7b"]
    assert peak(llama).weights == llama.params * 2
    cpu = estimate_memory(llama, batch=1, seq=SEQ, lora_r=16, target_modules="all-linear")
    assert cpu.weights == llama.params * 4 * 2  # the CPU formula, measured, is unchanged
    # QLoRA on a GPU: the linear layers in NF4, the rest (embeddings, head, norms) in fp32, as
    # PEFT's k-bit recipe casts it.
    rest = llama.params - llama.linear_params
    nf4 = peak(llama, quantization="4bit").weights
    assert nf4 == int(llama.linear_params * (0.5 + 1 / 64 + 4 / 16384)) + rest * 4
    assert nf4 / GIB == pytest.approx(4.09, abs=0.05)


@pytest.mark.parametrize("shards", [2, 8])
def test_fsdp_shards_the_weights_and_adds_the_layers_it_gathers(
    facts: dict[str, ModelFacts], shards: int
) -> None:
    llama = facts["llama-3-70b"]
    whole = peak(llama, checkpointing=True)
    sharded = peak(llama, checkpointing=True, shards=shards)
    assert sharded.weights == pytest.approx(whole.weights / shards, abs=1)
    assert sharded.lora_and_optimizer == pytest.approx(whole.lora_and_optimizer / shards, abs=1)
    assert whole.gathered_layers == 0
    assert sharded.gathered_layers == 2 * llama.layer_params * 2  # two bf16 layers, whole
    assert sharded.gathered_layers / GIB == pytest.approx(3.19, abs=0.01)
    # Each device trains its own rows: activations and the LM head stay as they were.
    assert (sharded.activations, sharded.logits) == (whole.activations, whole.logits)
    assert sharded.total == (
        whole.total
        - whole.weights
        - whole.lora_and_optimizer
        + sharded.weights
        + sharded.lora_and_optimizer
        + sharded.gathered_layers
    )
    # Quantized, the gathered layers are quantized too.
    qlora = peak(llama, quantization="4bit", checkpointing=True, shards=shards)
    assert qlora.gathered_layers < sharded.gathered_layers / 3


def test_a_7b_lora_does_not_fit_a_24gb_gpu_where_4bit_qlora_does(
    facts: dict[str, ModelFacts],
) -> None:
    llama, gpu = facts["llama-2-7b"], 24 * GIB
    # One row of 2048 tokens: bf16 LoRA needs activation checkpointing, 4-bit does not...
    assert not fits(peak(llama), gpu)
    assert fits(peak(llama, checkpointing=True), gpu)
    assert checkpointing_needed(llama, LORA, batch=1, seq=SEQ, device_bytes=gpu, accelerator="cuda")
    # ...and 8 rows fit only in 4 bits, even with checkpointing.
    assert not fits(peak(llama, batch=8, checkpointing=True), gpu)
    assert fits(peak(llama, batch=8, quantization="4bit", checkpointing=True), gpu)


# --- FSDP chosen, and advised ---------------------------------------------------------------------


def test_fsdp_is_chosen_for_70b_on_8_gpus_of_80gb_and_not_for_the_default_model(
    facts: dict[str, ModelFacts], default_model_dir: Path
) -> None:
    def chosen(model: ModelFacts, **changes: Any) -> str | None:
        arguments: dict[str, Any] = {
            "batch": 1,
            "seq": SEQ,
            "device_bytes": 80 * GIB,
            "shards": 8,
            "accelerator": "cuda",
            **changes,
        }
        return choose_distributed(model, LORA, **arguments)

    llama = facts["llama-3-70b"]
    assert chosen(llama) == "fsdp"
    assert fits(peak(llama, checkpointing=True, shards=8), 80 * GIB)
    assert not fits(peak(llama, checkpointing=True), 80 * GIB)
    default = _model_facts(str(default_model_dir), None, None)
    assert chosen(default) is None  # fits one device
    assert chosen(llama, shards=1) is None  # nothing to shard over
    assert chosen(llama, shards=2) is None  # does not fit 2 devices either
    assert chosen(llama, device_bytes=None) is None  # nothing to decide from
    assert chosen(llama, accelerator="cpu") is None  # ranks share one machine's memory
    assert chosen(facts["llama-2-7b"]) is None  # fits one 80 GB device


def test_the_advice_for_a_model_too_big_for_one_device_names_fsdp_and_4bit(
    facts: dict[str, ModelFacts],
) -> None:
    def advice(model: ModelFacts, device: int, **changes: Any) -> str:
        arguments: dict[str, Any] = {
            "hyperparameters": {"batch_size": 1, "gradient_accumulation_steps": 1},
            "lora": LORA,
            "seq": SEQ,
            "p99_row_tokens": SEQ,
            "rows_over_p99": 0,
            "accelerator": "cuda",
            "checkpointing": True,
            **changes,
        }
        suggestion = suggest(model, device, **arguments)
        assert suggestion.hyperparameters is None
        return suggestion.message

    llama = facts["llama-3-70b"]
    both_alone = advice(llama, 80 * GIB, fsdp_devices=8)
    assert '"quantization": "4bit" (QLoRA): one row fits' in both_alone
    assert '"distributed": "fsdp" (the base model sharded over 8 devices' in both_alone
    assert "fsdp" not in advice(llama, 80 * GIB)  # one device: nothing to shard over
    assert "fsdp" not in advice(llama, 80 * GIB, fsdp_devices=8, shards=8)  # sharded already
    # On 24 GB devices, neither lever alone fits; both together do, over 8 of them.
    together = advice(llama, 24 * GIB, fsdp_devices=8)
    assert together.count("Or set") == 1
    assert '"quantization": "4bit" and "distributed": "fsdp"' in together


# --- how a plan spreads a job ---------------------------------------------------------------------


def test_the_plan_counts_the_devices_fsdp_shards_over() -> None:
    cuda = PlanDevice(accelerator="cuda", name=None, count=None, memory_bytes=80 * GIB, source="")
    cpu = PlanDevice(accelerator="cpu", name="x", count=1, memory_bytes=64 * GIB, source="")
    every_gpu, one = Settings(training_processes=0), Settings(training_processes=1)

    def needed(_devices: int) -> bool:
        return True

    def not_needed(_devices: int) -> bool:
        return False

    chosen = choose_spread(every_gpu, cuda, None, needed)
    assert (chosen.distributed, chosen.shards) == (Distributed.FSDP, 8)
    assert chosen.note is not None and "8 GPUs a node assumed" in chosen.note
    recorded = choose_spread(every_gpu, cuda.model_copy(update={"count": 4}), None, needed)
    assert recorded.shards == 4 and "assumed" not in str(recorded.note)
    plain = choose_spread(every_gpu, cuda, None, not_needed)
    assert (plain.distributed, plain.shards, plain.fsdp_devices) == (Distributed.DDP, 1, 8)
    asked_ddp = choose_spread(every_gpu, cuda, Distributed.DDP, needed)
    assert (asked_ddp.distributed, asked_ddp.shards) == (Distributed.DDP, 1)
    # One process per job: one device, unless the job asks for FSDP (then 2 are assumed).
    alone = choose_spread(one, cuda, None, needed)
    assert (alone.distributed, alone.shards, alone.fsdp_devices) == (None, 1, 8)
    asked = choose_spread(one, cpu, Distributed.FSDP, not_needed)
    assert (asked.distributed, asked.shards) == (Distributed.FSDP, 2)
    assert asked.note is not None and "TUNESERVE_TRAINING_PROCESSES=1" in asked.note
    assert choose_spread(one, cpu, None, not_needed).fsdp_devices == 1  # no FSDP advice on CPUs


# --- the plan route, for a base model registered with its config alone ---------------------------


def config_only_model(target: Path, config: str, tokenizer_from: Path) -> Path:
    """A model directory with bench/configs/<config>/config.json and the default model's
    tokenizer files: no weights."""
    target.mkdir()
    shutil.copy(CONFIGS / config / "config.json", target / "config.json")
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, target / name)
    return target


@pytest.fixture
def big_models_api(
    fresh_db: Path, tmp_path: Path, default_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The api in-process on a fresh database, with Llama-3-8B and Llama-3-70B registered from
    directories holding their config.json and a tokenizer only, devices of 80 GB
    (TUNESERVE_DEVICE_MEMORY_BYTES) and every GPU of a node per job."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import get_settings
    from tests.fixtures.service import auth, create_api_key

    models_file = tmp_path / "models.toml"
    entries = []
    for name in ("llama-3-8b", "llama-3-70b"):
        directory = config_only_model(tmp_path / name, name, default_model_dir)
        entries.append(f'[models.{name}]\npath = "{directory}"\n')
    models_file.write_text("\n".join(entries))
    monkeypatch.setenv("TUNESERVE_MODELS_FILE", str(models_file))
    monkeypatch.setenv("TUNESERVE_DEVICE_MEMORY_BYTES", str(80 * GIB))
    monkeypatch.setenv("TUNESERVE_TRAINING_PROCESSES", "0")
    monkeypatch.setenv("TUNESERVE_DEFAULT_QUEUE", "big-model-plans")
    get_settings.cache_clear()
    key = create_api_key("big-models", owner="big-models")
    with TestClient(create_app(), headers=auth(key)) as client:
        yield client


def test_the_plan_of_a_config_only_8b_model_on_cuda(big_models_api: Any) -> None:
    uploaded = big_models_api.post(
        "/files", files={"file": ("sums.jsonl", jsonl(arithmetic_rows(16)))}
    )
    assert uploaded.status_code == 201, uploaded.text
    body = {
        "base_model": "llama-3-8b",
        "dataset_url": uploaded.json()["id"],
        "accelerator": "cuda",
        "hyperparameters": {"batch_size": 2},
    }
    answer = big_models_api.post("/jobs/plan", json=body)
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    memory = plan["memory"]
    assert plan["queue"] == "training-cuda" and plan["dataset"]["rows"] == 16
    assert memory["device"] == {
        "accelerator": "cuda",
        "name": None,
        "count": None,
        "memory_bytes": 80 * GIB,
        "source": "setting",
    }
    assert memory["fits"] is True and memory["suggestion"] is None
    assert memory["activation_checkpointing"] is False
    assert (memory["distributed"], memory["shards"]) == ("ddp", 1)  # 8 GPUs assumed, each whole
    # The same estimate as the formula's on the model's facts, its weights in bf16.
    facts = _model_facts(str(CONFIGS / "llama-3-8b"), None, None)
    expected = estimate_memory(
        facts,
        batch=2,
        seq=memory["seq"],
        lora_r=16,
        target_modules="all-linear",
        accelerator="cuda",
    )
    assert memory["estimated_bytes"] == expected.total
    assert memory["parts"]["weights"] == facts.params * 2
    assert memory["seq"] == plan["dataset"]["max_row_tokens"]
    # 16 rows, 10 epochs ("auto"), batches of 2 rows on each of 8 ranks: 1 step an epoch.
    assert plan["steps"] == 10


def test_the_plan_shards_a_70b_model_that_fits_only_so(big_models_api: Any) -> None:
    rows = arithmetic_rows(16)
    for row in rows:
        row["messages"][1]["content"] = "the answer is " * 300  # rows of about 1 000 tokens
    uploaded = big_models_api.post("/files", files={"file": ("long.jsonl", jsonl(rows))})
    body = {
        "base_model": "llama-3-70b",
        "dataset_url": uploaded.json()["id"],
        "accelerator": "cuda",
        "hyperparameters": {"batch_size": 2, "max_seq_length": 2048},
    }
    plan = big_models_api.post("/jobs/plan", json=body).json()
    memory = plan["memory"]
    assert (memory["distributed"], memory["shards"]) == ("fsdp", 8)
    assert memory["fits"] is True and memory["activation_checkpointing"] is True
    assert "does not fit one device" in memory["distributed_note"]
    assert "8 GPUs a node assumed" in memory["distributed_note"]
    assert memory["parts"]["gathered_layers"] > 0
    # Asked for DDP, it does not fit, and the advice names FSDP.
    ddp = big_models_api.post("/jobs/plan", json={**body, "distributed": "ddp"}).json()["memory"]
    assert (ddp["distributed"], ddp["shards"], ddp["fits"]) == ("ddp", 1, False)
    assert '"distributed": "fsdp"' in ddp["suggestion"]["message"]
    # Submitted as it is, the job is not refused: FSDP makes it fit.
    created = big_models_api.post("/jobs", json=body)
    assert created.status_code == 201, created.text
    refused = big_models_api.post("/jobs", json={**body, "distributed": "ddp"})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "job_does_not_fit"
    cancel = big_models_api.post(f"/jobs/{created.json()['id']}/cancel")
    assert cancel.status_code == 200


def test_a_config_only_model_reads_no_weights(tmp_path: Path, default_model_dir: Path) -> None:
    directory = config_only_model(tmp_path / "llama", "llama-3-8b", default_model_dir)
    assert not list(directory.glob("*.safetensors")) and not list(directory.glob("*.bin"))
    facts = _model_facts(str(directory), None, None)
    assert facts == _model_facts(str(CONFIGS / "llama-3-8b"), None, None)
    assert json.loads((directory / "config.json").read_text())["rope_theta"] == 500000.0
