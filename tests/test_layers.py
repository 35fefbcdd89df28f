"""The mixed LoRA layers (layers.py) against the formula computed expert by expert,

    y = W0 x + sum_e w_e s_e B_e A_e x,

for nn.Linear, GPT-2's Conv1D and nn.Embedding; folding against the unfolded layer; and, in a whole model, what
the layers do in each pass (no LoRA in the scaling pass, gradients into trainable experts, GPT-2 against a plain
loop since PEFT cannot mix GPT-2 experts)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_xlora
from torch import nn

from loramix.experts import ExpertModule
from loramix.layers import MixedLoraEmbedding, MixedLoraLinear, MixingState

TOL = 1e-5
IN, OUT = 12, 10


def random_experts(shape_of_a, shape_of_b, ranks, embedding=False) -> list[ExpertModule | None]:
    """Experts with the given ranks (None: the expert does not adapt this layer) and unlike scales."""
    torch.manual_seed(3)
    return [None if r is None else ExpertModule(lora_A=torch.randn(r, shape_of_a), lora_B=torch.randn(shape_of_b, r),
                                                scale=0.5 + e, embedding=embedding)
            for e, r in enumerate(ranks)]


def single_layer(cls, base, experts, **options) -> tuple[MixedLoraLinear | MixedLoraEmbedding, MixingState]:
    """One mixed layer (LoRA layer 0) and the MixingState a model would build for it alone."""
    state = MixingState()
    layer = cls(base, experts, 0, state, trainable=False, **options)
    state.flat_index, state.flat_scale = layer.expert_of_rank, layer.scale_of_rank  # layer 0: index = expert
    state.layer_sizes = [layer.lora_A.shape[0]]
    return layer, state


RANKS = [2, None, 3, 1]  # expert 1 does not adapt the layer


def linear_bases():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(OUT, IN)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return {"linear": nn.Linear(IN, OUT), "conv1d": conv}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_linear_forward_is_the_formula_expert_by_expert(kind):
    base = linear_bases()[kind]
    experts = random_experts(IN, OUT, RANKS)
    layer, state = single_layer(MixedLoraLinear, base, experts, dtype=torch.float32)
    torch.manual_seed(4)
    x = torch.randn(2, 5, IN)
    w = torch.rand(2, 5, 1, len(RANKS))  # (b, t, L=1, E)
    state.set(w)
    with torch.no_grad():
        ours = layer(x)
        expected = base(x)  # W0 x (+ bias)
        for e, m in enumerate(experts):
            if m is not None:
                expected = expected + w[:, :, 0, e, None] * m.scale * (x @ m.lora_A.T @ m.lora_B.T)
    assert (ours - base(x)).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    for e, m in enumerate(experts):  # each expert's own A and B come back out of the stacked weights
        own = layer.expert_module(e)
        assert (own is None) == (m is None)
        if m is not None:
            assert torch.equal(own.lora_A, m.lora_A) and torch.equal(own.lora_B, m.lora_B) and own.scale == m.scale


def test_embedding_forward_is_the_formula_expert_by_expert():
    torch.manual_seed(2)
    base = nn.Embedding(20, OUT, padding_idx=0)
    experts = random_experts(20, OUT, RANKS, embedding=True)
    layer, state = single_layer(MixedLoraEmbedding, base, experts, dtype=torch.float32)
    ids = torch.tensor([[0, 3, 7, 19, 3], [5, 5, 1, 0, 2]])
    w = torch.rand(2, 5, 1, len(RANKS))
    state.set(w)
    with torch.no_grad():
        ours = layer(ids)
        expected = base(ids)
        for e, m in enumerate(experts):
            if m is not None:  # A's column for each id (the lookup; the padding id too), then B
                delta = (m.lora_B @ m.lora_A)[:, ids].permute(1, 2, 0)  # (b, t, dim)
                expected = expected + w[:, :, 0, e, None] * m.scale * delta
    assert (ours - base(ids)).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_no_weights_is_the_base_layer_exactly(kind):
    base = linear_bases()[kind]
    layer, state = single_layer(MixedLoraLinear, base, random_experts(IN, OUT, RANKS))
    state.set(None)  # what the model sets for the scaling pass
    x = torch.randn(3, 4, IN)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_folded_weight_equals_the_layer_under_fixed_weights(kind):
    base = linear_bases()[kind]
    experts = random_experts(IN, OUT, RANKS)
    layer, state = single_layer(MixedLoraLinear, base, experts)
    expert_weights = torch.tensor([0.7, 0.1, 0.2, 0.4])
    x = torch.randn(2, 6, IN)
    with torch.no_grad():
        state.set(expert_weights.expand(2, 6, 1, -1))
        unfolded = layer(x)
        state.folded_weights = (layer.folded_weight(expert_weights),)
        folded = layer(x)
    torch.testing.assert_close(folded, unfolded, atol=TOL, rtol=0)


# ---- the layers inside a model ---------------------------------------------------------------------------------

def test_trainable_adapters_receive_gradients(tmp_path, ids):
    _, _, model = tiny_xlora("llama", tmp_path, xlora_depth=1, use_trainable_adapters=True)
    model(input_ids=ids, labels=ids).loss.backward()
    layer = model.mixed_layers()[1]
    assert layer.lora_A.requires_grad and layer.lora_A.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in model.base.named_parameters() if "lora_" not in n)


def test_scaling_pass_at_zero_computes_no_lora(tmp_path, ids):
    """With scaling_pass_value 0 every mixed layer of the scaling pass is the bare base layer (no weights to apply);
    in the mixed pass every one applies some."""
    _, _, model = tiny_xlora("llama", tmp_path, xlora_depth=1)
    assert model.config.scaling_pass_value == 0
    applied = []  # per mixed-layer call: whether the layer had mixing weights to apply
    hooks = [layer.register_forward_hook(lambda layer, args, out: applied.append(layer.rank_weights(out) is not None))
             for layer in model.mixed_layers()]
    try:
        with torch.no_grad():
            model.compute_scalings(input_ids=ids)  # the scaling pass alone
            scaling_pass, applied[:] = list(applied), []
            model(input_ids=ids, scalings=model.get_latest_scalings())  # the mixed pass alone
    finally:
        for hook in hooks:
            hook.remove()
    assert scaling_pass and not any(scaling_pass)
    assert len(applied) == len(model.mixed_layers()) and all(applied)


# ---- GPT-2: PEFT cannot load its experts into an X-LoRA, so a plain loop is the reference ----------------------
def plain_loop_reference(base, adapters, classifier, config, ids):
    """X-LoRA written the slow obvious way: one expert at a time, module by module."""
    import json
    import math

    from safetensors.torch import load_file

    base = copy.deepcopy(base)
    experts = []
    for path in adapters.values():
        cfg = json.load(open(f"{path}/adapter_config.json"))
        weights = load_file(f"{path}/adapter_model.safetensors")
        per_module = {}
        for key, t in weights.items():
            if ".lora_" not in key:
                continue
            module, kind = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
            per_module.setdefault(module, {})[kind.split(".")[0].replace("embedding_", "")] = t
        for module, ab in per_module.items():
            r = ab["A"].shape[0]
            ab["scale"] = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
        experts.append(per_module)
    names = [n for n, _ in base.named_modules() if any(n in e for e in experts)]
    with torch.no_grad():
        hidden = base(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        scalings = classifier(hidden, enable_softmax=config.enable_softmax, temperature=config.softmax_temperature)
    for layer, name in enumerate(names):
        parent, _, child = name.rpartition(".")
        module = base.get_submodule(name)

        class Looped(torch.nn.Module):
            def __init__(self, inner, layer, name):
                super().__init__()
                self.inner, self.layer, self.name = inner, layer, name

            def forward(self, x):
                out = self.inner(x)
                for e, expert in enumerate(experts):
                    if self.name not in expert:
                        continue
                    ab = expert[self.name]
                    if isinstance(self.inner, torch.nn.Embedding):
                        low = torch.nn.functional.embedding(x, ab["A"].T)
                    else:
                        low = x @ ab["A"].T
                    out = out + scalings[:, :, self.layer, e, None] * ab["scale"] * (low @ ab["B"].T)
                return out

        setattr(base.get_submodule(parent), child, Looped(module, layer, name))
    with torch.no_grad():
        return base(input_ids=ids).logits, scalings


@pytest.mark.parametrize("layerwise", [False, True])
def test_gpt2_conv1d_and_embedding_match_plain_loop(layerwise, tmp_path, ids):
    base, adapters, model = tiny_xlora("gpt2", tmp_path, layerwise_scalings=layerwise, xlora_depth=2, xlora_size=8)
    assert "transformer.wte" in model.lora_layer_names and "transformer.h.0.attn.c_attn" in model.lora_layer_names
    with torch.no_grad():
        ours = model(input_ids=ids)
        plain = base(input_ids=ids).logits
    logits, scalings = plain_loop_reference(base, adapters, model.classifier, model.config, ids)
    assert (ours.logits - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours.scalings, scalings, atol=TOL, rtol=0)
    torch.testing.assert_close(ours.logits, logits, atol=TOL, rtol=0)
