"""The decoder stack of a Llama-family base, run layer by layer: what both passes of X-LoRA share, built once.

A forward through a Hugging Face causal LM does, before its decoder layers, work that depends only on the token
positions and the KV cache's length: the positions themselves, the rotary table (cos, sin) and the attention mask
(causal, left padding, sliding window). X-LoRA runs the model twice per step over the same positions (scaling pass
and mixed pass, each with a cache of the same length), so through `base(...)` all of it is done twice, and each
call also pays for the model's wrappers (argument merging, output capture, output dataclasses). On a small model
at decode time that fixed cost is most of a step.

`DecoderStack` does the shared part once per step (`prepare`) and then runs the decoder layers directly, through
their public `forward`, for each pass (`hidden_states`): the same modules and the same mask function the model's
own forward uses, so results are bit-for-bit those of `base(...)`. It covers the families whose forward is exactly

    h = embed_tokens(ids);  (cos, sin) = rotary_emb(h, positions);  mask = the model's mask function
    h = layer_i(h, mask[kind of layer i], (cos, sin), cache)  for each decoder layer;  h = norm(h)
    logits = lm_head(h)

namely Llama, Mistral (causal or sliding-window mask) and Qwen2 (a mask per layer type). Anything else
(GPT-2, Gemma's scaled embeddings, soft-capped logits, ...) gets `None` from `DecoderStack.of` and runs through
the plain `base(...)` call.

Both transformers 4.57 and 5.x are served through public surfaces only: the mask functions of
`transformers.masking_utils` and the layers' `forward`, whose argument names (`cache` / `past_key_values`,
`inputs_embeds` / `input_embeds`, `cache_position`) are read from their signatures.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .compat import cache_argument

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class PreparedStep:
    """What both passes of one step share: positions, the rotary table and one attention mask per layer."""

    position_ids: torch.Tensor  # (b, t)
    cache_position: torch.Tensor  # (t,) slots of the new tokens in the cache (transformers 4.x layers take it)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (b, t, head_dim)
    layer_masks: list[Any]  # per decoder layer: whatever the model's mask function returned (None: plain causal)


class DecoderStack:
    """The decoder layers of a supported base model, run directly. Build with `DecoderStack.of(base)`."""

    def __init__(self, base: nn.Module) -> None:
        from transformers import masking_utils

        self.base = base
        self.backbone = base.model  # LlamaModel / MistralModel / Qwen2Model
        self.config = base.config
        self.layers = list(self.backbone.layers[: self.config.num_hidden_layers])
        self.layer_kinds = _layer_kinds(self.config, len(self.layers))
        self.mask_functions: dict[str, Callable] = {FULL: masking_utils.create_causal_mask}
        if SLIDING in self.layer_kinds:
            self.mask_functions[SLIDING] = masking_utils.create_sliding_window_causal_mask
        self.mask_arguments = _argument_names(masking_utils.create_causal_mask)
        layer_parameters = inspect.signature(self.layers[0].forward).parameters
        self.cache_keyword = cache_argument(self.layers[0])
        self.layer_takes_cache_position = "cache_position" in layer_parameters

    @classmethod
    def of(cls, base: nn.Module) -> "DecoderStack | None":
        """The stack of `base`, or None when the base is not one whose forward this class reproduces."""
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            return None
        backbone = getattr(base, "model", None)
        needed = ("layers", "rotary_emb", "norm", "embed_tokens")
        if backbone is None or not all(hasattr(backbone, n) for n in needed) or not hasattr(base, "lm_head"):
            return None
        if getattr(base, "base_model", base) is not backbone:  # a wrapped model (PEFT, ...): not the plain layout
            return None
        return cls(base)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(b, t) -> (b, t, hidden). The embedding may be a mixed LoRA layer: call it inside each pass."""
        return self.backbone.embed_tokens(input_ids)

    def prepare(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cache: Any) -> PreparedStep:
        """Positions, rotary table and masks for new tokens `inputs_embeds` (b, t, hidden) after what `cache`
        holds; call it before either pass writes the step's tokens into its cache."""
        b, t = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        cache_position = torch.arange(past, past + t, device=inputs_embeds.device)  # (t,)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)  # (1, t), as the model's forward does
        masks = {}
        for kind, function in self.mask_functions.items():
            masks[kind] = function(**self._mask_arguments(inputs_embeds, attention_mask, cache, cache_position,
                                                          position_ids))
        cos_sin = self.backbone.rotary_emb(inputs_embeds, position_ids=position_ids)
        return PreparedStep(position_ids=position_ids, cache_position=cache_position, position_embeddings=cos_sin,
                            layer_masks=[masks[kind] for kind in self.layer_kinds])

    def hidden_states(self, inputs_embeds: torch.Tensor, step: PreparedStep, cache: Any) -> torch.Tensor:
        """The decoder layers then the final norm: (b, t, hidden) -> (b, t, hidden), writing into `cache`."""
        extra = {self.cache_keyword: cache, "use_cache": cache is not None}
        if self.layer_takes_cache_position:
            extra["cache_position"] = step.cache_position
        hidden = inputs_embeds
        for layer, mask in zip(self.layers, step.layer_masks):
            hidden = layer(hidden, attention_mask=mask, position_ids=step.position_ids,
                           position_embeddings=step.position_embeddings, **extra)
            if isinstance(hidden, tuple):  # layers of older releases return (hidden, ...)
                hidden = hidden[0]
        return self.backbone.norm(hidden)

    def logits(self, hidden: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """LM head over the last `logits_to_keep` positions (0: all): (b, t, hidden) -> (b, t', vocab)."""
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.base.lm_head(hidden)

    def _mask_arguments(self, inputs_embeds, attention_mask, cache, cache_position, position_ids) -> dict:
        names = self.mask_arguments
        arguments = {"config": self.config, names["embeds"]: inputs_embeds, "attention_mask": attention_mask,
                     names["cache"]: cache, "position_ids": position_ids}
        if names["cache_position"]:
            arguments["cache_position"] = cache_position
        return arguments


def _layer_kinds(config, n_layers: int) -> list[str]:
    """Which mask each decoder layer reads, as the model's own forward chooses it."""
    if config.model_type == "qwen2":
        return list(config.layer_types[:n_layers])
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return [SLIDING] * n_layers
    return [FULL] * n_layers


def _argument_names(mask_function: Callable) -> dict:
    """The names a release's mask functions use for the embeddings and the cache, and whether they need
    `cache_position` (transformers 4.x)."""
    parameters = inspect.signature(mask_function).parameters
    return {"embeds": "inputs_embeds" if "inputs_embeds" in parameters else "input_embeds",
            "cache": "cache" if "cache" in parameters else "past_key_values",
            "cache_position": "cache_position" in parameters}
