"""The scaling head ("X-LoRA classifier") and the turning of its scalings into mixing weights.

Paper, section 2: the gate reads the last hidden state h[b, t] of the scaling pass and predicts, per token,
one weight per expert (and per LoRA layer with `layerwise_scalings`):

    logits = last(inner(h))                      (b, t, L*E) layerwise, (b, t, E) otherwise
    scalings = softmax(logits / temperature)     (b, t, L, E), over experts

`inner` is depth-1 blocks of Linear (+ ReLU + Dropout); the module keeps the original `xlora` library's
attribute names (`inner.{i}`, `last`) so its published checkpoints load as they are.

Precision: the Linear layers run in the model's compute dtype, but the softmax (and `mixing_weights`' top-k and
re-normalisation) run in float32: bf16 keeps 8 bits of mantissa, so a bf16 softmax over nine experts rounds each
weight to about 0.4% of itself and can tie the top-k. The model casts the mixing weights to the compute dtype once.

The layers then use mixing weights, derived from the scalings the way PEFT's XLoraLayer does it, per token and
per LoRA layer: keep the top-k experts (others set to 0), optionally re-normalise the kept ones with a softmax,
and multiply by the global scaling weight.
"""

from __future__ import annotations

import torch
from torch import nn


class XLoraClassifier(nn.Module):
    def __init__(self, hidden_size: int, n_experts: int, n_lora_layers: int, *, depth: int, size: int,
                 dropout_p: float, relu_and_dropout: bool, bias: bool, layerwise: bool) -> None:
        super().__init__()
        self.n_experts, self.n_lora_layers, self.layerwise = n_experts, n_lora_layers, layerwise
        self.inner = nn.ModuleList()
        width = hidden_size
        for _ in range(depth - 1):
            self.inner.append(nn.Linear(width, size, bias=bias))
            if relu_and_dropout:
                self.inner.extend([nn.ReLU(), nn.Dropout(dropout_p)])
            width = size
        self.last = nn.Linear(width, n_experts * (n_lora_layers if layerwise else 1), bias=bias)

    def forward(self, hidden: torch.Tensor, *, enable_softmax: bool, temperature: float) -> torch.Tensor:
        """hidden: (b, t, hidden_size) -> scalings (b, t, n_lora_layers, n_experts), float32.

        The head sits on the device of the hidden states it reads (with a sharded base, the last layer's device):
        it moves there on the first call."""
        b, t, _ = hidden.shape
        if hidden.device != self.last.weight.device:
            self.to(hidden.device)
        x = hidden.to(self.last.weight.dtype)
        for module in self.inner:  # `forward`, not a module call: at decode time the calls cost more than the math
            if self.training or not isinstance(module, nn.Dropout):
                x = module.forward(x)
        logits = self.last.forward(x).float()  # (b, t, L*E) or (b, t, E)
        if self.layerwise:
            logits = logits.reshape(b, t, self.n_lora_layers, self.n_experts)
        else:
            logits = logits.unsqueeze(2).expand(b, t, self.n_lora_layers, self.n_experts)
        if not enable_softmax:
            return logits
        if temperature != 1.0:  # logits / 1 is logits, exactly
            logits = logits / temperature
        return torch.softmax(logits, dim=-1)  # (b, t, L, E), float32 probabilities

    def hidden_linears(self) -> list[nn.Linear]:
        return [m for m in self.inner if isinstance(m, nn.Linear)]


def mixing_weights(scalings: torch.Tensor, *, top_k: int | None, softmax_topk: bool,
                   global_weight: float) -> torch.Tensor:
    """Scalings (..., n_experts) -> the weights the layers apply, per token and LoRA layer (PEFT's semantics).
    Computed in float32 whatever the scalings' dtype (a caller may pass edited bf16 scalings)."""
    w = scalings.float()
    if top_k is not None and top_k < w.shape[-1]:
        kept = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, w.topk(top_k, dim=-1).indices, True)
        w = w * kept.to(w.dtype)
    if softmax_topk:
        nonzero = w != 0
        w = torch.softmax(w.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    if global_weight != 1.0:
        w = w * global_weight
    return w
