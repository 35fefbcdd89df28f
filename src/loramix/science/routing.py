"""What the gate does on each domain's held-out prompts: the scalings over their tokens, which expert they go to,
and how much the gate mixes experts (entropy per layer, the share of layers where two experts take part).

scalings[n, layer, expert]: one row per prompt token (all held-out prompts of a domain, padding dropped), each
(token, layer) a distribution over experts (softmax gate; with top-k, zeros outside the k).
"""

from __future__ import annotations

import torch

from ..losses import mixing_entropy
from .scoring import prompt_text

TAKES_PART = 0.2  # an expert takes part in a layer at a token when its scaling there is at least this


@torch.no_grad()
def prompt_scalings(model, tokenizer, rows: list[dict], *, batch_size: int = 8, top_k_lora: int | None = None
                    ) -> torch.Tensor:
    """The X-LoRA model's scalings over every token of the rows' prompts (as the model reads them: chat template
    included): (n tokens, n_lora_layers, n_experts), float32."""
    out = []
    tokenizer.padding_side = "right"
    for start in range(0, len(rows), batch_size):
        texts = [prompt_text(row, tokenizer) for row in rows[start:start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = {} if top_k_lora is None else {"top_k_lora": top_k_lora}
        scalings = model(input_ids=enc["input_ids"].to(model.device),
                         attention_mask=enc["attention_mask"].to(model.device), **kwargs).scalings
        out.append(scalings[enc["attention_mask"].bool().to(scalings.device)].float().cpu())
    return torch.cat(out)


def routing(scalings: torch.Tensor, expert_names: list[str]) -> dict[str, float]:
    """Mean scaling of each expert over tokens and layers (sums to 1 for a softmax gate)."""
    mean = scalings.float().mean(dim=(0, 1))
    return {name: round(float(v), 4) for name, v in zip(expert_names, mean)}


def mixing(scalings: torch.Tensor) -> dict:
    """entropy_per_layer: mean over tokens of each layer's entropy over experts (nats; 0 one-hot, ln E uniform);
    entropy: its mean over layers; two_experts_share: the share of (token, layer) pairs where at least two experts
    have a scaling >= TAKES_PART; layers_mixing_share: the share of layers where the token-mean scalings have
    two experts >= TAKES_PART."""
    p = scalings.float()
    entropy = mixing_entropy(p)  # (L,)
    two = ((p >= TAKES_PART).sum(-1) >= 2).float()  # (n, L)
    mean_layers = ((p.mean(0) >= TAKES_PART).sum(-1) >= 2).float()  # (L,)
    return {"entropy": round(float(entropy.mean()), 4),
            "entropy_per_layer": [round(float(x), 4) for x in entropy],
            "two_experts_share": round(float(two.mean()), 4),
            "layers_mixing_share": round(float(mean_layers.mean()), 4)}
