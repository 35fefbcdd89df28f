"""What a training run keeps on disk: atomic `checkpoint-<step>/` folders, the JSONL metrics log.

A checkpoint is written in a temporary folder next to its final place and renamed when complete, so a crash
leaves either the whole checkpoint or none that `latest_checkpoint` would pick up. It holds the task's own model
folder, the trainable tensors and the optimizer state as safetensors (tensors) plus JSON (the rest), and the
step with a signature of the run's settings, checked on resume. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..files import read_jsonl, replace_dir, write_jsonl

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def latest_checkpoint(folder: str) -> str | None:
    """The newest complete `checkpoint-<step>` in folder (complete: renamed into place with its state file)."""
    if not os.path.isdir(folder):
        return None
    found = [(int(m[1]), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name))
             and os.path.isfile(os.path.join(folder, name, STATE_NAME))]
    return os.path.join(folder, max(found)[1]) if found else None


def save_checkpoint(folder: str, step: int, task, optimizer: torch.optim.Optimizer,
                    signature: dict[str, Any], tokenizer=None, grad_scaler=None) -> str:
    """Write checkpoint-<step> atomically: everything goes into a temporary folder that is renamed last."""
    target = os.path.join(folder, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=folder)
    try:
        task.save(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file({n: p.detach().contiguous().cpu() for n, p in task.trainable().items()},
                  os.path.join(tmp, TRAINABLE_NAME))
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, os.path.join(tmp, OPTIMIZER_NAME))
        with open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as f:
            state = {"step": step, "optimizer": meta, "signature": signature}
            if grad_scaler is not None:  # fp16: the loss scale and its growth counter (numbers only)
                state["grad_scaler"] = grad_scaler.state_dict()
            json.dump(state, f, indent=2)
        replace_dir(tmp, target)  # an older folder of the same step stays until the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(folder: str, task, optimizer: torch.optim.Optimizer,
                    signature: dict[str, Any], grad_scaler=None) -> int:
    """Load the trainable tensors, the optimizer state (and the fp16 loss scale) of `folder`; returns its step.
    Raises ValueError when the checkpoint was made with other run settings (`signature`)."""
    with open(os.path.join(folder, STATE_NAME), encoding="utf-8") as f:
        state = json.load(f)
    saved = state.get("signature", {})
    for key, value in signature.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"--resume: {folder} was made with {key}={saved[key]!r}, this run has {value!r}; "
                             f"resume with the same settings or start a new output folder")
    params = task.trainable()
    tensors = load_file(os.path.join(folder, TRAINABLE_NAME))
    if set(tensors) != set(params):
        raise ValueError(f"--resume: {folder}/{TRAINABLE_NAME} holds other parameters than this model trains")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(_unflatten_optimizer(load_file(os.path.join(folder, OPTIMIZER_NAME)),
                                                   state["optimizer"]))
    if grad_scaler is not None and "grad_scaler" in state:
        grad_scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as safetensors-ready tensors plus JSON metadata (no pickles)."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                plain.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta.get("plain", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def prune_checkpoints(folder: str, keep: int | None) -> None:
    if not keep:
        return
    found = sorted((int(m[1]), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name)))
    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def truncate_metrics(path: str, step: int, warn: Callable[[str], None] | None = None) -> None:
    """Drop log lines written after the checkpoint we resume from (the resumed run writes them again), and a torn
    last line that a crash mid-append left (`warn` is told)."""
    if not os.path.isfile(path):
        return
    records = read_jsonl(path, warn)
    write_jsonl(path, [r for r in records if r.get("step", 0) <= step])
