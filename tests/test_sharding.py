"""A base split by a device map, part on the CPU and part offloaded to disk by accelerate, against the plain model.

Offloaded weights sit on the "meta" device and are read from the offload folder only during their module's call,
so the mixed layers cannot take their device from `base_layer.weight`; they follow the activations instead. The
offload path computes the very same float32 products, so logits must be equal to the last bit and greedy tokens
identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, make_experts, tiny_base

from loramix import XLoraConfig, XLoraModel

CONFIG = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16)
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("sharded")
    base = tiny_base("llama")
    base.save_pretrained(str(folder / "base"))
    adapters = make_experts(base, "llama", folder)
    offloaded = AutoModelForCausalLM.from_pretrained(str(folder / "base"), device_map=DEVICE_MAP,
                                                     offload_folder=str(folder / "offload")).eval()
    sharded = XLoraModel.from_base(offloaded, XLoraConfig(adapters=adapters, **CONFIG))
    plain = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **CONFIG))
    sharded.classifier.load_state_dict(plain.classifier.state_dict())
    return sharded, plain, base


def offloaded_layers(model):
    return [layer for layer in model.mixed_layers() if layer.base_layer.weight.is_meta]


def test_offloaded_base_equals_plain_model(models, ids):
    sharded, plain, base = models
    assert len(offloaded_layers(sharded)) == 7  # layer 1's q, k, v, o, gate, up, down stay on disk
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ours = sharded(input_ids=ids, attention_mask=mask)
        reference = plain(input_ids=ids, attention_mask=mask)
        bare = base(input_ids=ids, attention_mask=mask).logits
    assert (reference.logits - bare).abs().max() > 1e-2  # the experts of the offloaded layer count
    assert torch.equal(ours.logits, reference.logits)
    assert torch.equal(ours.scalings, reference.scalings)
    assert len(offloaded_layers(sharded)) == 7  # still offloaded after the call: nothing was pinned in memory


def test_offloaded_base_generates_as_plain_model(models):
    sharded, plain, _ = models
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(sharded.generate(prompt, max_new_tokens=8), plain.generate(prompt, max_new_tokens=8))
    frozen = dict(max_new_tokens=8, freeze_scalings_after=2)
    assert torch.equal(sharded.generate(prompt, **frozen), plain.generate(prompt, **frozen))
    with pytest.raises(ValueError, match="offloaded to disk.*freeze the scalings without folding"):
        sharded.generate(prompt[:1], fold_frozen=True, **frozen)
