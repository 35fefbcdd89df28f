"""Routing health of the X-LoRA gate while it trains: how it mixes the experts, and alarms when it degenerates.

For the attended tokens n of a batch (attention mask 1) and each LoRA layer l, with p[n, l, :] the mixing
distribution over the E experts (the scalings, which are probabilities with the classifier's softmax on; a softmax
of the raw scalings otherwise, as the routing losses read them, `losses.routing_log_probs`):

    entropy[l]   = mean_n  -sum_e p[n, l, e] ln p[n, l, e]      the mixing entropy, in nats: 0 .. ln E
    share[l, e]  = mean_n  p[n, l, e]                           each expert's share of the weight
    top1[l, e]   = mean_n  [e = argmax_e' p[n, l, e']]          how often the expert weighs most (ties: the first)

`RoutingTally` sums these over the micro-batches of a logging window (and over processes), `RoutingHealth` is the
result, with its scalars for TensorBoard / W&B, and `RoutingWatch` turns a run's successive reports into alarms:

* **collapse onto one expert**: the same expert holds more than `COLLAPSE_SHARE` (0.9) of the weight in every
  LoRA layer, so the other experts are effectively unused;
* **collapse into hard routing**: the mixing entropy is below `min_entropy(E)` nats in every LoRA layer. The
  floor is one bit (ln 2 nats), capped at half the largest possible entropy: min(ln 2, ln(E) / 2). Entropy below
  one bit means fewer than two experts' worth of mixing per token (exp(H) < 2: each token is effectively served
  by one expert), which is what "entropy below one" can mean independently of the unit. One nat would not do:
  with two experts the largest entropy is ln 2 = 0.69 nats, so every gate, even a uniform one, would be "below
  one". The cap keeps a healthy mix of two or three experts out of the alarm (with E = 2 the floor is 0.35 nats,
  about a 0.89 / 0.11 split per token);
* **uniform**: the mixing entropy is above `UNIFORM_ENTROPY` (99%) of ln E in every LoRA layer (for E = 2 every
  token within about 0.56 / 0.44 of an even split): the gate has not learned to tell the experts apart. A fresh
  gate often starts near uniform, so this alarm waits for the second report ("stays uniform").

With one expert there is nothing to mix and no alarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..losses import routing_log_probs

COLLAPSE_SHARE = 0.9  # one expert above this share of the weight in every LoRA layer: collapse
UNIFORM_ENTROPY = 0.99  # the mixing entropy above this fraction of ln E in every LoRA layer: uniform


def min_entropy(n_experts: int) -> float:
    """The collapse floor of the mixing entropy, in nats: one bit, at most half of ln E (module docstring)."""
    return min(math.log(2), math.log(n_experts) / 2)


@dataclass(frozen=True)
class RoutingHealth:
    """The gate's routing over `tokens` attended tokens. entropy (L,) in nats; share and top1 (L, E), each row
    summing to 1; all float64 on the CPU. Layers and experts are named as the model names them."""

    layer_names: tuple[str, ...]
    expert_names: tuple[str, ...]
    tokens: int
    entropy: torch.Tensor  # (L,)
    share: torch.Tensor  # (L, E)
    top1: torch.Tensor  # (L, E)

    def scalars(self) -> dict[str, float]:
        """The values a run reports: routing/entropy (mean over layers) and routing/entropy/<layer>, and per
        expert routing/share/<expert> and routing/top1/<expert> (means over layers)."""
        values = {"routing/entropy": float(self.entropy.mean())}
        values.update({f"routing/entropy/{name}": float(h) for name, h in zip(self.layer_names, self.entropy)})
        for e, name in enumerate(self.expert_names):
            values[f"routing/share/{name}"] = float(self.share[:, e].mean())
            values[f"routing/top1/{name}"] = float(self.top1[:, e].mean())
        return values

    def record(self) -> dict[str, object]:
        """The compact form for metrics.jsonl: the mean entropy and each expert's share and top-1 rate."""
        return {"entropy": float(self.entropy.mean()),
                "share": {n: float(self.share[:, e].mean()) for e, n in enumerate(self.expert_names)},
                "top1": {n: float(self.top1[:, e].mean()) for e, n in enumerate(self.expert_names)}}

    def summary(self) -> str:
        """One phrase for a log line: 'routing entropy 0.612 nats, share a 0.55 b 0.45'."""
        shares = " ".join(f"{n} {float(self.share[:, e].mean()):.2f}" for e, n in enumerate(self.expert_names))
        return f"routing entropy {float(self.entropy.mean()):.3f} nats, share {shares}"


class RoutingTally:
    """Sums of the routing statistics over micro-batches, kept on the scalings' device in float64 (no host sync
    per micro-batch); `health` turns them into means."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None  # () count of attended tokens
        self.entropy: torch.Tensor | None = None  # (L,) sum over tokens of the mixing entropy
        self.share: torch.Tensor | None = None  # (L, E) sum over tokens of p
        self.top1: torch.Tensor | None = None  # (L, E) count of tokens where the expert weighs most

    def add(self, scalings: torch.Tensor, attention_mask: torch.Tensor, softmaxed: bool) -> None:
        """Add a batch: scalings (b, t, L, E) as the classifier returned them, attention_mask (b, t)."""
        valid = attention_mask.to(scalings.device).bool()
        probs, log_probs = routing_log_probs(scalings.detach(), softmaxed)
        p, log_p = probs[valid].double(), log_probs[valid].double()  # (n, L, E)
        n_experts = p.shape[-1]
        sums = (torch.tensor(float(p.shape[0]), dtype=torch.float64, device=p.device),
                -(p * log_p).sum(-1).sum(0),
                p.sum(0),
                torch.nn.functional.one_hot(p.argmax(-1), n_experts).double().sum(0))
        if self.tokens is None:
            self.tokens, self.entropy, self.share, self.top1 = sums
        else:
            self.tokens, self.entropy, self.share, self.top1 = (
                a + b for a, b in zip((self.tokens, self.entropy, self.share, self.top1), sums))

    def health(self, layer_names: Sequence[str], expert_names: Sequence[str],
               sum_: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RoutingHealth:
        """The means over every token added; `sum_` sums a tensor over the processes of a distributed run (in
        place, as `Distributed.sum_`), so each process must call it."""
        if self.tokens is None:
            raise ValueError("routing health: no scalings were added")
        n_layers, n_experts = self.share.shape
        if (len(layer_names), len(expert_names)) != (n_layers, n_experts):
            raise ValueError(f"routing health: {len(layer_names)} layer and {len(expert_names)} expert names for "
                             f"scalings over {n_layers} layers and {n_experts} experts")
        flat = torch.cat([self.tokens.reshape(1), self.entropy, self.share.reshape(-1), self.top1.reshape(-1)])
        if sum_ is not None:
            flat = sum_(flat)
        flat = flat.cpu()
        tokens = float(flat[0])
        means = flat[1:] / max(tokens, 1.0)
        cells = n_layers * n_experts
        return RoutingHealth(tuple(layer_names), tuple(expert_names), int(tokens), means[:n_layers],
                             means[n_layers:n_layers + cells].reshape(n_layers, n_experts),
                             means[n_layers + cells:].reshape(n_layers, n_experts))


def routing_health(scalings: torch.Tensor, attention_mask: torch.Tensor, *, softmaxed: bool = True,
                   layer_names: Sequence[str] | None = None,
                   expert_names: Sequence[str] | None = None) -> RoutingHealth:
    """The routing health of one batch: scalings (b, t, L, E), attention_mask (b, t). Unnamed layers and experts
    are called layer_<l> and expert_<e>."""
    tally = RoutingTally()
    tally.add(scalings, attention_mask, softmaxed)
    n_layers, n_experts = scalings.shape[-2:]
    return tally.health(layer_names or [f"layer_{i}" for i in range(n_layers)],
                        expert_names or [f"expert_{i}" for i in range(n_experts)])


def routing_alarms(health: RoutingHealth, *, collapse_share: float = COLLAPSE_SHARE,
                   entropy_floor: float | None = None,
                   uniform_entropy: float = UNIFORM_ENTROPY) -> dict[str, str]:
    """The alarms `health` raises, kind -> message: "collapse" (onto one expert, or into hard routing) and
    "uniform" (see the module docstring). `entropy_floor` in nats, default `min_entropy(E)`."""
    n_experts = len(health.expert_names)
    if n_experts < 2:
        return {}
    alarms = {}
    floor = min_entropy(n_experts) if entropy_floor is None else entropy_floor
    dominant = (health.share > collapse_share).all(0)  # (E,) above the threshold in every layer
    if dominant.any():
        e = int(dominant.nonzero()[0])
        alarms["collapse"] = (f"routing collapse: expert {health.expert_names[e]!r} holds more than "
                              f"{collapse_share:.0%} of the weight in every LoRA layer (mean share "
                              f"{float(health.share[:, e].mean()):.3f}); the other experts are effectively unused")
    elif bool((health.entropy < floor).all()):
        alarms["collapse"] = (f"routing collapse: the mixing entropy is below {floor:.3f} nats in every LoRA layer "
                              f"(highest {float(health.entropy.max()):.3f}): each token is effectively served by "
                              f"one expert")
    ceiling = uniform_entropy * math.log(n_experts)
    if bool((health.entropy > ceiling).all()):
        alarms["uniform"] = (f"the gate is uniform: the mixing entropy is above {uniform_entropy:.0%} of its "
                             f"largest value ln {n_experts} = {math.log(n_experts):.3f} nats in every LoRA layer "
                             f"(lowest {float(health.entropy.min()):.3f}); it does not tell the experts apart")
    return alarms


class RoutingWatch:
    """A run's alarms over its successive routing reports: each alarm is raised when it starts to hold (again
    only after it has cleared), and "uniform" only from the second report on (a fresh gate starts near uniform;
    the alarm is that it stays so)."""

    def __init__(self) -> None:
        self.reports = 0
        self.active: set[str] = set()

    def update(self, health: RoutingHealth) -> list[str]:
        """The messages of the alarms that start with this report."""
        self.reports += 1
        alarms = routing_alarms(health)
        if self.reports == 1:
            alarms.pop("uniform", None)
        new = [message for kind, message in alarms.items() if kind not in self.active]
        self.active = set(alarms)
        return new


__all__ = ["COLLAPSE_SHARE", "UNIFORM_ENTROPY", "RoutingHealth", "RoutingTally", "RoutingWatch", "min_entropy",
           "routing_alarms", "routing_health"]
