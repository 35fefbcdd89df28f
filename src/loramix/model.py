"""XLoraModel: a base causal LM, its LoRA experts mixed per token, and the two passes of X-LoRA.

    1. scaling pass: the base model with every expert weighted by `scaling_pass_value` (0: no LoRA at all)
       gives the last hidden state h (b, t, hidden);
    2. the classifier maps h to scalings (b, t, n_lora_layers, n_experts);
    3. mixed pass: the same model, each adapted layer adding sum_e w[b, t, layer, e] s_e B_e A_e x.

Both passes run through `forward`, as one pass function (`_pass`) given two sets of mixing weights, each with
its own optional KV cache, so cached generation needs nothing more than keeping the two caches. Only the
classifier is trained by default; the scaling pass runs without gradients (as in PEFT).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone.compat import enable_activation_checkpointing, output_cache, with_cache
from .backbone.decoder import DecoderStack, PreparedStep
from .cards import TrainingRecord, expert_entry, write_card, xlora_card
from .checkpoint import Checkpoint, load_classifier, read_checkpoint, write_checkpoint
from .classifier import XLoraClassifier, mixing_weights
from .config import GateOptions, XLoraConfig
from .experts import Expert, ExpertModule, supported_module
from .layers import MixedLoraEmbedding, MixedLoraLayer, MixedLoraLinear, MixingState
from .loading import base_model_id, load_base, load_experts, load_tokenizer
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
        # decoder layers directly (backbone/decoder.py); other bases, or `direct_layers = False`, go through
        # base(...). `_pass` makes that choice for both passes.
        self._stack = DecoderStack.of(base_model)
        self.direct_layers = True
        # the tokenizer that goes with the model, saved beside it by save_pretrained; from_base / from_pretrained
        # keep the one they are given (None: none known)
        self.tokenizer: Any = None
        self.eval()

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: str | nn.Module, config: XLoraConfig, *, dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, trust_remote_code: bool = False,
                  device_map: Any = None, max_memory: dict | None = None, offload_folder: str | None = None,
                  quantization: Any = None, tokenizer: Any = None) -> "XLoraModel":
        """Load the base model (path, hub id or a loaded PreTrainedModel) and the experts named in `config`.

        `device_map`, `max_memory`, `offload_folder` and `quantization` ("4bit", "8bit" or a BitsAndBytesConfig)
        go to transformers when the base is loaded by name (see `loramix.loading.load_base`). `tokenizer` (a
        tokenizer, or a folder or hub id to load one from) is kept as `model.tokenizer` and saved beside the model
        by `save_pretrained`."""
        if isinstance(config.adapters, list):
            raise ValueError("adapters: from_base needs a mapping name -> adapter path or hub id")
        base_model = load_base(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                               device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                               quantization=quantization)
        model = cls(base_model, config, load_experts(config, base_model), base_model_id=base_model_id(base))
        model.tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        return model

    @classmethod
    def from_pretrained(cls, source: str, base: str | nn.Module | None = None, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, trust_remote_code: bool = False,
                        adapters: dict[str, str] | None = None, device_map: Any = None,
                        max_memory: dict | None = None, offload_folder: str | None = None,
                        quantization: Any = None, tokenizer: Any = None) -> "XLoraModel":
        """Load a saved X-LoRA: loramix / original `xlora` layout, an X-LoRA saved by PEFT (see loramix.checkpoint),
        or a local mistral.rs X-LoRA folder (ordering file + flat `<expert>.adapter_*` files; see
        loramix.interop.mistralrs).

        `base` defaults to the base model id recorded in the checkpoint. `adapters` (name -> folder or hub id)
        loads the experts from elsewhere instead of the checkpoint's own folders; names must match the saved ones.
        `device_map`, `max_memory`, `offload_folder` and `quantization` are as in `from_base`. `tokenizer` (a
        tokenizer, or a folder or hub id; `source` itself for the one saved beside the checkpoint) is kept as
        `model.tokenizer`, as in `from_base`.
        """
        from .interop.mistralrs import find_ordering_file, read_mistralrs_checkpoint

        placement = dict(dtype=dtype, device=device, trust_remote_code=trust_remote_code, device_map=device_map,
                         max_memory=max_memory, offload_folder=offload_folder, quantization=quantization)
        if find_ordering_file(source) is not None:  # mistral.rs's layout: ordering file + flat adapter files
            with read_mistralrs_checkpoint(source, base=base, adapters=adapters) as checkpoint:  # adapters: in here
                model = cls._from_checkpoint(checkpoint, placement)
        else:
            model = cls._from_checkpoint(read_checkpoint(source, base=base, adapters=adapters), placement)
        model.tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        return model

    @classmethod
    def _from_checkpoint(cls, checkpoint: Checkpoint, placement: dict[str, Any]) -> "XLoraModel":
        base_model = load_base(checkpoint.base, **placement)
        experts = load_experts(checkpoint.config, base_model, inside_peft_xlora=checkpoint.peft_layout_experts)
        model = cls(base_model, checkpoint.config, experts, base_model_id=base_model_id(checkpoint.base))
        load_classifier(model.classifier, checkpoint)
        return model

    def save_pretrained(self, folder: str, *, tokenizer: Any = None, training: TrainingRecord | None = None,
                        repo_id: str | None = None) -> None:
        """Write the published X-LoRA layout (see loramix.checkpoint): config, classifier, and one PEFT adapter
        folder per expert; a model card, README.md (see loramix.cards: the base, the experts, the gate, and with
        `training` the data and the eval table; `repo_id` names where it is published); and the tokenizer
        (`tokenizer`, else `self.tokenizer`; none when neither is known). An interrupted save leaves no partial
        file."""
        experts = []
        for e, name in enumerate(self.expert_names):
            modules: dict[str, ExpertModule] = {}
            for layer_name, layer in zip(self.lora_layer_names, self.mixed_layers()):
                m = layer.expert_module(e)
                if m is not None:
                    modules[layer_name] = m
            experts.append(Expert(name, self._expert_configs[e], modules, self._expert_dtypes[e]))
        write_checkpoint(folder, self.config, self.classifier.state_dict(), experts, self.base_model_id)
        write_card(folder, xlora_card(base_model_id=self.base_model_id, experts=self.card_experts(),
                                      gate=self._card_gate(), training=training, repo_id=repo_id))
        tokenizer = self.tokenizer if tokenizer is None else tokenizer
        if tokenizer is not None:
            _save_tokenizer(tokenizer, folder)

    def card_experts(self) -> list[dict[str, Any]]:
        """The experts as a model card lists them (loramix.cards.expert_entry), in order."""
        sources = self.config.adapters if isinstance(self.config.adapters, dict) else {}
        return [expert_entry(name, config, sources.get(name))
                for name, config in zip(self.expert_names, self._expert_configs)]

    def _card_gate(self) -> dict[str, Any]:
        c = self.config
        return {"n_lora_layers": self.n_lora_layers, "xlora_depth": c.xlora_depth, "xlora_size": c.xlora_size,
                "layerwise_scalings": c.layerwise_scalings, "top_k_lora": c.top_k_lora,
                "enable_softmax": c.enable_softmax, "softmax_temperature": c.softmax_temperature,
                "global_scaling_weight": c.global_scaling_weight, "scaling_pass_value": c.scaling_pass_value}

    def push_to_hub(self, repo_id: str, *, tokenizer: Any = None, training: TrainingRecord | None = None,
                    private: bool | None = None, token: str | None = None, commit_message: str | None = None,
                    endpoint: str | None = None) -> str:
        """Save the model (as `save_pretrained`, the card naming `repo_id`) to a temporary folder and upload it to
        the hub repository `repo_id` ("owner/name"), created when missing (see loramix.hub.push_folder: `private`,
        `token`, `endpoint`: a hub other than huggingface_hub's default). Returns the commit's URL. A base model
        recorded as a local path is pushed as it is, with a warning: whoever loads it passes `base=`."""
        import tempfile
        import warnings

        from .hub import looks_like_path, push_folder

        if self.base_model_id and looks_like_path(self.base_model_id):
            warnings.warn(f"push_to_hub: the base model is the local path {self.base_model_id}; who loads "
                          f"{repo_id} must pass base=... (or build the model from the base's hub id)", stacklevel=2)

        with tempfile.TemporaryDirectory(prefix="loramix-push-") as tmp:
            self.save_pretrained(tmp, tokenizer=tokenizer, training=training, repo_id=repo_id)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                               endpoint=endpoint)

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
        gate = self._gate_options(top_k_lora, softmax_temperature)
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
        if scalings is None:
            # Pass 1: the base model with constant expert weights gives h, the classifier maps h to scalings.
            hidden, scaling_past_key_values, prepared = self._scaling_pass(scaling_past_key_values, **inputs)
            scalings = self._classify(hidden, gate)  # (b, t, L, E)
        # Pass 2: every adapted layer mixes its experts with per-token weights (folded: already in W).
        weights = None if folded else self.mixing_weights(scalings, top_k_lora=gate.top_k_lora)  # (b, t, L, E)
        logits, past_key_values, _ = self._pass(weights, past_key_values, prepared=prepared if share_step else None,
                                                logits_to_keep=logits_to_keep, **inputs)
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
        state. `softmax_temperature` overrides the config's for this call. `forward` runs the same two steps; a
        caller that wants to change some rows' scalings (frozen rows) calls this, edits the result and passes it
        to `forward(scalings=...)`."""
        gate = self._gate_options(None, softmax_temperature)
        hidden, cache, _ = self._scaling_pass(scaling_past_key_values, input_ids=input_ids,
                                              inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=use_cache)
        return self._classify(hidden, gate), cache

    def _scaling_pass(self, cache: Any, **inputs) -> tuple[torch.Tensor, Any, PreparedStep | None]:
        """Pass 1 up to the classifier's input, without gradient: `_pass` with every expert weighted
        `scaling_pass_value`, returning the last hidden state h (b, t, hidden)."""
        with torch.no_grad():
            return self._pass(self._scaling_pass_weights(), cache, **inputs)

    def _scaling_pass_weights(self) -> torch.Tensor | None:
        value = self.config.resolved_scaling_pass_value()
        if value == 0:
            return None  # every expert weighted 0: the bare base model, no LoRA computed
        p = self.classifier.last.weight
        constant = torch.full((1, 1, len(self.lora_layer_names), len(self.expert_names)), value,
                              dtype=p.dtype, device=p.device)
        return self.mixing_weights(constant)

    def _classify(self, hidden: torch.Tensor, gate: GateOptions) -> torch.Tensor:
        """h (b, t, hidden) -> scalings (b, t, n_lora_layers, n_experts), kept as the latest (and logged)."""
        scalings = self.classifier(hidden, enable_softmax=self.config.enable_softmax,
                                   temperature=gate.softmax_temperature)
        self._latest_scalings = scalings.detach()
        if self._scalings_logging:
            self._scalings_log.append(scalings.detach())
        return scalings

    def _pass(self, weights: torch.Tensor | None, cache: Any, input_ids: torch.Tensor | None = None,
              inputs_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, use_cache: bool = False, *,
              prepared: PreparedStep | None = None,
              logits_to_keep: int | None = None) -> tuple[torch.Tensor, Any, PreparedStep | None]:
        """One pass of the base model (either pass) with every mixed layer applying the mixing `weights`
        (b or 1, t or 1, n_lora_layers, n_experts), or no LoRA at all when None. Returns

        - with `logits_to_keep` None, the final hidden state (b, t, hidden), after the last norm, without the LM
          head; else the logits (b, t', vocab) of the last `logits_to_keep` positions (0: all);
        - the pass's KV cache;
        - the step's positions and masks when the decoder layers ran directly, else None; the other pass of the
          same step takes them as `prepared` when its cache holds as many positions.

        The decoder layers run directly (backbone/decoder.py: Llama, Mistral, Qwen2) unless `direct_layers` is
        False; other bases run through the transformers model itself."""
        self._state.set(weights)
        try:
            stack = self._direct_stack()
            if stack is not None:
                if use_cache and cache is None:
                    from transformers import DynamicCache

                    cache = DynamicCache(config=self.base.config)  # what the model's forward makes
                embeds = stack.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (b, t, hidden)
                if prepared is None:
                    prepared = stack.prepare(embeds, attention_mask, position_ids, cache)
                hidden = stack.hidden_states(embeds, prepared, cache)
                return hidden if logits_to_keep is None else stack.logits(hidden, logits_to_keep), cache, prepared
            inputs = dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache)
            if logits_to_keep is not None:
                extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
                out = self.base(**with_cache(self.base, cache), return_dict=True, **inputs, **extra)
                return out.logits, output_cache(out), None
            backbone = getattr(self.base, "base_model", self.base)  # the decoder without the LM head, if separate
            if backbone is not self.base:
                out = backbone(return_dict=True, **with_cache(backbone, cache), **inputs)
                return out.last_hidden_state, output_cache(out), None
            out = self.base(output_hidden_states=True, return_dict=True, **with_cache(self.base, cache), **inputs)
            return out.hidden_states[-1], output_cache(out), None
        finally:
            self._state.set(None)

    def mixing_weights(self, scalings: torch.Tensor, *, top_k_lora: int | None = None) -> torch.Tensor:
        """Scalings (..., n_lora_layers, n_experts) -> the weights the layers apply (top-k, its softmax, the
        global weight; see classifier.mixing_weights). `top_k_lora` overrides the config's (None: keep it)."""
        c = self.config
        return mixing_weights(scalings, top_k=self._gate_options(top_k_lora, None).top_k_lora,
                              softmax_topk=c.enable_softmax_topk, global_weight=c.global_scaling_weight)

    def _gate_options(self, top_k_lora: int | None, softmax_temperature: float | None) -> GateOptions:
        """One call's gate, the config's value where an option is None. GateOptions checks each value; the bound
        only the model knows, top_k_lora <= the number of experts, is checked here."""
        c = self.config
        gate = GateOptions(top_k_lora=c.top_k_lora if top_k_lora is None else top_k_lora,
                           softmax_temperature=c.softmax_temperature if softmax_temperature is None
                           else softmax_temperature)
        if gate.top_k_lora is not None and gate.top_k_lora > self.n_experts:
            raise ValueError(f"top_k_lora: got {gate.top_k_lora!r}, expected at most {self.n_experts} "
                             f"(the number of experts)")
        return gate

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

    @property
    def decodes_by_hand(self) -> bool:
        """Whether one-token steps run through the hand-written decoder layers (backbone/decoder.py), which is
        when a `loramix.backbone.kv_cache.GrowingCache` may hold the KV cache of both passes. True by default for
        Llama, Mistral and Qwen2 bases with full attention; set it to False to run every step through the model's
        own layers (the same tokens; for comparisons)."""
        stack = self._direct_stack()
        return stack is not None and stack.hand_written is not None and stack.by_hand

    @decodes_by_hand.setter
    def decodes_by_hand(self, on: bool) -> None:
        if self._stack is not None:
            self._stack.by_hand = bool(on)

    def rebuild_decoder_stack(self) -> None:
        """Read the base's decoder layers again, after they were wrapped or replaced in place (FSDP's
        `fully_shard`, training/fsdp.py); whether steps run by hand is kept."""
        by_hand = self._stack.by_hand if self._stack is not None else True
        self._stack = DecoderStack.of(self.base)
        if self._stack is not None:
            self._stack.by_hand = by_hand

    def _direct_stack(self) -> DecoderStack | None:
        return self._stack if self.direct_layers else None

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Cached generation with one KV cache per pass; see `loramix.engine.generate.generate` for the options
        (`speculate=N`: exact self-speculative decoding, engine/speculative.py)."""
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

    # ---- what transformers' pipelines read of a generating model (GenerationMixin's names) --------------------
    # `transformers.pipeline("text-generation", model=xlora_model, tokenizer=tok)` calls `generate` with the
    # pipeline's generation arguments. `config` stays the XLoraConfig; the base's own config is `base.config`.
    main_input_name = "input_ids"
    input_modalities = "text"
    output_modalities = "text"

    def can_generate(self) -> bool:
        """True: `generate` decodes text (GenerationMixin's question, asked by transformers' pipelines)."""
        return True

    @property
    def generation_config(self):
        """The base model's `transformers.GenerationConfig` (its EOS, pad and default lengths), made from its
        config when the base has none. `generate` itself takes its options as arguments."""
        config = getattr(self.base, "generation_config", None)
        if config is None:
            from transformers import GenerationConfig

            config = GenerationConfig.from_model_config(self.base.config)
        return config

    @property
    def name_or_path(self) -> str:
        """The base model's id (as transformers' models name themselves), or "" when it has none."""
        return self.base_model_id or ""


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


def _save_tokenizer(tokenizer: Any, folder: str) -> None:
    """`tokenizer.save_pretrained` into a temporary folder inside `folder`, then each file renamed in."""
    import shutil
    import tempfile

    from .files import move_into

    tmp = tempfile.mkdtemp(prefix=".tokenizer.", dir=folder)
    try:
        tokenizer.save_pretrained(tmp)
        move_into(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
