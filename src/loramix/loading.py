"""Loading in one place: the base model, the tokenizer, the experts and the parts of a saved X-LoRA checkpoint.

`XLoraModel.from_base` / `from_pretrained` are the public entry points and build the model from what this module
reads; the CLI, the server, training and the demo load through them and `load_tokenizer`. Every function raises
an exception naming the file, field or path at fault; none prints or exits. Strings that look like local paths
never reach the hub (see hub.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import read_json_object
from .classifier import XLoraClassifier
from .config import CONFIG_NAME, XLoraConfig
from .experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Expert, load_expert, load_safetensors
from .hub import check_local, resolve_file

CLASSIFIER_NAME = "xlora_classifier.safetensors"
QUANTIZATIONS = ("4bit", "8bit")
_PICKLED_CLASSIFIERS = ("xlora_classifier.pt", "xlora_classifier.bin", "xlora_classifier.pth", "adapter_model.bin")


# ---- base model and tokenizer -----------------------------------------------------------------------------------
def load_base(base: str | nn.Module, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              trust_remote_code: bool = False, device_map: Any = None, max_memory: dict | None = None,
              offload_folder: str | None = None, quantization: Any = None) -> nn.Module:
    """The base causal LM: a folder, a hub id or an already loaded module (used as is, moved to dtype/device).

    `device_map`, `max_memory`, `offload_folder` and `quantization` ("4bit", "8bit" or a transformers
    `BitsAndBytesConfig`) are handed to `AutoModelForCausalLM.from_pretrained` unchanged; they apply only when
    the base is loaded by name. Quantization needs the bitsandbytes package.
    """
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                     quantization=quantization)
    if isinstance(base, nn.Module):
        given = [k for k, v in placement.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: applies when the base model is loaded by name; the given module is used "
                             f"as it is (load it with these options yourself)")
        if dtype is not None:
            base = base.to(dtype)
        return base.to(device) if device is not None else base
    if not isinstance(base, str):
        raise ValueError(f"base: expected a folder, a hub id or a loaded model, got {type(base).__name__}")
    if device is not None and device_map is not None:
        raise ValueError("device_map: give either device or device_map, not both")
    path = check_local(base, what="base model")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization)
        if device is not None:  # quantized weights cannot be moved with .to(); place them while loading
            device_map, device = {"": str(device)}, None
    kwargs.update({k: v for k, v in (("device_map", device_map), ("max_memory", max_memory),
                                     ("offload_folder", offload_folder)) if v is not None})
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device) if device is not None else model


def _quantization_config(quantization: Any):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantization: needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization: got {quantization!r}, expected one of {QUANTIZATIONS} or a BitsAndBytesConfig")


def base_model_id(base: str | nn.Module) -> str | None:
    """The name a base is loaded by: the string itself, or the `_name_or_path` a loaded model records."""
    if isinstance(base, str):
        return base
    return getattr(getattr(base, "config", None), "_name_or_path", None) or None


def load_tokenizer(*sources: Any, chat_template_file: str | None = None):
    """The first tokenizer found among `sources` (folders or hub ids, tried in order; None skipped; a tokenizer
    object is taken as it is). `chat_template_file`, a Jinja file, replaces the tokenizer's chat template."""
    candidates = [s for s in sources if s is not None]
    if not candidates:
        raise ValueError("tokenizer: nothing to load it from (a base model passed as a module has no name); "
                         "pass a tokenizer")
    tokenizer, tried = None, []
    for source in candidates:
        if not isinstance(source, str):
            tokenizer = source
            break
        path = check_local(source, what="tokenizer")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            break
        except (OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            tried.append(f"{source!r} ({type(err).__name__}: {reason})" if reason else f"{source!r} ({type(err).__name__})")
    if tokenizer is None:
        raise FileNotFoundError(f"tokenizer: none could be loaded from {', '.join(tried)}; save one beside the "
                                f"checkpoint or the base model")
    if chat_template_file is not None:
        tokenizer.chat_template = _read_text(chat_template_file, what="chat template")
    return tokenizer


def _read_text(path: str, *, what: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path!r} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


# ---- experts and checkpoints ------------------------------------------------------------------------------------
def load_experts(config: XLoraConfig, base_model: nn.Module, *, inside_peft_xlora: bool = False) -> list[Expert]:
    """The experts named in `config.adapters` (name -> folder or hub id), each checked against `base_model`."""
    if isinstance(config.adapters, list):
        raise ValueError("adapters: loading experts needs a mapping name -> adapter path or hub id")
    return [load_expert(name, source, base_model, inside_peft_xlora=inside_peft_xlora)
            for name, source in config.adapters.items()]


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
    """Read a saved X-LoRA: the loramix / original `xlora` layout, or one saved by PEFT.

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
        base = base_id
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
