"""XLoraModel: a base causal LM, its LoRA experts mixed per token, and the two passes of X-LoRA.

    1. scaling pass: the base model with every expert weighted by `scaling_pass_value` (0: no LoRA at all)
       gives the last hidden state h (b, t, hidden);
    2. the classifier maps h to scalings (b, t, n_lora_layers, n_experts);
    3. mixed pass: the same model, each adapted layer adding sum_e w[b, t, layer, e] s_e B_e A_e x.

Both passes run through `forward`, each with its own optional KV cache, so cached generation needs nothing
more than keeping the two caches. Only the classifier is trained by default; the scaling pass runs without
gradients (as in PEFT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .backbone.compat import enable_activation_checkpointing, output_cache, with_cache
from .backbone.decoder import DecoderStack, PreparedStep
from .checks import is_finite_number, is_int
from .classifier import XLoraClassifier, mixing_weights
from .config import CONFIG_NAME, XLoraConfig
from .experts import Expert, save_expert, supported_module
from .files import atomic_write, atomic_write_text, replace_dir
from .layers import MixedLoraEmbedding, MixedLoraLayer, MixedLoraLinear, MixingState
from .loading import (
    CLASSIFIER_NAME,
    Checkpoint,
    base_model_id,
    load_base,
    load_classifier,
    load_experts,
    read_checkpoint,
)
from .losses import causal_lm_loss, shift_labels  # noqa: F401  (re-exported: loramix.model.causal_lm_loss)


@dataclass(frozen=True)
class FoldedWeights:
    """What `XLoraModel.fold` returns: one folded weight per adapted layer, in mixed-layer order (W0's layout)."""

    per_layer: tuple[torch.Tensor, ...]


@dataclass
class XLoraOutput:
    """What `XLoraModel.forward` returns. A plain dataclass of loramix's own, not a transformers `ModelOutput`, so
    that no transformers release can rename its fields; `out["logits"]` and `out.to_tuple()` work as on a
    ModelOutput (the tuple skips fields that are None)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (b, t, vocab)
    scalings: torch.Tensor | None = None  # (b, t, n_lora_layers, n_experts), the classifier's output
    past_key_values: Any = None  # KV cache of the mixed pass
    scaling_past_key_values: Any = None  # KV cache of the scaling pass

    def __getitem__(self, key: str | int):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())


class XLoraModel(nn.Module):
    """X-LoRA over a Hugging Face causal LM. Build with `from_base` or `from_pretrained`."""

    def __init__(self, base_model: nn.Module, config: XLoraConfig, experts: list[Expert],
                 base_model_id: str | None = None) -> None:
        super().__init__()
        hidden_size = _hidden_size(base_model)
        if config.hidden_size is None:
            config = dataclasses.replace(config, hidden_size=hidden_size)
        elif hidden_size is not None and config.hidden_size != hidden_size:
            raise ValueError(f"hidden_size: config says {config.hidden_size}, the base model's is {hidden_size}")
        self.config = config
        self.base_model_id = base_model_id
        self.base = base_model
        self.expert_names = [e.name for e in experts]
        self._expert_configs = [e.config for e in experts]
        self._expert_dtypes = [e.dtype for e in experts]
        self._state = MixingState()
        self._state.dtype = compute_dtype = _compute_dtype(base_model)  # never a packed 4/8-bit weight's dtype
        self.lora_layer_names = _swap_in_mixed_layers(base_model, experts, self._state, config, compute_dtype)
        flat_index, flat_scale = [], []
        for position, layer in enumerate(self.mixed_layers()):  # one gather per pass serves every layer
            layer.split_position = position
            self._state.layer_sizes.append(layer.lora_A.shape[0])
            flat_index.append(layer.layer_index * len(experts) + layer.expert_of_rank.cpu())  # layers may be sharded
            flat_scale.append(layer.scale_of_rank.cpu())
        self._state.flat_index, self._state.flat_scale = torch.cat(flat_index), torch.cat(flat_scale)
        self.classifier = XLoraClassifier(
            config.hidden_size, len(experts), len(self.lora_layer_names), depth=config.xlora_depth,
            size=config.xlora_size, dropout_p=config.xlora_dropout_p,
            relu_and_dropout=config.enable_relu_and_dropout, bias=config.use_bias,
            layerwise=config.layerwise_scalings,
        ).to(device=_param(base_model).device, dtype=compute_dtype)  # follows the last hidden state when sharded
        for p in self.base.parameters():
            p.requires_grad_(False)
        for layer in self.mixed_layers():
            layer.lora_A.requires_grad_(config.use_trainable_adapters)
            layer.lora_B.requires_grad_(config.use_trainable_adapters)
        self._latest_scalings: torch.Tensor | None = None
        self._scalings_log: list[torch.Tensor] = []
        self._scalings_logging = False
        # Llama / Mistral / Qwen2: both passes share one step's positions, rotary table and masks and run the
        # decoder layers directly (fast_decode.py); other bases, or `direct_layers = False`, go through base(...).
        self._stack = DecoderStack.of(base_model)
        self.direct_layers = True
        self.eval()

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: str | nn.Module, config: XLoraConfig, *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, trust_remote_code: bool = False,
                  device_map: Any = None, max_memory: dict | None = None, offload_folder: str | None = None,
                  quantization: Any = None, _peft_xlora_experts: bool = False) -> "XLoraModel":
        """Load the base model (path, hub id or a loaded PreTrainedModel) and the experts named in `config`.

        `device_map`, `max_memory`, `offload_folder` and `quantization` ("4bit", "8bit" or a BitsAndBytesConfig)
        go to transformers when the base is loaded by name (see `loramix.loading.load_base`)."""
        if isinstance(config.adapters, list):
            raise ValueError("adapters: from_base needs a mapping name -> adapter path or hub id")
        base_model = load_base(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                               quantization=quantization)
        experts = load_experts(config, base_model, inside_peft_xlora=_peft_xlora_experts)
        return cls(base_model, config, experts, base_model_id=base_model_id(base))

    @classmethod
    def from_pretrained(cls, source: str, base: str | nn.Module | None = None, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, trust_remote_code: bool = False,
                        adapters: dict[str, str] | None = None, device_map: Any = None,
                        max_memory: dict | None = None, offload_folder: str | None = None,
                        quantization: Any = None) -> "XLoraModel":
        """Load a saved X-LoRA: loramix / original `xlora` layout, an X-LoRA saved by PEFT, or a local mistral.rs
        X-LoRA folder (ordering file + flat `<expert>.adapter_*` files; see loramix.interop.mistralrs).

        `base` defaults to the base model id recorded in the checkpoint. `adapters` (name -> folder or hub id)
        loads the experts from elsewhere instead of the checkpoint's own folders; names must match the saved ones.
        `device_map`, `max_memory`, `offload_folder` and `quantization` are passed to `from_base`.
        """
        from .interop.mistralrs import find_ordering_file, read_mistralrs_checkpoint

        placement = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code, device_map=device_map,
                         max_memory=max_memory, offload_folder=offload_folder, quantization=quantization)
        if find_ordering_file(source) is not None:  # mistral.rs's layout: ordering file + flat adapter files
            with read_mistralrs_checkpoint(source) as found:  # its adapters exist only inside this block
                if base is None and not found.base_model_id:
                    raise ValueError(f"{source}: the checkpoint records no base model id; pass base=...")
                checkpoint = Checkpoint(config=dataclasses.replace(found.config, adapters=adapters or found.adapters),
                                        base=base or found.base_model_id, classifier_path=found.source,
                                        classifier_state=found.classifier_state, peft_layout=False,
                                        peft_layout_experts=False)
                model = cls.from_base(checkpoint.base, checkpoint.config, **placement)
        else:
            checkpoint = read_checkpoint(source, base=base, adapters=adapters)
            model = cls.from_base(checkpoint.base, checkpoint.config, **placement,
                                  _peft_xlora_experts=checkpoint.peft_layout_experts)
        load_classifier(model.classifier, checkpoint)
        return model

    def save_pretrained(self, folder: str) -> None:
        """Write the published X-LoRA layout: config, classifier, and one PEFT adapter folder per expert.

        Every file is written to a temporary name and renamed, so an interrupted save leaves no partial file.
        """
        os.makedirs(folder, exist_ok=True)
        config = self.config.to_dict()
        config["adapters"] = list(self.expert_names)
        config["base_model_id"] = self.base_model_id
        from ._version import __version__

        config["loramix_version"] = __version__
        atomic_write_text(os.path.join(folder, CONFIG_NAME), json.dumps(config, indent=2) + "\n")
        classifier_state = {k: v.detach().contiguous().cpu() for k, v in self.classifier.state_dict().items()}
        atomic_write(os.path.join(folder, CLASSIFIER_NAME), lambda p: save_file(classifier_state, p))
        for e, name in enumerate(self.expert_names):
            modules = {}
            for layer_name, layer in zip(self.lora_layer_names, self.mixed_layers()):
                m = layer.expert_module(e)
                if m is not None:
                    modules[layer_name] = m
            target = os.path.join(folder, name)
            tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=folder)
            try:
                save_expert(modules, self._expert_configs[e], self._expert_dtypes[e], tmp)
                replace_dir(tmp, target)
            finally:
                if os.path.isdir(tmp):
                    import shutil

                    shutil.rmtree(tmp, ignore_errors=True)

    # ---- the two passes -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, past_key_values: Any = None,
                scaling_past_key_values: Any = None, use_cache: bool = False,
                scalings: torch.Tensor | None = None, logits_to_keep: int = 0, *,
                top_k_lora: int | None = None, softmax_temperature: float | None = None) -> XLoraOutput:
        """Run X-LoRA. `scalings` (b, t or 1, n_lora_layers, n_experts), if given, skips the scaling pass.

        `top_k_lora` and `softmax_temperature` set the gate for this call only (None: the config's value); they
        are how one request's options reach the model without touching `model.config`. Inside `folded(...)`
        the experts are already in the weights: pass the frozen `scalings`, and no mixing weights are computed."""
        top_k_lora = self._gate_top_k(top_k_lora)
        stack = self._direct_stack()
        if stack is not None and inputs_embeds is None and not isinstance(stack.backbone.embed_tokens, MixedLoraLayer):
            input_ids, inputs_embeds = None, stack.embed(input_ids)  # the same in both passes: looked up once
        inputs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=use_cache)
        folded = self._state.folded_weights is not None
        if folded and scalings is None:
            raise ValueError("scalings: the model is folded (inside `folded`); pass the frozen scalings")
        prepared = None
        # one step's positions and masks serve both passes when their caches hold the same positions
        share_step = _same_length(scaling_past_key_values, past_key_values)
        try:
            if scalings is None:
                # Pass 1: the base model with constant expert weights, then the classifier.
                scalings, scaling_past_key_values, prepared = self._compute_scalings(
                    scaling_past_key_values=scaling_past_key_values, softmax_temperature=softmax_temperature,
                    **inputs)  # (b, t, L, E)
            # Pass 2: every adapted layer mixes its experts with per-token weights (folded: already in W).
            self._state.set(None if folded else self.mixing_weights(scalings, top_k_lora=top_k_lora))
            if stack is not None:
                logits, past_key_values, _ = self._run_layers(cache=past_key_values,
                                                              prepared=prepared if share_step else None,
                                                              logits_to_keep=logits_to_keep, **inputs)
            else:
                extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
                out = self.base(**with_cache(self.base, past_key_values), return_dict=True, **inputs, **extra)
                logits, past_key_values = out.logits, output_cache(out)
        finally:
            self._state.set(None)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return XLoraOutput(loss=loss, logits=logits, scalings=scalings,
                           past_key_values=past_key_values if use_cache else None,
                           scaling_past_key_values=scaling_past_key_values if use_cache else None)

    def compute_scalings(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                         scaling_past_key_values: Any = None, use_cache: bool = False, *,
                         softmax_temperature: float | None = None) -> tuple[torch.Tensor, Any]:
        """The scaling pass alone: (scalings (b, t, L, E), its KV cache). The base model runs with every expert
        weighted `scaling_pass_value` and without gradient (as in PEFT); the classifier reads its last hidden
        state. `softmax_temperature` overrides the config's for this call. `forward` calls this; a caller that
        wants to change some rows' scalings (frozen rows) calls it, edits the result and passes it to
        `forward(scalings=...)`."""
        scalings, cache, _ = self._compute_scalings(input_ids=input_ids, attention_mask=attention_mask,
                                                    position_ids=position_ids, inputs_embeds=inputs_embeds,
                                                    scaling_past_key_values=scaling_past_key_values,
                                                    use_cache=use_cache, softmax_temperature=softmax_temperature)
        return scalings, cache

    def _compute_scalings(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                          scaling_past_key_values=None, use_cache=False, *,
                          softmax_temperature=None) -> tuple[torch.Tensor, Any, PreparedStep | None]:
        """`compute_scalings`, also returning the step's positions and masks when the layers ran directly."""
        if softmax_temperature is None:
            softmax_temperature = self.config.softmax_temperature
        elif not (is_finite_number(softmax_temperature) and softmax_temperature > 0):
            raise ValueError(f"softmax_temperature: got {softmax_temperature!r}, expected a finite number > 0")
        try:
            self._state.set(self._scaling_pass_weights())
            with torch.no_grad():
                hidden, cache, prepared = self._last_hidden_state(
                    input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, cache=scaling_past_key_values, use_cache=use_cache)
        finally:
            self._state.set(None)
        scalings = self.classifier(hidden, enable_softmax=self.config.enable_softmax,
                                   temperature=softmax_temperature)  # (b, t, L, E)
        self._record(scalings)
        return scalings, cache, prepared

    def mixing_weights(self, scalings: torch.Tensor, *, top_k_lora: int | None = None) -> torch.Tensor:
        """Scalings (..., n_lora_layers, n_experts) -> the weights the layers apply (top-k, its softmax, the
        global weight; see classifier.mixing_weights). `top_k_lora` overrides the config's (None: keep it)."""
        c = self.config
        return mixing_weights(scalings, top_k=self._gate_top_k(top_k_lora), softmax_topk=c.enable_softmax_topk,
                              global_weight=c.global_scaling_weight)

    def _gate_top_k(self, top_k_lora: int | None) -> int | None:
        if top_k_lora is None:
            return self.config.top_k_lora
        if not (is_int(top_k_lora) and 1 <= top_k_lora <= self.n_experts):
            raise ValueError(f"top_k_lora: got {top_k_lora!r}, expected an integer in 1..{self.n_experts} "
                             f"(the number of experts)")
        return top_k_lora

    # ---- frozen scalings folded into the weights --------------------------------------------------------------
    def fold(self, scalings: torch.Tensor, *, top_k_lora: int | None = None) -> FoldedWeights:
        """The adapted weights with a fixed mix inside, W0 + sum_e w[l, e] s_e B_e A_e per LoRA layer l, for
        scalings (n_lora_layers, n_experts). Nothing changes until the result is used with `folded`; it holds
        one copy of every adapted weight for as long as it is kept."""
        if scalings.shape != (self.n_lora_layers, self.n_experts):
            raise ValueError(f"scalings: expected ({self.n_lora_layers}, {self.n_experts}) (LoRA layers, experts), "
                             f"got {tuple(scalings.shape)}")
        weights = self.mixing_weights(scalings, top_k_lora=top_k_lora)  # (L, E)
        for layer in self.mixed_layers():  # refuse before any layer is folded (quantized or offloaded weights)
            layer.check_foldable()
        with torch.no_grad():
            return FoldedWeights(tuple(layer.folded_weight(weights[layer.layer_index])
                                       for layer in self.mixed_layers()))

    @contextmanager
    def folded(self, weights: FoldedWeights) -> Iterator[None]:
        """Inside the block every adapted layer uses `weights` (from `fold`) instead of mixing its experts: a
        pass costs what a pass of the base model costs. `forward` then needs the frozen `scalings`."""
        if len(weights.per_layer) != self.n_lora_layers:
            raise ValueError(f"weights: folded for {len(weights.per_layer)} LoRA layers, this model has "
                             f"{self.n_lora_layers}")
        self._state.folded_weights = weights.per_layer
        try:
            yield
        finally:
            self._state.folded_weights = None

    def _scaling_pass_weights(self) -> torch.Tensor | None:
        value = self.config.resolved_scaling_pass_value()
        if value == 0:
            return None  # every expert weighted 0: the bare base model, no LoRA computed
        p = self.classifier.last.weight
        constant = torch.full((1, 1, len(self.lora_layer_names), len(self.expert_names)), value,
                              dtype=p.dtype, device=p.device)
        return self.mixing_weights(constant)

    def _last_hidden_state(self, cache: Any = None, **inputs) -> tuple[torch.Tensor, Any, PreparedStep | None]:
        """The base's final hidden state (after its last norm), without computing the LM head; its cache; the
        step's positions and masks when the layers ran directly (else None)."""
        if self._direct_stack() is not None:
            return self._run_layers(cache=cache, **inputs)
        backbone = getattr(self.base, "base_model", self.base)
        if backbone is not self.base:
            out = backbone(return_dict=True, **with_cache(backbone, cache), **inputs)
            return out.last_hidden_state, output_cache(out), None
        out = self.base(output_hidden_states=True, return_dict=True, **with_cache(self.base, cache), **inputs)
        return out.hidden_states[-1], output_cache(out), None

    @property
    def decodes_by_hand(self) -> bool:
        """Whether one-token steps run through the hand-written decoder layers (fast_decode.py), which is when a
        `loramix.backbone.kv_cache.GrowingCache` may hold the KV cache of both passes. True by default for Llama, Mistral
        and Qwen2 bases with full attention; set it to False to run every step through the model's own layers
        (the same tokens; for comparisons)."""
        stack = self._direct_stack()
        return stack is not None and stack.hand_written is not None and stack.by_hand

    @decodes_by_hand.setter
    def decodes_by_hand(self, on: bool) -> None:
        if self._stack is not None:
            self._stack.by_hand = bool(on)

    def _direct_stack(self) -> DecoderStack | None:
        return self._stack if self.direct_layers else None

    def _run_layers(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, cache=None,
                    use_cache=False, prepared: PreparedStep | None = None,
                    logits_to_keep: int | None = None) -> tuple[torch.Tensor, Any, PreparedStep]:
        """One pass through the decoder layers, as `base(...)` runs it: (the final hidden state (b, t, hidden),
        or the logits of the last `logits_to_keep` positions (0: all) when it is not None; the cache; the step's
        positions and masks, reused by the second pass of the same step)."""
        stack = self._stack
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.base.config)  # what the model's forward makes
        embeds = stack.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, hidden)
        if prepared is None:
            prepared = stack.prepare(embeds, attention_mask, position_ids, cache)
        hidden = stack.hidden_states(embeds, prepared, cache)
        if logits_to_keep is None:
            return hidden, cache, prepared
        return stack.logits(hidden, logits_to_keep), cache, prepared

    def _record(self, scalings: torch.Tensor) -> None:
        self._latest_scalings = scalings.detach()
        if self._scalings_logging:
            self._scalings_log.append(scalings.detach())

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Cached generation with one KV cache per pass; see `loramix.engine.generate.generate` for the options."""
        from .engine.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ---- inspection and knobs (PEFT's names) ----------------------------------------------------------------
    def mixed_layers(self) -> list[MixedLoraLayer]:
        return [m for m in self.base.modules() if isinstance(m, MixedLoraLayer)]

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def n_lora_layers(self) -> int:
        return len(self.lora_layer_names)

    @property
    def device(self) -> torch.device:
        return _param(self.base).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a 4/8-bit base computes in its float dtype, not in its packed weights')."""
        return self._state.dtype

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings (b, t, n_lora_layers, n_experts) of the latest scaling pass, or None."""
        return self._latest_scalings

    def enable_scalings_logging(self) -> None:
        self._scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self._scalings_logging = False

    def clear_scalings_log(self) -> None:
        self._scalings_log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the list of logged scalings, each (b, t, n_lora_layers, n_experts); t varies per call."""
        return list(self._scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log grouped by sequence length: {t: (positions in the log, tensors)}."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for i, s in enumerate(self._scalings_log):
            positions, tensors = buckets.setdefault(s.shape[1], ([], []))
            positions.append(i)
            tensors.append(s)
        return buckets

    def set_topk_lora(self, value: int | None) -> None:
        self._set(top_k_lora=value)

    def set_softmax_temperature(self, value: float) -> None:
        self._set(softmax_temperature=value)

    def set_global_scaling_weight(self, weight: float) -> None:
        self._set(global_scaling_weight=weight)

    def get_global_scaling_weight(self) -> float:
        return self.config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """None means 1 / n_experts."""
        self._set(scaling_pass_value=value)

    def _set(self, **changes) -> None:
        self.config = dataclasses.replace(self.config, **changes)  # re-validated by __post_init__

    def gradient_checkpointing_enable(self) -> None:
        """Training: turn on the base model's own gradient checkpointing (non-reentrant), for the mixed pass.

        A checkpointed block is recomputed during backward, after `forward` has cleared the shared mixing state,
        so each block's recomputation is given back the mixing weights it saw in the forward (torch's
        `context_fn`). The scaling pass runs without gradient and stores nothing to recompute."""
        state = self._state

        def context_fn():
            seen = (state.rank_weights, state.layer_weights)  # the weights this block reads in the forward

            @contextlib.contextmanager
            def recompute():
                before = (state.rank_weights, state.layer_weights)
                state.rank_weights, state.layer_weights = seen
                try:
                    yield
                finally:
                    state.rank_weights, state.layer_weights = before

            return contextlib.nullcontext(), recompute()

        enable_activation_checkpointing(self.base, use_reentrant=False, context_fn=context_fn)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _swap_in_mixed_layers(base: nn.Module, experts: list[Expert], state: MixingState,
                          config: XLoraConfig, dtype: torch.dtype) -> list[str]:
    """Replace every module that any expert adapts by a mixed layer, in module traversal order (PEFT's)."""
    targeted = set().union(*(e.modules for e in experts))
    names = [name for name, _ in base.named_modules() if name in targeted]
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        module = getattr(parent, child)
        per_expert = [e.modules.get(name) for e in experts]
        dropout_p = max((float(e.config.get("lora_dropout", 0.0) or 0.0) for e in experts if name in e.modules),
                        default=0.0) if config.use_trainable_adapters else 0.0
        cls = MixedLoraEmbedding if supported_module(module) == "embedding" else MixedLoraLinear
        setattr(parent, child, cls(module, per_expert, index, state, config.use_trainable_adapters, dropout_p, dtype))
    return names


def _hidden_size(base: nn.Module) -> int | None:
    cfg = getattr(base, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def _param(module: nn.Module) -> torch.Tensor:
    """The first parameter that holds data (parameters accelerate offloads to disk sit on "meta")."""
    return next((p for p in module.parameters() if not p.is_meta), next(module.parameters()))


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the base computes in: its first float parameter's (bitsandbytes' packed weights are uint8/int8)."""
    return next((p.dtype for p in module.parameters() if p.dtype.is_floating_point), torch.float32)


def _same_length(cache: Any, other: Any) -> bool:
    """Whether two KV caches (or None) hold the same number of positions: then one step's masks serve both."""
    if cache is None or other is None:
        return cache is None and other is None
    return type(cache) is type(other) and cache.get_seq_length() == other.get_seq_length()
