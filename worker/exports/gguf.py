"""A merged model folder written as one GGUF file, the format of llama.cpp and Ollama.

Tensor names, metadata keys and quantization come from the `gguf` package (llama.cpp's own
Python library). Tensors are streamed: their descriptions are written first, then each tensor is
read, converted and written on its own, so memory holds one tensor at a time.

Supported: Llama-architecture models (Llama, Mistral) and Qwen2, with a byte-level BPE
(GPT-2 style) tokenizer. Anything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np

from worker.exports.errors import ExportError
from worker.exports.merged import SHARD_INDEX, SINGLE_FILE

if TYPE_CHECKING:
    import torch

GgufQuantization = Literal["f16", "q8_0", "f32"]
ProgressCallback = Callable[[int, int], None]

# Hugging Face architecture -> (llama.cpp architecture, whether q/k rows are stored permuted).
# llama.cpp computes Llama's rotary embedding on adjacent pairs of a head's dimensions, where
# transformers rotates its two halves, so the Llama layout stores q_proj/k_proj rows reordered.
_ARCHITECTURES = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_Q8_0 = gguf.GGMLQuantizationType.Q8_0
_F16 = gguf.GGMLQuantizationType.F16
_F32 = gguf.GGMLQuantizationType.F32


@dataclass(frozen=True)
class _PlannedTensor:
    source: str  # name in the safetensors files
    shard: str
    name: str  # llama.cpp's name
    shape: tuple[int, ...]
    type: gguf.GGMLQuantizationType


def write_gguf(
    merged_dir: Path,
    out_file: Path,
    *,
    quantization: GgufQuantization = "f16",
    model_name: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Write the model in `merged_dir` (a merged export, or any supported safetensors folder) as
    the GGUF file `out_file`, which must not exist yet and appears only once complete.

    `quantization`: "f16" or "f32" for every matrix, or "q8_0" (8-bit blocks, about half of f16;
    a matrix whose rows do not split into 32-value blocks stays f16). 1-D tensors (norms, biases)
    stay f32 in every case. `model_name` goes into general.name (default: the folder's name).
    """
    from transformers import AutoConfig

    if quantization not in _FILE_TYPES:
        raise ExportError(
            f"GGUF quantization {quantization!r}: use one of {', '.join(_FILE_TYPES)}."
        )
    if out_file.exists():
        raise ExportError(f"{out_file} already exists: export into a new file.")
    raw_config = json.loads((merged_dir / "config.json").read_text())
    architecture = (raw_config.get("architectures") or ["(none)"])[0]
    if architecture not in _ARCHITECTURES:
        raise ExportError(
            f"GGUF export supports {', '.join(_ARCHITECTURES)}; this model is {architecture}."
        )
    arch, permutes_rope_rows = _ARCHITECTURES[architecture]
    config = AutoConfig.from_pretrained(merged_dir)
    plan = _plan_tensors(merged_dir, arch, config.num_hidden_layers, quantization)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(model_name or merged_dir.name)
        writer.add_type(gguf.GGUFType.MODEL)
        _add_hyperparameters(writer, config, quantization)
        _add_tokenizer(writer, merged_dir, config.vocab_size)
        for tensor in plan:
            block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.type]
            nbytes = int(np.prod(tensor.shape)) // block_size * type_size
            writer.add_tensor_info(
                tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=tensor.type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rope_heads = _rope_heads(config) if permutes_rope_rows else {}
        _write_tensor_data(writer, merged_dir, plan, rope_heads, on_progress)
        writer.close()
        os.replace(staging, out_file)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    return out_file


def _write_tensor_data(
    writer: gguf.GGUFWriter,
    merged_dir: Path,
    plan: list[_PlannedTensor],
    rope_heads: dict[str, int],
    on_progress: ProgressCallback | None,
) -> None:
    """Each tensor in plan order: read, reordered for llama.cpp's RoPE, converted, written."""
    from safetensors import safe_open

    with ExitStack() as files:
        readers = {
            shard: files.enter_context(safe_open(merged_dir / shard, framework="pt"))
            for shard in {tensor.shard for tensor in plan}
        }
        for done, tensor in enumerate(plan, start=1):
            data = readers[tensor.shard].get_tensor(tensor.source)
            heads = rope_heads.get(tensor.name.split(".")[-2])
            if heads is not None:
                data = _rotary_pairs_layout(data, heads)
            writer.write_tensor_data(gguf.quants.quantize(data.float().numpy(), tensor.type))
            if on_progress is not None:
                on_progress(done, len(plan))


def _rope_heads(config: Any) -> dict[str, int]:
    """The head counts of the projections whose rows llama.cpp's Llama layout reorders."""
    heads: int = config.num_attention_heads
    return {"attn_q": heads, "attn_k": getattr(config, "num_key_value_heads", None) or heads}


def _plan_tensors(
    merged_dir: Path, arch: gguf.MODEL_ARCH, block_count: int, quantization: str
) -> list[_PlannedTensor]:
    from safetensors import safe_open

    if (merged_dir / SHARD_INDEX).is_file():
        weight_map: dict[str, str] = json.loads((merged_dir / SHARD_INDEX).read_text())[
            "weight_map"
        ]
    elif (merged_dir / SINGLE_FILE).is_file():
        with safe_open(merged_dir / SINGLE_FILE, framework="pt") as reader:
            weight_map = dict.fromkeys(reader.keys(), SINGLE_FILE)
    else:
        raise ExportError(f"No {SINGLE_FILE} or {SHARD_INDEX} in {merged_dir}.")
    names = gguf.get_tensor_name_map(arch, block_count)
    plan = []
    for shard in sorted(set(weight_map.values())):
        with safe_open(merged_dir / shard, framework="pt") as reader:
            for source in sorted(name for name, file in weight_map.items() if file == shard):
                if source.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed by every runtime
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(
                        f"The tensor {source} has no llama.cpp name: cannot write it."
                    )
                shape = tuple(reader.get_slice(source).get_shape())
                plan.append(
                    _PlannedTensor(source, shard, name, shape, _tensor_type(shape, quantization))
                )
    return plan


def _tensor_type(shape: tuple[int, ...], quantization: str) -> gguf.GGMLQuantizationType:
    if len(shape) < 2 or quantization == "f32":
        return _F32
    if quantization == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[_Q8_0][0] == 0:
        return _Q8_0
    return _F16


def _rotary_pairs_layout(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Within each head, reorder q/k rows from the two-halves layout to interleaved pairs
    (rows 0, d/2, 1, d/2+1, ...): what llama.cpp's Llama graph expects and transformers' GGUF
    reader undoes."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any, quantization: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = dict(
        getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    )
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type != "default":
        raise ExportError(f"RoPE scaling {rope_type!r} is not supported by the GGUF export.")
    writer.add_file_type(_FILE_TYPES[quantization])
    if quantization == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary, and the chat template."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"No tokenizer.json in {model_dir}: the GGUF file needs the tokenizer.")
    tokenizer = json.loads(path.read_text())
    model = tokenizer.get("model") or {}
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise ExportError(
            "GGUF export writes byte-level BPE (GPT-2 style) tokenizers; this one is a "
            f"{model.get('type')} model with a {decoder} decoder"
            f"{' and byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}."
        )
    tokens, token_types = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # Merges, special token ids, add_bos/add_eos and the chat template, as llama.cpp reads them.
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    adds_bos, adds_eos = _added_special_tokens(path, special.special_token_ids)
    special.add_special_token.setdefault("bos", adds_bos)
    special.add_special_token.setdefault("eos", adds_eos)
    special.add_to_gguf(writer, quiet=True)


def _vocabulary(tokenizer: dict[str, Any], vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, gguf.TokenType.NORMAL)
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    if max(by_id) >= vocab_size:
        raise ExportError(
            f"The tokenizer has ids up to {max(by_id)} but the model's vocabulary has "
            f"{vocab_size} rows."
        )
    # Rows past the tokenizer (a vocabulary padded for speed) get placeholder names, as llama.cpp's
    # converter writes them.
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)]
    token_types = [int(types.get(index, gguf.TokenType.UNUSED)) for index in range(vocab_size)]
    return tokens, token_types


def _pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (tokenizer.ggml.pre)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and steps[1].get("use_regex", True)
    ):
        return "smollm"  # llama.cpp: each digit alone, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        name = _names_of_split_patterns().get(regex) if isinstance(regex, str) else None
        if name is not None:
            return name
    raise ExportError(
        f"The tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
        "name this export knows, so llama.cpp would split text differently."
    )


def _names_of_split_patterns() -> dict[str, str]:
    """Split regexes -> llama.cpp pre-tokenizer names (Llama 3, Qwen2, ...), from the table
    transformers' GGUF reader uses to rebuild them, so that a written file reads back the same."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:
        return {}
    names: dict[str, str] = {}
    for name, pattern in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(pattern, name)
    return names


def _added_special_tokens(tokenizer_file: Path, special_ids: dict[str, int]) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before, and EOS after, an encoded text by itself."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode("a").ids
    bos, eos = special_ids.get("bos"), special_ids.get("eos")
    return (bool(ids) and ids[0] == bos, len(ids) > 1 and ids[-1] == eos)
