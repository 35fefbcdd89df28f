"""PEFT LoRA adapters as X-LoRA experts: read, checked against a base model, written back in PEFT's layout.

An expert folder holds `adapter_config.json` and `adapter_model.safetensors` as PEFT writes them. Weight keys
keep PEFT's names (`<module>.lora_A.weight`, `<module>.lora_B.weight`, `<module>.lora_embedding_A/B`), so any
PEFT adapter loads without remapping. Only safetensors are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .checks import is_finite_number, is_int, read_json_object
from .hub import resolve_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for the base model's modules
_PEFT_XLORA_PREFIX = "base_model.lora_model.model."  # experts inside an X-LoRA saved by PEFT


@dataclass
class ExpertModule:
    """One expert's low-rank update of one module: delta(x) = scale * B A x."""

    lora_A: torch.Tensor  # (r, in_features), or (r, num_embeddings) for an embedding
    lora_B: torch.Tensor  # (out_features, r), or (embedding_dim, r) for an embedding
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool = False  # saved as lora_embedding_A/B (no ".weight") when True

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


@dataclass
class Expert:
    name: str
    config: dict  # adapter_config.json as read, written back unchanged on save
    modules: dict[str, ExpertModule] = field(default_factory=dict)  # base-model module name -> weights
    dtype: torch.dtype = torch.float32  # dtype of the tensors in the file


def supported_module(module: nn.Module) -> str | None:
    """'linear', 'embedding' or None for modules an expert cannot adapt."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2's transposed linear
        return "linear"
    return None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or GPT-2 Conv1D, (num_embeddings, dim) of an embedding."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an empty, truncated or corrupt file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for key, value in (pattern or {}).items():
        if module_name == key or module_name.endswith("." + key) or re.fullmatch(rf"(.*\.)?(?:{key})", module_name):
            return value
    return default


def _check_lora_numbers(config: dict, path: str) -> None:
    """r, lora_alpha and the rank/alpha patterns must be numbers and valid patterns before any weight is read."""
    def is_number(v, positive_int: bool = False) -> bool:
        return is_int(v) and v >= 1 if positive_int else is_finite_number(v)

    if "r" in config and not is_number(config["r"], positive_int=True):
        raise ValueError(f"{path}: r is {config['r']!r}, expected an integer >= 1")
    if "lora_alpha" in config and not is_number(config["lora_alpha"]):
        raise ValueError(f"{path}: lora_alpha is {config['lora_alpha']!r}, expected a finite number")
    for field_name, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field_name)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise ValueError(f"{path}: {field_name} is {pattern!r}, expected an object module pattern -> value")
        for key, value in pattern.items():
            try:
                re.compile(rf"(.*\.)?(?:{key})")  # the form _pattern_value matches with
            except re.error as err:
                raise ValueError(f"{path}: {field_name} key {key!r} is not a valid pattern ({err})") from None
            if not is_number(value, positive_int):
                raise ValueError(f"{path}: {field_name}[{key!r}] is {value!r}, expected "
                                 f"{'an integer >= 1' if positive_int else 'a finite number'}")


def load_expert(name: str, source: str, base_model: nn.Module, *, inside_peft_xlora: bool = False) -> Expert:
    """Read the PEFT adapter at `source` (folder or hub id) and check it against `base_model`.

    `inside_peft_xlora`: the folder is an expert subfolder of an X-LoRA saved by PEFT, which also holds base
    weights; those are skipped, and the LoRA weights are checked to cover every module the config targets.
    """
    where = f"expert {name!r} ({source})"
    config_path = resolve_file(source, ADAPTER_CONFIG, what=f"expert {name!r}")
    if config_path is None:
        raise FileNotFoundError(f"{where}: no {ADAPTER_CONFIG}")
    weights_path = resolve_file(source, ADAPTER_WEIGHTS, what=f"expert {name!r}")
    if weights_path is None:
        pickled = [f for f in _PICKLE_WEIGHTS if os.path.isdir(source) and os.path.isfile(os.path.join(source, f))]
        hint = f" (found {pickled[0]}: pickled weights are never loaded; convert it to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{where}: no {ADAPTER_WEIGHTS}{hint}")
    config = read_json_object(config_path)
    _check_variant(config, where)
    _check_lora_numbers(config, config_path)

    state = load_safetensors(weights_path)
    modules = dict(base_model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        short = key
        for prefix in (PEFT_PREFIX, _PEFT_XLORA_PREFIX):
            short = short[len(prefix):] if short.startswith(prefix) else short
        if inside_peft_xlora and ".lora_" not in short:
            continue
        if short.endswith(".base_layer.weight"):  # PEFT saves targeted embeddings' base weights too
            _check_same_base_weight(short[: -len(".base_layer.weight")], tensor, modules, where)
            continue
        m = _KEY.match(short)
        if m is None:
            raise ValueError(f"{where}: weight {key!r} is not a LoRA A/B matrix (DoRA, biases and "
                             f"modules_to_save are not supported)")
        pairs.setdefault(m["module"], {})[m["kind"]] = tensor

    rank_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    expert = Expert(name=name, config=config,
                    dtype=next(iter(state.values())).dtype if state else torch.float32)
    for module_name, ab in pairs.items():
        at = f"{where}, module {module_name!r}"
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"{at}: the base model has no such module (adapter made for another architecture?)")
        kind = supported_module(module)
        if kind is None:
            raise ValueError(f"{at}: {type(module).__name__} layers are not supported (Linear, Conv1D, Embedding)")
        prefix = "lora_embedding_" if kind == "embedding" else "lora_"
        if set(ab) != {prefix + "A", prefix + "B"}:
            raise ValueError(f"{at}: a {type(module).__name__} needs {prefix}A and {prefix}B, found {sorted(ab)}")
        A, B = ab[prefix + "A"], ab[prefix + "B"]
        n_in, n_out = linear_shape(module)
        rank = A.shape[0] if A.dim() else 0
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != n_in or B.shape != (n_out, rank):
            raise ValueError(f"{at}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit a "
                             f"{type(module).__name__} of {n_in} -> {n_out} at rank {rank}")
        expected_rank = _pattern_value(config.get("rank_pattern"), module_name, rank_default)
        if expected_rank != rank:
            raise ValueError(f"{at}: weights have rank {rank} but {ADAPTER_CONFIG} says {expected_rank}")
        alpha = _pattern_value(config.get("alpha_pattern"), module_name, alpha_default)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        expert.modules[module_name] = ExpertModule(lora_A=A, lora_B=B, scale=float(scale), embedding=kind == "embedding")
    if inside_peft_xlora and isinstance(config.get("target_modules"), list):
        wanted = [n for n, m in modules.items() if supported_module(m) and n != "lm_head"
                  and any(n == t or n.endswith("." + t) for t in config["target_modules"])]
        missing = [n for n in wanted if n not in expert.modules]
        if missing:
            raise ValueError(f"{where}: LoRA weights are missing for {len(missing)} targeted modules (first: "
                             f"{missing[0]!r}); some PEFT versions save X-LoRA experts incompletely. Pass "
                             f"adapters={{name: original folder}} to from_pretrained to load them from elsewhere")
    if not expert.modules:
        raise ValueError(f"{where}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    return expert


def _check_same_base_weight(module_name: str, tensor: torch.Tensor, modules: dict, where: str) -> None:
    module = modules.get(module_name)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.is_meta:  # offloaded to disk by accelerate: nothing to compare here
        return
    # compared in the base's dtype: a float32 adapter saved from a float32 base still matches the base in bf16
    if weight is None or weight.shape != tensor.shape or not torch.equal(
            weight.detach().cpu(), tensor.to(weight.dtype)):
        raise ValueError(f"{where}, module {module_name!r}: the adapter carries its own base weights for this "
                         f"module and they differ from the base model's (resized vocabulary?); not supported")


def _check_variant(config: dict, where: str) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type is {peft_type}, only LORA adapters can be experts")
    unsupported = {
        "use_dora": "DoRA", "lora_bias": "LoRA biases", "use_qalora": "QALoRA",
        "layer_replication": "layer replication", "modules_to_save": "modules_to_save",
        "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "aLoRA",
    }
    for key, what in unsupported.items():
        if config.get(key):
            raise ValueError(f"{where}: {what} ({key}) is not supported by X-LoRA experts")


def save_expert(expert_modules: dict[str, ExpertModule], config: dict, dtype: torch.dtype, folder: str) -> None:
    """Write one expert as a PEFT adapter folder (the caller makes `folder` atomic)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for module_name, em in expert_modules.items():
        embedding, suffix = ("embedding_", "") if em.embedding else ("", ".weight")
        tensors[f"{PEFT_PREFIX}{module_name}.lora_{embedding}A{suffix}"] = em.lora_A.detach().to(dtype).contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{module_name}.lora_{embedding}B{suffix}"] = em.lora_B.detach().to(dtype).contiguous().cpu()
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS))
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
