"""What differs between transformers releases, found through public surfaces only (signatures, attributes).

transformers 5.24 renamed the KV-cache argument of every model's `forward` from `past_key_values` to `cache`
(the old name is deprecated, to be removed in 5.40), and the field of its outputs likewise. loramix passes and
reads caches through these two helpers, so neither name is assumed.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

_CACHE_NAMES = ("cache", "past_key_values")  # newest first
_cache_arg_of: dict[type, str] = {}


def cache_argument(module: nn.Module) -> str:
    """The keyword under which `module.forward` takes its KV cache ("cache" or "past_key_values")."""
    kind = type(module)
    if kind not in _cache_arg_of:
        parameters = inspect.signature(module.forward).parameters
        _cache_arg_of[kind] = next((n for n in _CACHE_NAMES if n in parameters), "past_key_values")
    return _cache_arg_of[kind]


def with_cache(module: nn.Module, cache: Any) -> dict[str, Any]:
    """{the module's cache keyword: cache}, to splat into its call."""
    return {cache_argument(module): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a transformers model returned, whichever field name its release uses."""
    for name in _CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def enable_activation_checkpointing(model: nn.Module, **checkpoint_kwargs: Any) -> None:
    """Turn on a transformers model's own gradient (activation) checkpointing, passing `checkpoint_kwargs` to
    torch.utils.checkpoint. transformers 5.24 renamed `gradient_checkpointing_enable` (deprecated until v6) to
    `activation_checkpointing_enable`; older releases have only the first."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
