"""The scaling head and the mixing weights (classifier.py) against plain loops over tokens, layers and experts:
the head's Linear/ReLU chain and its softmax over experts, and PEFT's top-k, softmax-over-the-kept and global
weight semantics."""

from __future__ import annotations

import math

import pytest
import torch

from loramix.classifier import XLoraClassifier, mixing_weights

TOL = 1e-6
HIDDEN, N_EXPERTS, N_LORA_LAYERS = 16, 4, 3


def plain_mixing_weights(scalings: torch.Tensor, top_k, softmax_topk: bool, global_weight: float) -> torch.Tensor:
    """PEFT's XLoraLayer semantics, one (token, LoRA layer) vector of expert scalings at a time."""
    out = torch.zeros(scalings.shape, dtype=torch.float32)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in scalings.shape[:-1]]):
        row = [float(v) for v in scalings[tuple(index.tolist())]]
        kept = sorted(range(len(row)), key=lambda e: -row[e])[:top_k] if top_k else list(range(len(row)))
        weights = [row[e] if e in kept else 0.0 for e in range(len(row))]
        if softmax_topk:  # a softmax over the kept (non-zero) experts only
            total = sum(math.exp(weights[e]) for e in range(len(row)) if weights[e] != 0)
            weights = [math.exp(v) / total if v != 0 else 0.0 for v in weights]
        out[tuple(index.tolist())] = torch.tensor([v * global_weight for v in weights])
    return out


@pytest.mark.parametrize("top_k", [None, 1, 2, N_EXPERTS])
@pytest.mark.parametrize("softmax_topk", [False, True])
@pytest.mark.parametrize("global_weight", [1.0, 0.7])
def test_mixing_weights_equal_a_plain_loop(top_k, softmax_topk, global_weight):
    torch.manual_seed(0)
    scalings = torch.softmax(torch.randn(2, 5, N_LORA_LAYERS, N_EXPERTS), dim=-1)  # (b, t, L, E), no ties
    ours = mixing_weights(scalings, top_k=top_k, softmax_topk=softmax_topk, global_weight=global_weight)
    expected = plain_mixing_weights(scalings, top_k, softmax_topk, global_weight)
    torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    n_kept = top_k or N_EXPERTS
    assert ((ours != 0).sum(-1) == n_kept).all()
    if softmax_topk:  # the kept experts' weights sum to the global weight
        torch.testing.assert_close(ours.sum(-1), torch.full(ours.shape[:-1], global_weight), atol=TOL, rtol=0)


def test_mixing_weights_of_bf16_scalings_are_float32():
    torch.manual_seed(1)
    scalings = torch.softmax(torch.randn(1, 6, 1, 9), dim=-1).bfloat16()
    ours = mixing_weights(scalings, top_k=3, softmax_topk=True, global_weight=1.0)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain_mixing_weights(scalings.float(), 3, True, 1.0), atol=TOL, rtol=0)


def plain_head(head: XLoraClassifier, hidden: torch.Tensor, enable_softmax: bool, temperature: float):
    """The head one token at a time: Linear (+ ReLU) blocks, the last Linear, a softmax over each layer's experts."""
    b, t, _ = hidden.shape
    out = torch.zeros(b, t, head.n_lora_layers, head.n_experts)
    linears = head.hidden_linears()
    for i in range(b):
        for j in range(t):
            x = hidden[i, j]
            for linear in linears:
                x = torch.relu(linear.weight @ x + linear.bias)
            logits = head.last.weight @ x + head.last.bias  # (L*E,) layerwise, (E,) otherwise
            for layer in range(head.n_lora_layers):
                row = logits[layer * head.n_experts:(layer + 1) * head.n_experts] if head.layerwise else logits
                if enable_softmax:
                    exps = [math.exp(float(v) / temperature) for v in row]
                    row = torch.tensor([v / sum(exps) for v in exps])
                out[i, j, layer] = row
    return out


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("enable_softmax,temperature", [(True, 1.0), (True, 0.5), (False, 1.0)])
def test_head_equals_a_plain_loop(layerwise, depth, enable_softmax, temperature):
    torch.manual_seed(2)
    head = XLoraClassifier(HIDDEN, N_EXPERTS, N_LORA_LAYERS, depth=depth, size=8, dropout_p=0.2,
                           relu_and_dropout=True, bias=True, layerwise=layerwise).eval()
    hidden = torch.randn(2, 3, HIDDEN)
    with torch.no_grad():
        ours = head(hidden, enable_softmax=enable_softmax, temperature=temperature)
        expected = plain_head(head, hidden, enable_softmax, temperature)
    assert ours.shape == (2, 3, N_LORA_LAYERS, N_EXPERTS) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    if not layerwise:  # one prediction broadcast to every LoRA layer
        assert torch.equal(ours, ours[:, :, :1].expand_as(ours))
