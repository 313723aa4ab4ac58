"""bf16 linear layers packed for oneDNN compute what `nn.Linear` computes, and give their weight
back exactly (app/inference/packed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.inference.packed import PackedLinear, can_pack, pack, pack_linears

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="this PyTorch has no oneDNN"
)


def test_a_packed_layer_computes_what_the_linear_layer_computes() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in ((1, 1, 96), (16, 1, 96), (3, 40, 96)):
            x = torch.randn(shape, dtype=torch.bfloat16)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-2, atol=1e-2)
        assert torch.equal(packed.dense_weight(), linear.weight)
        other = torch.randn(160, 96, dtype=torch.bfloat16)
        x = torch.randn(4, 1, 96, dtype=torch.bfloat16)
        expected = nn.functional.linear(x, other, linear.bias)
        torch.testing.assert_close(packed(x, pack(other)), expected, rtol=1e-2, atol=1e-2)


def test_only_plain_linear_layers_are_packed() -> None:
    class Quantized(nn.Linear):  # stands for a subclass such as bitsandbytes' layers
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Quantized(8, 8), nn.Linear(8, 4)).to(
        torch.bfloat16
    )
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model] == [
        "PackedLinear",
        "ReLU",
        "Quantized",
        "PackedLinear",
    ]
    assert not can_pack(torch.device("cpu"), torch.float32)
