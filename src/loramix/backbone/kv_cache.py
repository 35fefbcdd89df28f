"""A KV cache for one-token decode steps: each layer's keys and values in a buffer with room to grow.

`GrowingCache` keeps every layer's keys and values as (b, kv_heads, capacity, head_dim) buffers whose first
`length` positions are filled: a step writes its token in place and the attention reads a view of the filled
part; a full buffer doubles, so an append costs O(1) amortised (DynamicCache copies the whole cache at every
append). Why: docs/architecture.md (History).

It serves the hand-written decode layers (backbone/decoder.py), which call `update` with DynamicCache's
signature. Generation prefills with a DynamicCache (the prompt goes through the model's own layers) and then
converts it with `GrowingCache.from_cache` when the model decodes by hand. As in DynamicCache, the rows of a batch
share one length; left padding is hidden by the attention mask.

Speculative decoding (engine/speculative.py) also needs `crop` (forget the positions of rejected drafts: a length
change) and `several_tokens` (a step of several tokens through the model's own decoder layers, appending in place).
"""

from __future__ import annotations

import torch


class GrowingCache:
    """Keys and values per decoder layer, (b, kv_heads, capacity, head_dim), the first `lengths[i]` positions
    filled."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], room: int = 256) -> None:
        """`keys`, `values`: the filled part of each layer, (b, kv_heads, length, head_dim); `room`: spare positions
        allocated beyond it."""
        self.room = room
        self._fill(keys, values)

    def _fill(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.lengths = [k.shape[2] for k in keys]
        self.key_buffers = [_with_room(k, self.room) for k in keys]
        self.value_buffers = [_with_room(v, self.room) for v in values]

    @classmethod
    def from_cache(cls, cache, room: int = 256) -> "GrowingCache":
        """The same keys and values as a filled transformers DynamicCache (its `layers`' keys and values)."""
        layers = list(cache.layers)
        if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
            raise ValueError("cache: GrowingCache.from_cache needs a cache filled by a forward pass")
        return cls([layer.keys for layer in layers], [layer.values for layer in layers], room=room)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if self.lengths else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key`, `value` (b, kv_heads, t, head_dim) to layer `layer_idx`; returns that layer's keys and values
        so far, (b, kv_heads, length + t, head_dim), views of the buffers (DynamicCache.update's contract)."""
        start, t = self.lengths[layer_idx], key.shape[2]
        keys, values = self.key_buffers[layer_idx], self.value_buffers[layer_idx]
        if start + t > keys.shape[2]:  # full: double the room
            keys = self.key_buffers[layer_idx] = _with_room(self.keys(layer_idx), start + t)
            values = self.value_buffers[layer_idx] = _with_room(self.values(layer_idx), start + t)
        keys.narrow(2, start, t).copy_(key)
        values.narrow(2, start, t).copy_(value)
        self.lengths[layer_idx] = start + t
        return keys.narrow(2, 0, start + t), values.narrow(2, 0, start + t)

    def keys(self, layer_idx: int) -> torch.Tensor:
        return self.key_buffers[layer_idx].narrow(2, 0, self.lengths[layer_idx])

    def values(self, layer_idx: int) -> torch.Tensor:
        return self.value_buffers[layer_idx].narrow(2, 0, self.lengths[layer_idx])

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of every layer (a rollback: the next update writes at `length`)."""
        if length < 0:
            raise ValueError(f"length: got {length}, expected >= 0")
        self.lengths = [min(n, length) for n in self.lengths]

    def several_tokens(self) -> "SeveralTokens":
        """This cache as the model's own decoder layers see it for a step of several tokens, which the hand-written
        one-token step does not serve (speculative verification); pass a 4-d attention mask with it."""
        return SeveralTokens(self)

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the rows `index` (1-d), in place."""
        self.key_buffers = [buffer.index_select(0, index) for buffer in self.key_buffers]
        self.value_buffers = [buffer.index_select(0, index) for buffer in self.value_buffers]

    def merge(self, other: "GrowingCache", width: int) -> None:
        """Append the rows of `other`, both left-padded with zeros to `width` positions (the attention mask must
        hide the padding)."""
        keys = [torch.cat([_pad_left(self.keys(i), width), _pad_left(other.keys(i), width)])
                for i in range(len(self.lengths))]
        values = [torch.cat([_pad_left(self.values(i), width), _pad_left(other.values(i), width)])
                  for i in range(len(self.lengths))]
        self._fill(keys, values)


class SeveralTokens:
    """A GrowingCache under another type, for a step of several tokens through the model's own decoder layers:
    `update` appends in place (GrowingCache.update), whatever keyword arguments the layers add. The decoder stack
    sends every GrowingCache to the hand-written one-token step; this view goes the layers' way instead, with the
    4-d attention mask its caller built (the mask functions return a 4-d mask as it is)."""

    def __init__(self, cache: GrowingCache) -> None:
        self.cache = cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.cache.get_seq_length(layer_idx)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """GrowingCache.update: append (b, kv_heads, t, head_dim); returns the layer's keys and values so far."""
        return self.cache.update(key, value, layer_idx)


def _with_room(filled: torch.Tensor, room: int) -> torch.Tensor:
    """A buffer (b, heads, length + room, dim) whose first `length` positions are `filled`."""
    b, heads, length, dim = filled.shape
    buffer = filled.new_empty(b, heads, length + max(room, 1), dim)
    buffer[:, :, :length] = filled
    return buffer


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """(b, heads, t, dim) -> (b, heads, width, dim), zeros on the left of the sequence axis."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))
