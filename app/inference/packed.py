"""bf16 linear layers on CPUs with their weights reordered once, for oneDNN.

A plain `nn.Linear` in bf16 on a CPU hands its weight to oneDNN in PyTorch's row-major layout,
and oneDNN reorders it into its blocked (AVX512-BF16/AMX) layout at every call. Reordering it
once, when the model loads, halves the time of each layer here (measured in
docs/benchmarks.md), for both a single row and a batch; the results are bit for bit the same.
The reordered weight replaces the original (no second copy); `dense_weight()` gives the plain one
back for the rare reader (merging an adapter, DoRA's norms).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose PyTorch has oneDNN's packed linear (fp32 gained nothing here)."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A dense [out, in] weight in oneDNN's layout (an opaque tensor)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
    return packed


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight packed (see the module docstring); inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = pack(linear.weight)
        self.bias = linear.bias

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
        """x times this layer's weight, or times `packed` (another weight of the same shape
        made by `pack`), plus the bias."""
        weight = self.packed if packed is None else packed
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return out


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of `model` (not its subclasses, such as quantized
    layers) by a `PackedLinear`; returns how many."""
    targets = [
        (name, module) for name, module in model.named_modules() if type(module) is nn.Linear
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module))
    logger.info("packed %d linear layers for oneDNN", len(targets))
    return len(targets)
