"""Linear layers on CPUs with their weights reordered once, for oneDNN.

- **bf16.** A plain `nn.Linear` in bf16 on a CPU hands its weight to oneDNN in PyTorch's
  row-major layout, and oneDNN reorders it into its blocked (AVX512-BF16/AMX) layout at every
  call. Reordering it once, when the model loads, halves the time of each layer (measured in
  docs/benchmarks.md), for both a single row and a batch; the results are bit for bit the same.
- **fp32, where it pays.** In fp32 PyTorch's own product (MKL) is as fast as oneDNN's on CPUs
  with AVX512, but on an AVX2-only AMD EPYC it was the slower one for the few rows of a
  decoding step: packing took 16 clients from 44.8 to 67.0 tokens/s there (docs/benchmarks.md).
  Which one is faster is measured once per process (`fp32_packing_pays`); the results differ
  from MKL's by float rounding only.

The reordered weight replaces the original (no second copy); `dense_weight()` gives the plain one
back for the rare reader (merging an adapter, DoRA's norms).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether layers of dtype on device run faster packed: bf16 on a CPU whose oneDNN runs
    bf16 (AVX512 or AVX-NE-CONVERT), and fp32 there too where `fp32_packing_pays`."""
    if device.type != "cpu" or not _has_onednn():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32 and fp32_packing_pays()


def _has_onednn() -> bool:
    return (
        torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    )


# The product timed: a decoding step's few rows through a layer of a small model.
_ROWS, _IN, _OUT = 16, 1024, 4096
_FASTER = 0.8  # packed must take at most this share of the plain product's time


@functools.cache
def fp32_packing_pays() -> bool:
    """Whether oneDNN's packed fp32 product takes clearly less time than PyTorch's own on this
    CPU: both timed on a [16, 1024] x [1024, 4096] product (about 50 ms in all, once per
    process)."""
    if not _has_onednn():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(_ROWS, _IN, generator=generator)
    weight = torch.randn(_OUT, _IN, generator=generator)
    packed = pack(weight)
    with torch.inference_mode():
        plain = _fastest(lambda: torch.nn.functional.linear(x, weight))
        onednn = _fastest(lambda: PackedLinear.product(x, packed, None))
    pays = onednn <= _FASTER * plain
    logger.info(
        "fp32 products here: %.2f ms plain, %.2f ms packed for oneDNN: %s",
        plain * 1e3,
        onednn * 1e3,
        "packing" if pays else "not packing",
    )
    return pays


def _fastest(product: Callable[[], object], rounds: int = 5, calls: int = 4) -> float:
    """The best time of one call of product over a few rounds (after one warm-up call)."""
    product()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            product()
        best = min(best, (time.perf_counter() - started) / calls)
    return best


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
        return self.product(x, self.packed if packed is None else packed, self.bias)

    @staticmethod
    def product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x times a weight made by `pack`, plus bias."""
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
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
    _let_go_of_the_file(model)
    logger.info("packed %d linear layers for oneDNN", len(targets))
    return len(targets)


def _let_go_of_the_file(model: nn.Module) -> None:
    """Copy the tensors left unpacked (norms, embeddings) into memory of their own. A model
    loaded in its file's precision holds views of the file mapped into memory, and one view kept
    keeps the whole mapping: every weight just packed, counted a second time (540 MB for the
    default model in fp32)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None:
                    setattr(module, name, buffer.clone())
