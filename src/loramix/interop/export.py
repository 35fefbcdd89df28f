"""Exporting an X-LoRA with fixed expert weights: one plain PEFT LoRA adapter, or a merged base model.

With the gate replaced by constant scalings S[l, e] (one per LoRA layer and expert), X-LoRA is a plain LoRA.
For an adapted layer l with mixing weights w[l, e] = mixing_weights(S)[l, e] (top-k, softmax over the kept
experts and the global weight, exactly as the model applies them) and experts of rank r_e and scale s_e:

    y = W0 x + sum_e w[l, e] s_e B_e A_e x
      = W0 x + B' A' x,    A' = [A_1; ...; A_E]  (R, in),   B' = [w_1 s_1 B_1, ..., w_E s_E B_E]  (out, R)

with R = sum of the ranks of the experts adapting l. `peft` writes A', B' as one LoRA adapter (rank R, alpha R,
so PEFT's scale alpha/r is 1, per module through rank_pattern / alpha_pattern); `merged` adds B' A' to W0.

The weights come from `--weights` (uniform, or a JSON file) or from data: the gate's mean scalings over a data
file's tokens, a static distillation of the gate.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import nn

from ..cards import export_card, write_card
from ..experts import ExpertModule, save_expert
from ..hub import local_id
from .mistralrs import export_mistralrs
from .saving import new_output_folder, plain_base

TARGETS = ("peft", "merged", "mistralrs")


# ---- the expert weights ------------------------------------------------------------------------------------------
def uniform_scalings(model) -> torch.Tensor:
    """Scalings (n_lora_layers, n_experts) of 1 / n_experts everywhere."""
    return torch.full((model.n_lora_layers, model.n_experts), 1.0 / model.n_experts)


def scalings_from_json(model, path: str) -> torch.Tensor:
    """Read fixed scalings (n_lora_layers, n_experts) from a JSON file holding one of:
    {expert: weight} (the same for every LoRA layer), {LoRA layer name: {expert: weight}} (every layer), or a
    list of n_lora_layers lists of n_experts numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    names, layers = model.expert_names, model.lora_layer_names

    def row(value: Any, where: str) -> list[float]:
        if isinstance(value, list):
            if len(value) != len(names):
                raise ValueError(f"{path}: {where} has {len(value)} weights, the model has {len(names)} experts")
            items = list(zip(names, value))
        elif isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            missing = [n for n in names if n not in value]
            if unknown or missing:
                raise ValueError(f"{path}: {where} names experts {sorted(value)}, the model's are {names}")
            items = [(n, value[n]) for n in names]
        else:
            raise ValueError(f"{path}: {where} must be a list or an object of expert weights")
        for name, v in items:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                raise ValueError(f"{path}: {where}, expert {name!r}: weight {v!r} is not a number")
        return [float(v) for _, v in items]

    if isinstance(data, dict) and data and all(isinstance(v, (dict, list)) for v in data.values()):
        unknown = sorted(set(data) - set(layers))
        missing = [n for n in layers if n not in data]
        if unknown or missing:
            raise ValueError(f"{path}: per-layer weights must name every LoRA layer; unknown {unknown[:3]}, "
                             f"missing {missing[:3]}")
        return torch.tensor([row(data[layer], f"layer {layer!r}") for layer in layers])
    if isinstance(data, list) and all(isinstance(v, list) for v in data):
        if len(data) != len(layers):
            raise ValueError(f"{path}: {len(data)} rows of weights, the model has {len(layers)} LoRA layers")
        return torch.tensor([row(v, f"row {i}") for i, v in enumerate(data)])
    return torch.tensor([row(data, "the top level")] * len(layers))


@torch.no_grad()
def mean_gate_scalings(model, tokenizer, sources: list[str], fmt=None, batch_size: int = 8,
                       log=print) -> torch.Tensor:
    """The gate's scalings (n_lora_layers, n_experts) averaged over every token of the data (read with the
    training loaders and data format), prompt and completion alike: a static distillation of the gate."""
    from ..training.data import DataFormat, collate, load_dataset

    dataset = load_dataset(sources, tokenizer, fmt or DataFormat(), log=log)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total = torch.zeros(model.n_lora_layers, model.n_experts, dtype=torch.float64)
    n_tokens = 0
    for start in range(0, len(dataset.examples), batch_size):
        batch = collate(dataset.examples[start:start + batch_size], pad_id)
        mask = batch["attention_mask"].to(model.device)  # (b, t)
        scalings, _ = model.compute_scalings(input_ids=batch["input_ids"].to(model.device), attention_mask=mask)
        total += (scalings.double() * mask[:, :, None, None]).sum(dim=(0, 1)).cpu()  # (L, E)
        n_tokens += int(mask.sum())
    return (total / n_tokens).float()


# ---- PEFT adapter ------------------------------------------------------------------------------------------------
def static_lora_modules(model, weights: torch.Tensor) -> dict[str, ExpertModule]:
    """One LoRA update per adapted module, equal to the mix with fixed mixing `weights` (n_lora_layers, n_experts):
    A' = the stacked A's, B' = the stacked B's times w[l, e] * s_e per rank row; scale 1."""
    modules = {}
    for layer in model.mixed_layers():
        w = weights[layer.layer_index].to(layer.scale_of_rank.device, torch.float32)
        per_rank = w.index_select(0, layer.expert_of_rank) * layer.scale_of_rank  # (R,)
        B = (layer.lora_B.detach().float() * per_rank).to(layer.lora_B.dtype)  # (out, R)
        modules[model.lora_layer_names[layer.layer_index]] = ExpertModule(
            lora_A=layer.lora_A.detach(), lora_B=B, scale=1.0, embedding=isinstance(layer.base_layer, nn.Embedding))
    return modules


def export_peft(model, folder: str, scalings: torch.Tensor, weights_from: str = "fixed weights") -> str:
    """Write one PEFT LoRA adapter equal to `model` with its scalings fixed to `scalings` (n_lora_layers,
    n_experts), and its model card (`weights_from` says where the weights came from).
    `PeftModel.from_pretrained(base, folder)` then gives `model(..., scalings=scalings)`'s logits."""
    modules = static_lora_modules(model, model.mixing_weights(scalings))
    ranks = {name: m.rank for name, m in modules.items()}
    pattern = {re.escape(name): rank for name, rank in ranks.items()}  # PEFT reads the keys as regexes
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in model.mixed_layers())
    base_id = model.base_model_id and local_id(model.base_model_id)  # a local base by its absolute path
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
        "r": max(ranks.values()), "lora_alpha": max(ranks.values()), "rank_pattern": pattern,
        "alpha_pattern": pattern, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": conv1d, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True,
    }
    with new_output_folder(folder) as tmp:
        save_expert(modules, config, model.dtype, tmp)
        write_card(tmp, _card(model, "peft", scalings, weights_from))
    return folder


# ---- merged model ------------------------------------------------------------------------------------------------
def export_merged(model, folder: str, scalings: torch.Tensor, tokenizer=None,
                  weights_from: str = "fixed weights") -> str:
    """Save the base model with the fixed mix folded into its weights (`save_pretrained`, plus the tokenizer and
    the model card): a plain transformers model giving `model(..., scalings=scalings)`'s logits."""
    weights = model.mixing_weights(scalings)
    with new_output_folder(folder) as tmp, plain_base(model, weights) as base:
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_card(tmp, _card(model, "merged", scalings, weights_from))
    return folder


def _card(model, kind: str, scalings: torch.Tensor, weights_from: str):
    """The export's model card: the base, the experts and each expert's mixing weight, averaged over the LoRA
    layers (what `mixing_weights` makes of `scalings`: top-k and the global weight included)."""
    mean = model.mixing_weights(scalings).float().mean(0).tolist()  # (n_experts,)
    return export_card(kind, base_model_id=model.base_model_id, experts=model.card_experts(),
                       weights=dict(zip(model.expert_names, mean)), weights_from=weights_from)


def export(model, to: str, folder: str, scalings: torch.Tensor | None = None, tokenizer=None,
           weights_from: str | None = None, **options) -> str:
    """Export `model` for another server: `to` is 'peft' or 'merged' (fixed `scalings` (n_lora_layers,
    n_experts), uniform by default; `weights_from`, where they came from, for the model card) or 'mistralrs'
    (the gate kept; see loramix.interop.mistralrs)."""
    if to not in TARGETS:
        raise ValueError(f"to: {to!r} is not one of {list(TARGETS)}")
    if to == "mistralrs":
        if scalings is not None:
            raise ValueError("weights: mistral.rs runs the X-LoRA gate itself; fixed weights apply to peft and merged")
        return export_mistralrs(model, folder, tokenizer=tokenizer, **options)
    if options:
        raise ValueError(f"{sorted(options)}: options of --to mistralrs only")
    weights_from = weights_from or ("uniform" if scalings is None else "fixed weights")
    scalings = uniform_scalings(model) if scalings is None else scalings
    expected = (model.n_lora_layers, model.n_experts)
    if tuple(scalings.shape) != expected:
        raise ValueError(f"weights: shape {tuple(scalings.shape)}, the model needs (n_lora_layers, n_experts) = "
                         f"{expected}")
    if to == "peft":
        return export_peft(model, folder, scalings, weights_from)
    return export_merged(model, folder, scalings, tokenizer=tokenizer, weights_from=weights_from)
