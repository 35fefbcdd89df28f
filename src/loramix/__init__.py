"""loramix: X-LoRA, a mixture of LoRA experts gated per token and per layer (Buehler & Buehler, 2024).

The package is lazy: `import loramix` (and `loramix --help`) loads neither torch nor transformers; each public
name below imports its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_LAZY = {  # public name -> the module that defines it
    "XLoraConfig": "config",
    "GateOptions": "config",
    "SamplingParams": "engine.params",
    "generate": "engine.generate",
    "GenerationResult": "engine.generate",
    "RoutingLosses": "losses",
    "TrainingArgs": "training.settings",
    "LoraSettings": "training.settings",
    "DataFormat": "training.data",
    "DataSource": "training.data",
    "XLoraModel": "model",
    "XLoraOutput": "model",
    "TrainResult": "training.loop",
    "train_expert": "training.loop",
    "train_xlora": "training.loop",
    "load_base": "loading",
    "load_tokenizer": "loading",
    "evaluate": "evaluation",
}

__all__ = ["XLoraConfig", "GateOptions", "SamplingParams", "generate", "GenerationResult", "RoutingLosses",
           "TrainingArgs", "LoraSettings", "DataFormat", "DataSource", "XLoraModel", "XLoraOutput", "TrainResult",
           "train_expert", "train_xlora", "load_base", "load_tokenizer", "evaluate", "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .config import GateOptions, XLoraConfig
    from .engine.generate import GenerationResult, generate
    from .engine.params import SamplingParams
    from .evaluation import evaluate
    from .loading import load_base, load_tokenizer
    from .losses import RoutingLosses
    from .model import XLoraModel, XLoraOutput
    from .training.data import DataFormat, DataSource
    from .training.loop import TrainResult, train_expert, train_xlora
    from .training.settings import LoraSettings, TrainingArgs


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'loramix' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
