"""The batch's key/value cache, with room to grow.

transformers' `DynamicCache` appends each decoding step's keys and values with `torch.cat`: every
step copies the whole cache of every layer, a cost that grows with the batch and the length.
Here each layer keeps
its keys and values in a buffer with room for more positions, and `keys`/`values` are views of
its first positions: a step writes its one new position in place. When the room is used up, or
when the batcher has put other tensors in place of the views (rows joining or leaving the batch,
app/inference/batching.py), the layer moves into a new buffer with room again: one copy every
`SPARE_POSITIONS` steps instead of one at every step. The room is a fixed number of positions,
not a share of the length, so that a long batch's cache never holds much more than it uses.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

SPARE_POSITIONS = 128  # room for this many positions more than needed, at each move


class RoomyLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # untyped upstream
    """A `DynamicLayer` whose keys and values are views of buffers with spare positions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.keys: torch.Tensor | None
        self.values: torch.Tensor | None
        self.key_room: torch.Tensor | None = None  # [batch, heads, room, head_dim]
        self.value_room: torch.Tensor | None = None

    def update(  # transformers' signature; its extra arguments are unused by a dynamic layer
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,  # noqa: ARG002
        **kwargs: Any,  # noqa: ARG002
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._holds_views(key_states, needed):
            self._move(key_states, value_states, length, needed)
        assert self.key_room is not None
        assert self.value_room is not None
        self.key_room[:, :, length:needed] = key_states
        self.value_room[:, :, length:needed] = value_states
        self.keys = self.key_room[:, :, :needed]
        self.values = self.value_room[:, :, :needed]
        return self.keys, self.values

    def _holds_views(self, new: torch.Tensor, needed: int) -> bool:
        """Whether keys/values are still views of this layer's buffers, with room for needed."""
        room = self.key_room
        if room is None or self.value_room is None or needed > room.shape[2]:
            return False
        return all(
            view is not None
            and view.numel() > 0
            and view.data_ptr() == buffer.data_ptr()
            and view.stride() == buffer.stride()
            and view.shape[:2] == new.shape[:2]
            for view, buffer in ((self.keys, room), (self.values, self.value_room))
        )

    def _move(
        self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int
    ) -> None:
        """Into new buffers with room, the cached positions copied over."""
        room = needed + SPARE_POSITIONS
        batch, heads, _, key_dim = key_states.shape
        self.key_room = key_states.new_empty(batch, heads, room, key_dim)
        self.value_room = value_states.new_empty(batch, heads, room, value_states.shape[-1])
        if length and self.keys is not None and self.values is not None:
            self.key_room[:, :, :length] = self.keys
            self.value_room[:, :, :length] = self.values


def decoding_cache() -> DynamicCache:
    """An empty cache whose layers are `RoomyLayer`s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache
