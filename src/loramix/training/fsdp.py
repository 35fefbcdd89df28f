"""Fully sharded data parallelism (FSDP2, `torch.distributed.fsdp.fully_shard`) for the training verbs.

`--fsdp` under `torchrun` / `accelerate launch` with N processes: every parameter is split in N pieces along its
first dimension, each process keeping one (a DTensor sharded over a one-dimensional device mesh). The units of
communication are

    each decoder layer of the base   its frozen weights and the experts' stacked A, B (trainable or not)
    the classifier                   the gate's trainable part, its own unit: gathered once per step
    the root (XLoraModel / PEFT)     what is left: embeddings, final norm, LM head

Before a unit runs its forward, its weights are all-gathered (and freed after, `reshard_after_forward`); in the
backward they are gathered again and the gradients of its trainable weights are reduce-scattered, so each
process holds 1/N of the weights, gradients and Adam moments plus one or two gathered layers at a time.

The trainable part is sharded rather than replicated: a ring all-reduce is a reduce-scatter plus an all-gather,
so the bytes on the wire are the same, and the sharded Adam moments take 1/N of the memory.

Gradients are summed over processes, not averaged (`set_gradient_divide_factor(1)`): the loop already divides
each micro-batch's loss by the global token count, so the sum is the gradient of the global batch, the same
contract as the data-parallel path. `MixedPrecisionPolicy`: with `--bf16` the gathered weights are cast to
bfloat16 and gradients are reduced in float32; the shards (and the optimizer) keep their own dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

# the modules a base's decoder layers are instances of, by the transformers convention
_NO_SPLIT = "_no_split_modules"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The base's decoder layers inside `model` (an XLoraModel, a PEFT model or a causal LM): the modules whose
    class transformers names in `_no_split_modules`, else the children of the longest ModuleList of one class.
    A ValueError when neither is found (FSDP would have nothing to shard per layer)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, _NO_SPLIT, None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise ValueError(f"fsdp: found no decoder layers in {type(model).__name__} to shard one by one")
    return list(max(lists, key=len))


def shard_model(model: nn.Module, mesh, *, bf16: bool = False, reshard_after_forward: bool = True) -> None:
    """Shard `model` in place over the 1-D device `mesh` (see the module docstring for the units); parameters are
    moved to the mesh's device. `bf16`: gather weights in bfloat16, reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    units = decoder_layers(model)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        units.append(classifier)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # the root: used again at once
    for unit in [*units, model]:
        unit.set_gradient_divide_factor(1.0)  # a sum over processes: the loss is already normalised globally
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    _drop_unsharded_references(model)


class _LiveTensors:
    """A mixed layer's (weight, bias, lora_A, lora_B), read from its modules at each use. The layer keeps them
    in a plain tuple for speed; FSDP swaps the registered Parameters (sharded between passes, whole inside one), so
    a tuple would compute with, and keep alive, the unsharded tensors of before `fully_shard`."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def _read(self) -> tuple:
        base = self.layer.base_layer
        return getattr(base, "weight", None), getattr(base, "bias", None), self.layer.lora_A, self.layer.lora_B

    def __iter__(self):
        return iter(self._read())

    def __getitem__(self, index: int):
        return self._read()[index]


def _drop_unsharded_references(model: nn.Module) -> None:
    """Point every plain reference to a parameter that `model` keeps for speed at the sharded model: the mixed
    layers' tensor tuples, and the XLoraModel's decoder stack (rebuilt: with FSDP's hooks on the layers it runs
    them as modules, never the hand-written one-token step that holds their weights)."""
    from ..layers import MixedLoraLayer

    for m in model.modules():
        if isinstance(m, MixedLoraLayer):
            m.tensors = _LiveTensors(m)
            m.plain_linear_base = False  # call the base Linear: FSDP's hooks may sit on it
    if hasattr(model, "rebuild_decoder_stack"):  # an XLoraModel
        model.rebuild_decoder_stack()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` went through `shard_model` (its root is an FSDP module)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this process holds: each DTensor's local shard, every other tensor whole."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global 2-norm is at most `max_norm`; returns the norm before clipping.
    Sharded gradients (DTensors) contribute their square sums from every process (one all-reduce)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


@contextlib.contextmanager
def full_parameters(model: nn.Module, which) -> Iterator[None]:
    """Inside, every sharded parameter of `model` for which `which(name, parameter)` is true is a plain, whole
    tensor on every process (all-gathered in `named_parameters` order: every process must enter), so that code
    written for an unsharded model (`save_pretrained`) reads it; the shards are put back on leaving. Call it
    between steps only (no forward inside)."""
    from torch.distributed.tensor import DTensor

    swapped = []
    try:
        for name, p in list(model.named_parameters()):
            if not (isinstance(p, DTensor) and which(name, p)):
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            owner.register_parameter(leaf, nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad))
            swapped.append((owner, leaf, p))
        yield
    finally:
        for owner, leaf, p in swapped:
            owner.register_parameter(leaf, p)


def saved_by_task(name: str, p: nn.Parameter) -> bool:
    """The parameters a task's `save` writes: the trainable ones and the experts' LoRA weights."""
    return p.requires_grad or "lora_" in name
