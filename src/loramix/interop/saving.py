"""What the exports write through: a new output folder that appears only once complete, and the plain base model
(its mixed layers swapped back out, a fixed mix optionally folded into its weights)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def new_output_folder(folder: str) -> Iterator[str]:
    """A temporary folder beside `folder`, renamed to it when the block succeeds; `folder` must be new or empty."""
    folder = os.path.abspath(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise FileExistsError(f"{folder}: exists and is not an empty folder; choose a new output folder")
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        yield tmp
        if os.path.isdir(folder):
            os.rmdir(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def plain_base(model, weights: torch.Tensor | None = None) -> Iterator[nn.Module]:
    """The base model with its original modules back in place of the mixed layers (and, given mixing `weights`
    (n_lora_layers, n_experts), each adapted weight replaced by W0 + sum_e w[l, e] s_e B_e A_e), for saving;
    the X-LoRA is restored on exit."""
    if weights is not None:
        _refuse_tied_adapted(model)
    swapped = []
    try:
        for layer in model.mixed_layers():
            name = model.lora_layer_names[layer.layer_index]
            parent_name, _, child = name.rpartition(".")
            parent = model.base.get_submodule(parent_name)
            original = layer.base_layer.weight
            if weights is not None:
                folded = layer.folded_weight(weights[layer.layer_index].to(original.device))
                layer.base_layer.weight = nn.Parameter(folded, requires_grad=False)
            setattr(parent, child, layer.base_layer)
            swapped.append((parent, child, layer, original))
        yield model.base
    finally:
        for parent, child, layer, original in reversed(swapped):
            layer.base_layer.weight = original
            setattr(parent, child, layer)


def _refuse_tied_adapted(model) -> None:
    base = model.base
    if not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return
    tied = (base.get_input_embeddings(), base.get_output_embeddings())
    for layer in model.mixed_layers():
        if any(layer is m or layer.base_layer is m for m in tied):
            raise ValueError(f"module {model.lora_layer_names[layer.layer_index]!r}: the base ties its input and "
                             f"output embeddings, so folding this expert update into one would change both; "
                             f"export --to peft instead")
