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

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..classifier import mixing_weights
from ..config import CONFIG_NAME
from ..experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertModule, save_expert
from .mistralrs import BASE_FOLDER, CLASSIFIER_NAME, ORDERING_NAME, PEFT_PREFIX

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


def fixed_mixing_weights(model, scalings: torch.Tensor) -> torch.Tensor:
    """Fixed scalings (n_lora_layers, n_experts) -> the weights the layers apply (top-k, softmax over the kept
    experts, global weight), as `model.forward(scalings=...)` would apply them."""
    c = model.config
    return mixing_weights(scalings.float(), top_k=c.top_k_lora, softmax_topk=c.enable_softmax_topk,
                          global_weight=c.global_scaling_weight)


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


def export_peft(model, folder: str, scalings: torch.Tensor) -> str:
    """Write one PEFT LoRA adapter equal to `model` with its scalings fixed to `scalings` (n_lora_layers,
    n_experts). `PeftModel.from_pretrained(base, folder)` then gives `model(..., scalings=scalings)`'s logits."""
    modules = static_lora_modules(model, fixed_mixing_weights(model, scalings))
    ranks = {name: m.rank for name, m in modules.items()}
    pattern = {re.escape(name): rank for name, rank in ranks.items()}  # PEFT reads the keys as regexes
    conv1d = any(type(layer.base_layer).__name__ == "Conv1D" for layer in model.mixed_layers())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.base_model_id,
        "r": max(ranks.values()), "lora_alpha": max(ranks.values()), "rank_pattern": pattern,
        "alpha_pattern": pattern, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "fan_in_fan_out": conv1d, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True,
    }
    with new_output_folder(folder) as tmp:
        save_expert(modules, config, model.dtype, tmp)
    return folder


# ---- merged model ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def plain_base(model, weights: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """The base model with its original modules back in place of the mixed layers (and, given mixing `weights`
    (n_lora_layers, n_experts), each adapted weight replaced by W0 + sum_e w[l, e] s_e B_e A_e), for saving;
    the X-LoRA is restored on exit."""
    if weights is not None:
        _refuse_tied_adapted(model)
    swapped = []
    try:
        for layer in model.mixed_layers():
            name = model.lora_layer_names[layer.layer_index]
            parent_name, _, child = name.rpartition(".")
            parent = model.base.get_submodule(parent_name)
            original = layer.base_layer.weight
            if weights is not None:
                folded = layer.folded_weight(weights[layer.layer_index].to(original.device))
                layer.base_layer.weight = nn.Parameter(folded, requires_grad=False)
            setattr(parent, child, layer.base_layer)
            swapped.append((parent, child, layer, original))
        yield model.base
    finally:
        for parent, child, layer, original in reversed(swapped):
            layer.base_layer.weight = original
            setattr(parent, child, layer)


def export_merged(model, folder: str, scalings: torch.Tensor, tokenizer=None) -> str:
    """Save the base model with the fixed mix folded into its weights (`save_pretrained`, plus the tokenizer):
    a plain transformers model giving `model(..., scalings=scalings)`'s logits."""
    weights = fixed_mixing_weights(model, scalings)
    with new_output_folder(folder) as tmp, plain_base(model, weights) as base:
        base.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return folder


def _refuse_tied_adapted(model) -> None:
    base = model.base
    if not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return
    tied = (base.get_input_embeddings(), base.get_output_embeddings())
    for layer in model.mixed_layers():
        if any(layer is m or layer.base_layer is m for m in tied):
            raise ValueError(f"module {model.lora_layer_names[layer.layer_index]!r}: the base ties its input and "
                             f"output embeddings, so folding this expert update into one would change both; "
                             f"export --to peft instead")


@contextlib.contextmanager
def new_output_folder(folder: str) -> Iterator[str]:
    """A temporary folder beside `folder`, renamed to it when the block succeeds; `folder` must be new or empty."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise FileExistsError(f"{folder}: exists and is not an empty folder; choose a new output folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        yield tmp
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(model, to: str, folder: str, scalings: torch.Tensor | None = None, tokenizer=None, **options) -> str:
    """Export `model` for another server: `to` is 'peft' or 'merged' (fixed `scalings` (n_lora_layers,
    n_experts), uniform by default) or 'mistralrs' (the gate kept; see loramix.interop.mistralrs)."""
    if to not in TARGETS:
        raise ValueError(f"to: {to!r} is not one of {list(TARGETS)}")
    if to == "mistralrs":
        if scalings is not None:
            raise ValueError("weights: mistral.rs runs the X-LoRA gate itself; fixed weights apply to peft and merged")
        return export_mistralrs(model, folder, tokenizer=tokenizer, **options)
    if options:
        raise ValueError(f"{sorted(options)}: options of --to mistralrs only")
    scalings = uniform_scalings(model) if scalings is None else scalings
    expected = (model.n_lora_layers, model.n_experts)
    if tuple(scalings.shape) != expected:
        raise ValueError(f"weights: shape {tuple(scalings.shape)}, the model needs (n_lora_layers, n_experts) = {expected}")
    if to == "peft":
        return export_peft(model, folder, scalings)
    return export_merged(model, folder, scalings, tokenizer=tokenizer)


# ---- mistral.rs -------------------------------------------------------------------------------------------------
def export_mistralrs(model, folder: str, tokenizer=None, base_model_id: str | None = None) -> str:
    """Write `model` in mistral.rs's X-LoRA layout (see the module docstring). `base_model_id`: the id mistral.rs
    will load the base from; None writes the base model (and tokenizer) to `folder/base` and records its path."""

    _check_exportable(model)
    folder = os.path.abspath(folder)
    record_id = base_model_id or os.path.join(folder, BASE_FOLDER)
    with new_output_folder(folder) as tmp:
        if base_model_id is None:
            with plain_base(model) as base:
                base.save_pretrained(os.path.join(tmp, BASE_FOLDER))
            _add_rope_theta(os.path.join(tmp, BASE_FOLDER, "config.json"))
            if tokenizer is not None:
                tokenizer.save_pretrained(os.path.join(tmp, BASE_FOLDER))
        ordering = {"order": list(model.expert_names), "layers": {n: i for i, n in enumerate(model.lora_layer_names)},
                    "base_model_id": record_id}
        _write_json(os.path.join(tmp, ORDERING_NAME), ordering)
        config = model.config.to_dict()
        config.update(adapters=list(model.expert_names), base_model_id=record_id, xlora_dropout_p=0.0,
                      scaling_pass_value=model.config.resolved_scaling_pass_value())
        _write_json(os.path.join(tmp, CONFIG_NAME), config)
        save_file(_numbered_classifier_state(model), os.path.join(tmp, CLASSIFIER_NAME))
        for e, name in enumerate(model.expert_names):
            tensors, adapter_config = _padded_expert(model, e, record_id)
            save_file(tensors, os.path.join(tmp, f"{name}.{ADAPTER_WEIGHTS}"))
            _write_json(os.path.join(tmp, f"{name}.{ADAPTER_CONFIG}"), adapter_config)
        _check_file_names(tmp, model.expert_names)
    return folder


def _check_exportable(model) -> None:
    c = model.config
    if c.enable_softmax_topk:
        raise ValueError("enable_softmax_topk: mistral.rs does not implement it")
    if c.xlora_depth > 1 and c.xlora_size != c.hidden_size:
        raise ValueError(f"xlora_size: mistral.rs 0.9.5 reads the classifier's last Linear as hidden_size "
                         f"({c.hidden_size}) wide, so with xlora_depth > 1 it needs xlora_size == hidden_size, "
                         f"not {c.xlora_size}")
    short_names = {n.rsplit(".", 1)[-1] for n in model.lora_layer_names}
    adapted = set(model.lora_layer_names)
    for layer in model.mixed_layers():
        if not isinstance(layer.base_layer, nn.Linear):
            raise ValueError(f"module {model.lora_layer_names[layer.layer_index]!r}: mistral.rs's X-LoRA adapts "
                             f"only Linear layers, not {type(layer.base_layer).__name__}")
    for name, module in model.base.named_modules():
        if name.rsplit(".", 1)[-1] in short_names and isinstance(module, nn.Linear) and name not in adapted \
                and not name.endswith(".base_layer"):
            raise ValueError(f"module {name!r}: mistral.rs adapts every module named {name.rsplit('.', 1)[-1]!r}, "
                             f"but no expert adapts this one")


def _padded_expert(model, e: int, base_model_id: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Expert e over every LoRA layer at one rank (its largest), its scale folded into B, zero where it is absent."""
    modules = {}
    for layer in model.mixed_layers():
        m = layer.expert_module(e)
        if m is not None:
            modules[model.lora_layer_names[layer.layer_index]] = (layer, m)
    rank = max(m.rank for _, m in modules.values())
    tensors = {}
    for layer in model.mixed_layers():
        name = model.lora_layer_names[layer.layer_index]
        n_in, n_out = layer.lora_A.shape[1], layer.lora_B.shape[0]
        A = torch.zeros(rank, n_in, dtype=layer.lora_A.dtype)  # (r, in)
        B = torch.zeros(n_out, rank, dtype=layer.lora_B.dtype)  # (out, r)
        if name in modules:
            m = modules[name][1]
            A[: m.rank] = m.lora_A.detach().cpu()
            B[:, : m.rank] = (m.lora_B.detach().float().cpu() * m.scale).to(B.dtype)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_id, "r": rank,
              "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in model.lora_layer_names})}
    return tensors, config


def _numbered_classifier_state(model) -> dict[str, torch.Tensor]:
    """Our classifier keys (inner.{position in the ModuleList}) -> mistral.rs's (inner.{j}, j-th Linear)."""
    state = {}
    for j, linear in enumerate(model.classifier.hidden_linears()):
        state.update({f"inner.{j}.{k}": v for k, v in linear.state_dict().items()})
    state.update({f"last.{k}": v for k, v in model.classifier.last.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _add_rope_theta(config_path: str) -> None:
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in config and theta is not None:
        config["rope_theta"] = theta
        _write_json(config_path, config)


def _check_file_names(folder: str, expert_names: list[str]) -> None:
    """mistral.rs gives a file to the first expert whose name it contains: every file must go where we mean."""
    for file in sorted(os.listdir(folder)):
        owner = next((n for n in expert_names if n in file), None)
        meant = next((n for n in expert_names if file.startswith(f"{n}.adapter_")), None)
        if owner != meant:
            raise ValueError(f"expert names {expert_names}: mistral.rs would read {file!r} as expert {owner!r}'s "
                             f"file (it matches files by substring); rename the experts so that no name contains "
                             f"another or appears in {sorted(os.listdir(folder))}")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


# ---- reading ---------------------------------------------------------------------------------------------------
