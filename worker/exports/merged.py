"""Merge a LoRA adapter into its base model, giving a Hugging Face safetensors folder.

The base is read one tensor at a time and written one shard at a time, in the base's own shard
layout, so memory holds one shard of output plus the adapter, never two copies of the model.
Each changed weight is computed in float32 (W + scale·B@A, or DoRA's form) and then cast.

Tied embeddings: when the base ties its output head to its input embedding and the adapter
changes either of them, the merged model is untied (both written, `tie_word_embeddings: false`).
That is what the adapter does at run time: PEFT changes only the module it trained and the other
keeps the base weight. An adapter trained with `ensure_weight_tying` is refused instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from worker.exports.adapter import LoraAdapter, read_adapter
from worker.exports.errors import ExportError

if TYPE_CHECKING:
    import torch

MergeDtype = Literal["float16", "bfloat16", "float32"]
ProgressCallback = Callable[[int, int], None]

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
OUTPUT_HEAD = "lm_head.weight"
_INPUT_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in)\.weight$")


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: MergeDtype = "float16",
    on_progress: ProgressCallback | None = None,
) -> Path:
    """Write base model + adapter as one model in `out_dir` (created; it must not exist yet).

    `out_dir` appears only once complete: everything is written in a hidden sibling folder that
    is renamed at the end. `on_progress(done_tensors, total_tensors)` follows each tensor.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    output_dtype = _torch_dtype(dtype)
    if out_dir.exists():
        raise ExportError(f"{out_dir} already exists: export into a new folder.")
    base = _BaseModel.read(base_dir)
    adapter = read_adapter(adapter_dir)
    tie = _tied_weights(base)
    untie = tie is not None and any(adapter.changes(name) for name in tie)
    if untie and adapter.ties_adapters:
        raise ExportError(
            "The adapter was trained with ensure_weight_tying on tied embeddings, which this "
            "export does not merge."
        )
    _check_adapter_fits(adapter, base, tie)

    written = sum(len(names) for names in base.shards.values())
    if untie and OUTPUT_HEAD not in base.shapes:
        written += 1
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent)
    )
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for shard, names in base.shards.items():
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(base_dir / shard, framework="pt") as reader:
                for name in names:
                    if untie and name == OUTPUT_HEAD:
                        continue  # written from the embedding's base weight, next to it
                    weight = _base_weight(name, reader, adapter, tie)
                    tensors[name] = _cast(adapter.merged(name, weight), output_dtype)
                    if untie and tie is not None and name == tie[0]:
                        tensors[OUTPUT_HEAD] = _cast(
                            adapter.merged(OUTPUT_HEAD, weight), output_dtype
                        )
                    if on_progress is not None:
                        on_progress(len(weight_map) + len(tensors), written)
            save_file(tensors, staging / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            total_size += sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
            del tensors
        if base.sharded:
            index = {
                "metadata": {"total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (staging / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        _write_config(base.config, staging, dtype=dtype, untie=untie)
        _copy_model_files(base_dir, adapter_dir, staging)
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


@dataclass(frozen=True)
class _BaseModel:
    """A base model folder: its config and which tensors (of which shapes) each shard holds."""

    config: dict[str, Any]
    shards: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]]
    sharded: bool

    @classmethod
    def read(cls, base_dir: Path) -> _BaseModel:
        from safetensors import safe_open

        config_file = base_dir / "config.json"
        if not config_file.is_file():
            raise ExportError(f"No config.json in {base_dir}: not a Hugging Face model folder.")
        config: dict[str, Any] = json.loads(config_file.read_text())
        if "quantization_config" in config:
            raise ExportError("The base model is quantized; merge into its unquantized weights.")
        if (base_dir / SHARD_INDEX).is_file():
            weight_map: dict[str, str] = json.loads((base_dir / SHARD_INDEX).read_text())[
                "weight_map"
            ]
            shards: dict[str, list[str]] = {}
            for name, shard in weight_map.items():
                shards.setdefault(shard, []).append(name)
            sharded = True
        elif (base_dir / SINGLE_FILE).is_file():
            shards, sharded = {SINGLE_FILE: []}, False
        else:
            raise ExportError(
                f"No {SINGLE_FILE} or {SHARD_INDEX} in {base_dir}: only safetensors base models "
                "can be merged."
            )
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(shards):
            with safe_open(base_dir / shard, framework="pt") as reader:
                names = list(reader.keys()) if not sharded else shards[shard]
                for name in names:
                    shapes[name] = tuple(reader.get_slice(name).get_shape())
            shards[shard] = names
        return cls(
            config=config, shards=dict(sorted(shards.items())), shapes=shapes, sharded=sharded
        )


def _tied_weights(base: _BaseModel) -> tuple[str, str] | None:
    """(input embedding, output head) when the base ties them, else None."""
    if not _ties_word_embeddings(base.config):
        return None
    embeddings = [name for name in base.shapes if _INPUT_EMBEDDING.search(name)]
    return (embeddings[0], OUTPUT_HEAD) if len(embeddings) == 1 else None


def _ties_word_embeddings(config: dict[str, Any]) -> bool:
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    # Absent from the file: the config class's default decides (it differs between models).
    from transformers import AutoConfig

    try:
        defaults = AutoConfig.for_model(config["model_type"])
    except (KeyError, ValueError) as error:
        raise ExportError(
            f"The base model's config.json names no known model_type: {error}"
        ) from None
    return bool(getattr(defaults, "tie_word_embeddings", False))


def _check_adapter_fits(
    adapter: LoraAdapter, base: _BaseModel, tie: tuple[str, str] | None
) -> None:
    for name in sorted(adapter.targets()):
        shape = base.shapes.get(name)
        if shape is None and tie is not None and name == tie[1]:
            shape = base.shapes[tie[0]]
        module = name.removesuffix(".weight")
        if shape is None:
            raise ExportError(
                f"The adapter changes {module}, which the base model does not have: was it "
                "trained on another base model?"
            )
        expected = adapter.expected_shape(name)
        if shape != expected:
            raise ExportError(
                f"The adapter does not fit this base model: {module} is {_shape_text(shape)} in "
                f"the base model and {_shape_text(expected)} in the adapter. Was it trained on "
                "another base model?"
            )


def _base_weight(
    name: str, reader: Any, adapter: LoraAdapter, tie: tuple[str, str] | None
) -> torch.Tensor:
    # A base weight saved with the adapter overwrites the base in place, tied partner included.
    for candidate in tie if tie is not None and name in tie else (name,):
        if candidate in adapter.saved_base_weights:
            return adapter.saved_base_weights[candidate]
    tensor: torch.Tensor = reader.get_tensor(name)
    return tensor


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor.contiguous()


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if name not in dtypes:
        raise ExportError(f"dtype {name!r}: use one of {', '.join(dtypes)}.")
    return dtypes[name]


def _write_config(config: dict[str, Any], out_dir: Path, *, dtype: str, untie: bool) -> None:
    config = dict(config, dtype=dtype)
    if "torch_dtype" in config:  # written by transformers 4
        config["torch_dtype"] = dtype
    if untie:
        config["tie_word_embeddings"] = False
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_model_files(base_dir: Path, adapter_dir: Path, out_dir: Path) -> None:
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out_dir)
    # The tokenizer as a whole, from one place: the adapter's if it was saved with one (it may
    # carry a chat template of its own), else the base model's.
    has_tokenizer = any(
        (adapter_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )
    tokenizer_dir = adapter_dir if has_tokenizer else base_dir
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir)
    if (tokenizer_dir / "additional_chat_templates").is_dir():
        shutil.copytree(
            tokenizer_dir / "additional_chat_templates", out_dir / "additional_chat_templates"
        )


def _shape_text(shape: tuple[int, ...]) -> str:
    return "×".join(str(size) for size in shape)
