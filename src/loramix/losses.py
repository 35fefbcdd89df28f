"""Losses: the causal language-model loss and the optional terms on the gate's routing.

The paper trains the X-LoRA gate with next-token cross-entropy only. The routing terms are off by default; each
is its own function over the scalings of the attended tokens, so that one can be changed without the others:

* balance   E * sum_e mean_p[e]^2 - 1 per LoRA layer, averaged over layers: 0 when the mean routing is uniform,
            E - 1 when every token goes to one expert (against collapse onto one expert);
* entropy   the mean per-token entropy of the scalings (a positive weight sharpens the routing, a negative one
            spreads it);
* routing   cross-entropy of the scalings against the expert labelled for each position (a row's one label,
            or per span / per chat message), to warm-start the gate; optionally annealed to 0 over training
            (`routing_anneal_steps`), after which the paper's cross-entropy alone shapes the routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import is_finite_number, is_int


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, Hugging Face convention: labels are the inputs, -100 is ignored. `reduction`
    "mean" averages over label tokens; "sum" lets a trainer normalise over a larger (global) batch itself.

    The labels are shifted (position t predicts labels[t + 1], the last position predicts nothing) rather than the
    logits sliced: slicing the (b, t, vocab) logits would copy them, and its backward would fill a zero tensor of
    their size."""
    return F.cross_entropy(logits.flatten(0, 1).float(), shift_labels(labels).to(logits.device).flatten(),
                           ignore_index=-100, reduction=reduction)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(b, t) labels -> (b, t) targets of each position: labels[:, 1:] and -100 for the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


@dataclass
class RoutingLosses:
    """Weights of the optional gate terms (see the module docstring); all 0, the paper's setting, by default.
    routing_weight needs rows that name their expert (DataFormat.expert_field)."""

    balance_weight: float = 0.0
    entropy_weight: float = 0.0
    routing_weight: float = 0.0
    routing_anneal_steps: int = 0  # > 0: the routing weight falls linearly to 0 over this many optimizer steps

    def __post_init__(self) -> None:
        for name in ("balance_weight", "routing_weight"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):
                raise ValueError(f"{name}: got {value!r}, expected a finite number >= 0")
        if not is_finite_number(self.entropy_weight):
            raise ValueError(f"entropy_weight: got {self.entropy_weight!r}, expected a finite number")
        if not (is_int(self.routing_anneal_steps) and self.routing_anneal_steps >= 0):
            raise ValueError(f"routing_anneal_steps: got {self.routing_anneal_steps!r}, expected an integer >= 0")

    @property
    def any(self) -> bool:
        return bool(self.balance_weight or self.entropy_weight or self.routing_weight)

    def routing_weight_at(self, step: int) -> float:
        """The routing term's weight at optimizer step `step` (0-based): constant, or annealed linearly to 0."""
        if not self.routing_anneal_steps:
            return self.routing_weight
        return self.routing_weight * max(0.0, 1.0 - step / self.routing_anneal_steps)


def routing_log_probs(scalings: torch.Tensor, softmaxed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, log_probs) of the routing, both float32 (b, t, L, E). With the classifier's softmax on, the scalings
    already are probabilities; otherwise the terms read a softmax of the raw scalings."""
    if softmaxed:
        probs = scalings.float()
        return probs, probs.clamp_min(1e-9).log()
    log_probs = scalings.float().log_softmax(-1)
    return log_probs.exp(), log_probs


def mixing_entropy(token_probs: torch.Tensor) -> torch.Tensor:
    """Per LoRA layer, the mean over tokens of the entropy over experts, -sum_e p ln p in nats (0 one-hot, ln E
    uniform): token_probs (n, L, E) -> (L,), float32."""
    p = token_probs.float()
    return -(p * p.clamp_min(1e-9).log()).sum(-1).mean(0)


def balance_loss(token_probs: torch.Tensor) -> torch.Tensor:
    """E * sum_e mean_p[e]^2 - 1, averaged over LoRA layers. token_probs: (n, L, E), one row per attended token."""
    n_experts = token_probs.shape[-1]
    mean_p = token_probs.mean(0)  # (L, E): the mean routing of each layer
    return n_experts * (mean_p ** 2).sum(-1).mean() - 1


def entropy_loss(token_probs: torch.Tensor, token_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and layers of -sum_e p log p. Both (n, L, E)."""
    return -(token_probs * token_log_probs).sum(-1).mean()


def routing_loss(log_probs: torch.Tensor, valid: torch.Tensor, expert: torch.Tensor) -> torch.Tensor | None:
    """Supervised routing: mean over the attended, labelled positions (and over layers) of -log p[expert].

    log_probs: (b, t, L, E); valid: (b, t) attended tokens; expert: (b, t) the expert labelled for each position
    (the one that should write the next token), or (b,) one label for all of a row's positions; negative: no
    label (those positions train on cross-entropy only). None when nothing in the batch is labelled."""
    expert = expert[:, None].expand_as(valid) if expert.dim() == 1 else expert  # (b, t)
    labelled = valid & (expert >= 0)  # (b, t)
    if not labelled.any():
        return None
    target = expert[labelled]  # (n,)
    n_lora_layers = log_probs.shape[2]
    picked = log_probs[labelled].gather(-1, target[:, None, None].expand(-1, n_lora_layers, 1))  # (n, L, 1)
    return -picked.mean()


def routing_losses(scalings: torch.Tensor, attention_mask: torch.Tensor, expert: torch.Tensor,
                   softmaxed: bool) -> dict[str, torch.Tensor]:
    """The gate terms over the attended tokens: {"balance", "entropy"} and "routing" when a row is labelled.
    scalings: (b, t, L, E); attention_mask: (b, t); expert: (b, t) per-position labels or (b,) per row."""
    valid = attention_mask.bool()  # (b, t)
    probs, log_probs = routing_log_probs(scalings, softmaxed)
    out = {"balance": balance_loss(probs[valid]), "entropy": entropy_loss(probs[valid], log_probs[valid])}
    supervised = routing_loss(log_probs, valid, expert)
    if supervised is not None:
        out["routing"] = supervised
    return out
