"""The method's settings: `XLoraConfig` (the experts, the gate; saved with a model), `GateOptions` (the gate's
overrides for one call or request).

XLoraConfig describes the method only (which experts, how the gate is built, how its output becomes mixing
weights), with the field names of PEFT's XLoraConfig and the original `xlora` library. GateOptions overrides two
of its fields for one call (`top_k_lora`, `softmax_temperature`) and adds frozen scalings (`freeze_scalings_after`,
`fold_frozen`). Other run settings (training, generation, serving) live with the code that uses them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .checks import is_finite_number, is_int, read_json_object

# Fields that the original `xlora` library or PEFT write into their configs and that carry no meaning for us.
_IGNORED_FIELDS = {
    "device", "stop_token_id", "use_mean_pool", "model_type", "peft_type", "task_type", "peft_version",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "loramix_version",
    "target_modules", "modules_to_save", "_subfolders",
}

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # used with fullmatch: no "$" before a newline


@dataclass
class XLoraConfig:
    """How to build an X-LoRA model: the experts and the scaling head (classifier).

    Every field keeps the name and meaning it has in PEFT's ``XLoraConfig`` and in the original ``xlora``
    library, so configs move between the three without renaming.
    """

    # Ordered mapping expert name -> PEFT adapter folder or hub id ("owner/repo" or "owner/repo/sub/folder").
    # The order fixes the expert axis of `scalings`. A list of names is accepted when the paths are known
    # from elsewhere (a saved checkpoint keeps one folder per expert, named after it).
    adapters: dict[str, str] | list[str] = field(default_factory=dict)
    # Width of the base model's last hidden state, the classifier's input. None: read from the base model.
    hidden_size: int | None = None
    # Softmax over experts of the classifier's logits (divided by `softmax_temperature`).
    enable_softmax: bool = True
    # Softmax over the experts kept by top-k, per token and per LoRA layer (exclusive with `enable_softmax`).
    enable_softmax_topk: bool = False
    softmax_temperature: float = 1.0
    # True: one set of expert weights per LoRA layer; False: one set per token, shared by all LoRA layers.
    layerwise_scalings: bool = False
    # Keep only the k largest expert weights per token and LoRA layer (None: dense mixing).
    top_k_lora: int | None = None
    # Number of Linear layers in the classifier (1: a single projection to the scalings).
    xlora_depth: int = 1
    # Width of the classifier's hidden layers (unused when xlora_depth == 1).
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    # ReLU + Dropout after each hidden Linear of the classifier (PEFT always has the ReLU).
    enable_relu_and_dropout: bool = True
    use_bias: bool = True
    # Train the experts' LoRA weights along with the classifier.
    use_trainable_adapters: bool = False
    # Expert weight used in the scaling pass; None means 1 / n_experts. 0 runs the scaling pass on the bare base.
    scaling_pass_value: float | None = 0.0
    # Multiplies every expert's output in both passes.
    global_scaling_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.adapters, (list, tuple)):
            names = list(self.adapters)
            if not all(isinstance(n, str) for n in names):
                raise ValueError(f"adapters: expert names must be strings, got {names!r}")
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"adapters: duplicate expert names {duplicates}")
            self.adapters = names
        elif isinstance(self.adapters, dict):
            bad = {k: v for k, v in self.adapters.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise ValueError(f"adapters: expected expert name -> path strings, got {bad!r}")
            self.adapters = dict(self.adapters)
        else:
            raise ValueError(f"adapters: expected a dict name -> path or a list of names, got {type(self.adapters).__name__}")
        if len(self.adapters) == 0:
            raise ValueError("adapters: at least one expert is needed")
        for name in self.expert_names:
            if not _ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
                raise ValueError(f"adapters: expert name {name!r} must be letters, digits, '_', '-', '.' (it names a folder)")
        n = len(self.adapters)
        _check(self.hidden_size is None or (is_int(self.hidden_size) and self.hidden_size > 0),
               "hidden_size", self.hidden_size, "a positive integer or None")
        _check(is_int(self.xlora_depth) and self.xlora_depth >= 1, "xlora_depth", self.xlora_depth, "an integer >= 1")
        _check(is_int(self.xlora_size) and self.xlora_size >= 1, "xlora_size", self.xlora_size, "an integer >= 1")
        _check(is_finite_number(self.xlora_dropout_p) and 0.0 <= self.xlora_dropout_p < 1.0,
               "xlora_dropout_p", self.xlora_dropout_p, "in [0, 1)")
        _check(is_finite_number(self.softmax_temperature) and self.softmax_temperature > 0,
               "softmax_temperature", self.softmax_temperature, "a finite number > 0")
        _check(self.top_k_lora is None or (is_int(self.top_k_lora) and 1 <= self.top_k_lora <= n),
               "top_k_lora", self.top_k_lora, f"None or an integer in 1..{n} (the number of experts)")
        _check(self.scaling_pass_value is None or is_finite_number(self.scaling_pass_value),
               "scaling_pass_value", self.scaling_pass_value, "a finite number or None")
        _check(is_finite_number(self.global_scaling_weight), "global_scaling_weight", self.global_scaling_weight, "a finite number")
        for flag in ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "enable_relu_and_dropout",
                     "use_bias", "use_trainable_adapters"):
            _check(isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "true or false")
        if self.enable_softmax and self.enable_softmax_topk:
            raise ValueError("enable_softmax_topk: cannot be combined with enable_softmax=True (choose one softmax)")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise ValueError("enable_softmax_topk: needs top_k_lora to be set")

    @property
    def expert_names(self) -> list[str]:
        return list(self.adapters)

    @property
    def n_experts(self) -> int:
        return len(self.adapters)

    def resolved_scaling_pass_value(self) -> float:
        return 1.0 / self.n_experts if self.scaling_pass_value is None else float(self.scaling_pass_value)

    # ---- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "XLoraConfig":
        """Build from a dict as saved in a config file; errors name `source` and the field at fault."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_FIELDS - {"base_model_id"})
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}")
        kwargs = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> tuple["XLoraConfig", dict[str, Any]]:
        """Read a config file; returns the config and the raw dict (for fields such as base_model_id)."""
        data = read_json_object(path)
        return cls.from_dict(data, source=str(path)), data


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}: got {value!r}, expected {expected}")


@dataclass(frozen=True)
class GateOptions:
    """How the gate mixes the experts for one call or request; None keeps the model's own setting.

    Rows decode in one batch only when their options are equal (they change what the classifier's output means).
    `top_k_lora` is bounded by the model's number of experts, which only the model knows: `XLoraModel` checks
    that bound."""

    top_k_lora: int | None = None  # keep the k largest scalings per LoRA layer
    softmax_temperature: float | None = None  # of the classifier's softmax
    freeze_scalings_after: int | None = None  # keep a row's scalings after N generated tokens; skip pass 1 then
    fold_frozen: bool = False  # frozen rows that share their scalings run with the experts folded into W

    def __post_init__(self) -> None:
        if self.top_k_lora is not None and not (is_int(self.top_k_lora) and self.top_k_lora >= 1):
            raise ValueError(f"top_k_lora: got {self.top_k_lora!r}, expected an integer >= 1")
        if self.softmax_temperature is not None and not (
                is_finite_number(self.softmax_temperature) and self.softmax_temperature > 0):
            raise ValueError(f"softmax_temperature: got {self.softmax_temperature!r}, expected a finite number > 0")
        if self.freeze_scalings_after is not None and not (
                is_int(self.freeze_scalings_after) and self.freeze_scalings_after >= 0):
            raise ValueError(f"freeze_scalings_after: got {self.freeze_scalings_after!r}, expected an integer >= 0")
        if not isinstance(self.fold_frozen, bool):
            raise ValueError(f"fold_frozen: got {self.fold_frozen!r}, expected true or false")
        if self.fold_frozen and self.freeze_scalings_after is None:
            raise ValueError("fold_frozen: needs freeze_scalings_after")
