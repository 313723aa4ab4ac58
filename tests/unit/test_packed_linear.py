"""Linear layers packed for oneDNN compute what `nn.Linear` computes, and give their weight back
exactly (app/inference/packed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.inference.packed import PackedLinear, can_pack, fp32_packing_pays, pack, pack_linears

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN"
)
bf16 = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16 on this CPU"
)


@bf16
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

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Quantized(8, 8), nn.Linear(8, 4))
    assert pack_linears(model) == 2
    assert [type(m).__name__ for m in model] == [
        "PackedLinear",
        "ReLU",
        "Quantized",
        "PackedLinear",
    ]
    assert can_pack(torch.device("cpu"), torch.float32) == fp32_packing_pays()
    assert not can_pack(torch.device("cpu"), torch.float16)


def test_a_packed_fp32_layer_computes_what_the_linear_layer_computes() -> None:
    """fp32 layers are packed only where that measured faster; packed, they differ from
    PyTorch's product by float rounding alone."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=True)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in ((1, 1, 96), (16, 1, 96), (3, 40, 96)):
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.dense_weight(), linear.weight)


def test_packing_lets_go_of_the_loaded_weights() -> None:
    """What stays unpacked (here an embedding) gets memory of its own: no view keeps the
    loaded weights (a file mapped into memory, for a model loaded from disk) alive."""
    loaded = torch.randn(40, 8)  # stands for the file's memory: every weight a view of it
    model = nn.Sequential(nn.Embedding(4, 8), nn.Linear(8, 4))
    model[0].weight = nn.Parameter(loaded[:4])
    model[1].weight = nn.Parameter(loaded[4:8])
    pack_linears(model)
    assert model[0].weight.untyped_storage().data_ptr() != loaded.untyped_storage().data_ptr()
    assert torch.equal(model[0].weight, loaded[:4])
