"""LoRA variants and the memory levers, trained for real: rsLoRA, DoRA, AdaLoRA and 4-bit QLoRA
jobs learn and their adapters are served with the greedy text PEFT computes; AdaLoRA prunes ranks,
resumes from its checkpoints and imports as the LoRA it equals; DoRA and rsLoRA rows share a
batch with plain LoRA rows exactly; DoRA adapters import; 8-bit DoRA is refused; a job that fits
its device only with activation checkpointing is planned, accepted and trained with it; and the
real default model learns on a 4-bit base."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.corpus import arithmetic_rows, jsonl, person_rows
from tests.fixtures.env import MODEL_CACHE, SESSION_DIR
from tests.fixtures.service import Service, local_key_headers, start, stop

QUESTION = [{"role": "user", "content": "What is 3 + 4?"}]
VARIANTS: dict[str, dict[str, Any]] = {
    "rslora": {"lora": {"r": 8, "alpha": 8, "use_rslora": True}},
    "dora": {"lora": {"r": 8, "alpha": 16, "use_dora": True}},
    "qlora_4bit": {"quantization": "4bit"},
    # AdaLoRA's singular values start at zero and are pruned as it goes: it wants a bolder rate,
    # and more steps (at 4 epochs an Intel Xeon's numerics left it at 2.9% better, not 3%).
    "adalora": {
        "lora": {"type": "adalora", "r": 8, "target_r": 4},
        "hyperparameters": {"learning_rate": 5e-2, "n_epochs": 8},
    },
}
TRAIN = {"n_epochs": 4, "batch_size": 4, "learning_rate": 1e-2, "max_seq_length": 64}


def peft_greedy(
    location: Path, adapter_dir: Path, messages: list[dict[str, str]], tokens: int
) -> str:
    """The adapter's greedy answer as PEFT computes it on the unquantized fp32 base, stopping
    at the end-of-sequence tokens the engine stops at."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(location)
    base = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    eos = base.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer: list[int] = []
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, -1]
            token = int(torch.argmax(logits))
            if token in stops:
                break
            answer.append(token)
    return str(tokenizer.decode(answer, skip_special_tokens=True))


def served(service: Service, adapter: str, messages: list[dict[str, str]], tokens: int) -> str:
    answer = service.client.post(
        "/generate", json={"adapter": adapter, "messages": messages, "max_new_tokens": tokens}
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


def adapter_dir(service: Service, adapter_id: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for name, content in service.adapter_files(adapter_id).items():
        (where / name).write_bytes(content)
    return where


@pytest.fixture(scope="module")
def variant_jobs(service: Service, tiny_model: str) -> dict[str, dict[str, Any]]:
    """One job per variant on the same rows, submitted together and trained to the end."""
    file_id = service.upload("variant-sums.jsonl", jsonl(arithmetic_rows(16)))
    created = {
        name: service.create_job(
            base_model=tiny_model,
            dataset_url=file_id,
            **{**body, "hyperparameters": {**TRAIN, **body.get("hyperparameters", {})}},
        )
        for name, body in VARIANTS.items()
    }
    return {name: service.wait_for(job["id"], timeout=600) for name, job in created.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_learns_and_serves_peft_greedy_text(
    service: Service,
    tiny_model: str,
    variant_jobs: dict[str, dict[str, Any]],
    variant: str,
    tmp_path: Path,
) -> None:
    job = variant_jobs[variant]
    assert job["status"] == "succeeded", job["error"]
    lora, quantization = job["lora"], job["quantization"]
    assert lora["use_rslora"] is (variant == "rslora")
    assert lora["use_dora"] is (variant == "dora")
    assert quantization == ("4bit" if variant == "qlora_4bit" else None)
    evaluation = job["evaluation"]
    assert evaluation["adapter_eval_loss"] < 0.97 * evaluation["base_eval_loss"], evaluation

    local = adapter_dir(service, job["adapter"]["id"], tmp_path / "adapter")
    config = json.loads((local / "adapter_config.json").read_text())
    assert (config["use_rslora"], config["use_dora"]) == (variant == "rslora", variant == "dora")
    from safetensors.torch import load_file

    names = load_file(local / "adapter_model.safetensors")
    magnitudes = [name for name in names if name.endswith("lora_magnitude_vector")]
    assert bool(magnitudes) is (variant == "dora")
    manifest = json.loads(service.adapter_files(job["adapter"]["id"])["tuneserve_manifest.json"])
    assert manifest["device"]["quantization"] == quantization

    assert lora["type"] == ("adalora" if variant == "adalora" else "lora")
    assert config["peft_type"] == "LORA"  # AdaLoRA too: published as the LoRA it equals

    engine = served(service, job["id"], QUESTION, 8)
    assert engine == peft_greedy(MODEL_CACHE / tiny_model, local, QUESTION, 8)
    assert engine != served(service, None, QUESTION, 8)  # type: ignore[arg-type]


def test_adalora_prunes_to_its_budget_and_says_what_it_kept(
    service: Service, variant_jobs: dict[str, dict[str, Any]]
) -> None:
    job = variant_jobs["adalora"]
    said = {event["type"]: event for event in service.events(job["id"])}["job.adalora"]
    kept = said["data"]["kept_ranks"]
    # Every linear layer of the 2 tiny layers, ranks between 0 and r=8, averaging target_r=4
    # (PEFT's budget is the total over modules), not all the same: the budget was allocated.
    assert len(kept) == 14 and all(0 <= rank <= 8 for rank in kept.values())
    assert sum(kept.values()) == 4 * 14 and len(set(kept.values())) > 1
    manifest = json.loads(service.adapter_files(job["adapter"]["id"])["tuneserve_manifest.json"])
    assert manifest["metrics"]["adalora_kept_ranks"] == kept
    adapter = service.client.get(f"/adapters/{job['adapter']['id']}").json()
    assert adapter["rank"] == max(kept.values())


def test_adalora_resumes_from_checkpoints_before_and_after_its_final_allocation(
    tiny_model: str, tmp_path: Path
) -> None:
    """A resumed AdaLoRA run loads its full-rank checkpoint and its rank pattern, and ends where
    the uninterrupted run ends."""
    import shutil

    from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
    from worker.training import RANK_PATTERN_FILE, TrainingSpec, train_lora

    hp = TrainingHyperparameters.model_validate(
        {**Hyperparameters().model_dump(mode="json"), **TRAIN, "seed": 3}
    )
    spec = TrainingSpec(
        str(MODEL_CACHE / tiny_model),
        hp,
        LoraSpec(type="adalora", r=8, target_r=4),
        checkpoint_every_steps=5,
    )
    rows, held_out = arithmetic_rows(20)[:16], arithmetic_rows(20)[16:]
    whole = train_lora(spec, rows, held_out, tmp_path / "whole")
    assert whole.steps == 16 and whole.kept_ranks is not None
    # 16 steps: pruning from step 1, the final allocation at step 13 (the last 20% keep it).
    for step in (10, 15):
        checkpoint = tmp_path / "whole" / "trainer" / f"checkpoint-{step}"
        assert (checkpoint / RANK_PATTERN_FILE).is_file()
        copy = shutil.copytree(checkpoint, tmp_path / f"from-{step}")
        resumed = train_lora(
            TrainingSpec(**{**spec.__dict__, "resume_from": str(copy)}),
            rows,
            held_out,
            tmp_path / f"resumed-{step}",
        )
        assert resumed.steps == 16
        assert resumed.kept_ranks is not None
        assert sum(resumed.kept_ranks.values()) == sum(whole.kept_ranks.values())
        assert resumed.eval_loss == pytest.approx(whole.eval_loss, rel=1e-2)


def test_an_adalora_adapter_imports_as_the_lora_it_equals(
    service: Service, tiny_model: str, tmp_path: Path
) -> None:
    """PEFT's own AdaLoRA save (ranks cut by its rank pattern) imports, and the engine serves
    it with the greedy text PEFT computes from the AdaLoRA files."""
    import io
    import tarfile

    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    location = MODEL_CACHE / tiny_model
    config = AdaLoraConfig(
        init_r=6, target_r=3, total_step=10, lora_alpha=12, target_modules=["q_proj", "up_proj"]
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(location), config)
    generator = torch.Generator().manual_seed(5)
    pattern = {}
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
        if "lora_E" in name:  # keep 2 to 6 of the 6 singular values, as a pruned run would
            keep = 2 + len(pattern) % 5
            parameter.data[keep:] = 0
            pattern[name.removesuffix(".lora_E.default").removeprefix("base_model.model.")] = [
                index < keep for index in range(6)
            ]
    model.peft_config["default"].rank_pattern = {
        f"{module}.lora_E": mask for module, mask in pattern.items()
    }
    original = tmp_path / "adalora"
    model.save_pretrained(original)
    assert json.loads((original / "adapter_config.json").read_text())["peft_type"] == "ADALORA"

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(original / name, arcname=name)
    answer = service.client.post(
        "/adapters",
        files={"file": ("adalora.tar.gz", archive.getvalue())},
        data={"base_model": tiny_model, "name": "adalora-import"},
        timeout=120,
    )
    assert answer.status_code == 201, answer.text
    imported = answer.json()
    assert imported["rank"] == max(sum(mask) for mask in pattern.values()) == 5
    engine = served(service, imported["id"], QUESTION, 8)
    assert engine == peft_greedy(location, original, QUESTION, 8)
    assert engine != served(service, None, QUESTION, 8)  # type: ignore[arg-type]

    refused = service.client.post(
        "/jobs",
        json={"dataset_url": "file-x", "lora": {"type": "adalora", "use_dora": True}},
    )
    assert refused.status_code == 422 and "use_dora" in refused.text


def test_a_dora_adapter_imports_and_generates_the_same(
    service: Service, variant_jobs: dict[str, dict[str, Any]]
) -> None:
    trained = variant_jobs["dora"]
    archive = service.client.get(f"/adapters/{trained['adapter']['id']}/download").content
    answer = service.client.post(
        "/adapters",
        files={"file": ("dora.tar.gz", archive)},
        data={"base_model": "tiny-llama", "name": "dora-copy"},
        timeout=120,
    )
    assert answer.status_code == 201, answer.text
    imported = answer.json()["id"]
    assert served(service, imported, QUESTION, 8) == served(service, trained["id"], QUESTION, 8)

    # A job trains on from it, and keeps its DoRA.
    file_id = service.upload("dora-more.jsonl", jsonl(arithmetic_rows(8)))
    created = service.create_job(
        dataset_url=file_id, adapter=imported, hyperparameters={**TRAIN, "n_epochs": 1}
    )
    assert created["lora"]["use_dora"] is True and created["lora"]["r"] == 8


def test_dora_on_an_8bit_base_is_refused(
    service: Service, tiny_model: str, variant_jobs: dict[str, dict[str, Any]]
) -> None:
    file_id = service.upload("dora-8bit.jsonl", jsonl(arithmetic_rows(8)))
    body = {
        "base_model": tiny_model,
        "dataset_url": file_id,
        "quantization": "8bit",
        "lora": {"use_dora": True},
    }
    for path in ("/jobs", "/jobs/plan"):
        answer = service.client.post(path, json=body)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "quantization_unsupported" and '"4bit"' in error["message"]
    # A DoRA parent counts as DoRA.
    from_dora = {"dataset_url": file_id, "adapter": variant_jobs["dora"]["id"]}
    answer = service.client.post("/jobs", json={**from_dora, "quantization": "8bit"})
    assert (
        answer.status_code == 400 and answer.json()["error"]["code"] == "quantization_unsupported"
    )
    answer = service.client.post("/jobs", json={**body, "quantization": "3bit"})
    assert answer.status_code == 422, answer.text


def test_dora_and_rslora_rows_batch_with_plain_lora_exactly(
    tiny_model: str, tmp_path: Path
) -> None:
    """One forward pass over rows with a DoRA, an rsLoRA, a plain adapter and none, against
    PEFT's logits for each adapter alone; DoRA alone (the single-adapter path); and each
    adapter alone long enough to be merged into a copy of the weights."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.base_models.registry import get_base_model
    from app.inference.engine import InferenceEngine
    from app.inference.lora import MERGE_AFTER_STEPS, read_adapter
    from app.settings import get_settings

    settings = get_settings().model_copy(
        update={"inference_precision": "fp32", "adapter_cache_size": 3}
    )
    location = MODEL_CACHE / tiny_model
    configs = {
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
        "rslora": LoraConfig(
            r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True
        ),
        "plain": LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj"]),
    }
    dirs = {}
    for index, (name, config) in enumerate(configs.items()):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(location), config)
        generator = torch.Generator().manual_seed(index)
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
            if "lora_magnitude_vector" in parameter_name:  # a trained magnitude, not W's norm
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.data = parameter.data * (1 + 0.2 * noise)
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name])

    engine = InferenceEngine(settings)
    try:
        loaded = engine._loaded(get_base_model(settings, tiny_model))
        slots = loaded.batcher.slots
        for slot, name in enumerate(configs, start=1):
            slots.install(read_adapter(dirs[name], name), slot)
        reference = AutoModelForCausalLM.from_pretrained(location).eval()
        peft = PeftModel.from_pretrained(reference, dirs["dora"], adapter_name="dora")
        for name in ("rslora", "plain"):
            peft.load_adapter(dirs[name], adapter_name=name)
        ids = torch.tensor([loaded.tokenizer("Once upon a time there was")["input_ids"]] * 4)
        order = ["dora", None, "rslora", "plain"]
        with torch.inference_mode():
            slots.batch([1, 0, 2, 3])
            mixed = loaded.model(input_ids=ids).logits
            slots.batch([1, 1])
            alone = loaded.model(input_ids=ids[:2]).logits
            expected = []
            for row, name in enumerate(order):
                if name is None:
                    with peft.disable_adapter():
                        expected.append(peft(input_ids=ids[row : row + 1]).logits[0])
                else:
                    peft.set_adapter(name)
                    expected.append(peft(input_ids=ids[row : row + 1]).logits[0])
            with peft.disable_adapter():
                plain_base = peft(input_ids=ids[:1]).logits[0]
        for row in range(4):
            torch.testing.assert_close(mixed[row], expected[row], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone[0], expected[0], rtol=1e-4, atol=1e-4)
        # The magnitudes matter: the DoRA row is neither the base nor LoRA without them.
        assert not torch.allclose(expected[0], plain_base, atol=1e-2)

        # Each adapter alone for MERGE_AFTER_STEPS steps decodes with its merged weights: the
        # same logits; then the base alone and a mixed batch, still exact.
        for slot, name in enumerate(configs, start=1):
            with torch.inference_mode():
                for _ in range(MERGE_AFTER_STEPS):
                    slots.batch([slot, slot])
                merged = loaded.model(input_ids=ids[:2]).logits
            assert all(
                layer.merged_slot == slot for layer in slots.layers.values() if layer.used[slot]
            )
            torch.testing.assert_close(merged[0], expected[order.index(name)], rtol=1e-4, atol=1e-4)
        with torch.inference_mode():
            slots.batch([0])
            base_alone = loaded.model(input_ids=ids[:1]).logits
            slots.batch([1, 0, 2, 3])
            mixed_after = loaded.model(input_ids=ids).logits
        torch.testing.assert_close(base_alone[0], expected[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed_after, mixed, rtol=1e-5, atol=1e-5)
        # A new adapter in the merged slot leaves no stale merged weights behind.
        slots.remove("plain")
        slots.install(read_adapter(dirs["rslora"], "rslora-again"), 3)
        assert all(layer.merged_slot != 3 for layer in slots.layers.values())
        with torch.inference_mode():
            slots.batch([3])
            again = loaded.model(input_ids=ids[:1]).logits
        torch.testing.assert_close(again[0], expected[2], rtol=1e-4, atol=1e-4)
    finally:
        engine.close()


def test_merging_an_adapter_alone_can_be_turned_off(tiny_model: str, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.base_models.registry import get_base_model
    from app.inference.engine import InferenceEngine
    from app.inference.lora import MERGE_AFTER_STEPS, read_adapter
    from app.settings import get_settings

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(MODEL_CACHE / tiny_model),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    model.save_pretrained(tmp_path)
    settings = get_settings().model_copy(
        update={"inference_precision": "fp32", "merge_single_adapter": False}
    )
    engine = InferenceEngine(settings)
    try:
        slots = engine._loaded(get_base_model(settings, tiny_model)).batcher.slots
        slots.install(read_adapter(tmp_path, "plain"), 1)
        for _ in range(2 * MERGE_AFTER_STEPS):
            slots.batch([1])
        assert all(layer.merged is None for layer in slots.layers.values())
    finally:
        engine.close()


# --- activation checkpointing when needed --------------------------------------------------


def _between_levers(tiny_model: str, batch: int, seq: int) -> tuple[int, int, int]:
    """Device sizes: one where the job fits only with activation checkpointing, one where it
    fits without, and one where it fits with nothing (as app/jobs/memory.py estimates)."""
    from app.base_models.facts import model_facts
    from app.base_models.registry import get_base_model
    from app.jobs.memory import USABLE_SHARE, estimate_memory
    from app.settings import get_settings

    settings = get_settings()
    facts = model_facts(settings, get_base_model(settings, tiny_model))

    def peak(checkpointing: bool) -> int:
        return estimate_memory(
            facts,
            batch=batch,
            seq=seq,
            lora_r=16,
            target_modules="all-linear",
            checkpointing=checkpointing,
        ).total

    with_it, without = peak(True), peak(False)
    assert with_it < without
    return (
        int((with_it + without) / 2 / USABLE_SHARE),
        int(without / USABLE_SHARE) + 1,
        int(with_it / USABLE_SHARE) - 1,
    )


@pytest.fixture(scope="module")
def long_rows(service: Service) -> tuple[str, int]:
    rows = arithmetic_rows(8)
    for row in rows:
        row["messages"][1]["content"] = "the answer is " * 40
    from app.base_models.loading import load_tokenizer
    from app.base_models.registry import get_base_model
    from app.datasets.loss_mask import token_mask
    from app.settings import get_settings

    settings = get_settings()
    tokenizer = load_tokenizer(settings, get_base_model(settings, "tiny-llama"))
    seq = max(len(token_mask(tokenizer, row)[0]) for row in rows)
    return service.upload("long-sums.jsonl", jsonl(rows)), seq


@pytest.fixture(scope="module")
def tight_worker(service: Service, tiny_model: str, long_rows: tuple[str, int]) -> Iterator[int]:
    """A worker of queue training-cpu whose device holds the long-row job only with activation
    checkpointing (TUNESERVE_DEVICE_MEMORY_BYTES)."""
    from app.cli.processes import worker_command

    tight, _roomy, _small = _between_levers(tiny_model, 4, long_rows[1])
    os.environ["TUNESERVE_DEVICE_MEMORY_BYTES"] = str(tight)
    try:
        process = start("worker-tight", worker_command(["training-cpu"]), SESSION_DIR / "logs")
    finally:
        del os.environ["TUNESERVE_DEVICE_MEMORY_BYTES"]
    yield tight
    stop(process)


def _api_with_device(memory: int) -> Any:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import get_settings

    settings = get_settings().model_copy(
        update={"device_memory_bytes": memory, "default_queue": "lever-tests"}
    )
    return TestClient(create_app(settings), headers=local_key_headers())


def test_the_plan_turns_checkpointing_on_only_when_the_job_needs_it(
    service: Service, tiny_model: str, long_rows: tuple[str, int]
) -> None:
    file_id, seq = long_rows
    tight, roomy, small = _between_levers(tiny_model, 4, seq)
    body = {
        "base_model": tiny_model,
        "dataset_url": file_id,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_seq_length": 256},
    }
    with _api_with_device(roomy) as api:
        memory = api.post("/jobs/plan", json=body).json()["memory"]
        assert memory["fits"] is True and memory["activation_checkpointing"] is False
        without = memory["estimated_bytes"]
    with _api_with_device(tight) as api:
        memory = api.post("/jobs/plan", json=body).json()["memory"]
        assert memory["seq"] == seq and memory["batch"] == 4
        assert memory["fits"] is True and memory["activation_checkpointing"] is True
        assert memory["estimated_bytes"] <= memory["usable_bytes"] < without
        # 4 rows x seq tokens x 64 wide x (2 layers' inputs + one layer's 16 values) x fp32
        assert memory["parts"]["activations"] == 4 * seq * 64 * (2 + 16) * 4
        accepted = api.post("/jobs", json=body)
        assert accepted.status_code == 201, accepted.text  # refused before checkpointing
        api.post(f"/jobs/{accepted.json()['id']}/cancel")
    with _api_with_device(small) as api:
        refused = api.post("/jobs", json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "job_does_not_fit"
        assert "with activation checkpointing" in error["message"]
        assert error["detail"]["activation_checkpointing"] is True


def test_a_job_that_fits_only_with_checkpointing_trains_with_it(
    service: Service, tiny_model: str, long_rows: tuple[str, int], tight_worker: int
) -> None:
    created = service.create_job(
        base_model=tiny_model,
        dataset_url=long_rows[0],
        accelerator="cpu",
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-3},
    )
    job = service.wait_for(created["id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    events = {event["type"]: event for event in service.events(job["id"])}
    said = events["job.activation_checkpointing"]
    assert "Activation checkpointing on: 4 rows" in said["message"]
    manifest = json.loads(service.adapter_files(job["adapter"]["id"])["tuneserve_manifest.json"])
    assert manifest["device"]["activation_checkpointing"] is True
    assert job["evaluation"]["adapter_eval_loss"] < job["evaluation"]["base_eval_loss"]


def test_train_lora_recomputes_activations_when_asked(tiny_model: str, tmp_path: Path) -> None:
    """What the worker runs for such a job: the model trains with checkpointing on, on a
    quantized base too, and learns the same as without (checkpointing changes memory, not
    math)."""
    from transformers import TrainerCallback

    from app.jobs.schemas import Hyperparameters, LoraSpec, TrainingHyperparameters
    from worker.training import TrainingSpec, train_lora

    seen: list[bool] = []

    class Watch(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
            seen.append(bool(kwargs["model"].is_activation_checkpointing))

    hp = TrainingHyperparameters.model_validate(
        {**Hyperparameters().model_dump(mode="json"), **TRAIN, "n_epochs": 1}
    )
    rows = arithmetic_rows(8)
    losses = {}
    for checkpointing, quantization in ((False, None), (True, None), (True, "4bit")):
        spec = TrainingSpec(
            str(MODEL_CACHE / tiny_model),
            hp,
            LoraSpec(),
            gradient_checkpointing=checkpointing,
            quantization=quantization,
        )
        result = train_lora(
            spec,
            rows,
            None,
            tmp_path / f"{checkpointing}-{quantization}",
            extra_callbacks=[Watch()],
        )
        losses[(checkpointing, quantization)] = result.train_loss
        assert seen[-result.steps :] == [checkpointing] * result.steps
    assert losses[(True, None)] == pytest.approx(losses[(False, None)], rel=1e-4)


# --- the real default model on a 4-bit base ---------------------------------------------------


@pytest.mark.real_model
def test_the_default_model_learns_on_a_4bit_base_and_its_adapter_serves(
    service: Service, default_model_dir: Path, tmp_path: Path
) -> None:
    train = service.upload("people-qlora.jsonl", jsonl(person_rows(16, seed=3)))
    held_out = service.upload("people-qlora-val.jsonl", jsonl(person_rows(6, seed=4)))
    created = service.create_job(
        dataset_url=train,
        validation_url=held_out,
        quantization="4bit",
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3},
    )
    assert created["quantization"] == "4bit"
    job = service.wait_for(created["id"], timeout=1500)
    assert job["status"] == "succeeded", job["error"]
    evaluation = job["evaluation"]
    assert evaluation["split"] == "validation" and evaluation["rows"] == 6
    assert evaluation["adapter_eval_loss"] < evaluation["base_eval_loss"], evaluation
    loading = next(e for e in service.events(job["id"]) if e["type"] == "job.loading_model")
    assert "quantized to 4bit" in loading["message"]

    question = [{"role": "user", "content": "Hana is 29 years old and lives in Bergen."}]
    local = adapter_dir(service, job["adapter"]["id"], tmp_path / "adapter")
    assert served(service, job["id"], question, 8) == peft_greedy(
        default_model_dir, local, question, 8
    )


# --- every variant on the real default model ----------------------------------------------------

DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "rslora": {"lora": {"r": 8, "alpha": 8, "use_rslora": True}},
    "dora": {"lora": {"r": 8, "alpha": 16, "use_dora": True}},
    # AdaLoRA's singular values start at zero: a bolder rate for the same few steps.
    "adalora": {"lora": {"type": "adalora", "r": 8, "target_r": 4}, "learning_rate": 2e-2},
}


@pytest.fixture(scope="module")
def default_variant_jobs(service: Service) -> dict[str, dict[str, Any]]:
    """rsLoRA, DoRA and AdaLoRA jobs on the default model, on the same rows, trained to the end."""
    train = service.upload("people-variants.jsonl", jsonl(person_rows(16, seed=5)))
    held_out = service.upload("people-variants-val.jsonl", jsonl(person_rows(6, seed=6)))
    created = {
        name: service.create_job(
            dataset_url=train,
            validation_url=held_out,
            lora=variant["lora"],
            # 4 steps each: three jobs on the real model stay short.
            hyperparameters={
                "n_epochs": 1,
                "batch_size": 4,
                "learning_rate": variant.get("learning_rate", 5e-3),
            },
        )
        for name, variant in DEFAULT_VARIANTS.items()
    }
    return {name: service.wait_for(job["id"], timeout=1500) for name, job in created.items()}


@pytest.mark.real_model
@pytest.mark.parametrize("variant", list(DEFAULT_VARIANTS))
def test_each_variant_learns_on_the_default_model_and_serves_peft_greedy_text(
    service: Service,
    default_model_dir: Path,
    default_variant_jobs: dict[str, dict[str, Any]],
    variant: str,
    tmp_path: Path,
) -> None:
    job = default_variant_jobs[variant]
    assert job["status"] == "succeeded", job["error"]
    evaluation = job["evaluation"]
    assert evaluation["split"] == "validation" and evaluation["rows"] == 6
    assert evaluation["adapter_eval_loss"] < evaluation["base_eval_loss"], evaluation
    question = [{"role": "user", "content": "Hana is 29 years old and lives in Bergen."}]
    local = adapter_dir(service, job["adapter"]["id"], tmp_path / "adapter")
    assert served(service, job["id"], question, 8) == peft_greedy(
        default_model_dir, local, question, 8
    )
