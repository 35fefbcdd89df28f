"""The X-LoRA layout of mistral.rs (a Rust inference engine), written and read.

mistral.rs 0.9.x loads an X-LoRA from one folder plus an ordering file, and is strict about both:
- the ordering file is {"order": [expert, ...], "layers": {module name: index on the LoRA-layer axis},
  "base_model_id": id}; the same `base_model_id` string must be the model id it is given and the one in
  `xlora_config.json`;
- it lists the folder without descending into subfolders and gives each file to the first expert whose name
  the file name contains, so the experts sit flat as `<expert>.adapter_config.json` /
  `<expert>.adapter_model.safetensors`, and no other file name may contain an expert's name;
- each adapter config has one rank `r` and one `lora_alpha` (no rank_pattern, alpha_pattern, rsLoRA) and all
  experts must list the same `target_modules`, which it applies to every module with that last name;
- the classifier's hidden Linear layers are numbered `inner.0, inner.1, ...` (ours keep the positions of the
  ReLU and Dropout between them), it runs the classifier's Dropout even at inference, and it builds the last
  Linear hidden_size wide even after hidden layers (so xlora_size must equal hidden_size when xlora_depth > 1);
- its Llama config needs `rope_theta`, which transformers 5 writes only inside `rope_parameters`.

The export therefore folds each expert's scale into B and pads every expert with zero rows to one rank and to
every LoRA layer (exact: zero rows add nothing), writes the classifier's Dropout as 0, and puts the base model,
with `rope_theta`, in the `base/` subfolder, whose absolute path becomes `base_model_id`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import CLASSIFIER_NAME, CONFIG_NAME, Checkpoint
from ..config import XLoraConfig
from ..experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from .saving import new_output_folder, plain_base

ORDERING_NAME = "xlora_ordering.json"
BASE_FOLDER = "base"


# ---- writing ----------------------------------------------------------------------------------------------------
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


# ---- reading ----------------------------------------------------------------------------------------------------
def find_ordering_file(folder: str) -> str | None:
    """The ordering file of a local mistral.rs X-LoRA folder: `xlora_ordering.json`, else the one JSON file
    holding "order" and "layers"; None when there is none (not this layout)."""
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return None
    if os.path.isfile(os.path.join(folder, ORDERING_NAME)):
        return os.path.join(folder, ORDERING_NAME)
    for file in sorted(os.listdir(folder)):
        if file.endswith(".json") and file != CONFIG_NAME:
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and "order" in data and "layers" in data:
                return os.path.join(folder, file)
    return None


@contextlib.contextmanager
def read_mistralrs_checkpoint(folder: str, base: str | nn.Module | None = None,
                              adapters: dict[str, str] | None = None) -> Iterator[Checkpoint]:
    """Read a mistral.rs X-LoRA folder (ordering file + flat `<expert>.adapter_*` files). The adapters are offered
    as PEFT folders of links in a temporary folder that exists only inside the `with` block.

    `base` defaults to the base written beside (`base/`), else the recorded id; `adapters` (name -> folder or hub
    id) loads the experts from elsewhere instead."""
    ordering_path = find_ordering_file(folder)
    if ordering_path is None:
        raise FileNotFoundError(f"{folder}: no mistral.rs ordering file (a JSON with 'order' and 'layers')")
    with open(ordering_path, encoding="utf-8") as f:
        ordering = json.load(f)
    config, raw = XLoraConfig.from_json_file(os.path.join(folder, CONFIG_NAME))
    order = ordering.get("order")
    if order != config.expert_names:
        raise ValueError(f"{ordering_path}: order {order} differs from {CONFIG_NAME}'s adapters {config.expert_names}")
    classifier_path = os.path.join(folder, CLASSIFIER_NAME)
    if not os.path.isfile(classifier_path):
        raise FileNotFoundError(f"{folder}: no {CLASSIFIER_NAME}")
    state = load_file(classifier_path)
    step = 3 if config.enable_relu_and_dropout else 1  # Linear, ReLU, Dropout per hidden block in ours
    ours = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head == "inner":
            j, _, param = rest.partition(".")
            key = f"inner.{int(j) * step}.{param}"
        ours[key] = tensor
    files = sorted(os.listdir(folder))
    tmp = tempfile.mkdtemp(prefix=".loramix-mistralrs-")
    try:
        own = {}  # expert name -> its folder of links
        for name in config.expert_names:
            mine = [f for f in files if next((n for n in config.expert_names if n in f), None) == name]
            for wanted in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                found = [f for f in mine if f.endswith(wanted)]
                if len(found) != 1:
                    raise FileNotFoundError(f"{folder}: expert {name!r} needs one file ending in {wanted} whose name "
                                            f"contains {name!r}, found {found}")
                os.makedirs(os.path.join(tmp, name), exist_ok=True)
                os.symlink(os.path.join(os.path.abspath(folder), found[0]), os.path.join(tmp, name, wanted))
            own[name] = os.path.join(tmp, name)
        base_id = raw.get("base_model_id") or ordering.get("base_model_id")
        if os.path.isfile(os.path.join(folder, BASE_FOLDER, "config.json")):
            base_id = os.path.join(os.path.abspath(folder), BASE_FOLDER)  # the base written beside, wherever moved
        if base is None and not base_id:
            raise ValueError(f"{folder}: the checkpoint records no base model id; pass base=...")
        yield Checkpoint(config=dataclasses.replace(config, adapters=adapters or own), base=base or base_id,
                         classifier_path=classifier_path, classifier_state=ours, peft_layout=False,
                         peft_layout_experts=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
