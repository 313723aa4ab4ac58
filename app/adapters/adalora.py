"""AdaLoRA adapters rewritten as the plain LoRA adapters they equal.

AdaLoRA (PEFT's `AdaLoraConfig`) trains each module's update in SVD form and prunes the
singular values it finds least important, so the modules end with different ranks. Its update is

    delta_W = lora_B @ (lora_A * lora_E) * scaling / (init_r + 1e-5)

with `lora_A` [k, in], `lora_E` [k, 1] (the singular values), `lora_B` [out, k] and k the rank the
module kept (PEFT saves only the kept rows, and the mask in `rank_pattern`, or zeros where it
pruned); `scaling` is
`lora_alpha` (or init_r when it is 0). That is a LoRA update with

    lora_A' = lora_A * lora_E           lora_B' = lora_B * scaling / (init_r + 1e-5)

and a scale of 1 (lora_alpha = r). Every module is padded with zero rows and columns to the
largest kept rank R, so the adapter is one uniform rank-R LoRA: the inference engine batches it,
vLLM loads it, the exports merge it, and PEFT loads it, all as they do any LoRA. The padding adds
no update (zeros) and costs R - k rows of compute on modules that kept fewer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from app.adapters.unpacking import CONFIG, WEIGHTS, refusal

ADALORA = "ADALORA"
_PART = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[ABE])$")
# What AdaLoRA's config shares with LoRA's and keeps its meaning in the rewritten one.
_KEPT_KEYS = (
    "base_model_name_or_path",
    "revision",
    "task_type",
    "target_modules",
    "lora_dropout",
    "bias",
    "modules_to_save",
    "fan_in_fan_out",
    "inference_mode",
)


def is_adalora(directory: Path) -> bool:
    """Whether the adapter in directory is an AdaLoRA one (its config's peft_type)."""
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # the LoRA validation names what is wrong with the file
    return isinstance(config, dict) and config.get("peft_type") == ADALORA


def _invalid(reason: str, **detail: Any) -> Exception:
    return refusal(
        "adapter_config_invalid",
        f"AdaLoRA adapter: {reason}. It must be PEFT's AdaLoRA adapter as save_pretrained writes "
        "it (init_r and lora_alpha in the config, lora_A, lora_E and lora_B per module).",
        **detail,
    )


def to_lora(directory: Path) -> dict[str, int]:
    """Rewrite the AdaLoRA adapter in directory, in place, as the uniform-rank LoRA adapter it
    equals (see the module docstring). Returns the rank each module kept."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    init_r = config.get("init_r")
    if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
        raise _invalid(f"init_r is {init_r!r}, not a positive integer", file=CONFIG, field="init_r")
    alpha = config.get("lora_alpha") or 0
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha < 0:
        raise _invalid(f"lora_alpha is {alpha!r}", file=CONFIG, field="lora_alpha")
    scale = (alpha if alpha > 0 else init_r) / (init_r + 1e-5)
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (OSError, SafetensorError) as exc:
        raise _invalid(f"{WEIGHTS} cannot be read ({exc})", file=WEIGHTS) from exc

    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        match = _PART.match(name)
        if match is None:
            rest[name] = tensor  # modules_to_save, kept as they are
        else:
            modules.setdefault(match["module"], {})[match["part"]] = tensor
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, parts in modules.items():
        missing = sorted({"A", "B", "E"} - parts.keys())
        if missing:
            raise _invalid(f"{module} has no lora_{', lora_'.join(missing)}", file=WEIGHTS)
        a, b, e = parts["A"].float(), parts["B"].float(), parts["E"].float()
        if a.dim() != 2 or b.dim() != 2 or e.shape != (a.shape[0], 1) or b.shape[1] != a.shape[0]:
            raise _invalid(
                f"{module}'s shapes do not make an SVD triplet: lora_A {list(a.shape)}, "
                f"lora_E {list(e.shape)}, lora_B {list(b.shape)}",
                file=WEIGHTS,
            )
        # A pruned singular value is zero (PEFT masks it): its row adds nothing.
        kept_rows = e[:, 0] != 0
        pairs[module.removeprefix("base_model.model.")] = (
            (a * e)[kept_rows],
            (b * scale)[:, kept_rows],
        )
    if not pairs:
        raise _invalid("it holds no lora_A / lora_E / lora_B weights", file=WEIGHTS)

    kept = {module: int(a.shape[0]) for module, (a, _b) in pairs.items()}
    rank = max(max(kept.values()), 1)
    dtype = next(iter(weights.values())).dtype
    lora: dict[str, torch.Tensor] = dict(rest)
    for module, (a, b) in pairs.items():
        padded_a = torch.zeros(rank, a.shape[1])
        padded_a[: a.shape[0]] = a
        padded_b = torch.zeros(b.shape[0], rank)
        padded_b[:, : b.shape[1]] = b
        lora[f"base_model.model.{module}.lora_A.weight"] = padded_a.to(dtype).contiguous()
        lora[f"base_model.model.{module}.lora_B.weight"] = padded_b.to(dtype).contiguous()
    save_file(lora, str(directory / WEIGHTS), metadata={"format": "pt"})
    rewritten = {key: config[key] for key in _KEPT_KEYS if key in config}
    rewritten.update(
        peft_type="LORA", r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, bias="none"
    )
    (directory / CONFIG).write_text(json.dumps(rewritten, indent=2), encoding="utf-8")
    return kept
