"""The pieces of a job plan that need no service: "auto" rules, the memory formula and its
advice, LoRA parameter counts, and the loss mask on the real (tiny model's) tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.base_models.facts import ModelFacts
from app.jobs.auto import (
    auto_batch_size,
    auto_epochs,
    auto_learning_rate,
    resolve,
)
from app.jobs.memory import (
    MemoryEstimate,
    batch_fits,
    estimate_memory,
    fits,
    suggest,
)
from app.jobs.schemas import CreateJobRequest, Hyperparameters

GIB = 1 << 30
# SmolLM2-135M's sizes, with two of its linear layers per kind (enough for the formula).
SMOL = ModelFacts(
    params=134_515_008,
    hidden_size=576,
    layers=30,
    vocab_size=49152,
    linear_layers=(
        ("model.layers.0.self_attn.q_proj", 576, 576),
        ("model.layers.0.self_attn.v_proj", 576, 192),
        ("model.layers.0.mlp.up_proj", 576, 1536),
        ("model.layers.0.mlp.down_proj", 1536, 576),
    ),
)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


# --- "auto" ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "epochs", "batch", "rate"),
    [
        (1, 10, 1, 7.07e-5),
        (8, 10, 1, 7.07e-5),
        (16, 10, 2, 1e-4),
        (50, 6, 4, 1.41e-4),
        (99, 4, 8, 2e-4),
        (300, 3, 8, 2e-4),
        (10_000, 3, 8, 2e-4),
        (20_000, 1, 8, 2e-4),
        (1_000_000, 1, 8, 2e-4),
    ],
)
def test_auto_rules_table(rows: int, epochs: int, batch: int, rate: float) -> None:
    assert auto_epochs(rows) == epochs
    assert auto_batch_size(rows) == batch
    assert auto_batch_size(rows) <= rows
    assert auto_learning_rate(batch, 1, 135_000_000) == pytest.approx(rate)


def test_auto_batch_size_halves_until_it_fits() -> None:
    assert auto_batch_size(1000, lambda batch: batch <= 3) == 2
    assert auto_batch_size(1000, lambda _batch: False) == 1  # never below 1


def test_auto_learning_rate_scales_with_the_effective_batch_and_the_model() -> None:
    assert auto_learning_rate(8, 4, 100_000_000) == pytest.approx(4e-4)
    assert auto_learning_rate(8, 1, 7_000_000_000) == pytest.approx(1e-4)
    assert auto_learning_rate(8, 1, 70_000_000_000) == pytest.approx(5e-5)


def test_resolve_replaces_only_auto_values() -> None:
    requested = Hyperparameters().model_dump(mode="json")
    assert {requested[name] for name in ("n_epochs", "batch_size", "learning_rate")} == {"auto"}
    resolved = resolve(requested, rows=16, model_params=135_000_000)
    assert resolved.auto == ["n_epochs", "batch_size", "learning_rate"]
    assert (resolved.hyperparameters["n_epochs"], resolved.hyperparameters["batch_size"]) == (10, 2)
    assert resolved.hyperparameters["max_seq_length"] == 1024

    numeric = {**requested, "n_epochs": 2, "batch_size": 4, "learning_rate": 1e-3}
    kept = resolve(numeric, rows=16, model_params=135_000_000)
    assert kept.auto == [] and kept.hyperparameters == numeric  # jobs from before "auto"

    mixed = resolve({**requested, "batch_size": 4}, rows=16, model_params=135_000_000)
    assert mixed.auto == ["n_epochs", "learning_rate"]
    assert mixed.hyperparameters["learning_rate"] == pytest.approx(1.41e-4)  # from batch 4


def test_hyperparameters_take_auto_or_numbers() -> None:
    assert Hyperparameters.model_validate({"n_epochs": "auto", "batch_size": 4}).batch_size == 4
    for bad in ({"n_epochs": 0}, {"n_epochs": "three"}, {"learning_rate": 2}, {"batch_size": 2.5}):
        with pytest.raises(ValidationError) as caught:
            Hyperparameters.model_validate(bad)
        error = caught.value.errors()[0]
        assert error["loc"] == (next(iter(bad)),)  # no union branch in the field's path
        assert '(or "auto")' in error["msg"]
    schema = Hyperparameters.model_json_schema()["properties"]["n_epochs"]
    assert {"const": "auto", "type": "string"} in schema["anyOf"]


def test_the_request_hash_treats_omitted_and_auto_alike_and_ignores_dry_run() -> None:
    from app.jobs.service import job_request_hash

    plain = CreateJobRequest.model_validate({"dataset_url": "file-x"})
    spelled = CreateJobRequest.model_validate(
        {"dataset_url": "file-x", "hyperparameters": {"n_epochs": "auto"}, "dry_run": True}
    )
    numeric = CreateJobRequest.model_validate(
        {"dataset_url": "file-x", "hyperparameters": {"n_epochs": 3}}
    )
    assert job_request_hash(plain) == job_request_hash(spelled)
    assert job_request_hash(plain) != job_request_hash(numeric)


# --- memory ---------------------------------------------------------------------------------------


def _estimate(batch: int, seq: int, facts: ModelFacts = SMOL) -> MemoryEstimate:
    return estimate_memory(facts, batch=batch, seq=seq, lora_r=16, target_modules="all-linear")


def test_memory_formula_parts() -> None:
    estimate = _estimate(8, 100)  # a CPU worker
    assert estimate.weights == SMOL.params * 4 * 2
    assert estimate.lora_and_optimizer == SMOL.lora_params(16, "all-linear") * 16
    assert estimate.activations == 8 * 100 * 576 * 30 * 16 * 4
    assert estimate.logits == 8 * 100 * 32768 * 4 * 8  # tiles of the fused LM head
    assert _estimate(64, 1000).logits == 4096 * 32768 * 4 * 8  # never more than 4096 tokens
    assert estimate.total == sum(
        (estimate.weights, estimate.lora_and_optimizer, estimate.activations, estimate.logits)
    ) + (1 << 30)
    gpu = estimate_memory(
        SMOL, batch=8, seq=100, lora_r=16, target_modules="all-linear", accelerator="cuda"
    )
    assert gpu.weights == SMOL.params * 2  # bf16 on GPUs
    assert gpu.logits == 8 * 100 * 32768 * 4 * 3
    assert gpu.activations == estimate.activations


def test_memory_grows_with_batch_sequence_rank_and_model() -> None:
    assert _estimate(1, 64).total < _estimate(2, 64).total < _estimate(2, 128).total
    rank_8 = estimate_memory(SMOL, batch=1, seq=64, lora_r=8, target_modules="all-linear")
    assert rank_8.total < _estimate(1, 64).total
    bigger = ModelFacts(
        params=SMOL.params * 2,
        hidden_size=SMOL.hidden_size * 2,
        layers=SMOL.layers,
        vocab_size=SMOL.vocab_size,
        linear_layers=SMOL.linear_layers,
    )
    assert _estimate(1, 64, bigger).total > _estimate(1, 64).total


def test_lora_params_follow_peft_module_matching() -> None:
    assert SMOL.lora_params(16, "all-linear") == 16 * (
        (576 + 576) + (576 + 192) + (576 + 1536) + (1536 + 576)
    )
    assert SMOL.lora_params(8, ["q_proj", "v_proj"]) == 8 * ((576 + 576) + (576 + 192))
    assert SMOL.lora_params(8, ["self_attn.q_proj"]) == 8 * (576 + 576)
    assert SMOL.lora_params(8, ["proj"]) == 0  # a name must match whole path components


def test_a_batch_that_does_not_fit_gets_a_smaller_one_with_the_same_effective_batch() -> None:
    device = 8 * GIB
    assert not fits(_estimate(8, 512), device)
    hyperparameters = {"batch_size": 8, "gradient_accumulation_steps": 2, "max_seq_length": 512}
    advice = suggest(
        SMOL,
        device,
        hyperparameters=hyperparameters,
        lora=LORA,
        seq=512,
        p99_row_tokens=400,
        rows_over_p99=1,
    )
    assert advice.hyperparameters is not None
    smaller = advice.hyperparameters["batch_size"]
    assert 1 <= smaller < 8
    assert fits(_estimate(smaller, 512), device)
    assert not fits(_estimate(2 * smaller, 512), device)  # not needlessly small
    # 5 rows would fit too; 4 divides the effective batch, so it stays exactly 16.
    assert smaller * advice.hyperparameters["gradient_accumulation_steps"] == 16
    assert f"batch_size to {smaller}" in advice.message and "the same 16 rows" in advice.message
    assert batch_fits(SMOL, LORA, rows=100, seq=512, device_bytes=device)(smaller)
    assert batch_fits(SMOL, LORA, rows=100, seq=512, device_bytes=None)(1024)


def test_the_suggested_batch_divides_the_effective_batch_when_it_can() -> None:
    from app.jobs.memory import _dividing

    assert _dividing(64, 10) == 8 and _dividing(16, 5) == 4
    assert _dividing(7, 6) == 6  # no divisor of 7 between 3 and 6: accumulation rounds up


def test_when_one_row_does_not_fit_the_advice_is_a_shorter_max_seq_length() -> None:
    device = 4 * GIB
    assert not fits(_estimate(1, 4096), device)
    advice = suggest(
        SMOL,
        device,
        hyperparameters={"batch_size": 4, "gradient_accumulation_steps": 1},
        lora=LORA,
        seq=4096,
        p99_row_tokens=300,
        rows_over_p99=2,
    )
    assert advice.hyperparameters is not None
    assert advice.hyperparameters["max_seq_length"] == 300
    assert "2 longer rows" in advice.message
    chosen = advice.hyperparameters["batch_size"]
    assert fits(_estimate(chosen, 300), device)

    hopeless = suggest(
        SMOL,
        GIB,
        hyperparameters={"batch_size": 1, "gradient_accumulation_steps": 1},
        lora=LORA,
        seq=64,
        p99_row_tokens=64,
        rows_over_p99=0,
    )
    assert hopeless.hyperparameters is None and "more memory" in hopeless.message


# --- quantization and activation checkpointing ---------------------------------------------------

# SmolLM2-135M whole: 30 layers of q, k, v, o, gate, up and down projections.
SMOL_LAYERS = tuple(
    (f"model.layers.{layer}.{name}", fan_in, fan_out)
    for layer in range(30)
    for name, fan_in, fan_out in (
        ("self_attn.q_proj", 576, 576),
        ("self_attn.k_proj", 576, 192),
        ("self_attn.v_proj", 576, 192),
        ("self_attn.o_proj", 576, 576),
        ("mlp.gate_proj", 576, 1536),
        ("mlp.up_proj", 576, 1536),
        ("mlp.down_proj", 1536, 576),
    )
)
SMOL_WHOLE = ModelFacts(
    params=SMOL.params,
    hidden_size=576,
    layers=30,
    vocab_size=49152,
    linear_layers=SMOL_LAYERS,
)


def test_quantized_weights_are_counted_per_linear_weight() -> None:
    from app.jobs.memory import weight_bytes

    linear = 106_168_320  # the 210 linear layers: quantized; embeddings and norms as loaded
    assert SMOL_WHOLE.linear_params == linear
    nf4_linear = int(linear * (0.5 + 1 / 64 + 4 / 16384))
    # GPUs: the rest in bf16.
    nf4 = weight_bytes(SMOL_WHOLE, accelerator="cuda", quantization="4bit")
    int8 = weight_bytes(SMOL_WHOLE, accelerator="cuda", quantization="8bit")
    assert nf4 == nf4_linear + (SMOL.params - linear) * 4
    assert int8 == linear + (SMOL.params - linear) * 4
    bf16 = weight_bytes(SMOL_WHOLE, accelerator="cuda", quantization=None)
    assert nf4 < int8 < bf16 == SMOL.params * 2
    # A CPU worker holds the rest in fp32, and reads the fp32 checkpoint to quantize it: those
    # pages stay counted beside the quantized model.
    fp32 = SMOL.params * 4
    cpu_nf4 = weight_bytes(SMOL_WHOLE, accelerator="cpu", quantization="4bit")
    cpu_int8 = weight_bytes(SMOL_WHOLE, accelerator="cpu", quantization="8bit")
    assert cpu_nf4 == nf4_linear + (SMOL.params - linear) * 4 + fp32
    assert weight_bytes(SMOL_WHOLE, accelerator="cpu", quantization=None) == 2 * fp32
    # get_memory_footprint() of the model loaded so on the CPU (bitsandbytes 0.50.2): 166.5 MB
    # in 4 bits, 209 MiB in 8 bits.
    assert cpu_nf4 - fp32 == pytest.approx(166_471_168, rel=0.02)
    assert cpu_int8 - fp32 == pytest.approx(209 * 2**20, rel=0.02)

    def peak(quantization: str | None) -> int:
        return estimate_memory(
            SMOL_WHOLE,
            batch=1,
            seq=64,
            lora_r=16,
            target_modules="all-linear",
            accelerator="rocm",
            quantization=quantization,
        ).total

    assert peak(None) - peak("4bit") == bf16 - nf4  # only the weights change


def test_checkpointed_activations_keep_one_value_per_layer_and_one_layer_whole() -> None:
    plain = _estimate(8, 100)
    checkpointed = estimate_memory(
        SMOL, batch=8, seq=100, lora_r=16, target_modules="all-linear", checkpointing=True
    )
    assert checkpointed.activations == 8 * 100 * 576 * (30 + 16) * 4
    assert plain.activations == 8 * 100 * 576 * 30 * 16 * 4
    assert plain.total - checkpointed.total == plain.activations - checkpointed.activations


def test_checkpointing_is_needed_only_when_the_job_fits_with_it_alone() -> None:
    from app.jobs.memory import checkpointing_needed, usable

    without = _estimate(8, 512).total
    with_it = estimate_memory(
        SMOL, batch=8, seq=512, lora_r=16, target_modules="all-linear", checkpointing=True
    ).total
    between = int((without + with_it) / 2 / 0.9)
    assert with_it <= usable(between) < without

    def needed(device: int | None, batch: int = 8) -> bool:
        return checkpointing_needed(SMOL, LORA, batch=batch, seq=512, device_bytes=device)

    assert needed(between)
    assert not needed(int(without / 0.9) + 1)  # fits as it is: no recomputing
    assert not needed(None)  # unknown memory: nothing to decide from
    assert not needed(between, batch=1)  # a smaller batch fits without
    # Suggestions for a job that does not fit even so assume checkpointing on.
    tight = int(with_it / 0.9) - GIB
    advice = suggest(
        SMOL,
        tight,
        hyperparameters={"batch_size": 8, "gradient_accumulation_steps": 1},
        lora=LORA,
        seq=512,
        p99_row_tokens=512,
        rows_over_p99=0,
        checkpointing=True,
    )
    assert advice.hyperparameters is not None
    smaller = advice.hyperparameters["batch_size"]
    assert batch_fits(SMOL, LORA, rows=8, seq=512, device_bytes=tight, checkpointing=True)(smaller)
    assert not batch_fits(SMOL, LORA, rows=8, seq=512, device_bytes=tight)(smaller)


def test_when_nothing_fits_in_fp32_the_advice_names_4bit() -> None:
    rows = {"batch_size": 1, "gradient_accumulation_steps": 1}

    def one_row(quantization: str | None) -> int:
        return estimate_memory(
            SMOL_WHOLE,
            batch=1,
            seq=64,
            lora_r=16,
            target_modules="all-linear",
            accelerator="cuda",
            quantization=quantization,
        ).total

    def hopeless(device: int, quantization: str | None = None) -> str:
        advice = suggest(
            SMOL_WHOLE,
            device,
            hyperparameters=rows,
            lora=LORA,
            seq=64,
            p99_row_tokens=64,
            rows_over_p99=0,
            accelerator="cuda",
            quantization=quantization,
        )
        assert advice.hyperparameters is None
        return advice.message

    device = int((one_row(None) + one_row("4bit")) / 2 / 0.9)  # fp32 does not fit, 4bit does
    assert '"quantization": "4bit"' in hopeless(device)
    assert "quantization" not in hopeless(int(one_row("4bit") / 2), "4bit")  # already 4bit
    assert "quantization" not in hopeless(GIB // 2)  # 4 bits do not fit either


# --- the loss mask on the tiny model's tokenizer --------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str) -> Any:
    from transformers import AutoTokenizer

    from tests.fixtures.env import MODEL_CACHE

    return AutoTokenizer.from_pretrained(MODEL_CACHE / tiny_model)


def _trained_text(segments: list[Any]) -> str:
    return "".join(segment.text for segment in segments if segment.trained)


def test_chat_mask_trains_the_assistant_messages_only(tokenizer: Any) -> None:
    from app.datasets.loss_mask import assistant_token_mask, mask_segments

    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "ANSWER: 4"},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "ANSWER: 6"},
    ]
    input_ids, mask = assistant_token_mask(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True)
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert input_ids == list(expected_ids)  # the ids training uses are the chat template's
    assert len(mask) == len(input_ids)

    segments = mask_segments(tokenizer, {"messages": messages})
    assert "".join(segment.text for segment in segments) == rendered
    assert [segment.trained for segment in segments] == [False, True, False, True]
    assert segments[1].text == "ANSWER: 4<|im_end|>\n"  # the end of turn is learned: it stops
    assert segments[3].text == "ANSWER: 6<|im_end|>\n"
    assert sum(segment.tokens for segment in segments) == len(input_ids)
    trained_ids = [token for token, bit in zip(input_ids, mask, strict=True) if bit]
    assert tokenizer.decode(trained_ids) == "ANSWER: 4<|im_end|>\nANSWER: 6<|im_end|>\n"


def test_chat_mask_falls_back_to_the_content_when_prefixes_render_differently(
    tokenizer: Any,
) -> None:
    from app.datasets.loss_mask import mask_segments

    odd = tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\nThinking…' }}"
    )
    assert odd != tokenizer.chat_template
    original, tokenizer.chat_template = tokenizer.chat_template, odd
    try:
        messages = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
        ]
        segments = mask_segments(tokenizer, {"messages": messages})
    finally:
        tokenizer.chat_template = original
    assert _trained_text(segments) == "Hello there"


def test_prompt_completion_and_text_masks(tokenizer: Any) -> None:
    from app.datasets.loss_mask import completion_token_mask, mask_segments, text_token_mask

    record = {"prompt": "2 + 2 =", "completion": " 4"}
    input_ids, mask = completion_token_mask(tokenizer, record["prompt"], record["completion"])
    assert len(input_ids) == len(tokenizer("2 + 2 = 4")["input_ids"]) + 1  # + EOS
    assert input_ids[-1] == tokenizer.eos_token_id and mask[-1]
    segments = mask_segments(tokenizer, record)
    assert [segment.trained for segment in segments] == [False, True]
    assert "".join(segment.text for segment in segments) == "2 + 2 = 4<|im_end|>"
    assert _trained_text(segments) == " 4<|im_end|>"

    input_ids, mask = text_token_mask(tokenizer, "Once upon a time")
    assert all(mask) and input_ids[-1] == tokenizer.eos_token_id
    only = mask_segments(tokenizer, {"text": "Once upon a time"})
    assert len(only) == 1 and only[0].trained and only[0].text == "Once upon a time<|im_end|>"
