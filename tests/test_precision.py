"""bf16 and fp16: logits against PEFT's XLoraModel in the same dtype, greedy tokens against the float32 run.

Tolerance. Both implementations round every matmul, norm and softmax of the base model to the dtype's mantissa
(bf16: 8 bits, a relative step of 2^-8; fp16: 11 bits, 2^-11) but not in the same places: PEFT keeps its LoRA
weights in float32 (`autocast_adapter_dtype`), ours are in the compute dtype, and our gate's softmax runs in float32
while PEFT's runs in the compute dtype. The logits of the tiny model are at most ~0.4 in magnitude; we allow 8 steps
of the dtype at that magnitude, `8 * 2^-mantissa * max|logits|` (bf16 ~0.011, fp16 ~0.0014), measured differences
are about half of it. The experts move the logits by several times the tolerance, so the check is not vacuous.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, make_experts, peft_reference, tiny_base

from loramix import XLoraConfig, XLoraModel

CONFIG = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16)
MANTISSA_BITS = {torch.bfloat16: 8, torch.float16: 11}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path_factory.mktemp("experts"))
    float32 = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **CONFIG))
    return base, adapters, float32


def low_precision(setup, dtype, via: str) -> XLoraModel:
    """The float32 model's weights in `dtype`: either from_base(dtype=) or a base already converted by the user."""
    base, adapters, float32 = setup
    config = XLoraConfig(adapters=adapters, **CONFIG)
    if via == "dtype":
        model = XLoraModel.from_base(copy.deepcopy(base), config, dtype=dtype)
    else:
        model = XLoraModel.from_base(copy.deepcopy(base).to(dtype), config)
    model.classifier.load_state_dict(float32.classifier.state_dict())  # cast to dtype by load_state_dict
    return model


@pytest.mark.parametrize("via", ["dtype", "converted"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_logits_match_peft_in_the_same_dtype(setup, dtype, via, ids):
    base, adapters, float32 = setup
    model = low_precision(setup, dtype, via)
    assert model.dtype == dtype and all(layer.lora_A.dtype == dtype for layer in model.mixed_layers())
    reference = peft_reference(copy.deepcopy(base).to(dtype), adapters, model, **CONFIG)
    with torch.no_grad():
        ours = model(input_ids=ids)
        theirs = reference(input_ids=ids).logits
        exact = float32(input_ids=ids).logits
        plain = base.to(torch.float32)(input_ids=ids).logits
    assert ours.logits.dtype == dtype and ours.scalings.dtype == torch.float32  # the gate's softmax in float32
    tol = 8 * 2.0 ** -MANTISSA_BITS[dtype] * exact.abs().max().item()
    assert (exact - plain).abs().max() > 3 * tol  # the experts move the logits well past the tolerance
    torch.testing.assert_close(ours.logits.float(), theirs.float(), atol=tol, rtol=0)
    torch.testing.assert_close(ours.logits.float(), exact, atol=tol, rtol=0)


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_greedy_tokens_match_float32_where_the_margin_is_large(setup, dtype):
    """Where every float32 greedy choice wins by more than twice the logits tolerance, no logit error within the
    tolerance can flip it: those prompts must decode to the same tokens in `dtype` (cached). Prompts with near-ties
    may legitimately diverge and are not used."""
    _, _, float32 = setup
    model = low_precision(setup, dtype, "dtype")
    new = 4
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, VOCAB, (64, 6), generator=g)
    with torch.no_grad():
        tokens32 = float32.generate(prompts, max_new_tokens=new)  # (64, 6 + new)
        logits32 = float32(input_ids=tokens32).logits[:, 5:-1]  # (64, new, vocab): the logits that chose them
        margins = top2_margin(logits32)
        tol = 8 * 2.0 ** -MANTISSA_BITS[dtype] * logits32.abs().max().item()
        clear = margins.min(dim=1).values > 2 * tol
        assert clear.sum() >= 3, "too few fixtures with a clear float32 margin"
        tokens = model.generate(prompts[clear], max_new_tokens=new)
    assert torch.equal(tokens, tokens32[clear])
