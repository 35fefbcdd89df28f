"""Cached generation against full recomputation, PEFT's generate, single rows, and its own frozen/folded modes."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_experts, padded_batch, peft_reference, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.engine.params import SamplingParams
from loramix.engine.rows import RowState, finish_reason
from loramix.engine.sampling import sample_next_token

CONFIGS = {
    "layerwise-depth2": dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16),
    "broadcast-topk-spv": dict(layerwise_scalings=False, xlora_depth=1, top_k_lora=2, scaling_pass_value=0.2),
}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    base = tiny_base("llama")
    return base, make_experts(base, "llama", tmp_path_factory.mktemp("experts"))


def build(experts, **config):
    base, adapters = experts
    return XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **config))


def no_cache_greedy(model, ids, n):
    """Reference: every step re-runs the whole sequence through both passes (what PEFT does)."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def peft_generate(experts, model, config, ids, mask, n, eos):
    reference = peft_reference(experts[0], experts[1], model, **config)
    return reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_equals_full_recompute_and_peft(name, experts):
    model = build(experts, **CONFIGS[name])
    ids, _ = padded_batch()
    ours = model.generate(ids[:1], max_new_tokens=12, eos_token_id=None)
    assert torch.equal(ours, no_cache_greedy(model, ids[:1], 12))
    ids, mask = padded_batch()
    ours = model.generate(ids, mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(ours, peft_generate(experts, model, CONFIGS[name], ids, mask, 12, None))


def test_left_padded_rows_equal_rows_alone_and_stop_at_eos(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, mask = padded_batch()
    free = model.generate(ids, mask, max_new_tokens=10, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 3])  # a token row 0 produces early: rows finish at different steps
    together = model.generate(ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    for r in range(3):
        start = int((mask[r] == 0).sum())
        alone = model.generate(ids[r:r + 1, start:], max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
        n = alone.shape[1] - (ids.shape[1] - start)
        assert torch.equal(together[r, start:start + alone.shape[1]], alone[0])
        assert (together[r, ids.shape[1] + n:] == 0).all()  # padded after the row ended
    assert torch.equal(together, peft_generate(experts, model, CONFIGS["layerwise-depth2"], ids, mask, 10, eos))


def test_min_new_tokens_blocks_eos(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, _ = padded_batch()
    free = model.generate(ids[:1], max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, ids.shape[1]])  # the very first token
    assert model.generate(ids[:1], max_new_tokens=6, eos_token_id=eos).shape[1] == ids.shape[1] + 1
    held = model.generate(ids[:1], max_new_tokens=6, min_new_tokens=3, eos_token_id=eos)
    assert held.shape[1] >= ids.shape[1] + 3 and eos not in held[0, ids.shape[1]:ids.shape[1] + 3].tolist()


@pytest.mark.parametrize("after", [0, 3])
def test_frozen_scalings_equal_recompute_with_frozen_scalings(after, experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, _ = padded_batch()
    prompt = ids[:1]
    result = model.generate(prompt, max_new_tokens=8, eos_token_id=None, freeze_scalings_after=after,
                            return_scalings=True)
    # reference: positions from (prompt + after - 1) on use the scalings computed there
    seq = prompt.clone()
    frozen_at = prompt.shape[1] + after - 1
    with torch.no_grad():
        for _ in range(8):
            scalings = model(input_ids=seq).scalings
            if seq.shape[1] > frozen_at:
                scalings[:, frozen_at:] = scalings[:, frozen_at:frozen_at + 1]
            logits = model(input_ids=seq, scalings=scalings).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(result.sequences, seq)
    assert torch.allclose(result.scalings[0, after:], result.scalings[0, after:after + 1].expand(8 - after, -1, -1))
    with torch.no_grad():
        before = model(input_ids=seq).logits
    folded = model.generate(prompt, max_new_tokens=8, eos_token_id=None, freeze_scalings_after=after,
                            fold_frozen=True)
    assert torch.equal(folded, seq)
    with torch.no_grad():  # the model mixes per token again after the request
        assert torch.equal(model(input_ids=seq).logits, before)


def test_returned_scalings_are_the_ones_that_produced_each_token(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, _ = padded_batch()
    result = model.generate(ids[:1], max_new_tokens=5, eos_token_id=None, return_scalings=True)
    with torch.no_grad():
        full = model(input_ids=result.sequences).scalings  # (1, t, L, E)
    expected = full[0, ids.shape[1] - 1: ids.shape[1] + 4]
    torch.testing.assert_close(result.scalings[0], expected, atol=1e-5, rtol=0)
    assert result.n_new_tokens == [5] and result.finish_reasons == ["length"]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, eos_token_id=None)
    a = model.generate(ids, mask, seed=5, **kwargs)
    b = model.generate(ids, mask, seed=5, **kwargs)
    c = model.generate(ids, mask, seed=6, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(ids, mask, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(model.generate(ids, mask, seed=1, top_k=1, **kwargs), greedy)
    assert not torch.equal(a, greedy)


def test_repetition_penalty_matches_transformers(experts):
    """The penalty follows HF's RepetitionPenaltyLogitsProcessor; checked against the base model's generate."""
    base = experts[0]
    model = build(experts, **CONFIGS["layerwise-depth2"])
    model.set_global_scaling_weight(0.0)  # experts off: X-LoRA is the base model
    ids, _ = padded_batch()
    ours = model.generate(ids[:1], max_new_tokens=12, repetition_penalty=1.8, eos_token_id=None)
    theirs = base.generate(ids[:1], max_new_tokens=12, repetition_penalty=1.8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_k=-2), "top_k"),
    (dict(temperature=float("nan")), "temperature"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(fold_frozen=True), "fold_frozen"), (dict(stop=["x"]), "tokenizer"),
    pytest.param(dict(temperature=10**400), "temperature", id="int-beyond-float-range"),  # not an OverflowError
])
def test_invalid_parameters(kwargs, field, experts):
    model = build(experts, xlora_depth=1)
    with pytest.raises(ValueError, match=field):
        model.generate(torch.tensor([[5, 6, 7]]), **kwargs)


def test_prompt_longer_than_context(experts):
    model = build(experts, xlora_depth=1)
    with pytest.raises(ValueError, match="context is 128"):
        model.generate(torch.randint(3, 97, (1, 129)), max_new_tokens=1)


def test_streamer_and_stop_strings(experts):
    from transformers import TextIteratorStreamer

    tokenizer = tiny_tokenizer()
    model = build(experts, **CONFIGS["layerwise-depth2"])
    prompt = tokenizer("the cat", return_tensors="pt")["input_ids"]
    full = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    text = tokenizer.decode(full[0, prompt.shape[1]:])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    streamed = model.generate(prompt, max_new_tokens=10, eos_token_id=None, streamer=streamer)
    assert torch.equal(streamed, full) and "".join(streamer) == text
    stop = text[3:5]  # a stop string that appears after a few tokens
    stopped = model.generate(prompt, max_new_tokens=10, eos_token_id=None, stop=[stop], tokenizer=tokenizer)
    stopped_text = tokenizer.decode(stopped[0, prompt.shape[1]:])
    assert stopped_text.endswith(stop) and text.startswith(stopped_text) and len(stopped_text) < len(text)


def test_a_tiny_temperature_samples_greedily(experts):
    """temperature 1e-39 used to overflow float32 (logits / T = inf) and the sampler raised."""
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, mask = padded_batch()
    greedy = model.generate(ids, mask, max_new_tokens=8, eos_token_id=None)
    for temperature in (1e-39, 1e-6):
        tiny = model.generate(ids, mask, max_new_tokens=8, eos_token_id=None, do_sample=True,
                              temperature=temperature, seed=0)
        assert torch.equal(tiny, greedy)


def _rows(n, device="cpu", **params):
    return [RowState.start([5, 6, 7], SamplingParams(**params), device=device, eos_token_ids=[2])
            for _ in range(n)]


def test_sampling_failures_stay_in_their_row():
    logits = torch.randn(3, 11)
    logits[1] = float("nan")
    rows = _rows(3, do_sample=True, seed=0)
    sampled = sample_next_token(logits, rows)
    assert list(sampled.errors) == [1] and "sampling failed" in sampled.errors[1]
    again = sample_next_token(logits[[0, 2]], _rows(2, do_sample=True, seed=0))  # the same rows, without row 1
    assert sampled.tokens[[0, 2]].tolist() == again.tokens.tolist() and not again.errors


def test_finish_reason_rules():
    tok = tiny_tokenizer()

    def row(**params):
        return RowState.start([5, 6, 7], SamplingParams(**params), device="cpu", eos_token_ids=[2],
                              tokenizer=tok, context_length=6)

    r = row(max_new_tokens=10, min_new_tokens=2)
    for token, expected in zip([2, 2, 2], [None, None, "stop"]):  # an EOS ends the row after min_new_tokens
        r.push(token)
        assert finish_reason(r) == expected
    r = row(max_new_tokens=10, stop=["bc"])
    for token, expected in zip(tok("abc")["input_ids"], [None, None, "stop"]):
        r.push(token)
        assert finish_reason(r) == expected
    assert r.take_text(final=True) == "a"  # the text ends before the stop string
    r = row(max_new_tokens=10)  # the context (6) leaves 3 tokens after a 3-token prompt
    assert r.budget == 3
    for token, expected in zip([9, 9, 9], [None, None, "length"]):
        r.push(token)
        assert finish_reason(r) == expected


def test_gate_options_are_arguments_checked_by_name(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, _ = padded_batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match="top_k_lora"):
            model(input_ids=ids, top_k_lora=9)
        with pytest.raises(ValueError, match="softmax_temperature"):
            model(input_ids=ids, softmax_temperature=float("inf"))
        by_argument = model(input_ids=ids, top_k_lora=1, softmax_temperature=0.5).logits
        model.set_topk_lora(1)
        model.set_softmax_temperature(0.5)
        assert torch.equal(model(input_ids=ids).logits, by_argument)


def test_log_probabilities_are_those_of_the_distribution_sampled_from(experts):
    model = build(experts, **CONFIGS["layerwise-depth2"])
    ids, _ = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]  # (3, vocab)
    rows = [RowState.start(ids[0].tolist(), SamplingParams(), device="cpu"),
            RowState.start(ids[1].tolist(), SamplingParams(do_sample=True, temperature=0.7, top_k=5, seed=0),
                           device="cpu"),
            RowState.start(ids[2].tolist(), SamplingParams(do_sample=True, temperature=1.8, top_p=0.9, seed=1),
                           device="cpu")]
    sampled = sample_next_token(logits, rows, logprobs=4)
    unsampled = sample_next_token(logits, [RowState.start(r.prompt, r.params, device="cpu") for r in rows])
    assert torch.equal(sampled.tokens, unsampled.tokens)  # asking for them changes nothing else
    expected = torch.log_softmax(logits.double() / torch.tensor([[1.0], [0.7], [1.8]], dtype=torch.float64), -1)
    chosen = expected.gather(-1, sampled.tokens[:, None])[:, 0]
    torch.testing.assert_close(sampled.logprobs.double(), chosen, atol=1e-4, rtol=0)
    top, top_ids = expected.topk(4, dim=-1)
    torch.testing.assert_close(sampled.top_logprobs.double(), top, atol=1e-4, rtol=0)
    assert torch.equal(sampled.top_ids, top_ids)
    assert int(sampled.tokens[0]) == int(top_ids[0, 0])  # the greedy row took the most likely token


def test_an_expert_on_the_lm_head_generates(tmp_path):
    """An expert that also adapts lm_head: the prefill keeps the logits of the last position only, so the LM head's
    mixing weights must be the last position's too (a shape mismatch crashed generate before). Greedy tokens as a
    loop that re-runs the whole sequence without a cache, through the hand-written step and through base(...)."""
    from loramix.tiny import random_experts

    base = tiny_base("llama")
    adapters = random_experts(base, str(tmp_path), [4, 6], targets=["q_proj", "v_proj", "lm_head"])
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, layerwise_scalings=True))
    assert "lm_head" in model.lora_layer_names
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    ids, mask = padded_batch()
    reference = no_cache_greedy(model, ids[:1], 8)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=8, eos_token_id=None), reference)
    model.direct_layers = False
    assert torch.equal(model.generate(ids[:1], max_new_tokens=8, eos_token_id=None), reference)
