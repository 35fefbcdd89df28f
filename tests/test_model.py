"""XLoraModel against PEFT's XLoraModel (the reference semantics): both passes' logits and scalings, loss and
gradients, the knobs, the scalings log, and the two KV caches. The mixed layers (and GPT-2, which PEFT cannot
mix) are tested in test_layers.py, the scaling head and the mixing weights in test_classifier.py."""

from __future__ import annotations

import pytest
import torch
from helpers import peft_reference, tiny_xlora

TOL = 1e-5

# (layerwise, depth, top_k, softmax, softmax_topk, scaling_pass_value, global weight, temperature)
VARIANTS = {
    "broadcast-depth1": dict(layerwise_scalings=False, xlora_depth=1),
    "layerwise-depth2": dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16),
    "layerwise-depth3-topk2-temp": dict(layerwise_scalings=True, xlora_depth=3, xlora_size=12, top_k_lora=2,
                                        softmax_temperature=0.5),
    "softmax-topk": dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16, top_k_lora=2,
                         enable_softmax=False, enable_softmax_topk=True),
    "scaling-pass-value-and-weight": dict(layerwise_scalings=False, xlora_depth=2, xlora_size=16,
                                          scaling_pass_value=0.3, global_scaling_weight=0.7),
    "scaling-pass-topk": dict(layerwise_scalings=True, xlora_depth=1, scaling_pass_value=0.5, top_k_lora=1),
}


# the full grid on Llama; Mistral and Qwen2 take two variants each
CASES = [("llama", v) for v in VARIANTS] + [(a, v) for a in ("mistral", "qwen2")
                                            for v in ("layerwise-depth2", "softmax-topk")]


@pytest.mark.parametrize("arch,variant", CASES)
def test_logits_and_scalings_match_peft(arch, variant, tmp_path, ids):
    config = VARIANTS[variant]
    base, adapters, model = tiny_xlora(arch, tmp_path, **config)
    reference = peft_reference(base, adapters, model, **config)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask)
        theirs = reference(input_ids=ids, attention_mask=mask)
        plain = base(input_ids=ids, attention_mask=mask)
    assert (ours.logits - plain.logits).abs().max() > 1e-2  # the experts really change the output
    torch.testing.assert_close(ours.logits, theirs.logits, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.scalings, reference.get_latest_scalings(), atol=TOL, rtol=0)
    assert ours.scalings.shape == (2, ids.shape[1], model.n_lora_layers, model.n_experts)


def test_lora_layer_order_is_peft_order(tmp_path):
    base, adapters, model = tiny_xlora("llama", tmp_path, xlora_depth=1)
    reference = peft_reference(base, adapters, model, xlora_depth=1)
    from peft.tuners.lora import LoraLayer

    peft_order = [n.split("base_model.lora_model.model.", 1)[1] for n, m in reference.named_modules()
                  if isinstance(m, LoraLayer)]
    assert model.lora_layer_names == peft_order
    assert model.lora_layer_names[0] == "model.embed_tokens"
    assert model.expert_names == list(adapters)


def test_loss_and_classifier_gradients_match_peft(tmp_path, ids):
    config = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    base, adapters, model = tiny_xlora("llama", tmp_path, **config)
    reference = peft_reference(base, adapters, model, **config)
    labels = ids.clone()
    labels[:, :4] = -100
    ours = model(input_ids=ids, labels=labels)
    theirs = reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=TOL, rtol=0)
    ours.loss.backward()
    theirs.loss.backward()
    mine = model.classifier.hidden_linears() + [model.classifier.last]
    peft_linears = [m for m in reference.base_model.internal_xlora_classifier.layers
                    if isinstance(m, torch.nn.Linear)]
    for own, other in zip(mine, peft_linears):
        torch.testing.assert_close(own.weight.grad, other.weight.grad, atol=1e-6, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)


def test_knobs_match_peft_setters(tmp_path, ids):
    config = dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    base, adapters, model = tiny_xlora("llama", tmp_path, **config)
    reference = peft_reference(base, adapters, model, **config)
    model.set_topk_lora(1)
    reference.set_topk_lora(1)
    model.set_global_scaling_weight(0.5)
    reference.set_global_scaling_weight(0.5)
    model.set_scaling_pass_value(None)  # 1 / n_experts
    reference.set_scaling_pass_value(None)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=TOL, rtol=0)
    assert model.get_global_scaling_weight() == 0.5
    with pytest.raises(ValueError, match="top_k_lora"):
        model.set_topk_lora(9)
    with pytest.raises(ValueError, match="softmax_temperature"):
        model.set_softmax_temperature(0)
    model.set_softmax_temperature(2.0)
    assert model.config.softmax_temperature == 2.0


def test_scalings_log(tmp_path, ids):
    _, _, model = tiny_xlora("llama", tmp_path, xlora_depth=1)
    with torch.no_grad():
        model(input_ids=ids)
        assert model.get_scalings_log() == []
        model.enable_scalings_logging()
        first = model(input_ids=ids).scalings
        model(input_ids=ids[:, :4])
        model.disable_scalings_logging()
        model(input_ids=ids)
    log = model.get_scalings_log()
    assert len(log) == 2 and torch.equal(log[0], first) and log[1].shape[1] == 4
    assert torch.equal(model.get_latest_scalings(), first)
    buckets = model.get_bucketed_scalings_log()
    assert sorted(buckets) == [4, ids.shape[1]] and buckets[4][0] == [1]
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_each_pass_carries_its_own_kv_cache(tmp_path, ids):
    """Prompt then one token with both caches equals one full forward (the basis of cached generation)."""
    _, _, model = tiny_xlora("llama", tmp_path, layerwise_scalings=True, xlora_depth=2, xlora_size=16)
    with torch.no_grad():
        full = model(input_ids=ids)
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=first.past_key_values,
                     scaling_past_key_values=first.scaling_past_key_values, use_cache=True)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=TOL, rtol=0)
    torch.testing.assert_close(step.scalings[:, -1], full.scalings[:, -1], atol=TOL, rtol=0)


def test_per_call_gate_options_are_checked_by_name(tmp_path, ids):
    """Out-of-range per-call options are ValueErrors naming the option, an int beyond float range included."""
    _, _, model = tiny_xlora("llama", tmp_path)
    for bad in (0.0, -1.0, float("nan"), float("inf"), 10**400, True):
        with pytest.raises(ValueError, match="softmax_temperature"):
            model(input_ids=ids, softmax_temperature=bad)
    for bad in (0, model.n_experts + 1, 1.0, True):
        with pytest.raises(ValueError, match="top_k_lora"):
            model(input_ids=ids, top_k_lora=bad)
