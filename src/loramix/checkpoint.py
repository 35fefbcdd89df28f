"""A saved X-LoRA folder, written and read: loramix's layout (the original `xlora` library's), or PEFT's (read only).

loramix's layout, which the original `xlora` library also wrote and read:

    folder/xlora_config.json              XLoraConfig; "adapters" lists the expert names in order, "base_model_id"
    folder/xlora_classifier.safetensors   the classifier's state dict: inner.{i}.weight/bias for its i-th module
                                          (the k-th hidden Linear at inner.{3k}, or inner.{k} without ReLU/Dropout),
                                          last.weight/bias
    folder/<expert>/                      one PEFT adapter folder per expert (see experts.py)

PEFT saves an X-LoRA as `adapter_config.json` ("peft_type": "XLORA"), its classifier in
`adapter_model.safetensors` (keys `...internal_xlora_classifier.layers.{i}.*`) and its experts in 0/, 1/, ...,
which also hold base weights. mistral.rs's layout has a module of its own (interop/mistralrs.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .checks import read_json_object
from .classifier import XLoraClassifier
from .config import XLoraConfig
from .experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Expert, load_safetensors, save_expert
from .files import atomic_write, atomic_write_text, replace_dir
from .hub import local_id, recorded_path, resolve_file

CONFIG_NAME = "xlora_config.json"
CLASSIFIER_NAME = "xlora_classifier.safetensors"
_PICKLED_CLASSIFIERS = ("xlora_classifier.pt", "xlora_classifier.bin", "xlora_classifier.pth", "adapter_model.bin")


# ---- writing ----------------------------------------------------------------------------------------------------
def write_checkpoint(folder: str, config: XLoraConfig, classifier_state: dict[str, torch.Tensor],
                     experts: list[Expert], base_model_id: str | None) -> None:
    """Write loramix's layout: `config` with "adapters" = the experts' names (in order), `base_model_id` and the
    loramix version; `classifier_state` in the classifier's own key names; one PEFT adapter folder per expert
    (its config as read; a relative `base_model_name_or_path` that exists here made absolute).

    Every file and expert folder is written under a temporary name and renamed, so an interrupted save leaves no
    partial file."""
    os.makedirs(folder, exist_ok=True)
    record = config.to_dict()
    record["adapters"] = [e.name for e in experts]
    record["base_model_id"] = base_model_id
    record["loramix_version"] = __version__
    atomic_write_text(os.path.join(folder, CONFIG_NAME), json.dumps(record, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in classifier_state.items()}
    atomic_write(os.path.join(folder, CLASSIFIER_NAME), lambda p: save_file(state, p))
    for expert in experts:
        tmp = tempfile.mkdtemp(prefix=f".{expert.name}.", dir=folder)
        try:
            save_expert(expert.modules, _absolute_base(expert.config), expert.dtype, tmp)
            replace_dir(tmp, os.path.join(folder, expert.name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _absolute_base(config: dict) -> dict:
    """An expert's adapter config with a relative local base path (as older versions recorded it) made absolute."""
    name = config.get("base_model_name_or_path")
    return {**config, "base_model_name_or_path": local_id(name)} if isinstance(name, str) and name else config


# ---- reading ----------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a saved X-LoRA holds, read and checked before any model is built."""

    config: XLoraConfig  # adapters: name -> the folder each expert is loaded from
    base: str | nn.Module  # the base to load: the caller's, else the id recorded in the checkpoint
    classifier_path: str
    classifier_state: dict[str, torch.Tensor]  # in the file's own key names
    peft_layout: bool  # saved by PEFT (classifier keys `...internal_xlora_classifier.layers.{i}`)
    peft_layout_experts: bool  # experts are PEFT's X-LoRA subfolders (which also hold base weights)


def read_checkpoint(source: str, base: str | nn.Module | None = None,
                    adapters: dict[str, str] | None = None) -> Checkpoint:
    """Read a saved X-LoRA (folder or hub id): loramix's layout, or one saved by PEFT.

    `base` defaults to the base model id recorded in the checkpoint. `adapters` (name -> folder or hub id) loads
    the experts from elsewhere instead of the checkpoint's own folders; names must match the saved ones.
    """
    config_path = resolve_file(source, CONFIG_NAME, what="X-LoRA checkpoint")
    if config_path is not None:
        config, raw = XLoraConfig.from_json_file(config_path)
        expert_dirs = [_join(source, name) for name in config.expert_names]
        base_field, classifier_file = "base_model_id", CLASSIFIER_NAME
    else:
        config_path = resolve_file(source, ADAPTER_CONFIG, what="X-LoRA checkpoint")
        if config_path is None:
            raise FileNotFoundError(f"{source}: neither {CONFIG_NAME} nor a PEFT X-LoRA {ADAPTER_CONFIG}")
        raw = read_json_object(config_path)
        if str(raw.get("peft_type", "")).upper() != "XLORA":
            raise ValueError(f"{config_path}: peft_type is {raw.get('peft_type')!r}, not an X-LoRA checkpoint")
        config = XLoraConfig.from_dict(raw, source=config_path)
        expert_dirs = [_join(source, str(i)) for i in range(config.n_experts)]  # PEFT saves experts as 0/, 1/, ...
        base_field, classifier_file = "base_model_name_or_path", ADAPTER_WEIGHTS
    base_id = raw.get(base_field)
    if base_id is not None and not isinstance(base_id, str):
        raise ValueError(f"{config_path}: {base_field} is {base_id!r}, expected a string")
    if base is None:
        if not base_id:
            raise ValueError(f"{source}: the checkpoint records no base model id; pass base=...")
        base = recorded_path(base_id, os.path.expanduser(source))  # older versions recorded relative paths
    classifier_path = resolve_file(source, classifier_file, what="X-LoRA checkpoint")
    if classifier_path is None:
        local = os.path.expanduser(source)
        pickled = [f for f in _PICKLED_CLASSIFIERS if os.path.isdir(local) and os.path.isfile(os.path.join(local, f))]
        if pickled:
            raise ValueError(f"{source}: classifier weights are in {pickled[0]}, a pickle; only safetensors are "
                             f"loaded (convert it with safetensors.torch.save_file)")
        raise FileNotFoundError(f"{source}: no {classifier_file}")
    peft_layout = classifier_file == ADAPTER_WEIGHTS
    if adapters is not None:
        if list(adapters) != config.expert_names:
            raise ValueError(f"adapters: names {list(adapters)} differ from the checkpoint's {config.expert_names}")
        expert_dirs = list(adapters.values())
    state = load_safetensors(classifier_path)
    if peft_layout:
        state = _classifier_state_from_peft(state, classifier_path)
    _check_hidden_widths(state, config, classifier_path)
    return Checkpoint(config=dataclasses.replace(config, adapters=dict(zip(config.expert_names, expert_dirs))),
                      base=base, classifier_path=classifier_path, classifier_state=state, peft_layout=peft_layout,
                      peft_layout_experts=peft_layout and adapters is None)


def load_classifier(classifier: XLoraClassifier, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's classifier weights into `classifier`; keys and shapes must match the config."""
    path, expected = checkpoint.classifier_path, classifier.state_dict()
    state = dict(checkpoint.classifier_state)
    hidden_positions = [i for i, m in enumerate(classifier.inner) if isinstance(m, nn.Linear)]
    if checkpoint.peft_layout:  # "hidden.{j}" counts hidden Linears; ours are indexed among ReLU/Dropout too
        state = {(f"inner.{hidden_positions[int(k.split('.')[1])]}.{k.split('.')[2]}" if k.startswith("hidden.")
                  and int(k.split(".")[1]) < len(hidden_positions) else k): v for k, v in state.items()}
    n_linears = sum(k.endswith(".weight") for k in state)
    if checkpoint.peft_layout and n_linears != len(hidden_positions) + 1:
        raise ValueError(f"{path}: holds {n_linears} classifier Linear layers, xlora_depth={len(hidden_positions) + 1} "
                         f"needs {len(hidden_positions) + 1} (some PEFT versions save only the last one)")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: classifier keys do not match the config (missing {missing}, unexpected "
                         f"{unexpected}); check xlora_depth, use_bias and enable_relu_and_dropout")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the config needs "
                             f"{tuple(expected[key].shape)} (hidden_size, xlora_size, layerwise_scalings, experts)")
    classifier.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _check_hidden_widths(state: dict[str, torch.Tensor], config: XLoraConfig, path: str) -> None:
    """The config's xlora_size must match the file before the classifier is allocated: a corrupt xlora_size of
    10**12 must fail here, not in the allocator. Hidden Linears are (xlora_size, in); the last one reads
    xlora_size features when xlora_depth > 1."""
    if config.xlora_depth == 1:
        return
    widths = {k: t.shape[0] if t.dim() == 2 else None for k, t in state.items()
              if re.fullmatch(r"(inner|hidden)\.\d+\.weight", k)}
    if "last.weight" in state:
        last = state["last.weight"]
        widths["last.weight"] = last.shape[1] if last.dim() == 2 else None
    if not widths:
        raise ValueError(f"{path}: holds no classifier weight to check xlora_size={config.xlora_size} against "
                         f"(xlora_depth={config.xlora_depth})")
    for key, width in sorted(widths.items()):
        if width != config.xlora_size:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, which does not fit "
                             f"xlora_size={config.xlora_size}")


def _classifier_state_from_peft(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """PEFT's `...internal_xlora_classifier.layers.{i}.*` keys -> `hidden.{j}.*` for the hidden Linears (counted
    without ReLU/Dropout; `load_classifier` places them) and `last.*` for the final one."""
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.search(r"internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)$", key)
        if m is None:
            raise ValueError(f"{path}: unexpected key {key!r} for a PEFT X-LoRA classifier")
        by_index.setdefault(int(m[1]), {})[m[2]] = tensor
    indices = sorted(by_index)
    ours = {}
    for j, index in enumerate(indices[:-1]):
        ours.update({f"hidden.{j}.{k}": v for k, v in by_index[index].items()})
    if indices:
        ours.update({f"last.{k}": v for k, v in by_index[indices[-1]].items()})
    return ours


def _join(source: str, name: str) -> str:
    local = os.path.expanduser(source)
    return os.path.join(local, name) if os.path.isdir(local) else f"{source.rstrip('/')}/{name}"
