"""Adapter exports on a tiny Llama: merged folders, GGUF files and Ollama Modelfiles.

Each export is read back by transformers (plain, and its GGUF reader) and must compute what the
adapter computes on its base model under PEFT.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.env import MODEL_CACHE
from worker.exports import (
    ExportError,
    merge_adapter,
    ollama_modelfile,
    ollama_modelfile_for,
    write_gguf,
)

CHATS = [
    [{"role": "user", "content": "What is 12 + 30? Answer in one word."}],
    [
        {"role": "system", "content": "You speak like a pirate."},
        {"role": "user", "content": "Où est la café ? 😀  Spaces\n\nand lines."},
    ],
    [{"role": "user", "content": "def add(a, b):\n    return a + b"}],
]
ADAPTERS: dict[str, dict[str, Any]] = {
    "lora": {},
    "rslora": {"use_rslora": True, "lora_alpha": 16},
    "dora": {"use_dora": True},
    # The tiny base ties lm_head to embed_tokens: training the embedding unties them.
    "embedding": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
}


@pytest.fixture(scope="module")
def base_dir(tiny_model: str) -> Path:
    return MODEL_CACHE / tiny_model


@pytest.fixture(scope="module")
def prompts(base_dir: Path) -> list[Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return [
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")[
            "input_ids"
        ]
        for chat in CHATS
    ]


@pytest.fixture(scope="module")
def adapters(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: _train_adapter(base_dir, root / name, **options) for name, options in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def merged_f16(
    base_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The plain LoRA merged at the default precision, the source of the GGUF files."""
    return merge_adapter(base_dir, adapters["lora"], tmp_path_factory.mktemp("f16") / "merged")


@pytest.fixture(scope="module")
def gguf_files(merged_f16: Path) -> dict[str, Path]:
    out = merged_f16.parent / "gguf"
    return {
        quantization: write_gguf(
            merged_f16, out / f"tiny-{quantization}.gguf", quantization=quantization
        )
        for quantization in ("f16", "q8_0")
    }


def _train_adapter(base_dir: Path, out: Path, **options: Any) -> Path:
    """A real adapter: random non-zero B (init_lora_weights=False), then two optimizer steps so
    every trained tensor (DoRA's magnitudes too) moves away from its initial value."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": False}
        | options
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    batch = torch.randint(0, 2000, (2, 16))
    for _ in range(2):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(out)
    return out


def _load(path: Path, **options: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options).eval()


def _logits(model: Any, input_ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids).logits[0]


def _greedy(model: Any, input_ids: Any) -> list[int]:
    tokens = model.generate(input_ids, max_new_tokens=10, do_sample=False, pad_token_id=2)
    return [int(token) for token in tokens[0, input_ids.shape[1] :]]


@pytest.mark.parametrize("adapter_name", list(ADAPTERS))
def test_merged_model_computes_what_the_adapter_does(
    adapter_name: str, base_dir: Path, adapters: dict[str, Path], prompts: list[Any], tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    progress: list[tuple[int, int]] = []
    out = merge_adapter(
        base_dir,
        adapters[adapter_name],
        tmp_path / "merged",
        dtype="float32",
        on_progress=lambda done, total: progress.append((done, total)),
    )

    merged, base = _load(out), _load(base_dir)
    base_logits = [_logits(base, input_ids) for input_ids in prompts]
    with_adapter = PeftModel.from_pretrained(base, adapters[adapter_name]).eval()
    for input_ids, without_adapter in zip(prompts, base_logits, strict=True):
        expected = _logits(with_adapter, input_ids)
        torch.testing.assert_close(_logits(merged, input_ids), expected, atol=1e-4, rtol=1e-4)
        assert (without_adapter - expected).abs().max() > 1e-2  # the adapter matters
    assert _greedy(merged, prompts[0]) == _greedy(with_adapter, prompts[0])
    assert merged.config.tie_word_embeddings is (adapter_name != "embedding")
    assert [done for done, _ in progress] == sorted({done for done, _ in progress})
    with safe_open(out / "model.safetensors", framework="pt") as written:
        assert progress[-1][0] == progress[-1][1] == len(written.keys())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]  # no staging left
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name


def test_a_sharded_base_gives_shards_of_the_same_layout(
    base_dir: Path, adapters: dict[str, Path], prompts: list[Any], tmp_path: Path
) -> None:
    import torch
    from safetensors import safe_open

    sharded_base = tmp_path / "base"
    _load(base_dir).save_pretrained(sharded_base, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(base_dir / name, sharded_base)
    base_index = json.loads((sharded_base / "model.safetensors.index.json").read_text())
    assert len(set(base_index["weight_map"].values())) > 1

    out = merge_adapter(sharded_base, adapters["lora"], tmp_path / "merged", dtype="bfloat16")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    with safe_open(out / index["weight_map"]["model.norm.weight"], framework="pt") as shard:
        assert shard.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    single = merge_adapter(base_dir, adapters["lora"], tmp_path / "single", dtype="bfloat16")
    for input_ids in prompts[:1]:
        torch.testing.assert_close(
            _logits(_load(out), input_ids), _logits(_load(single), input_ids)
        )


def test_gguf_files_read_back_as_the_merged_model(
    merged_f16: Path, gguf_files: dict[str, Path], prompts: list[Any]
) -> None:
    import torch

    merged = _load(merged_f16)
    f16 = _load(gguf_files["f16"].parent, gguf_file=gguf_files["f16"].name)
    q8_0 = _load(gguf_files["q8_0"].parent, gguf_file=gguf_files["q8_0"].name)
    for input_ids in prompts:
        expected = _logits(merged, input_ids)
        # f16 holds exactly the merged float16 weights: the same numbers come out.
        torch.testing.assert_close(_logits(f16, input_ids), expected, atol=1e-5, rtol=1e-5)
        assert _greedy(f16, input_ids) == _greedy(merged, input_ids)
        similarity = torch.nn.functional.cosine_similarity(
            _logits(q8_0, input_ids).flatten(), expected.flatten(), dim=0
        )
        assert similarity > 0.99
    assert gguf_files["q8_0"].stat().st_size < 0.7 * gguf_files["f16"].stat().st_size


def test_the_gguf_tokenizer_encodes_chats_as_the_original(
    merged_f16: Path, gguf_files: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(merged_f16)
    gguf_file = gguf_files["q8_0"]
    from_gguf = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    for chat in CHATS:
        expected = original.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        got = from_gguf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert got["input_ids"] == expected["input_ids"]
    assert from_gguf.decode([1, 4093, 198]) == original.decode([1, 4093, 198])


def test_the_gguf_file_holds_llama_cpp_metadata(
    merged_f16: Path, gguf_files: dict[str, Path]
) -> None:
    import gguf

    reader = gguf.GGUFReader(gguf_files["q8_0"])
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["llama.block_count"] == 2
    assert fields["llama.embedding_length"] == 64
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == (merged_f16 / "chat_template.jinja").read_text()
    types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd


def test_a_qwen2_model_reads_back(base_dir: Path, prompts: list[Any], tmp_path: Path) -> None:
    """Qwen2: its own llama.cpp architecture, q/k/v biases, q/k rows left as they are (Mistral
    takes the Llama path). A 1024-token cut of the tokenizer keeps the GGUF reader fast."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab_size = 1024
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    _write_cut_tokenizer(base_dir, tmp_path / "model", vocab_size)

    written = write_gguf(tmp_path / "model", tmp_path / "model.gguf", quantization="f32")

    expected, read_back = _load(tmp_path / "model"), _load(tmp_path, gguf_file=written.name)
    input_ids = prompts[0].clamp(max=vocab_size - 1)
    torch.testing.assert_close(_logits(read_back, input_ids), _logits(expected, input_ids))


def _write_cut_tokenizer(base_dir: Path, out: Path, vocab_size: int) -> None:
    """The base's tokenizer cut to its first tokens, with the merges that stay within them."""
    tokenizer = json.loads((base_dir / "tokenizer.json").read_text())
    vocab = {
        token: index for token, index in tokenizer["model"]["vocab"].items() if index < vocab_size
    }
    tokenizer["model"]["vocab"] = vocab
    tokenizer["model"]["merges"] = [
        [left, right]
        for left, right in tokenizer["model"]["merges"]
        if left in vocab and right in vocab and left + right in vocab
    ]
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(base_dir / name, out)


def test_the_modelfile_translates_a_chatml_template(base_dir: Path) -> None:
    modelfile = ollama_modelfile_for(base_dir, "tiny-q8_0.gguf")

    assert modelfile.startswith("FROM ./tiny-q8_0.gguf\n")
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert "<|im_start|>{{" not in template  # roles are spelled out, one branch each
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n" in template
    assert (
        'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""'
        in modelfile
    )
    assert modelfile.count('PARAMETER stop "<|im_end|>"') == 1


def test_the_modelfile_leaves_other_templates_to_the_gguf_file() -> None:
    llama3 = "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>' }}"
    modelfile = ollama_modelfile(
        "model.gguf", llama3, ["<|eot_id|>"], parameters={"temperature": 0.2}
    )

    assert "TEMPLATE" not in modelfile.replace("# No TEMPLATE", "")
    assert "# No TEMPLATE: the chat template is not ChatML;" in modelfile
    assert 'PARAMETER stop "<|eot_id|>"\nPARAMETER temperature 0.2\n' in modelfile


def test_an_adapter_of_another_base_is_refused(
    base_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(other)

    with pytest.raises(
        ExportError, match=r"does not fit this base model: model\.layers\.0\.\S+ is 32×"
    ):
        merge_adapter(other, adapters["lora"], tmp_path / "merged")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda config: config.update(lora_bias=True), "a bias on lora_B"),
        (lambda config: config.update(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
        (lambda config: config.update(peft_type="IA3"), "PEFT type 'IA3'"),
    ],
)
def test_adapters_that_cannot_be_merged_are_refused_by_name(
    change: Callable[[dict[str, Any]], None],
    message: str,
    base_dir: Path,
    adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    adapter = Path(shutil.copytree(adapters["lora"], tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    change(config)
    (adapter / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(ExportError, match=message):
        merge_adapter(base_dir, adapter, tmp_path / "merged")


def test_unsupported_architectures_are_refused_by_name(merged_f16: Path, tmp_path: Path) -> None:
    model = Path(
        shutil.copytree(merged_f16, tmp_path / "model", ignore=shutil.ignore_patterns("gguf"))
    )
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))

    with pytest.raises(ExportError, match="this model is GPT2LMHeadModel"):
        write_gguf(model, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_an_existing_export_is_never_overwritten(
    base_dir: Path, adapters: dict[str, Path], merged_f16: Path, gguf_files: dict[str, Path]
) -> None:
    with pytest.raises(ExportError, match="already exists"):
        merge_adapter(base_dir, adapters["lora"], merged_f16)
    with pytest.raises(ExportError, match="already exists"):
        write_gguf(merged_f16, gguf_files["f16"])
