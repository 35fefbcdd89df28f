"""The decoder stack of a Llama-family base, run layer by layer: what both passes of X-LoRA share, built once.

`DecoderStack` computes once per step what depends only on the token positions and the KV cache's length (the
positions, the rotary table (cos, sin), one attention mask per layer: `prepare`), then runs the decoder layers
directly, through their public `forward`, for each pass (`hidden_states`). It uses the same modules and the same
mask functions as the model's own forward, so results are bit for bit those of `base(...)`. It covers the
families whose forward is exactly

    h = embed_tokens(ids);  (cos, sin) = rotary_emb(h, positions);  mask = the model's mask function
    h = layer_i(h, mask[kind of layer i], (cos, sin), cache)  for each decoder layer;  h = norm(h)
    logits = lm_head(h)

namely Llama, Mistral (causal or sliding-window mask) and Qwen2 (a mask per layer type). Anything else
(GPT-2, Gemma's scaled embeddings, soft-capped logits, ...) gets `None` from `DecoderStack.of` and runs through
the plain `base(...)` call.

Both transformers 4.57 and 5.x are served through public surfaces only: the mask functions of
`transformers.masking_utils` and the layers' `forward`, whose argument names (`cache` / `past_key_values`,
`inputs_embeds` / `input_embeds`, `cache_position`) are read from their signatures.

One-token steps (decoding) of bases with full attention in every layer, SDPA and the Llama layout run through
`_decode_layer`, a hand-written decoder layer: it calls the layer's own projections (the mixed LoRA layers
included) and computes the norms, rotary embedding and attention with the same operations in the same order as
the model's forward, so the logits stay bit for bit those of `base(...)` (tests/backbone/test_decoder.py). Its
inputs: each layer's parts looked up once (`LayerParts`), at most a padding mask, rotary rows from a table
(`RotaryRows`) and a `GrowingCache` (backbone/kv_cache.py), a DynamicCache or no cache. Training (autograd on)
keeps the model's own layers. Why, and what each part bought: docs/architecture.md (History).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .compat import cache_argument
from .kv_cache import GrowingCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class PreparedStep:
    """What both passes of one step share: positions, the rotary table and one attention mask per layer."""

    position_ids: torch.Tensor  # (b, t)
    cache_position: torch.Tensor  # (t,) slots of the new tokens in the cache (transformers 4.x layers take it)
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin), each (b, t, head_dim); None: by hand
    layer_masks: list[Any]  # per decoder layer: whatever the model's mask function returned (None: plain causal)
    # a one-token step through the hand-written layers (`_decode_layer`); layer_masks then hold the SDPA mask
    # over the cache's padding, (b, 1, 1, cached + 1) bool, or None where nothing is padded
    hand_written: bool = False
    rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # what `_rotate` reads (hand-written)


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
        self.final_norm = _rms_norm_of(self.backbone.norm) if _is_llama_rms_norm(self.backbone.norm) else \
            self.backbone.norm.forward
        self.rotary = RotaryRows(self.backbone.rotary_emb)
        self.by_hand = True  # False: one-token steps too go through the model's layers (for comparisons)
        self.hand_written = _hand_written_layers(base, self.layers, self.layer_kinds)  # None: not supported

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
        if t == 1 and self._decodes_by_hand(cache) and _padding_mask_fits(attention_mask, b, past + 1):
            mask = None if attention_mask is None or bool(attention_mask.all()) else \
                attention_mask.bool()[:, None, None, :]  # (b, 1, 1, past + 1): True where a key may be read
            cos, signed_sin, swapped = self.rotary.rows(inputs_embeds, position_ids)  # (b, 1, 1, head_dim) each
            return PreparedStep(position_ids=position_ids, cache_position=cache_position, position_embeddings=None,
                                layer_masks=[mask] * len(self.layers), hand_written=True,
                                rotary=(cos, signed_sin, swapped))
        if isinstance(cache, GrowingCache):
            raise ValueError("cache: a GrowingCache serves one-token steps through the hand-written decoder layers; "
                             "this step has {t} tokens (or a mask not over the cache's {past} + 1 positions)"
                             .format(t=t, past=past))
        masks = {}
        for kind, function in self.mask_functions.items():
            masks[kind] = function(**self._mask_arguments(inputs_embeds, attention_mask, cache, cache_position,
                                                          position_ids))
        cos_sin = self.backbone.rotary_emb(inputs_embeds, position_ids=position_ids)
        return PreparedStep(position_ids=position_ids, cache_position=cache_position, position_embeddings=cos_sin,
                            layer_masks=[masks[kind] for kind in self.layer_kinds])

    def hidden_states(self, inputs_embeds: torch.Tensor, step: PreparedStep, cache: Any) -> torch.Tensor:
        """The decoder layers then the final norm: (b, t, hidden) -> (b, t, hidden), writing into `cache`."""
        if step.hand_written:
            rotary = step.rotary  # (cos, sin with rotate_half's signs, order of the halves), built once a step
            hidden = inputs_embeds
            for index, (parts, mask) in enumerate(zip(self.hand_written, step.layer_masks)):
                hidden = _decode_layer(parts, index, hidden, rotary, mask, cache)
            return self.final_norm(hidden)
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

    def _decodes_by_hand(self, cache: Any) -> bool:
        """Whether a one-token step may run through `_decode_layer`: a supported stack, and either a GrowingCache or
        no autograd (training keeps the model's layers and their checkpointing) with no cache or a DynamicCache."""
        if self.hand_written is None or not self.by_hand:
            return False
        if isinstance(cache, GrowingCache):  # made for these layers (generation converts its caches to it)
            return True
        if torch.is_grad_enabled():
            return False
        from transformers import DynamicCache

        return cache is None or type(cache) is DynamicCache

    def _mask_arguments(self, inputs_embeds, attention_mask, cache, cache_position, position_ids) -> dict:
        names = self.mask_arguments
        arguments = {"config": self.config, names["embeds"]: inputs_embeds, "attention_mask": attention_mask,
                     names["cache"]: cache, "position_ids": position_ids}
        if names["cache_position"]:
            arguments["cache_position"] = cache_position
        return arguments


# ---- the hand-written decoder layer ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerParts:
    """What the hand-written step calls in one decoder layer, looked up once: each projection as a plain function
    of its input."""

    input_norm: Callable[[torch.Tensor], torch.Tensor]
    q_proj: Callable[[torch.Tensor], torch.Tensor]
    k_proj: Callable[[torch.Tensor], torch.Tensor]
    v_proj: Callable[[torch.Tensor], torch.Tensor]
    o_proj: Callable[[torch.Tensor], torch.Tensor]
    post_norm: Callable[[torch.Tensor], torch.Tensor]
    gate_proj: Callable[[torch.Tensor], torch.Tensor]
    up_proj: Callable[[torch.Tensor], torch.Tensor]
    down_proj: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    head_dim: int
    scaling: float


def _decode_layer(parts: LayerParts, index: int, hidden: torch.Tensor, rotary: tuple, mask: torch.Tensor | None,
                  cache: Any) -> torch.Tensor:
    """One Llama-family decoder layer for one new token per row, `hidden` (b, 1, hidden), after what `cache` holds,
    computed as the layer's own forward computes it, without its per-call machinery:

        x = input_norm(h);  q, k, v = rotary(q_proj x), rotary(k_proj x), v_proj x;  k, v = cache + (k, v)
        h = h + o_proj(attention(q, k, v));  x = post_norm(h);  h = h + down(act(gate x) * up x)

    `rotary`: from `RotaryRows.rows`; `mask`: (b, 1, 1, keys) bool or None (every key visible)."""
    b = hidden.shape[0]
    heads = (b, -1, 1, parts.head_dim)  # one token: (b, 1, heads, head_dim) transposed is this very layout
    x = parts.input_norm(hidden)
    q = _rotate(parts.q_proj(x).view(heads), *rotary)  # (b, n_heads, 1, head_dim)
    k = _rotate(parts.k_proj(x).view(heads), *rotary)  # (b, n_kv_heads, 1, head_dim)
    v = parts.v_proj(x).view(heads)
    if cache is not None:
        k, v = cache.update(k, v, index)  # (b, n_kv_heads, keys, head_dim)
    # grouped key/value heads: SDPA's enable_gqa gives bit for bit what repeating them gives
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=parts.scaling,
                                         enable_gqa=q.shape[1] != k.shape[1])  # (b, n_heads, 1, head_dim)
    hidden = hidden + parts.o_proj(out.view(b, 1, -1))
    x = parts.post_norm(hidden)
    return hidden + parts.down_proj(parts.act(parts.gate_proj(x)) * parts.up_proj(x))


class RotaryRows:
    """What `_rotate` reads for one-token steps: (cos, sign * sin, the halves' order swapped), so that
    rotate_half(x) * sin, where rotate_half(x) = (-x2, x1), is x[..., swapped] * (sign * sin), bit for bit (a sign
    flip is exact).

    For the rotary kinds whose table depends on the position alone (STATIC), the model's own rotary module computes
    the table for positions 0..n-1 in one call, grown (doubled) when a step goes past it, and a step looks its rows
    up. One call over many positions gives each position's row bit for bit as a call for that position alone
    (tests/backbone/test_decoder.py checks it). Other kinds ("dynamic", "longrope", ...) call the module at every
    step."""

    STATIC = ("default", "linear", "llama3", "yarn")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.static = getattr(module, "rope_type", None) in self.STATIC
        self.tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (dtype, device) -> (cos, signed sin)
        self.swaps: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (head_dim, dtype, device) -> (sign, order)

    def rows(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each (b, 1, 1, head_dim), and the swapped order (head_dim,), for positions (b, 1)."""
        b = position_ids.shape[0]
        if not self.static:
            cos, sin = self.module(like, position_ids=position_ids)  # (b, 1, head_dim)
            return cos.unsqueeze(1), (sin * self.sign(cos)).unsqueeze(1), self.order(cos)
        key = (like.dtype, like.device)
        positions = position_ids.reshape(-1)
        try:
            cos, signed_sin = self.tables[key]
            rows = cos.index_select(0, positions), signed_sin.index_select(0, positions)
        except (KeyError, IndexError):  # no table yet, or a position past it
            self._grow(like, int(positions.max()) + 1)
            cos, signed_sin = self.tables[key]
            rows = cos.index_select(0, positions), signed_sin.index_select(0, positions)
        return rows[0].view(b, 1, 1, -1), rows[1].view(b, 1, 1, -1), self.order(cos)

    def sign(self, like: torch.Tensor) -> torch.Tensor:
        return self._swap(like)[0]

    def order(self, like: torch.Tensor) -> torch.Tensor:
        return self._swap(like)[1]

    def _swap(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.shape[-1], like.dtype, like.device)
        if key not in self.swaps:
            head_dim, half = like.shape[-1], like.shape[-1] // 2
            sign = torch.ones(head_dim, dtype=like.dtype, device=like.device)
            sign[:half] = -1
            order = torch.cat([torch.arange(half, 2 * half), torch.arange(half)]).to(like.device)
            self.swaps[key] = (sign, order)
        return self.swaps[key]

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        key = (like.dtype, like.device)
        old = self.tables[key][0].shape[0] if key in self.tables else 0
        size = max(needed, 2 * old, 256)
        positions = torch.arange(size, device=like.device)[None]  # (1, size)
        cos, sin = self.module(like[:1, :1], position_ids=positions)  # (1, size, head_dim)
        self.tables[key] = (cos[0], sin[0] * self.sign(cos))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, swapped: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x (b, heads, t, head_dim): x cos + rotate_half(x) sin."""
    return x * cos + x.index_select(-1, swapped) * signed_sin


def _hand_written_layers(base: nn.Module, layers: list[nn.Module], layer_kinds: list[str]) -> list[LayerParts] | None:
    """The parts of every layer when `_decode_layer` computes what the layers compute, else None: full attention
    in every layer (a sliding window goes through the model's mask functions), SDPA attention, the Llama layout of
    modules, RMSNorms of the Llama kind, no forward hooks (which calling a module's `forward` would skip) and no
    accelerate dispatch (a base sharded with device_map or offloaded moves its tensors in hooks)."""
    if any(kind != FULL for kind in layer_kinds):
        return None
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return None
    if any(hasattr(m, "_hf_hook") for m in base.modules()):  # dispatched by accelerate (device_map, offload)
        return None
    found = []
    for layer in layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = [getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)]
        if attention is None or mlp is None or not all(_is_llama_rms_norm(n) for n in norms):
            return None
        if not all(hasattr(attention, n) for n in _ATTENTION_PARTS) or not all(hasattr(mlp, n) for n in _MLP_PARTS):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in layer.modules()):
            return None  # hooks (accelerate's device placement and offload among them) run only in module calls
        found.append(LayerParts(
            input_norm=_rms_norm_of(norms[0]), post_norm=_rms_norm_of(norms[1]),
            **{n: _projection(getattr(attention, n)) for n in _ATTENTION_PARTS[:4]},
            **{n: _projection(getattr(mlp, n)) for n in _MLP_PARTS[:3]}, act=mlp.act_fn.forward,
            head_dim=int(attention.head_dim), scaling=float(attention.scaling)))
    return found


_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _is_llama_rms_norm(module: nn.Module | None) -> bool:
    """The RMSNorm of Llama, Mistral and Qwen2: weight * (x / rms(x)) in float32, then back to x's dtype."""
    return type(module).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm") and \
        hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), torch.Tensor)


def _rms_norm_of(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, eps = module.weight, module.variance_epsilon

    def rms_norm(x: torch.Tensor) -> torch.Tensor:  # the same operations, in the same order, as the module's forward
        dtype = x.dtype
        if dtype is torch.float32:  # the conversions are no-ops; in place where the module allocates (same values)
            return weight * (x * x.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_())
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x.to(dtype)

    return rms_norm


def _projection(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A projection as a function: F.linear over the weights of a plain nn.Linear (what its forward does), else the
    module's own forward (a mixed LoRA layer, a quantized linear)."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module.forward


def _padding_mask_fits(attention_mask: torch.Tensor | None, batch: int, keys: int) -> bool:
    """A 2-d 0/1 mask over every key of a one-token step (or none), as the hand-written step reads it."""
    return attention_mask is None or (attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch, keys))


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
