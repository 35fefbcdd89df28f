"""Losses: the causal LM loss against transformers' own, the routing terms against a hand computation."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, tiny_base

from loramix import model as model_module
from loramix.losses import (
    RoutingLosses,
    balance_loss,
    causal_lm_loss,
    entropy_loss,
    routing_log_probs,
    routing_loss,
    routing_losses,
    shift_labels,
)


def test_causal_lm_loss_equals_the_loss_transformers_computes():
    base = tiny_base("llama")
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt without loss
    with torch.no_grad():
        out = base(input_ids=ids, labels=labels)
    assert torch.allclose(causal_lm_loss(out.logits, labels), out.loss, atol=1e-6)
    n_targets = int((labels[:, 1:] != -100).sum())
    assert torch.allclose(causal_lm_loss(out.logits, labels, reduction="sum"), out.loss * n_targets, atol=1e-5)


def test_shift_labels_and_the_model_module_re_export():
    labels = torch.tensor([[5, 6, 7], [-100, 8, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, -100], [8, 9, -100]]
    assert model_module.causal_lm_loss is causal_lm_loss and model_module.shift_labels is shift_labels


def test_routing_losses_against_a_hand_computation():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 2), -1)  # (b, t, L, E)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expert = torch.tensor([1, -1])
    out = routing_losses(probs, mask, expert, softmaxed=True)
    tokens = [probs[0, 0], probs[0, 1], probs[1, 0], probs[1, 1], probs[1, 2]]  # each (L, E)
    mean = sum(tokens) / 5
    assert torch.allclose(out["balance"], 2 * (mean ** 2).sum(-1).mean() - 1)
    entropy = sum(-(t * t.log()).sum(-1).mean() for t in tokens) / 5
    assert torch.allclose(out["entropy"], entropy)
    assert torch.allclose(out["routing"], -(probs[0, :2, :, 1].log()).mean())


def test_raw_scalings_are_softmaxed_and_unlabelled_batches_take_no_routing_loss():
    torch.manual_seed(1)
    raw = torch.randn(2, 3, 4, 3)
    probs, log_probs = routing_log_probs(raw, softmaxed=False)
    assert torch.allclose(probs, raw.softmax(-1)) and torch.allclose(log_probs, raw.log_softmax(-1))
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert routing_loss(log_probs, valid, torch.tensor([-1, -1])) is None
    assert "routing" not in routing_losses(raw, valid.long(), torch.tensor([-1, -1]), softmaxed=False)
    # the bounds the docstring states: 0 for uniform routing, E - 1 for collapse onto one expert
    uniform = torch.full((5, 4, 3), 1 / 3)
    collapsed = torch.zeros(5, 4, 3)
    collapsed[..., 0] = 1
    assert float(balance_loss(uniform)) == pytest.approx(0.0, abs=1e-6)
    assert float(balance_loss(collapsed)) == pytest.approx(2.0)
    assert float(entropy_loss(uniform, uniform.log())) == pytest.approx(torch.log(torch.tensor(3.0)).item())


# ---- routing labels per token and the annealed routing term (issue 15) -------------------------------------------
def test_routing_loss_takes_a_label_per_token():
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(2, 3, 4, 2), -1)  # (b, t, L, E)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expert = torch.tensor([[0, 1, 1], [-100, 1, 0]])  # the padded position's label and -100 are ignored
    out = routing_losses(probs, mask, expert, softmaxed=True)
    picked = [probs[0, 0, :, 0], probs[0, 1, :, 1], probs[1, 1, :, 1], probs[1, 2, :, 0]]  # each (L,)
    assert torch.allclose(out["routing"], -torch.stack(picked).log().mean())
    row_labels = routing_losses(probs, mask, torch.tensor([1, -1]), softmaxed=True)["routing"]
    assert torch.allclose(row_labels, routing_losses(probs, mask, torch.tensor([[1, 1, 1], [-1, -1, -1]]),
                                                     softmaxed=True)["routing"])  # a row label = all its tokens
    assert "routing" not in routing_losses(probs, mask, torch.full((2, 3), -100), softmaxed=True)


def test_the_routing_weight_anneals_linearly_to_zero():
    annealed = RoutingLosses(routing_weight=2.0, routing_anneal_steps=4)
    assert [annealed.routing_weight_at(s) for s in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert RoutingLosses(routing_weight=2.0).routing_weight_at(1000) == 2.0
    with pytest.raises(ValueError, match="routing_anneal_steps: got -1, expected an integer >= 0"):
        RoutingLosses(routing_anneal_steps=-1)


@pytest.mark.parametrize("field, value", [("balance_weight", -0.1), ("balance_weight", float("nan")),
                                          ("routing_weight", float("inf")), ("routing_weight", "1"),
                                          ("entropy_weight", float("nan")), ("routing_anneal_steps", 2.5),
                                          ("routing_anneal_steps", True)])
def test_routing_losses_refuse_a_bad_weight_naming_it(field, value):
    """A Python caller gets what the CLI's flags enforce: finite weights, non-negative where a sign is meaningless."""
    with pytest.raises(ValueError, match=f"^{field}: got "):
        RoutingLosses(**{field: value})
    assert RoutingLosses(entropy_weight=-0.5).entropy_weight == -0.5  # a negative entropy weight flattens: allowed


def test_mixing_entropy_is_each_layers_mean_token_entropy():
    import math

    from loramix.losses import mixing_entropy

    torch.manual_seed(0)
    probs = torch.rand(5, 3, 4).softmax(-1)
    probs[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one-hot: 0 · ln 0 counts as 0
    loop = [sum(-sum(p * math.log(p) for p in probs[n, layer].tolist() if p > 0) for n in range(5)) / 5
            for layer in range(3)]
    torch.testing.assert_close(mixing_entropy(probs), torch.tensor(loop), rtol=0, atol=1e-6)
