"""DecoderStack against the model's own forward: the same hidden states and logits, step after cached step."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loramix.compat import output_cache, with_cache
from loramix.fast_decode import DecoderStack

from conftest import VOCAB, tiny_base

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def windowed(arch: str):
    """Bases whose mask is not plain causal: Mistral with a 4-token window on every layer, Qwen2 with a window on
    its second layer only (one mask per layer type)."""
    torch.manual_seed(0)
    if arch == "mistral-window":
        return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=4)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1)).eval()


def bases():
    return {"llama": tiny_base("llama"), "mistral": tiny_base("mistral"), "qwen2": tiny_base("qwen2"),
            "mistral-window": windowed("mistral-window"), "qwen2-window": windowed("qwen2-window")}


def left_padded(batch: int = 3, width: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 7, 5 and 2 real tokens, padded on the left."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 2, 5][:batch]):
        ids[row, :pad], mask[row, :pad] = 0, 0
    return ids, mask


def stack_forward(stack: DecoderStack, ids, mask, positions, cache):
    embeds = stack.embed(ids)
    step = stack.prepare(embeds, mask, positions, cache)
    return stack.logits(stack.hidden_states(embeds, step, cache))


def model_forward(base, ids, mask, positions, cache):
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, return_dict=True,
               **with_cache(base, cache))
    assert output_cache(out) is cache
    return out.logits


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mistral-window", "qwen2-window"])
def test_cached_steps_match_the_models_forward(arch):
    """A left-padded batch prefilled, then 12 greedy steps (past the 4-token window): the logits of every step are
    those of `base(...)` with its own cache, bit for bit, and so are the tokens."""
    base = bases()[arch]
    stack = DecoderStack.of(base)
    assert stack is not None
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours_cache, ref_cache = DynamicCache(), DynamicCache()
    with torch.no_grad():
        for step in range(13):
            ours = stack_forward(stack, ids, mask, positions, ours_cache)
            ref = model_forward(base, ids, mask, positions, ref_cache)
            assert torch.equal(ours, ref), f"step {step}: max diff {(ours - ref).abs().max()}"
            ids = ref[:, -1].argmax(-1, keepdim=True)  # (b, 1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


@pytest.mark.parametrize("arch", ["llama", "mistral-window", "qwen2-window"])
def test_without_cache_or_positions_matches(arch):
    """No cache, no position ids (the training and prefill call): the model's defaults are reproduced."""
    base = bases()[arch]
    ids, mask = left_padded()
    stack = DecoderStack.of(base)
    with torch.no_grad():
        embeds = stack.embed(ids)
        ours = stack.logits(stack.hidden_states(embeds, stack.prepare(embeds, mask, None, None), None))
        ref = base(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(ours, ref)


def test_logits_to_keep_is_the_tail():
    base = tiny_base("llama")
    stack = DecoderStack.of(base)
    ids, mask = left_padded()
    with torch.no_grad():
        embeds = stack.embed(ids)
        hidden = stack.hidden_states(embeds, stack.prepare(embeds, mask, None, None), None)
        ref = base(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
    assert torch.equal(stack.logits(hidden, 1), ref)


def test_other_architectures_are_left_to_the_plain_path():
    """GPT-2 (no rotary, no `model.layers`) and a wrapped model are not taken over."""
    assert DecoderStack.of(tiny_base("gpt2")) is None
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_base("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert DecoderStack.of(wrapped) is None
