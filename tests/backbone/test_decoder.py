"""DecoderStack against the model's own forward (the same logits, step after cached step), and XLoraModel with its
layers run directly against the same model run through `base(...)` (`direct_layers = False`)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from helpers import VOCAB, make_experts, tiny_base
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.backbone.compat import output_cache, with_cache
from loramix.backbone.decoder import DecoderStack
from loramix.backbone.kv_cache import GrowingCache

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.fixture(autouse=True)
def grouped_heads_as_repeated(monkeypatch):
    """The hand-written decode step attends with grouped key/value heads through SDPA's `enable_gqa`, which gives
    bit for bit what repeating the heads gives (transformers 4.x's path). transformers 5.24, for one query token
    under a padding mask, instead folds the query heads into the query axis, which rounds differently (1 ulp); this
    switch makes it attend as the hand-written step does, so that every comparison here stays bit for bit."""
    monkeypatch.setenv("TRANSFORMERS_SDPA_FORCE_GQA", "1")


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


@pytest.mark.parametrize("arch,dtype,steps", [("llama", torch.float32, 300), ("mistral", torch.float32, 300),
                                              ("qwen2", torch.float32, 300), ("llama", torch.bfloat16, 20)])
def test_cached_steps_in_a_growing_cache_match_the_models_forward(arch, dtype, steps):
    """Prefill into a DynamicCache, convert it to a GrowingCache (what generation does), then 300 one-token steps
    through the hand-written layers (the buffer grows past its first room of 256): every step's logits are
    base(...)'s with its own DynamicCache, bit for bit, and every step ran by hand. In bfloat16 too (the RMSNorm's
    float32 round trip)."""
    base = bases()[arch].to(dtype)
    stack = DecoderStack.of(base)
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_cache = DynamicCache()
    with torch.no_grad():
        prefill = DynamicCache()
        stack_forward(stack, ids, mask, positions, prefill)
        model_forward(base, ids, mask, positions, ref_cache)
        ours_cache = GrowingCache.from_cache(prefill)
        ids = torch.tensor([[5], [6], [7]])
        for step in range(steps):
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            embeds = stack.embed(ids)
            prepared = stack.prepare(embeds, mask, positions, ours_cache)
            assert prepared.hand_written
            ours = stack.logits(stack.hidden_states(embeds, prepared, ours_cache))
            ref = model_forward(base, ids, mask, positions, ref_cache)
            assert torch.equal(ours, ref), f"step {step}: max diff {(ours - ref).abs().max()}"
            ids = ref[:, -1].argmax(-1, keepdim=True)
    assert ours_cache.get_seq_length() == ref_cache.get_seq_length() == 7 + steps


def test_which_steps_run_by_hand():
    """One-token steps of full-attention Llama/Mistral/Qwen2 without autograd run by hand; a sliding window, a
    prompt, autograd with a DynamicCache, or an eager-attention model keep the model's own layers; a GrowingCache
    on a step it cannot serve is refused by name."""
    def step(arch, t=1, grad=False, cache=None):
        base = bases()[arch]
        stack = DecoderStack.of(base)
        cache = cache if cache is not None else DynamicCache()
        with torch.set_grad_enabled(grad):
            embeds = stack.embed(torch.full((1, t), 5))
            return stack.prepare(embeds, None, None, cache).hand_written

    assert step("llama") and step("mistral") and step("qwen2")
    assert not step("mistral-window") and not step("qwen2-window")
    assert not step("llama", t=3) and not step("llama", grad=True)
    eager = tiny_base("llama")
    eager.config._attn_implementation = "eager"
    assert DecoderStack.of(eager).hand_written is None
    prefill = DynamicCache()
    base = bases()["llama"]
    with torch.no_grad():
        base(input_ids=torch.full((1, 4), 5), use_cache=True, **with_cache(base, prefill))
    growing = GrowingCache.from_cache(prefill)
    assert step("llama", grad=True, cache=growing)  # made for the hand-written layers: taken under autograd too
    with pytest.raises(ValueError, match="GrowingCache serves one-token steps"):
        step("llama", t=2, cache=growing)


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "dynamic", "factor": 2.0}])
def test_rotary_rows_are_the_modules_own(rope):
    """The rows a one-token step reads (from the table built in one call, grown past 256 positions) are the model's
    rotary module's for those positions alone, bit for bit, with the sign of rotate_half folded into sin."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(COMMON, rope_scaling=rope) if rope else COMMON
    base = LlamaForCausalLM(LlamaConfig(**config)).eval()
    stack = DecoderStack.of(base)
    like = torch.zeros(3, 1, 32)
    with torch.no_grad():
        for positions in ([[0], [5], [9]], [[255], [256], [700]], [[3], [1000], [1]]):
            position_ids = torch.tensor(positions)
            cos, signed_sin, order = stack.rotary.rows(like, position_ids)
            ref_cos, ref_sin = base.model.rotary_emb(like, position_ids=position_ids)  # (3, 1, head_dim)
            x = torch.randn(3, 4, 1, ref_cos.shape[-1])
            half = x.shape[-1] // 2
            rotate_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
            assert torch.equal(cos[:, 0], ref_cos)
            assert torch.equal(x.index_select(-1, order) * signed_sin, rotate_half * ref_sin.unsqueeze(1))
    assert stack.rotary.static == (rope is None or rope["rope_type"] != "dynamic")


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


# ---- XLoraModel: layers run directly (the default for these bases) against base(...) ---------------------------
def xlora(arch: str, tmp_path, **config) -> XLoraModel:
    """Three unlike experts (one adapts embed_tokens) and a gate that moves with the text."""
    base = bases()[arch]
    adapters = make_experts(base, "llama", tmp_path / arch)
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, layerwise_scalings=True,
                                                   **config))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    assert DecoderStack.of(model.base) is not None
    return model


@contextmanager
def plain(model: XLoraModel):
    """The same model through base(...), as before fast_decode."""
    model.direct_layers = False
    try:
        yield
    finally:
        model.direct_layers = True


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral-window", "qwen2-window"])
def test_xlora_forward_with_caches_matches_the_plain_path(arch, tmp_path):
    """Prefill a left-padded batch, then 10 cached steps, granular: logits and scalings of every step as
    through base(...); so is the frozen step (scalings given, no scaling pass)."""
    model = xlora(arch, tmp_path, scaling_pass_value=0.5)  # every expert in the scaling pass too
    ids, mask = left_padded()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = {True: (DynamicCache(), DynamicCache()), False: (DynamicCache(), DynamicCache())}
    with torch.no_grad():
        for step in range(11):
            outs = {}
            for direct in (True, False):
                model.direct_layers = direct
                scaling_cache, mixed_cache = caches[direct]
                outs[direct] = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                     past_key_values=mixed_cache, scaling_past_key_values=scaling_cache,
                                     logits_to_keep=1)
            model.direct_layers = True
            assert torch.allclose(outs[True].logits, outs[False].logits, atol=1e-6, rtol=0), f"step {step}"
            assert torch.allclose(outs[True].scalings, outs[False].scalings, atol=1e-6, rtol=0)
            ids = outs[False].logits[:, -1].argmax(-1, keepdim=True)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        frozen = outs[False].scalings
        for direct in (True, False):
            model.direct_layers = direct
            outs[direct] = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                 past_key_values=caches[direct][1], scalings=frozen)
        model.direct_layers = True
    assert torch.allclose(outs[True].logits, outs[False].logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "mistral-window", "qwen2-window"])
@pytest.mark.parametrize("mode", [{}, {"freeze_scalings_after": 2}, {"freeze_scalings_after": 0, "fold_frozen": True}])
def test_generate_is_token_for_token_the_plain_path_and_a_no_cache_run(arch, mode, tmp_path):
    """Batched, left-padded greedy generation: the same tokens and scalings as through base(...), and the
    granular tokens equal a loop that re-runs the whole sequence without any cache."""
    model = xlora(arch, tmp_path)
    ids, mask = left_padded()
    kwargs = dict(max_new_tokens=10, eos_token_id=None, return_scalings=True, **mode)
    with torch.no_grad():
        ours = model.generate(ids, mask, **kwargs)
        model.decodes_by_hand = False  # the model's own layers, run directly
        layers = model.generate(ids, mask, **kwargs)
        model.decodes_by_hand = True
        with plain(model):
            ref = model.generate(ids, mask, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences) and torch.equal(layers.sequences, ref.sequences)
    assert torch.allclose(ours.scalings, ref.scalings, atol=1e-6, rtol=0)
    assert torch.allclose(layers.scalings, ref.scalings, atol=1e-6, rtol=0)
    if mode:
        return
    seqs, full_mask = ids, mask
    with torch.no_grad():
        for _ in range(10):
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits[:, -1]
            seqs = torch.cat([seqs, logits.argmax(-1, keepdim=True)], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    assert torch.equal(ours.sequences, seqs)


def test_training_loss_and_gradients_match_the_plain_path(tmp_path):
    """The gate's loss and its gradients are those of the plain path (training runs the same forward)."""
    model = xlora("qwen2-window", tmp_path)
    ids, mask = left_padded()
    grads = {}
    for direct in (True, False):
        model.direct_layers = direct
        model.classifier.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        grads[direct] = (loss.detach(), [p.grad.clone() for p in model.classifier.parameters()])
    model.direct_layers = True
    assert torch.allclose(grads[True][0], grads[False][0], atol=1e-6, rtol=0)
    for mine, ref in zip(grads[True][1], grads[False][1]):
        assert torch.allclose(mine, ref, atol=1e-6, rtol=0)


def test_gpt2_keeps_the_plain_path(tmp_path):
    base = tiny_base("gpt2")
    model = XLoraModel.from_base(base, XLoraConfig(adapters=make_experts(base, "gpt2", tmp_path, n=2)))
    assert DecoderStack.of(model.base) is None  # the plain path
