"""The inference engine in process, on the tiny model in fp32 with LoRA adapters made by PEFT:
mixed batches match each adapter alone and PEFT's logits, requests join a running batch,
adapters are evicted and loaded again, cancelled and broken requests free the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

PROMPTS = [
    "The three best things about living by the sea are",
    "Once upon a time",
    "List the planets:",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def settings(tiny_model: str) -> Any:
    from app.settings import get_settings

    return get_settings().model_copy(
        update={"inference_precision": "fp32", "adapter_cache_size": 2}
    )


@pytest.fixture(scope="module")
def adapters(settings: Any, tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three LoRA adapters of the tiny model (ranks 4, 8 and 8 on different modules), random B so
    each changes the output, saved by PEFT and put in the artifact store like trained ones."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from app.base_models.loading import model_location
    from app.base_models.registry import get_base_model
    from app.storage import artifact_store

    location = model_location(settings, get_base_model(settings, tiny_model))
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=8, lora_alpha=8, target_modules=["o_proj", "down_proj", "up_proj"]),
    ]
    found = {}
    for index, config in enumerate(configs):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(location), config)
        generator = torch.Generator().manual_seed(index)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * 0.5
        local = tmp_path_factory.mktemp(f"adapter{index}")
        model.save_pretrained(local)
        key = f"adapter-enginetest{index}-{time.time_ns()}"
        artifact_store(settings).put_dir(local, f"adapters/{key}")
        found[key] = local
    return {"location": location, "dirs": found}


@pytest.fixture
def engine(settings: Any) -> Iterator[Any]:
    from app.inference.engine import InferenceEngine

    engine = InferenceEngine(settings)
    yield engine
    engine.close()


def generation(settings: Any, tiny_model: str, adapter: str | None = None, **fields: Any) -> Any:
    from app.base_models.registry import get_base_model
    from app.inference.engine import Generation

    values: dict[str, Any] = {
        "base_model": get_base_model(settings, tiny_model),
        "adapter_key": adapter,
        "adapter_path": f"adapters/{adapter}" if adapter else None,
        "prompt": PROMPTS[0],
        "messages": None,
        "max_new_tokens": 12,
        "temperature": 0.0,
        "top_p": 1.0,
        "stop": None,
        "seed": None,
    }
    return Generation(**{**values, **fields})


def run_together(engine: Any, requests: list[Any]) -> list[Any]:
    results: list[Any] = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def run(index: int) -> None:
        start.wait()
        results[index] = engine.generate(requests[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_a_mixed_batch_gives_each_request_its_text_alone(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    keys = [*adapters["dirs"]][:2]
    requests = [
        generation(settings, tiny_model, adapter, prompt=prompt)
        for adapter in (None, *keys)
        for prompt in PROMPTS[:2]
    ]
    alone = [engine.generate(request) for request in requests]
    assert len({result.text for result in alone}) == len(alone)  # the adapters do matter
    together = run_together(engine, requests)
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [r.completion_tokens for r in alone]


def test_prompts_that_arrive_together_are_prefilled_together_exactly(
    settings: Any, tiny_model: str, adapters: Any
) -> None:
    """Prompts of different lengths and adapters (and none), prefilled in one left-padded pass,
    give each request the text it gets alone. The batch thread is stopped so that all of them
    are admitted at one step, then the test drives the batcher's own steps."""
    from app.inference.batching import Done
    from app.inference.engine import InferenceEngine

    keys = [*adapters["dirs"]][:2]
    requests = [
        generation(settings, tiny_model, adapter, prompt=prompt, max_new_tokens=10)
        for adapter, prompt in zip((None, keys[0], keys[1], keys[0]), PROMPTS, strict=True)
    ]
    alone_engine = InferenceEngine(settings)
    try:
        alone = [alone_engine.generate(request).text for request in requests]
    finally:
        alone_engine.close()
    assert len(set(alone)) == len(alone)

    engine = InferenceEngine(settings)
    try:
        engine.generate(generation(settings, tiny_model, max_new_tokens=1))  # loads the model
        batcher = engine._models[tiny_model].batcher
        batcher.stop()
        batcher.join()
        streams = [engine.stream(request) for request in requests]
        with torch.inference_mode():
            batcher._admit(block=False)
            assert len(batcher.rows) == len(requests) and not batcher.waiting  # one prefill
            while batcher.rows:
                batcher._step()
        together = []
        for stream in streams:
            items = []
            while not stream._request.out.empty():
                items.append(stream._request.out.get())
            together.append(next(item.text for item in items if isinstance(item, Done)))
            stream._done = True
        assert together == alone
    finally:
        engine.close()


def test_prefill_groups_keep_arrival_order_within_the_token_budget() -> None:
    from app.inference.batching import PREFILL_TOKENS, _prefill_groups

    def request(length: int) -> Any:
        return type("R", (), {"prompt_ids": [1] * length})()

    lengths = [10, 20, PREFILL_TOKENS // 2, 5, PREFILL_TOKENS + 1, 7]
    admitted = [(request(n), 0) for n in lengths]
    groups = _prefill_groups(admitted)
    assert [[len(r.prompt_ids) for r, _ in group] for group in groups] == [
        [10, 20],
        [PREFILL_TOKENS // 2, 5],
        [PREFILL_TOKENS + 1],
        [7],
    ]
    for group in groups:
        width = max(len(r.prompt_ids) for r, _ in group)
        assert len(group) == 1 or width * len(group) <= PREFILL_TOKENS


def test_mixed_batch_logits_match_peft(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    """One forward pass over rows with different adapters (and none) against PEFT's logits for
    each adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine.generate(generation(settings, tiny_model, max_new_tokens=1))
    loaded = engine._models[tiny_model]
    keys = [*adapters["dirs"]]
    reference = AutoModelForCausalLM.from_pretrained(adapters["location"]).eval()
    peft = PeftModel.from_pretrained(reference, adapters["dirs"][keys[0]], adapter_name=keys[0])
    for key in keys[1:]:
        peft.load_adapter(adapters["dirs"][key], adapter_name=key)
    ids = torch.tensor([loaded.tokenizer(PROMPTS[0])["input_ids"]] * 3)
    # Adapters 0 and 1 in the engine's two slots (the batcher thread is idle between requests).
    slots = loaded.batcher.slots
    from app.inference.lora import read_adapter

    for slot, key in enumerate(keys[:2], start=1):
        slots.install(read_adapter(adapters["dirs"][key], key), slot)
    slots.batch([1, 0, 2])
    with torch.inference_mode():
        mixed = loaded.model(input_ids=ids).logits
        expected = []
        for row, key in enumerate((keys[0], None, keys[1])):
            if key is None:
                with peft.disable_adapter():
                    expected.append(peft(input_ids=ids[row : row + 1]).logits[0])
            else:
                peft.set_adapter(key)
                expected.append(peft(input_ids=ids[row : row + 1]).logits[0])
    for row in range(3):
        torch.testing.assert_close(mixed[row], expected[row], rtol=1e-4, atol=1e-4)


def test_greedy_text_is_transformers_generate_with_peft(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    """Token by token what PEFT's model gives with transformers' `generate`: the decode steps
    (positions, cache, mask) are those of a plain forward pass over the whole sequence."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapters["location"])
    key, directory = next(iter(adapters["dirs"].items()))
    base = AutoModelForCausalLM.from_pretrained(adapters["location"])
    peft = PeftModel.from_pretrained(base, directory).eval()
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = peft.generate(
                input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False, min_length=0
            )
        expected = tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True)
        ours = engine.generate(
            generation(settings, tiny_model, key, prompt=prompt, max_new_tokens=16)
        )
        assert ours.text == expected


def test_a_new_request_joins_a_running_batch(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    from app.inference.engine import GenerationResult

    key = next(iter(adapters["dirs"]))
    long = generation(settings, tiny_model, prompt=PROMPTS[1], max_new_tokens=300)
    short = generation(settings, tiny_model, key, prompt=PROMPTS[2], max_new_tokens=8)
    expected_short = engine.generate(short)
    with engine.stream(long) as stream:
        next(stream)  # the long one is decoding
        assert engine.generate(short) == expected_short  # joined it, and finished first
        assert not engine._models[tiny_model].batcher.waiting
        rest = list(stream)
    assert isinstance(rest[-1], GenerationResult)
    assert rest[-1].completion_tokens == 300


def test_adapters_are_evicted_and_loaded_again(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    keys = [*adapters["dirs"]]  # three adapters, two slots
    first = [engine.generate(generation(settings, tiny_model, key)).text for key in keys]
    assert engine.loaded_adapter_ids() == frozenset(keys[1:])  # the oldest went
    again = engine.generate(generation(settings, tiny_model, keys[0])).text
    assert again == first[0]
    assert keys[0] in engine.loaded_adapter_ids()
    assert len(engine.loaded_adapter_ids()) == 2


def test_three_adapters_at_once_wait_for_a_slot(
    engine: Any, settings: Any, tiny_model: str, adapters: Any
) -> None:
    keys = [*adapters["dirs"]]
    requests = [generation(settings, tiny_model, key, max_new_tokens=20) for key in keys]
    alone = [engine.generate(request).text for request in requests]
    assert [r.text for r in run_together(engine, requests)] == alone


def test_cancelling_drops_the_request_and_frees_the_batch(
    engine: Any, settings: Any, tiny_model: str, caplog: pytest.LogCaptureFixture
) -> None:
    from app.inference.engine import GenerationResult, TextDelta

    cancelled = threading.Event()
    request = generation(settings, tiny_model, prompt=PROMPTS[3], max_new_tokens=1000)
    with caplog.at_level("INFO", logger="app.inference.batching"):
        with engine.stream(request, cancelled) as stream:
            items = [next(stream)]
            cancelled.set()
            items += list(stream)
        assert not any(isinstance(item, GenerationResult) for item in items)
        assert all(isinstance(item, TextDelta) for item in items)
        deadline = time.monotonic() + 5
        while engine._models[tiny_model].batcher.rows and time.monotonic() < deadline:
            time.sleep(0.01)
    assert not engine._models[tiny_model].batcher.rows
    assert any("generation cancelled after" in record.message for record in caplog.records)
    assert engine.generate(generation(settings, tiny_model, max_new_tokens=3)).completion_tokens


def test_stop_sequences_sampling_and_seeds(engine: Any, settings: Any, tiny_model: str) -> None:
    greedy = engine.generate(generation(settings, tiny_model, max_new_tokens=20))
    cut = greedy.text[len(greedy.text) // 2 :][:3]
    if cut.strip():
        stopped = engine.generate(generation(settings, tiny_model, max_new_tokens=20, stop=[cut]))
        assert stopped.finish_reason == "stop"
        assert stopped.text == greedy.text[: greedy.text.find(cut)]
    sampled = generation(settings, tiny_model, temperature=1.0, top_p=0.9, seed=7)
    assert engine.generate(sampled).text == engine.generate(sampled).text  # same seed


def test_bad_adapters_are_refused_before_streaming(
    engine: Any, settings: Any, tiny_model: str, tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from app.inference.lora import AdapterNotLoadable
    from app.storage import artifact_store

    store = artifact_store(settings)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    store.put_dir(pickled, "adapters/adapter-pickled")
    with pytest.raises(AdapterNotLoadable) as refused:
        engine.stream(generation(settings, tiny_model, "adapter-pickled"))
    assert refused.value.code == "adapter_not_safetensors"

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(4, 999),
            f"{prefix}.lora_B.weight": torch.zeros(64, 4),
        },
        str(wrong / "adapter_model.safetensors"),
    )
    store.put_dir(wrong, "adapters/adapter-wrong")
    with pytest.raises(AdapterNotLoadable, match="expected"):
        engine.stream(generation(settings, tiny_model, "adapter-wrong"))
    assert engine.generate(generation(settings, tiny_model, max_new_tokens=2)).completion_tokens


def test_bf16_serves_with_fp32_lora_weights(settings: Any, tiny_model: str, adapters: Any) -> None:
    from app.inference.engine import InferenceEngine

    engine = InferenceEngine(settings.model_copy(update={"inference_precision": "bf16"}))
    try:
        key = next(iter(adapters["dirs"]))
        result = engine.generate(generation(settings, tiny_model, key, max_new_tokens=12))
        assert result.completion_tokens == 12
        loaded = engine._models[tiny_model]
        assert loaded.dtype == "bfloat16"
        assert next(loaded.model.parameters()).dtype == torch.bfloat16
        layers = loaded.batcher.slots.layers.values()
        assert all(layer.AT.dtype == layer.B.dtype == torch.float32 for layer in layers)
        # On a CPU with oneDNN, the layers' weights were packed once, in the batch thread.
        from app.inference.packed import PackedLinear, can_pack

        if can_pack(torch.device("cpu"), torch.bfloat16):
            assert all(isinstance(layer.base, PackedLinear) for layer in layers)
            assert isinstance(loaded.model.lm_head, PackedLinear)
        # 12 steps alone: the adapter was merged into a copy of the weights (packed too).
        assert all(layer.merged_slot == 1 for layer in layers if layer.used[1])
    finally:
        engine.close()
