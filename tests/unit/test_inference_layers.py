"""worker/inference_layers.py: the evaluation's layers compute what PEFT computes.

- In fp32: each row of a batch that mixes the adapter's rows and the base model's gets exactly
  PEFT's logits for its side.
- Under bf16 autocast on a CPU (packed frozen weights, the adapter's product in fp32): the base
  model's rows are bit for bit what autocast computes, the adapter's rows within bf16 rounding
  of PEFT's.
- Layers with a variant (DoRA) keep PEFT's forward; everything is as before after the context.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from app.inference.packed import can_pack
from worker.inference_layers import adapter_rows, inference_layers, mixes_rows


def _model(**lora: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear", **lora)
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # a trained adapter, not the zero it starts as
            torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), precision:
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits


def _peft_sides(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    adapter = _logits(model, ids, bf16)
    with model.disable_adapter():
        base = _logits(model, ids, bf16)
    return torch.cat([adapter, base])


def test_mixed_rows_get_pefts_logits_exactly_in_fp32() -> None:
    model = _model()
    ids = torch.randint(0, 128, (3, 7))
    expected = _peft_sides(model, ids, bf16=False)
    with inference_layers(model, bf16=False):
        assert mixes_rows(model)
        with adapter_rows([True] * 3 + [False] * 3):
            mixed = _logits(model, torch.cat([ids, ids]), bf16=False)
        alone = _logits(model, ids, bf16=False)
    assert torch.equal(mixed[3:], expected[3:])  # the base model's rows
    torch.testing.assert_close(mixed[:3], expected[:3], rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, _logits(model, ids, bf16=False))  # outside: PEFT's own again


@pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.bfloat16), reason="no oneDNN bf16")
def test_under_bf16_autocast_base_rows_are_exact_and_adapter_rows_close() -> None:
    model = _model()
    ids = torch.randint(0, 128, (3, 7))
    expected = _peft_sides(model, ids, bf16=True)
    with inference_layers(model, bf16=True):
        with adapter_rows([True] * 3 + [False] * 3):
            mixed = _logits(model, torch.cat([ids, ids]), bf16=True)
    assert torch.equal(mixed[3:], expected[3:])
    torch.testing.assert_close(mixed[:3].float(), expected[:3].float(), rtol=0.05, atol=0.05)
    assert not any("forward" in vars(module) for module in model.modules())


def test_dora_keeps_pefts_forward_and_does_not_mix_rows() -> None:
    model = _model(use_dora=True)
    ids = torch.randint(0, 128, (2, 5))
    expected = _logits(model, ids, bf16=False)
    with inference_layers(model, bf16=False):
        assert not mixes_rows(model)
        assert torch.equal(_logits(model, ids, bf16=False), expected)
    assert not mixes_rows(model)  # outside the context
