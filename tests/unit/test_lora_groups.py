"""A mixed batch's LoRA products, rows grouped by slot (app/inference/lora.py), give each row
what its adapter alone gives it, whatever the mix: uneven groups, rows without an adapter,
adapters of different ranks, slots left empty in between."""

from __future__ import annotations

import torch
from torch import nn

from app.inference.lora import NO_ADAPTER, AdapterWeights, LoraSlots, grouped_by_slot


def _adapter(key: str, rank: int, seed: int) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, 12, generator=generator)
    b = torch.randn(10, rank, generator=generator)
    return AdapterWeights(key, rank, {"0": (a, b)}, {}, 0.5)


def test_a_mix_gives_each_row_its_adapter_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    slots = LoraSlots(model, capacity=5, merge=False)
    slots.install(_adapter("a", 2, 1), 1)
    slots.install(_adapter("b", 4, 2), 2)  # a larger rank: slot 1 is padded
    slots.install(_adapter("c", 2, 3), 4)  # slot 3 stays empty
    row_slots = [2, NO_ADAPTER, 1, 2, 4, 2, NO_ADAPTER]
    x = torch.randn(len(row_slots), 3, 12)
    with torch.inference_mode():
        slots.batch(row_slots)
        mixed = model(x)
        for row, slot in enumerate(row_slots):
            slots.batch([slot])
            torch.testing.assert_close(mixed[row], model(x[row : row + 1])[0])


def test_rows_are_grouped_by_slot_and_padded_to_the_largest_group() -> None:
    groups = grouped_by_slot([3, 0, 1, 3, 3], torch.device("cpu"))
    assert groups is not None
    assert (groups.first, groups.count, groups.size) == (1, 3, 3)  # slots 1, 2 (empty), 3
    zero_row = 5  # the all-zero row appended to a padded batch's input
    assert groups.padded and groups.bare_rows
    assert groups.gather.tolist() == [2, zero_row, zero_row, zero_row, zero_row, zero_row, 0, 3, 4]
    zero_entry = 9  # the zero delta appended for rows without an adapter (row 1)
    assert groups.source.tolist() == [6, zero_entry, 0, 7, 8]
    even = grouped_by_slot([2, 1, 1, 2], torch.device("cpu"))
    assert even is not None and not even.padded and not even.bare_rows
    assert even.gather.tolist() == [1, 2, 0, 3]
    assert even.source.tolist() == [2, 0, 1, 3]
    assert grouped_by_slot([NO_ADAPTER, NO_ADAPTER], torch.device("cpu")) is None
