"""Check an unpacked adapter against its base model before it is registered.

adapter_config.json must describe LoRA (rsLoRA and DoRA included). adapter_model.safetensors is
opened with safetensors (its header only; no tensor is read) and must hold exactly the lora_A /
lora_B weight pairs of linear layers the base model has, named as PEFT saves them
(`base_model.model.<module>.lora_A.weight`), shaped [r, in_features] and [out_features, r], and
for DoRA (`use_dora`) each module's magnitude (`….lora_magnitude_vector`), shaped [out_features].

The base model's layer shapes come from its config.json alone: the architecture is built on
torch's `meta` device, which allocates no memory and loads no weights.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.adapters.unpacking import CONFIG, WEIGHTS, refusal
from app.base_models.facts import model_facts
from app.base_models.registry import BaseModel
from app.settings import Settings

_WEIGHT = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.(?:lora_(?P<part>[AB])\.weight|lora_magnitude_vector)$"
)
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class LoraFacts:
    rank: int
    alpha: float
    target_modules: list[str] | str
    dropout: float = 0.0
    task_type: str | None = None  # PEFT's: CAUSAL_LM generates, SEQ_CLS (a reward model) scores
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # a magnitude vector per module beside the LoRA pair


def _config_invalid(reason: str, **detail: Any) -> Exception:
    return refusal(
        "adapter_config_invalid",
        f'{CONFIG}: {reason}. It must be PEFT\'s LoRA config, with peft_type "LORA", r, '
        "lora_alpha and target_modules.",
        file=CONFIG,
        **detail,
    )


def read_config(directory: Path) -> LoraFacts:
    """The LoRA facts of adapter_config.json; refused unless it is a plain LoRA config."""
    return parse_config((directory / CONFIG).read_bytes())


def parse_config(content: bytes) -> LoraFacts:
    """The LoRA facts of an adapter_config.json's bytes; refused unless plain LoRA."""
    try:
        config = json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _config_invalid("not UTF-8 text") from exc
    except ValueError as exc:
        raise _config_invalid(f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise _config_invalid("not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise refusal(
            "adapter_not_lora",
            f'{CONFIG} has peft_type {peft_type!r}; only LoRA adapters ("LORA") are imported.',
            file=CONFIG,
            field="peft_type",
        )
    rank, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _config_invalid(f"r is {rank!r}, not a positive integer", field="r")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise _config_invalid(f"lora_alpha is {alpha!r}, not a positive number", field="lora_alpha")
    names_ok = isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)
    if not (isinstance(targets, str) and targets) and not (names_ok and targets):
        raise _config_invalid(
            f"target_modules is {targets!r}, not a module name list or pattern",
            field="target_modules",
        )
    dropout = config.get("lora_dropout") or 0.0
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise _config_invalid(f"lora_dropout is {dropout!r}, not in [0, 1)", field="lora_dropout")
    task_type = config.get("task_type")
    flags = {name: config.get(name) or False for name in ("use_rslora", "use_dora")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise _config_invalid(f"{name} is {value!r}, not true or false", field=name)
    return LoraFacts(
        rank=rank,
        alpha=float(alpha),
        target_modules=targets,
        dropout=float(dropout),
        task_type=task_type if isinstance(task_type, str) else None,
        use_rslora=flags["use_rslora"],
        use_dora=flags["use_dora"],
    )


def _targeted(module: str, targets: list[str] | str) -> bool:
    """Whether PEFT would put LoRA on the module. A pattern string is taken as matching anything:
    it is the uploader's regex, never run here."""
    if isinstance(targets, str):
        return True
    return any(module == target or module.endswith(f".{target}") for target in targets)


def check_weights(directory: Path, facts: LoraFacts, shapes: dict[str, tuple[int, int]]) -> int:
    """Refuse weights that are not LoRA pairs fitting the base model's linear layers (shapes:
    module path -> (in_features, out_features)); return how many modules they adapt."""
    from safetensors import SafetensorError, safe_open

    pairs: dict[str, dict[str, tuple[str, list[int]]]] = {}
    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_slice(name)
                dtype, shape = tensor.get_dtype(), list(tensor.get_shape())
                match = _WEIGHT.match(name)
                if match is None or dtype not in _FLOAT_DTYPES:
                    raise _unexpected_tensor(name, dtype)
                part = match["part"] or "magnitude"
                if part == "magnitude" and not facts.use_dora:
                    raise _unexpected_tensor(name, dtype, f"{CONFIG} does not set use_dora")
                pairs.setdefault(match["module"], {})[part] = (name, shape)
    except SafetensorError as exc:
        raise refusal(
            "adapter_weights_invalid",
            f"{WEIGHTS} is not a valid safetensors file ({exc}).",
            file=WEIGHTS,
        ) from exc
    if not pairs:
        raise refusal("adapter_weights_invalid", f"{WEIGHTS} holds no tensors.", file=WEIGHTS)
    for module, pair in sorted(pairs.items()):
        _check_module(module, pair, facts, shapes)
    return len(pairs)


def _unexpected_tensor(name: str, dtype: str, why: str | None = None) -> Exception:
    reason = f" ({why})" if why else ""
    return refusal(
        "adapter_weights_invalid",
        f"{WEIGHTS} holds {name} ({dtype}){reason}; only floating-point LoRA weights named as "
        "PEFT saves them (base_model.model.<module>.lora_A.weight / .lora_B.weight, and "
        ".lora_magnitude_vector for DoRA) are accepted.",
        file=WEIGHTS,
        tensor=name,
    )


def _check_module(
    module: str,
    pair: dict[str, tuple[str, list[int]]],
    facts: LoraFacts,
    shapes: dict[str, tuple[int, int]],
) -> None:
    wanted = {"A", "B", "magnitude"} if facts.use_dora else {"A", "B"}
    if set(pair) != wanted:
        have = next(iter(pair.values()))[0]
        names = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"}
        lacking = " or ".join(names[part] for part in sorted(wanted - set(pair)))
        raise refusal(
            "adapter_weights_invalid",
            f"{WEIGHTS} has {have} but no {lacking} for {module}.",
            file=WEIGHTS,
            tensor=have,
        )
    a_name = pair["A"][0]
    if module not in shapes:
        raise refusal(
            "adapter_module_mismatch",
            f"{a_name} adapts {module}, which is not a linear layer of the base model: the "
            "adapter was trained on another model.",
            file=WEIGHTS,
            tensor=a_name,
            module=module,
        )
    if not _targeted(module, facts.target_modules):
        raise refusal(
            "adapter_module_mismatch",
            f"{a_name} adapts {module}, which {CONFIG}'s target_modules does not name.",
            file=WEIGHTS,
            tensor=a_name,
            module=module,
        )
    in_features, out_features = shapes[module]
    expected = {
        "A": [facts.rank, in_features],
        "B": [out_features, facts.rank],
        "magnitude": [out_features],
    }
    for part in sorted(wanted):
        name, shape = pair[part]
        if shape != expected[part]:
            raise refusal(
                "adapter_shape_mismatch",
                f"{name} has shape {shape}; the base model and r={facts.rank} need "
                f"{expected[part]}: the adapter was trained on another model (or r is wrong).",
                file=WEIGHTS,
                tensor=name,
                shape=shape,
                expected=expected[part],
            )


def linear_shapes(settings: Settings, model: BaseModel) -> dict[str, tuple[int, int]]:
    """Every linear layer of the base model but its LM head (what LoRA adapts): module path ->
    (in_features, out_features)."""
    return {
        name: (in_features, out_features)
        for name, in_features, out_features in model_facts(settings, model).linear_layers
    }
