"""The mixed LoRA layer: a base layer plus all experts' low-rank updates, weighted per token.

For one adapted layer (index `l` on the LoRA-layer axis) and experts e = 1..E with ranks r_e,

    y[b, t] = W0 x[b, t] + sum_e  w[b, t, l, e] * s_e * B_e A_e x[b, t]

where s_e = alpha_e / r_e (alpha_e / sqrt(r_e) with rsLoRA) and w are the mixing weights that the model
computed for this pass (the classifier's scalings after top-k and the global weight; see classifier.py).

The experts are stacked once, at load time, along the rank axis:

    A = [A_1; A_2; ...; A_E]      (R, in)     R = sum of the ranks of the experts that adapt this layer
    B = [B_1, B_2, ..., B_E]      (out, R)

and each rank row remembers its expert (`expert_of_rank`) and scale (`scale_of_rank`). The sum over experts is
then two matrix products whatever E is:

    h = (x A^T) * (w[..., expert_of_rank] * scale_of_rank)      (b, t, R)
    y = W0 x + h B^T                                             (b, t, out)

Experts that do not adapt this layer simply own no rows. No forward hooks: the model swaps these modules in
once and, before each pass, writes the mixing weights into the `MixingState` that every layer shares.

Precision, quantized and sharded bases: A and B are held in the model's compute dtype (bf16, fp16 or float32),
never in the storage dtype of the base weight, which for a bitsandbytes `Linear4bit` / `Linear8bitLt` is packed
uint8 / int8. They live on the device the base layer computes on: the weight's device, or, for a weight that
accelerate offloads to disk (kept on the "meta" device and loaded only during the call), the device of the
inputs, followed on the first call. Folding (W0 + the mix as one weight) needs a dense W0 and is refused for
quantized or offloaded base weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import ExpertModule


class MixingState:
    """The weights of the pass being run, shared by the model and all its mixed layers.

    `rank_weights` is None (layers add no LoRA at all: the base model) or (batch, tokens, total rank rows):
    for every rank row of every layer, w[b, t, layer, expert_of_row] * scale_of_row, gathered once per pass
    by the model (`set`) and split once into one view per layer (`layer_weights`, in mixed-layer order). Splitting
    rather than slicing in each layer matters for training: the backward of a split is one concatenation, while
    each slice's backward would fill a zero tensor of the full (b, t, total R) size.
    """

    def __init__(self) -> None:
        self.rank_weights: torch.Tensor | None = None
        self.flat_index: torch.Tensor | None = None  # (total R,) index into the flattened (layer, expert) axis
        self.flat_scale: torch.Tensor | None = None  # (total R,)
        self.dtype: torch.dtype | None = None  # compute dtype of the layers: the weights are cast to it once
        self.layer_sizes: list[int] = []  # rank rows of each mixed layer, in mixed-layer order
        self.layer_weights: tuple[torch.Tensor, ...] = ()  # one (b, t, R_layer) view per layer
        # W0 + a fixed mix per layer (XLoraModel.fold), in mixed-layer order, while XLoraModel.folded is active
        self.folded_weights: tuple[torch.Tensor, ...] | None = None

    def set(self, weights: torch.Tensor | None) -> None:
        """weights: mixing weights broadcastable to (b, t, n_lora_layers, n_experts), or None for no LoRA."""
        if weights is None:
            self.rank_weights, self.layer_weights = None, ()
            return
        flat = weights.flatten(-2)  # (b, t, L*E)
        if self.flat_index.device != flat.device:  # the classifier's device, wherever the base's last layer is
            self.flat_index, self.flat_scale = self.flat_index.to(flat.device), self.flat_scale.to(flat.device)
        self.rank_weights = flat.index_select(-1, self.flat_index) * self.flat_scale.to(flat.dtype)  # (b, t, R)
        if self.dtype is not None:  # the classifier's float32 weights, cast once for every layer
            self.rank_weights = self.rank_weights.to(self.dtype)
        self.layer_weights = self.rank_weights.split(self.layer_sizes, dim=-1)  # each moved by its layer if sharded


class MixedLoraLayer(nn.Module):
    """Common part of the mixed Linear and Embedding layers: the stacked expert weights and their bookkeeping."""

    def __init__(self, base_layer: nn.Module, experts: list[ExpertModule | None], layer_index: int,
                 state: MixingState, trainable: bool, dropout_p: float = 0.0, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the compute dtype of A and B (default: the base weight's, when that is a float dtype)."""
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.n_experts = len(experts)
        self._state = state  # plain attribute: shared, not a submodule
        device = base_layer_device(base_layer)
        dtype = dtype or _float_dtype(base_layer.weight)
        present = [(e, m) for e, m in enumerate(experts) if m is not None]
        # rank_slices[e] = (start, stop) of expert e's rows in the stacked matrices, or None
        self.rank_slices: list[tuple[int, int] | None] = [None] * self.n_experts
        start = 0
        for e, m in present:
            self.rank_slices[e] = (start, start + m.rank)
            start += m.rank
        self.embedding_flags = [m.embedding if m is not None else False for m in experts]
        self.lora_A = nn.Parameter(torch.cat([m.lora_A for _, m in present], 0).to(device, dtype),
                                   requires_grad=trainable)  # (R, in)
        self.lora_B = nn.Parameter(torch.cat([m.lora_B for _, m in present], 1).to(device, dtype),
                                   requires_grad=trainable)  # (out, R)
        expert_of_rank = torch.cat([torch.full((m.rank,), e) for e, m in present])
        scale_of_rank = torch.cat([torch.full((m.rank,), m.scale, dtype=torch.float32) for _, m in present])
        self.register_buffer("expert_of_rank", expert_of_rank.to(device), persistent=False)  # (R,)
        self.register_buffer("scale_of_rank", scale_of_rank.to(device), persistent=False)  # (R,)
        self.split_position = 0  # this layer's view in MixingState.layer_weights (set by the model)
        self.dropout = nn.Dropout(dropout_p) if dropout_p > 0 else nn.Identity()
        # a plain nn.Linear base (no hooks, not quantized, not offloaded) is computed as its forward computes it,
        # F.linear over its weights, without a module call: at decode time that call costs more than the product
        self.plain_linear_base = type(base_layer) is nn.Linear and not (
            base_layer._forward_hooks or base_layer._forward_pre_hooks or hasattr(base_layer, "_hf_hook"))
        # the Parameters `forward` reads, also held in a plain tuple (the same objects: `.to()`, `_move_experts`
        # and optimizers change their data in place), because each nn.Module attribute lookup costs about what a
        # decode step's small product costs
        self.tensors = (getattr(base_layer, "weight", None), getattr(base_layer, "bias", None), self.lora_A,
                        self.lora_B)

    def folded_weight(self, expert_weights: torch.Tensor) -> torch.Tensor:
        """W0 + sum_e w_e s_e B_e A_e for fixed per-expert weights (E,), in the base layer's layout (frozen
        scalings: the model installs it with `XLoraModel.folded`)."""
        self.check_foldable()
        w0 = self.base_layer.weight
        if isinstance(self.base_layer, nn.Linear) and self.lora_A.dtype == w0.dtype:
            # W0 + (B * w) A in one product that adds into a copy of W0: one pass over the weight, not three
            w = self._scale_per_rank(expert_weights).to(w0.dtype)
            return torch.addmm(w0, self.lora_B * w, self.lora_A).detach()  # (out, in)
        delta = self.delta_weight(expert_weights)  # (out, in)
        transposed = not isinstance(self.base_layer, nn.Linear)  # Conv1D (in, out), Embedding (num, dim)
        return (w0 + (delta.t() if transposed else delta).to(w0.dtype)).detach()

    def check_foldable(self) -> None:
        """Raise unless the base weight is a dense float tensor in memory (the model checks every layer before
        folding any)."""
        w0 = self.base_layer.weight
        if not w0.dtype.is_floating_point or w0.is_meta:
            what = "offloaded to disk" if w0.is_meta else f"quantized ({type(w0).__name__}, {w0.dtype})"
            raise ValueError(f"fold_frozen: the base weight of mixed layer {self.layer_index} is {what}, so the "
                             f"experts cannot be folded into it; freeze the scalings without folding "
                             f"(freeze_scalings_after=... with fold_frozen=False)")

    def rank_weights(self, like: torch.Tensor) -> torch.Tensor | None:
        """This layer's per-rank-row weights w[..., expert_of_rank] * scale_of_rank (b, t, R) on the device and in
        the dtype of `like` (this layer's activations), or None."""
        state = self._state
        if state.rank_weights is None:
            return None
        w = state.layer_weights[self.split_position]
        lora_A = self.tensors[2]  # self.lora_A without a module attribute lookup (this runs in every mixed layer)
        if w.device == like.device == lora_A.device and w.dtype == lora_A.dtype:  # one device, the model's dtype
            return w
        if lora_A.device != like.device:  # offloaded base: compute where accelerate runs the base layer
            self._move_experts(like.device)
        return w.to(like.device, lora_A.dtype)

    def _move_experts(self, device: torch.device) -> None:
        """Move A, B and their bookkeeping (not the base layer: accelerate places that) keeping the Parameters."""
        for p in (self.lora_A, self.lora_B):
            p.data = p.data.to(device)
        self.expert_of_rank, self.scale_of_rank = self.expert_of_rank.to(device), self.scale_of_rank.to(device)

    def expert_module(self, e: int) -> ExpertModule | None:
        """Expert e's own A and B for this layer (views into the stacked weights), or None."""
        if self.rank_slices[e] is None:
            return None
        lo, hi = self.rank_slices[e]
        return ExpertModule(lora_A=self.lora_A[lo:hi], lora_B=self.lora_B[:, lo:hi], scale=float(self.scale_of_rank[lo]),
                            embedding=self.embedding_flags[e])

    def delta_weight(self, expert_weights: torch.Tensor) -> torch.Tensor:
        """The dense update sum_e w_e s_e B_e A_e for fixed per-expert weights (E,): (out, in)."""
        return (self.lora_B * self._scale_per_rank(expert_weights).to(self.lora_B.dtype)) @ self.lora_A

    def _scale_per_rank(self, expert_weights: torch.Tensor) -> torch.Tensor:
        """Fixed per-expert weights (E,) -> w_e s_e for every rank row (R,), float32."""
        return expert_weights.to(self.scale_of_rank.dtype).index_select(0, self.expert_of_rank) * self.scale_of_rank


class MixedLoraLinear(MixedLoraLayer):
    """nn.Linear (or GPT-2's Conv1D) plus the weighted experts: y = W0 x + h B^T, h = (x A^T) * w."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.folded_weights is not None:  # set while the model runs folded (XLoraModel.folded)
            return self._folded_forward(x, state.folded_weights[self.split_position])
        weight, bias, lora_A, lora_B = self.tensors
        result = F.linear(x, weight, bias) if self.plain_linear_base else self.base_layer(x)  # W0 x, (b, t, out)
        w = self.rank_weights(x)  # (b, t, R) where x is, in the experts' dtype (moves offloaded experts there)
        if w is None:
            return result
        if w.shape[-2] > x.shape[-2] and w.dim() == x.dim():  # an LM head over the last positions (logits_to_keep)
            w = w[..., -x.shape[-2]:, :]
        if self.training:  # nn.Dropout, or nn.Identity when the experts have none
            x = self.dropout(x)
        h = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), lora_A) * w  # (b, t, R), in the experts' dtype
        if h.dtype != result.dtype:  # a float32 base with bf16 experts, say
            h, lora_B = h.to(result.dtype), lora_B.to(result.dtype)
        if self.plain_linear_base and not (result.requires_grad or h.requires_grad):
            # no autograd: add h B^T into W0 x where it lies (the same product; at prefill this spares a fresh
            # (tokens, out) tensor per adapted layer, a few MB each)
            result.view(-1, result.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), lora_B.t())
            return result
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.t())
        return out.view(result.shape)  # W0 x + h B^T, (b, t, out)

    def _folded_forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        if isinstance(self.base_layer, nn.Linear):
            return F.linear(x, weight, bias)
        out = x.reshape(-1, x.shape[-1]) @ weight  # Conv1D: (in, out) layout
        return (out if bias is None else out + bias).reshape(*x.shape[:-1], -1)


class MixedLoraEmbedding(MixedLoraLayer):
    """nn.Embedding plus the weighted experts: the A lookup replaces the first product."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        folded = self._state.folded_weights
        if folded is not None:
            out = F.embedding(ids, folded[self.split_position], padding_idx=self.base_layer.padding_idx)
            embed_scale = getattr(self.base_layer, "embed_scale", None)
            return out if embed_scale is None else out * torch.as_tensor(embed_scale, dtype=out.dtype)
        result = self.base_layer(ids)
        w = self.rank_weights(result)
        if w is None:
            return result
        h = F.embedding(ids, self.lora_A.t(), padding_idx=self.base_layer.padding_idx) * w  # (b, t, R)
        delta = F.linear(h, self.lora_B).to(result.dtype)  # (b, t, dim)
        embed_scale = getattr(self.base_layer, "embed_scale", None)  # scaled embeddings (Gemma) scale LoRA too
        if embed_scale is not None:
            delta = delta * torch.as_tensor(embed_scale, dtype=delta.dtype, device=delta.device)
        return result + delta


def base_layer_device(base_layer: nn.Module) -> torch.device:
    """Where a base layer computes: its weight's device, or the CPU for a weight accelerate keeps on "meta" (disk
    offload) until the first call shows the execution device."""
    weight = base_layer.weight
    return torch.device("cpu") if weight.is_meta else weight.device


def _float_dtype(weight: torch.Tensor) -> torch.dtype:
    if not weight.dtype.is_floating_point:  # packed bitsandbytes weight: its compute dtype is not in the weight
        raise ValueError(f"a {type(weight).__name__} ({weight.dtype}) base weight needs an explicit compute dtype "
                         f"for the experts")
    return weight.dtype
