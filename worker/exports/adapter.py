"""A PEFT LoRA adapter folder read as updates to the base model's tensors, by their names.

Only what merges into plain weights is accepted: LoRA on linear and embedding layers (rsLoRA,
rank and alpha patterns included), DoRA on linear layers, whole modules saved with the adapter
(`modules_to_save`) and trained biases. Anything else is refused by name rather than merged wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.exports.errors import ExportError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves every tensor under the wrapper's prefix, whatever the task type.
_KEY_PREFIX = "base_model.model."
_LORA_PARTS = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_embedding_A": "embedding_a",
    ".lora_embedding_B": "embedding_b",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
# Options whose trained result is not a change to plain weights, or that change the model's shape.
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}
# Initialisations that also rewrite the base weights when training starts: such an adapter fits
# the rewritten base, not the one on disk, unless PEFT converted it when saving.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraUpdate:
    """One layer's low-rank update, as PEFT applies it (float32 factors)."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False
    magnitude: torch.Tensor | None = None  # DoRA's learned norm of each output row

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The shape of the base weight this update fits."""
        if self.embedding:  # A is (r, vocabulary), B is (width, r)
            return (self.lora_a.shape[1], self.lora_b.shape[0])
        rows, columns = self.lora_b.shape[0], self.lora_a.shape[1]
        return (columns, rows) if self.fan_in_fan_out else (rows, columns)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in float32: W + scale·(B @ A), DoRA-rescaled when trained with DoRA."""
        weight = weight.float()
        delta = self.scale * (self.lora_b @ self.lora_a)
        if self.embedding or self.fan_in_fan_out:
            delta = delta.T
        if self.magnitude is None:
            return weight + delta
        # DoRA (PEFT's DoraLinearVariant.merge_safe): each output row of W + ΔW is rescaled so its
        # L2 norm becomes the learned magnitude; rows are dim 0 unless stored fan-in first.
        merged = weight + delta
        rows = merged.T if self.fan_in_fan_out else merged
        rows = rows * (self.magnitude.float() / rows.norm(dim=1)).unsqueeze(1)
        rescaled: torch.Tensor = rows.T if self.fan_in_fan_out else rows
        return rescaled


@dataclass
class LoraAdapter:
    """An adapter's changes, each keyed by the base model tensor it changes (`...q_proj.weight`)."""

    updates: dict[str, LoraUpdate] = field(default_factory=dict)
    # Base weights saved with the adapter (PEFT does for embeddings it trains): they overwrite the
    # base weight in place, so a weight tied to it sees them too.
    saved_base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    # Whole modules trained and saved with the adapter (modules_to_save), and trained biases.
    replaced_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    ties_adapters: bool = False  # PEFT's ensure_weight_tying

    def changes(self, name: str) -> bool:
        return name in self.updates or name in self.replaced_weights

    def targets(self) -> set[str]:
        return set(self.updates) | set(self.replaced_weights) | set(self.saved_base_weights)

    def expected_shape(self, name: str) -> tuple[int, ...]:
        if name in self.updates:
            return self.updates[name].weight_shape
        saved = self.replaced_weights.get(name)
        if saved is None:
            saved = self.saved_base_weights[name]
        return tuple(saved.shape)

    def merged(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """The tensor `name` becomes, from its base weight (saved base weights already applied)."""
        weight = self.replaced_weights.get(name, base_weight)
        update = self.updates.get(name)
        return weight if update is None else update.apply(weight)


def read_adapter(adapter_dir: Path) -> LoraAdapter:
    from safetensors.torch import load_file

    config = _read_config(adapter_dir)
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        found = "adapter_model.bin" if (adapter_dir / "adapter_model.bin").is_file() else "nothing"
        raise ExportError(
            f"No {ADAPTER_WEIGHTS} in {adapter_dir} (found {found}): only adapters saved as "
            "safetensors can be exported."
        )
    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    adapter = LoraAdapter(ties_adapters=bool(config.get("ensure_weight_tying")))
    for key, tensor in load_file(weights_file).items():
        if not key.startswith(_KEY_PREFIX):
            raise ExportError(f"Unexpected tensor {key!r} in {weights_file}: not saved by PEFT.")
        name = key.removeprefix(_KEY_PREFIX)
        for suffix, part in _LORA_PARTS.items():
            if name.endswith(suffix):
                parts[name.removesuffix(suffix)][part] = tensor
                break
        else:
            if ".lora_" in name:
                raise ExportError(f"The adapter has {key!r}, a LoRA tensor that cannot be merged.")
            if ".base_layer." in name:
                adapter.saved_base_weights[name.replace(".base_layer.", ".")] = tensor
            else:
                adapter.replaced_weights[name] = tensor
    for module, module_parts in parts.items():
        adapter.updates[f"{module}.weight"] = _lora_update(module, module_parts, config)
    return adapter


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise ExportError(f"No {ADAPTER_CONFIG} in {adapter_dir}: not a PEFT adapter folder.")
    config: dict[str, Any] = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ExportError(
            f"The adapter is of PEFT type {config.get('peft_type')!r}; only LORA can be merged."
        )
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise ExportError(f"The adapter uses {what}, which cannot be merged into the base.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ExportError(
            f"The adapter was initialised with init_lora_weights={init!r}, which also changed the "
            "base weights it was trained on; save it with PEFT's "
            "path_initial_model_for_weight_conversion to get an adapter of the original base."
        )
    return config


def _lora_update(module: str, parts: dict[str, torch.Tensor], config: dict[str, Any]) -> LoraUpdate:
    embedding = "embedding_a" in parts or "embedding_b" in parts
    lora_a = parts.get("embedding_a" if embedding else "lora_a")
    lora_b = parts.get("embedding_b" if embedding else "lora_b")
    if lora_a is None or lora_b is None:
        raise ExportError(f"The adapter has only half of the LoRA pair of {module}.")
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        raise ExportError(f"LoRA on {module}, not a linear or embedding layer, cannot be merged.")
    magnitude = parts.get("magnitude")
    if magnitude is not None and embedding:
        raise ExportError(f"DoRA on the embedding layer {module} is not supported.")
    rank = lora_a.shape[0]
    expected_rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    if rank != expected_rank:
        raise ExportError(
            f"{module}: LoRA rank {rank} in the weights, {expected_rank} in the config."
        )
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraUpdate(
        module=module,
        lora_a=lora_a.float(),
        lora_b=lora_b.float(),
        scale=scale,
        embedding=embedding,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not embedding,
        magnitude=None if magnitude is None else magnitude.float(),
    )


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """A module's rank or alpha, matched as PEFT does (`peft.utils.other.get_pattern_key`)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default
