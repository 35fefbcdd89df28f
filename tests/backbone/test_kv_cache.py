"""GrowingCache against transformers' DynamicCache: the same keys and values after appends, row selection and the
left-padded merge of two batches (generation.select_cache_rows / merge_caches drive both kinds)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from loramix.backbone.kv_cache import GrowingCache
from loramix.engine.batch import merge_caches, select_cache_rows

LAYERS, HEADS, DIM = 2, 3, 4


def filled(batch: int, length: int, seed: int) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(batch, HEADS, length, DIM, generator=g),
                     torch.randn(batch, HEADS, length, DIM, generator=g), layer)
    return cache


def same(growing: GrowingCache, reference: DynamicCache) -> bool:
    return all(torch.equal(growing.keys(i), layer.keys) and torch.equal(growing.values(i), layer.values)
               for i, layer in enumerate(reference.layers))


def test_appends_rows_and_merges_are_dynamic_caches():
    reference = filled(3, 5, seed=0)
    growing = GrowingCache.from_cache(filled(3, 5, seed=0), room=2)  # room for 2: the third append grows it
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for layer in range(LAYERS):
            key, value = torch.randn(3, HEADS, 1, DIM, generator=g), torch.randn(3, HEADS, 1, DIM, generator=g)
            ours = growing.update(key, value, layer)
            ref = reference.update(key, value, layer)
            assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    assert growing.get_seq_length() == reference.get_seq_length() == 9 and same(growing, reference)
    index = torch.tensor([2, 0])
    select_cache_rows(growing, index)
    select_cache_rows(reference, index)
    assert same(growing, reference)
    merge_caches(growing, GrowingCache.from_cache(filled(2, 12, seed=3)), 12)
    merge_caches(reference, filled(2, 12, seed=3), 12)
    assert growing.get_seq_length() == 12 and same(growing, reference)
    key = torch.ones(4, HEADS, 1, DIM)
    growing.update(key, key, 0)
    assert torch.equal(growing.keys(0), torch.cat([reference.layers[0].keys, key], dim=2))


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="filled by a forward pass"):
        GrowingCache.from_cache(DynamicCache())
    with pytest.raises(ValueError, match="joins only another GrowingCache"):
        merge_caches(GrowingCache.from_cache(filled(1, 2, seed=0)), filled(1, 2, seed=0), 2)
