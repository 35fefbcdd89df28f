"""What a run will hold in memory, from the base model's config alone (no weights are read).

The base's parameter shapes come from building it on the "meta" device (`AutoModelForCausalLM.from_config`), so
every architecture transformers knows is counted exactly; the rest follows from those shapes:

    base weights      every parameter in the compute dtype; with 4-bit, the quantized Linear weights take half a
                      byte each plus one float32 absmax per block of 64; with 8-bit, a byte each plus one float32
                      scale per output row (bitsandbytes' layouts). Embeddings, norms and the LM head stay in the
                      compute dtype (transformers does not quantize the output embedding).
    stacked experts   n_experts * rank * (in + out) per adapted Linear, in the compute dtype
    classifier        hidden -> (xlora_size ->)^(depth-1) n_lora_layers * n_experts (layerwise) Linear layers
    KV caches         two: the scaling pass's and the mixed pass's, each 2 (K, V) * layers * batch * context *
                      kv_heads * head_dim elements
    activations       what autograd keeps for a gate-training step over batch * context tokens (below)

Activations per token and decoder layer (Llama-family: RMSNorm, rotary attention through SDPA, gated MLP), in
elements of the compute dtype, counting each tensor autograd saves once (inputs shared by several ops count once):

    two norms: normalized input + output             4 H
    q, k, v; rotary: rotated copies and results      H + 2 D_kv  +  2 H + 2 D_kv
    repeated K/V for grouped-query attention         2 H (when kv_heads < heads)
    attention output, its contiguous copy, o_proj    3 H, residual sum H
    gated MLP: gate, up, SiLU(gate), product         4 I; down_proj output and residual sum 2 H
    LoRA per adapted Linear: x A^T and its weighted  2 R (R = n_experts * rank)

plus the LM head's logits per token (compute dtype) and the loss's float32 log-softmax and gradient (2 * 4 bytes
per vocabulary entry). With gradient checkpointing only each layer's input (H) is kept, plus one layer's
activations while it is recomputed. The SDPA kernel keeps no (t x t) score matrix for the backward; an eager attention would
add heads * context per token and layer. Generation's peak is the prefill: one layer's temporaries, including the
(batch, heads, context, context) scores and their softmax, on top of the weights and caches.

Per process under FSDP over N processes (`training_per_rank`, training/fsdp.py): the weights, the experts and the
classifier with its gradient and Adam moments are split N ways (each tensor along its first dimension, so a
process may hold one row more of each); the decoder layer being computed and the next one are gathered whole
(two `layer_unit`s: the largest layer's weights and experts), the root unit (embeddings, final norm, LM head,
`root_unit`) stays gathered through the step; activations do not shrink (each process runs its own micro-batch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_BLOCK = 64  # bitsandbytes' 4-bit block size: one float32 absmax per block


@dataclass
class MemoryEstimate:
    """Bytes per component of a run (see the module docstring for how each is counted)."""

    base_weights: int
    experts: int
    classifier: int
    kv_caches: int
    activations: int
    activations_checkpointed: int
    prefill: int  # the largest temporaries of one layer while the prompt is read (no graph kept)
    shape: dict = field(default_factory=dict)  # the figures the estimate was made from
    layer_unit: int = 0  # the largest decoder layer's weights and experts: what FSDP gathers for one layer
    root_unit: int = 0  # the weights outside the decoder layers (embeddings, final norm, LM head)

    def inference(self) -> int:
        """Peak while generating: weights, experts, classifier, both KV caches and the prefill's temporaries."""
        return self.base_weights + self.experts + self.classifier + self.kv_caches + self.prefill

    def training(self, checkpointing: bool = False) -> int:
        """Held during a gate-training step (no KV caches; the classifier's gradient and Adam state are counted)."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        return self.base_weights + self.experts + 4 * self.classifier + acts


    def sharded_weights(self, ranks: int) -> int:
        """One process's share of the weights, experts and classifier under FSDP over `ranks` processes."""
        return -(-(self.base_weights + self.experts + self.classifier) // ranks)

    def training_per_rank(self, ranks: int, checkpointing: bool = False) -> int:
        """Held by one process during a gate-training step under FSDP over `ranks` processes (module docstring)."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        shards = -(-(self.base_weights + self.experts + 4 * self.classifier) // ranks)
        return shards + 2 * self.layer_unit + self.root_unit + acts


def read_base_config(base: str):
    """The transformers config of a local model folder or of a config.json file (only the config is read)."""
    from transformers import AutoConfig

    if os.path.isfile(base):
        with open(base, encoding="utf-8") as f:
            raw = json.load(f)
        if "model_type" not in raw:
            raise ValueError(f"{base}: no model_type field; is this a transformers config.json?")
        raw = dict(raw)
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{base}: neither a model folder nor a config.json file")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(f"{base}: no config.json in this folder")
    return AutoConfig.from_pretrained(base)


def estimate_memory(config, n_experts: int, rank: int, *, dtype: torch.dtype = torch.bfloat16,
                    quantization: str | None = None, batch: int = 1, context: int = 2048,
                    target_modules: str | list[str] = "all-linear", layerwise: bool = True, xlora_depth: int = 1,
                    xlora_size: int = 2048) -> MemoryEstimate:
    """Estimate a run's memory for a base `config` (a transformers config) with `n_experts` rank-`rank` experts.

    `target_modules`: "all-linear" (every Linear but the LM head) or module names matched as dotted suffixes.
    `quantization`: None, "4bit" or "8bit" (bitsandbytes)."""
    from transformers import AutoModelForCausalLM

    if quantization not in (None, "4bit", "8bit"):
        raise ValueError(f"quantization: {quantization!r} is not one of 4bit, 8bit")
    for name, value in (("n_experts", n_experts), ("rank", rank), ("batch", batch), ("context", context)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} is not a positive integer")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    element = torch.empty((), dtype=dtype).element_size()
    head = model.get_output_embeddings()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    if target_modules == "all-linear":
        targeted = list(linears)
    else:
        wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        targeted = [n for n in linears if any(n == w or n.endswith("." + w) for w in wanted)]
        if not targeted:
            raise ValueError(f"target_modules: {wanted} match no Linear module of this base")
    quantized_params = sum(m.weight.numel() for m in linears.values()) if quantization else 0
    quantized_rows = sum(m.out_features for m in linears.values()) if quantization else 0
    dense_params = sum(p.numel() for p in model.parameters()) - quantized_params
    base_weights = dense_params * element
    if quantization == "4bit":
        base_weights += quantized_params // 2 + 4 * (quantized_params // QUANT_BLOCK)
    elif quantization == "8bit":
        base_weights += quantized_params + 4 * quantized_rows
    total_rank = n_experts * rank
    experts = sum(total_rank * (linears[n].in_features + linears[n].out_features) for n in targeted) * element

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    n_lora_layers = len(targeted)
    widths = [hidden] + [xlora_size] * (xlora_depth - 1) + [n_experts * (n_lora_layers if layerwise else 1)]
    classifier = sum((a + 1) * b for a, b in zip(widths, widths[1:])) * element

    tokens = batch * context
    kv_width = kv_heads * head_dim
    kv_caches = 2 * 2 * layers * tokens * kv_width * element  # two caches, K and V
    lora_per_layer = 2 * total_rank * n_lora_layers // max(layers, 1)
    per_layer = (4 * hidden + (hidden + 2 * kv_width) + (2 * hidden + 2 * kv_width)
                 + (2 * hidden if kv_heads < heads else 0) + 4 * hidden + 4 * intermediate + 2 * hidden
                 + lora_per_layer)  # elements per token
    logits = vocab * element + 2 * 4 * vocab  # per token: logits, float32 log-softmax and its gradient
    activations = tokens * (layers * per_layer * element + logits)
    activations_checkpointed = tokens * (layers * hidden * element + per_layer * element + logits)
    # one layer while the prompt is read: gate, up, SiLU and product; norms and residual; and the attention scores
    # with their softmax, which PyTorch's CPU attention materialises when given a padding mask (b, heads, t, t)
    prefill = tokens * (3 * intermediate + 4 * hidden + 2 * heads * context) * element
    shape = dict(hidden=hidden, layers=layers, vocab=vocab, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 intermediate=intermediate, n_lora_layers=n_lora_layers, n_experts=n_experts, rank=rank,
                 dtype=str(dtype).removeprefix("torch."), quantization=quantization, batch=batch, context=context)
    layer_unit, root_unit = _fsdp_units(model, element, experts // max(layers, 1))
    return MemoryEstimate(base_weights, experts, classifier, kv_caches, activations, activations_checkpointed, prefill,
                          shape, layer_unit, root_unit)


def _fsdp_units(model: torch.nn.Module, element: int, experts_per_layer: int) -> tuple[int, int]:
    """(largest decoder layer's bytes with its experts, bytes outside the decoder layers) of a meta-device model:
    the decoder layers are the children of its longest ModuleList of one class."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    layers = list(max(lists, key=len)) if lists else []
    sizes = [sum(p.numel() for p in layer.parameters()) * element for layer in layers]
    total = sum(p.numel() for p in model.parameters()) * element
    return (max(sizes) + experts_per_layer if sizes else 0), total - sum(sizes)


def format_estimate(estimate: MemoryEstimate, fsdp: int | None = None) -> str:
    """A plain-text table of the estimate, in GiB/MiB; with `fsdp` N, also one process's share under FSDP."""
    s = estimate.shape
    rows = [("base weights" + (f" ({s['quantization']})" if s["quantization"] else f" ({s['dtype']})"),
             estimate.base_weights),
            (f"stacked experts ({s['n_experts']} x rank {s['rank']} on {s['n_lora_layers']} modules)", estimate.experts),
            ("classifier", estimate.classifier),
            (f"two KV caches (batch {s['batch']}, context {s['context']})", estimate.kv_caches),
            ("prefill temporaries (one layer)", estimate.prefill),
            ("training activations", estimate.activations),
            ("training activations, gradient checkpointing", estimate.activations_checkpointed),
            ("total, generation", estimate.inference()),
            ("total, gate training", estimate.training()),
            ("total, gate training with checkpointing", estimate.training(checkpointing=True))]
    if fsdp:
        rows += [(f"FSDP over {fsdp}: weights, experts, classifier per process", estimate.sharded_weights(fsdp)),
                 (f"FSDP over {fsdp}: two gathered layers + the root unit",
                  2 * estimate.layer_unit + estimate.root_unit),
                 (f"FSDP over {fsdp}: gate training per process", estimate.training_per_rank(fsdp)),
                 (f"FSDP over {fsdp}: gate training per process, checkpointing",
                  estimate.training_per_rank(fsdp, checkpointing=True))]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {_human(n):>10}" for name, n in rows)


def _human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
