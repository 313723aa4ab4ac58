"""The batch's key/value cache with room to grow (app/inference/kv_cache.py) holds what
transformers' DynamicCache holds, step by step, also after the batcher has put other tensors in
its place (rows joining or leaving) and after its room has run out."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from app.inference.kv_cache import SPARE_POSITIONS, RoomyLayer


def _states(rows: int, positions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 3, positions, 8, generator=generator),
        torch.randn(rows, 3, positions, 4, generator=generator),
    )


def test_the_cache_holds_what_dynamic_cache_holds() -> None:
    roomy, plain = RoomyLayer(), DynamicLayer()
    steps = [(4, 5)] + [(4, 1)] * (SPARE_POSITIONS + 20)  # a prefill, then past the first room
    for seed, (rows, positions) in enumerate(steps):
        keys, values = _states(rows, positions, seed)
        got, want = roomy.update(keys, values), plain.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        if seed == 10:  # rows 0 and 2 leave: the batcher puts the selected rows in place
            for layer in (roomy, plain):
                layer.keys, layer.values = layer.keys[[0, 2]], layer.values[[0, 2]]
            steps[11:] = [(2, 1)] * len(steps[11:])
    assert roomy.get_seq_length() == plain.get_seq_length() == 5 + SPARE_POSITIONS + 20


def test_a_step_writes_in_place() -> None:
    layer = RoomyLayer()
    layer.update(*_states(2, 6, 0))
    room = layer.key_room
    assert room is not None and room.shape[2] == 6 + SPARE_POSITIONS
    keys, _values = layer.update(*_states(2, 1, 1))
    assert layer.key_room is room and keys.data_ptr() == room.data_ptr()
    assert keys.shape == (2, 3, 7, 8)
