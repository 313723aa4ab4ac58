"""The trained model's layers set up for its evaluation's forward passes (worker/evaluation.py),
computing what PEFT computes with less work per layer.

- **Frozen weights packed once in bf16 (CPUs with bf16 autocast).** A model trained on a CPU
  keeps fp32 weights, and bf16 autocast casts every frozen weight to bf16 at every call: the
  whole model, once per decoded token. For the evaluation, each frozen plain `nn.Linear` (the
  base layers PEFT wraps, the LM head) runs a bf16 copy reordered once for oneDNN
  (app/inference/packed.py): the same bf16 product autocast would compute, without the casts.
- **Plain LoRA as one product for every row.** PEFT runs a batch that mixes the adapter's rows
  and the base model's (`adapter_names`) as one sub-batch per adapter, in Python, in every
  layer. Here each plain LoRA layer (no DoRA or other variant) computes `B(A(x)) * scaling`
  over the whole batch and zeroes it on the base model's rows (`adapter_rows`), as the inference
  engine does. Rows of the adapter get PEFT's own sum; the base model's rows get the base layer
  alone.

Other layers (DoRA, AdaLoRA, other PEFT methods) keep PEFT's forward, on packed base weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from app.inference.packed import can_pack, pack


class _Rows(threading.local):
    # [batch, 1, 1]: 1 for the adapter's rows, 0 for the base model's; None: every row.
    mask: torch.Tensor | None = None


_ROWS = _Rows()
_MARK = "_tuneserve_inference_layers"


@contextlib.contextmanager
def inference_layers(model: nn.Module, bf16: bool) -> Iterator[None]:
    """model's layers set up as this module describes, for the duration (re-entrant)."""
    if getattr(model, _MARK, False):
        yield
        return
    device = next(model.parameters()).device
    packing = bf16 and can_pack(device, torch.bfloat16)
    replaced: list[nn.Module] = []
    for name, module in model.named_modules():
        if _plain_lora(module):
            module.forward = _lora_forward(module, packing)
        elif packing and _frozen_fp32_linear(name, module):
            module.forward = _packed_forward(module)
        else:
            continue
        replaced.append(module)
    setattr(model, _MARK, True)
    try:
        yield
    finally:
        for module in replaced:
            del module.forward  # the class's own forward again
        delattr(model, _MARK)


def mixes_rows(model: nn.Module) -> bool:
    """Whether one batch can hold rows of the adapter and of the base model (`adapter_rows`):
    inside `inference_layers`, with every adapted layer plain LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return getattr(model, _MARK, False) and all(
        _plain_lora(module) for module in model.modules() if isinstance(module, BaseTunerLayer)
    )


@contextlib.contextmanager
def adapter_rows(rows: list[bool]) -> Iterator[None]:
    """Within, rows marked False of each batch (of len(rows)) go through the base model alone."""
    _ROWS.mask = torch.tensor(rows, dtype=torch.float32).view(-1, 1, 1)
    try:
        yield
    finally:
        _ROWS.mask = None


def _frozen_fp32_linear(name: str, module: nn.Module) -> bool:
    # The adapter's own weights (lora_A, lora_B, heads it trains) stay as PEFT runs them.
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and not module.weight.requires_grad
        and ".lora_" not in f".{name}"
        and "modules_to_save" not in name
    )


def _plain_lora(module: nn.Module) -> bool:
    """A PEFT LoRA linear layer whose one active adapter is plain LoRA (no variant)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or module.merged or len(module.active_adapters) != 1:
        return False
    active = module.active_adapters[0]
    return active in module.lora_A and active not in module.lora_variant


# (x, the base layer's result) -> the result with the adapter's share added
AddAdapter = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _lora_forward(layer: Any, packing: bool) -> Any:
    active = layer.active_adapters[0]
    base = layer.base_layer
    plain = layer.lora_A[active].bias is None and layer.lora_B[active].bias is None
    add_adapter = _fp32_delta(layer, active) if packing and plain else _peft_delta(layer, active)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result: torch.Tensor = base(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        return add_adapter(x, result)

    return forward


def _peft_delta(layer: Any, active: str) -> AddAdapter:
    """result plus what PEFT adds in eval mode (its dropout is the identity there)."""
    lora_a, lora_b, scaling = layer.lora_A[active], layer.lora_B[active], layer.scaling[active]

    def add(x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        delta: torch.Tensor = lora_b(lora_a(layer._cast_input_dtype(x, lora_a.weight.dtype)))
        delta = delta * scaling
        if _ROWS.mask is not None:
            delta = delta * _ROWS.mask.to(delta.device, delta.dtype)
        return (result + delta).to(result.dtype)

    return add


def _fp32_delta(layer: Any, active: str) -> AddAdapter:
    """result plus the adapter's product in fp32, its own precision, outside bf16 autocast:
    on a CPU, products this small are faster in fp32 than in bf16."""
    down = layer.lora_A[active].weight.detach().t().contiguous()  # [in, rank]
    up = (layer.lora_B[active].weight.detach() * layer.scaling[active]).t().contiguous()

    def add(x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            low = torch.mm(x.reshape(-1, x.shape[-1]).float(), down)
            if _ROWS.mask is not None:  # zero on the base model's rows
                low.view(x.shape[0], -1, low.shape[-1]).mul_(_ROWS.mask)
            # bf16 += fp32: summed in fp32, rounded once.
            result.view(low.shape[0], -1).add_(torch.mm(low, up))
        return result

    return add


def _packed_forward(linear: nn.Linear) -> Any:
    weight = pack(linear.weight.detach().to(torch.bfloat16))
    bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # Autocast's bf16 linear: both operands in bf16, the result in bf16.
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), weight, bias, "none", [], ""
        )
        return out

    return forward
