"""Sizes of a base model that plans need (parameters, width, depth, vocabulary, linear layers,
one decoder layer), read from its config on the meta device: no weights are loaded."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from app.base_models.loading import BaseModelUnavailable, hub_kwargs, model_location
from app.base_models.registry import BaseModel
from app.settings import Settings


@dataclass(frozen=True)
class ModelFacts:
    params: int
    hidden_size: int
    layers: int
    vocab_size: int
    # Linear layers LoRA may target (the output head excluded): (module path, in, out).
    linear_layers: tuple[tuple[str, int, int], ...]
    # One decoder layer (what FSDP gathers whole at a time): its parameters, and those of its
    # linear layers (what quantization shrinks). 0: not known.
    layer_params: int = 0
    layer_linear_params: int = 0

    @property
    def linear_params(self) -> int:
        """Weights of the linear layers (the output head excluded): what quantization shrinks."""
        return sum(fan_in * fan_out for _name, fan_in, fan_out in self.linear_layers)

    def lora_params(self, r: int, target_modules: str | list[str]) -> int:
        """Parameters of a LoRA adapter: r x (in + out) per targeted layer, matched as PEFT
        does ("all-linear", or a name equal to the path or to its last components)."""
        total = 0
        for name, fan_in, fan_out in self.linear_layers:
            if target_modules == "all-linear" or any(
                name == target or name.endswith("." + target) for target in target_modules
            ):
                total += r * (fan_in + fan_out)
        return total


def model_facts(settings: Settings, model: BaseModel) -> ModelFacts:
    location = model_location(settings, model)
    kwargs = hub_kwargs(settings, model)
    return _model_facts(location, kwargs.get("revision"), kwargs.get("cache_dir"))


@lru_cache(maxsize=8)
def _model_facts(location: str, revision: str | None, cache_dir: str | None) -> ModelFacts:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hub = {"revision": revision, "cache_dir": cache_dir} if cache_dir else {}
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False, **hub)
        # The meta device is per thread; dtype=None leaves torch's global default dtype alone.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                config, dtype=None, trust_remote_code=False
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BaseModelUnavailable(
            f"Cannot read the architecture of the base model at {location} ({exc})."
        ) from exc
    text: Any = config.get_text_config()  # hidden_size etc. are per-architecture attributes
    head = model.get_output_embeddings()
    linear_layers = tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    layers = int(text.num_hidden_layers)
    layer_params, layer_linear_params = _decoder_layer(model, layers, linear_layers)
    return ModelFacts(
        params=sum(parameter.numel() for parameter in model.parameters()),
        hidden_size=int(text.hidden_size),
        layers=layers,
        vocab_size=int(text.vocab_size),
        linear_layers=linear_layers,
        layer_params=layer_params,
        layer_linear_params=layer_linear_params,
    )


def _decoder_layer(
    model: Any, layers: int, linear_layers: tuple[tuple[str, int, int], ...]
) -> tuple[int, int]:
    """Parameters of the first decoder layer, and of its linear layers: the first module list
    as long as the model is deep (`model.layers` in Llama-like models). (0, 0) when none is."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers and layers:
            prefix = f"{name}.0."
            linear = sum(
                fan_in * fan_out
                for path, fan_in, fan_out in linear_layers
                if path.startswith(prefix)
            )
            return sum(parameter.numel() for parameter in module[0].parameters()), linear
    return 0, 0
