"""What a training run keeps on disk: atomic `checkpoint-<step>/` folders, the JSONL metrics log.

A checkpoint is written in a temporary folder next to its final place and renamed when complete, so a crash
leaves either the whole checkpoint or none that `latest_checkpoint` would pick up. It holds the task's own model
folder, the trainable tensors and the optimizer state as safetensors (tensors) plus JSON (the rest), and the
step with a signature of the run's settings, checked on resume. Nothing is pickled.

What can still go wrong on disk is named, never a traceback: a write that fails (a full disk, a file-size limit)
is one OSError naming the file and the errno, with nothing of the checkpoint left; a checkpoint damaged later
(a file cut short, missing or not what was written) is a `DamagedCheckpoint` naming the file, and `resume_from`
passes over it to the newest intact one; the temporaries a killed run leaves are cleared at the next start
(`clear_stale_temporaries`, by their exact names).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checks import is_finite_number, is_int, read_json_object
from ..files import read_jsonl, replace_dir, write_failure, write_jsonl

STATE_NAME = "trainer_state.json"
TRAINABLE_NAME = "trainable.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
SHARDED_NAME = "sharded"  # an FSDP checkpoint's trainable tensors and optimizer moments, one file per process
FINAL_PREFIX = ".final."  # the temporary folder of a run's final model (training/loop.py)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RANDOM = r"[a-z0-9_]{8}"  # the eight characters tempfile adds to a prefix
# a save killed midway: its temporary folder, the final model's, or an older checkpoint-<step> being replaced
_STALE_FOLDER = re.compile(rf"^(\.checkpoint-\d+\.{_RANDOM}|{re.escape(FINAL_PREFIX)}{_RANDOM}|checkpoint-\d+\.old)$")


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be what `save_checkpoint` wrote (missing, cut short, not the format, other
    shapes); the message starts with the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def checkpoint_folders(folder: str) -> list[str]:
    """Every `checkpoint-<step>` folder in `folder`, newest first (complete or not)."""
    if not os.path.isdir(folder):
        return []
    found = sorted(((int(m[1]), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name))),
                   reverse=True)
    return [os.path.join(folder, name) for _, name in found]


def latest_checkpoint(folder: str) -> str | None:
    """The newest complete `checkpoint-<step>` in folder (complete: renamed into place with its state file)."""
    return next((path for path in checkpoint_folders(folder) if os.path.isfile(os.path.join(path, STATE_NAME))),
                None)


def restore_replaced_checkpoints(folder: str) -> list[str]:
    """Put back a `checkpoint-<step>.old` whose `checkpoint-<step>` is missing (a run killed between the two
    renames that replace a checkpoint of the same step); returns the checkpoints put back. `load_checkpoint`
    still checks them."""
    restored = []
    for name in sorted(os.listdir(folder)):
        target = os.path.join(folder, name.removesuffix(".old"))
        path = os.path.join(folder, name)
        if (name.endswith(".old") and _CHECKPOINT.match(os.path.basename(target)) and os.path.isdir(path)
                and not os.path.islink(path) and not os.path.lexists(target)):
            os.replace(path, target)
            restored.append(target)
    return restored


def clear_stale_temporaries(folder: str, file_names: tuple[str, ...] = ()) -> list[str]:
    """Remove what a run killed in the middle of a save left in its output folder, and return the paths: the
    temporary folders of a checkpoint (`.checkpoint-<step>.XXXXXXXX`) and of the final model
    (`.final.XXXXXXXX`), an older checkpoint being replaced (`checkpoint-<step>.old`), and the temporary files of
    the atomic writes of `file_names` (`.<name>.XXXXXXXX`). Only names of exactly these forms, only real folders
    and files: a link is never followed, anything else is left alone."""
    stale_file = re.compile(rf"^\.({'|'.join(map(re.escape, file_names))})\.{_RANDOM}$") if file_names else None
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.islink(path):
            continue
        if _STALE_FOLDER.match(name) and os.path.isdir(path):
            shutil.rmtree(path)
        elif stale_file is not None and stale_file.match(name) and os.path.isfile(path):
            os.remove(path)
        else:
            continue
        removed.append(path)
    return removed


@contextlib.contextmanager
def naming_write_errors(tmp: str, shown: str, after: str = "", name: str | None = None) -> Iterator[None]:
    """Inside, a write error that names no file (a full disk, a file-size limit) becomes one OSError naming the
    file and the errno: `name` (else the newest file in the temporary folder `tmp`, the one being written; else
    the folder) inside its final folder `shown`. `after` ends the message."""
    try:
        yield
    except Exception as err:
        name = name or _newest_file(tmp)
        failure = write_failure(err, os.path.join(shown, name) if name else shown, after)
        if failure is None:
            raise
        raise failure from err


def _newest_file(folder: str) -> str | None:
    """The path, inside `folder`, of its most recently modified file (None for none, or a tie)."""
    stamps = []
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                stamps.append((os.stat(os.path.join(root, name)).st_mtime_ns, os.path.join(root, name)))
    stamps.sort()
    if not stamps or (len(stamps) > 1 and stamps[-1][0] == stamps[-2][0]):
        return None
    return os.path.relpath(stamps[-1][1], folder)


def save_checkpoint(folder: str, step: int, task, optimizer: torch.optim.Optimizer,
                    signature: dict[str, Any], tokenizer=None, grad_scaler=None) -> str:
    """Write checkpoint-<step> atomically: everything goes into a temporary folder that is renamed last. A write
    that fails (full disk, file-size limit) is an OSError naming the file and the errno; nothing of it is left."""
    target = os.path.join(folder, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=folder)

    def writing(name: str | None = None):
        return naming_write_errors(tmp, target, f"; checkpoint-{step} was not saved (nothing of it is left)", name)

    try:
        with writing():  # the task's own files, then the tokenizer's
            task.save(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        with writing(TRAINABLE_NAME):
            save_file({n: p.detach().contiguous().cpu() for n, p in task.trainable().items()},
                      os.path.join(tmp, TRAINABLE_NAME))
        tensors, meta = _flatten_optimizer(optimizer)
        with writing(OPTIMIZER_NAME):
            save_file(tensors, os.path.join(tmp, OPTIMIZER_NAME))
        state = {"step": step, "optimizer": meta, "signature": signature}
        if grad_scaler is not None:  # fp16: the loss scale and its growth counter (numbers only)
            state["grad_scaler"] = grad_scaler.state_dict()
        with writing(STATE_NAME), open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as f:
            json.dump(state, f, indent=2)
        replace_dir(tmp, target)  # an older folder of the same step stays until the new one is in place
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resume_from(folder: str, task, optimizer: torch.optim.Optimizer, signature: dict[str, Any],
                grad_scaler=None, log: Callable[[str], None] = print) -> tuple[str, int] | None:
    """Load the newest intact checkpoint of `folder` (see `load_checkpoint`) and return it with its step; None when
    `folder` holds no checkpoint. A damaged newer one is named to `log` and passed over; when every checkpoint is
    damaged, a ValueError names the newest one's damaged file. Other run settings are a ValueError at once."""
    damaged: list[DamagedCheckpoint] = []
    for path in checkpoint_folders(folder):
        try:
            return path, load_checkpoint(path, task, optimizer, signature, grad_scaler)
        except DamagedCheckpoint as err:
            log(f"--resume: {err}; falling back to the checkpoint before {os.path.basename(path)}")
            damaged.append(err)
    if damaged:
        raise ValueError(f"--resume: no intact checkpoint in {folder}; the newest is damaged: {damaged[0]}")
    return None


def load_checkpoint(folder: str, task, optimizer: torch.optim.Optimizer,
                    signature: dict[str, Any], grad_scaler=None) -> int:
    """Load the trainable tensors, the optimizer state (and the fp16 loss scale) of `folder`; returns its step.
    Every file is read and checked before anything is loaded: a damaged one is a `DamagedCheckpoint` naming it
    (and the model and optimizer are untouched); a checkpoint made with other run settings (`signature`, the
    parameters trained or their shapes) is a ValueError."""
    if os.path.isdir(os.path.join(folder, SHARDED_NAME)):
        return load_sharded_checkpoint(folder, task, optimizer, signature)
    state = _read_state(folder, signature, optimizer, grad_scaler)
    params = task.trainable()
    if any(_is_dtensor(p) for p in params.values()):
        raise ValueError(f"--resume: {folder} was saved without --fsdp (whole tensors); resume it without --fsdp")
    tensors = _read_tensors(os.path.join(folder, TRAINABLE_NAME))
    if set(tensors) != set(params):
        raise ValueError(f"--resume: {folder}/{TRAINABLE_NAME} holds other parameters than this model trains")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise ValueError(f"--resume: {folder}/{TRAINABLE_NAME}: {name} has shape {list(tensors[name].shape)}, "
                             f"this model's is {list(p.shape)}; resume with the same settings")
    optimizer_path = os.path.join(folder, OPTIMIZER_NAME)
    optimizer_state = _unflatten_optimizer(_read_tensors(optimizer_path), state["optimizer"], optimizer_path)
    _check_optimizer_state(optimizer_path, optimizer_state, optimizer)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    if grad_scaler is not None and "grad_scaler" in state:
        grad_scaler.load_state_dict(state["grad_scaler"])
    return int(state["step"])


def _read_state(folder: str, signature: dict[str, Any], optimizer: torch.optim.Optimizer, grad_scaler) -> dict:
    """trainer_state.json, checked: its signature against this run's (ValueError), its shape (DamagedCheckpoint)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.exists(path):
        raise DamagedCheckpoint(path, "missing (the checkpoint is incomplete)")
    try:
        state = read_json_object(path)
    except OSError as err:
        raise DamagedCheckpoint(path, f"cannot be read ({err.strerror})") from None
    except ValueError as err:  # the message names the file already
        raise DamagedCheckpoint(path, str(err).removeprefix(f"{path}: ")) from None
    saved = state.get("signature")
    if not isinstance(saved, dict):
        raise DamagedCheckpoint(path, "no 'signature' object (the run's settings)")
    for key, value in signature.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"--resume: {folder} was made with {key}={saved[key]!r}, this run has {value!r}; "
                             f"resume with the same settings or start a new output folder")
    if not is_int(state.get("step")) or state["step"] < 0:
        raise DamagedCheckpoint(path, f"'step' is {state.get('step')!r}, not a step number")
    meta = state.get("optimizer")
    groups = meta.get("param_groups") if isinstance(meta, dict) else None
    if (not isinstance(groups, list) or len(groups) != len(optimizer.param_groups)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                       and len(g["params"]) == len(mine["params"]) for g, mine in zip(groups, optimizer.param_groups))
            or not _plain_entries(meta.get("plain", {}))):
        raise DamagedCheckpoint(path, "'optimizer' is not the optimizer's parameter groups of this run")
    if grad_scaler is not None and "grad_scaler" in state:
        scale = state["grad_scaler"]
        if (not isinstance(scale, dict) or set(scale) != set(grad_scaler.state_dict())
                or not all(is_finite_number(v) for v in scale.values())):
            raise DamagedCheckpoint(path, "'grad_scaler' is not a loss scaler's numbers")
    return state


def _plain_entries(plain: Any) -> bool:
    """Whether `plain` is `_flatten_optimizer`'s non-tensor state: {"<id>": {entry: value}}."""
    return isinstance(plain, dict) and all(k.isdigit() and isinstance(v, dict) for k, v in plain.items())


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file of the checkpoint; missing, cut short or not safetensors is a DamagedCheckpoint."""
    if not os.path.exists(path):
        raise DamagedCheckpoint(path, "missing (the checkpoint is incomplete)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedCheckpoint(path, f"not a readable safetensors file, cut short or overwritten ({err})") from None


def _check_optimizer_state(path: str, state: dict, optimizer: torch.optim.Optimizer) -> None:
    """Each saved moment has its parameter's shape (AdamW: `exp_avg`, `exp_avg_sq`; `step` a scalar)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state["state"].items():
        if not 0 <= pid < len(params):
            raise DamagedCheckpoint(path, f"holds the state of parameter {pid}; the optimizer has {len(params)}")
        for name, value in entries.items():
            want = () if name == "step" else params[pid].shape
            if torch.is_tensor(value) and value.shape != want:
                raise DamagedCheckpoint(path, f"{pid}.{name} has shape {list(value.shape)}, expected {list(want)}")


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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, path: str) -> dict:
    """The optimizer's state_dict from `_flatten_optimizer`'s two parts; a name that is not '<id>.<entry>' is a
    DamagedCheckpoint naming `path`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        if not pid.isdigit() or not name:
            raise DamagedCheckpoint(path, f"holds {key!r}, not a '<parameter>.<state>' tensor")
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta.get("plain", {}).items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def prune_checkpoints(folder: str, keep: int | None, newest: int | None = None) -> None:
    """Remove all but the `keep` newest checkpoints up to step `newest` (the one just saved); newer ones are what
    a resume passed over as damaged, replaced when the run gets there."""
    if not keep:
        return
    found = sorted((int(m[1]), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name)))
    found = [(step, name) for step, name in found if newest is None or step <= newest]
    for _, name in found[:-keep]:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def truncate_metrics(path: str, step: int, warn: Callable[[str], None] | None = None) -> None:
    """Drop log lines written after the checkpoint we resume from (the resumed run writes them again), and a torn
    last line that a crash mid-append left (`warn` is told). A record whose step is not a number is damage: a
    ValueError naming the file."""
    if not os.path.isfile(path):
        return
    records = read_jsonl(path, warn)
    for n, record in enumerate(records, 1):
        if not is_finite_number(record.get("step", 0)):
            raise ValueError(f"{path}: record {n} has step {record['step']!r}, not a number; the log is damaged")
    write_jsonl(path, [r for r in records if r.get("step", 0) <= step])


# ---- sharded checkpoints (FSDP) ------------------------------------------------------------------------------
def save_sharded_checkpoint(folder: str, step: int, task, optimizer: torch.optim.Optimizer,
                            signature: dict[str, Any], dist, tokenizer=None) -> str:
    """Write checkpoint-<step> of a sharded (FSDP) run, every process taking part (`dist`: training/distributed.py).

    The same folder as `save_checkpoint`'s, but the trainable tensors and the optimizer's moments go to
    `sharded/` through `torch.distributed.checkpoint` in its safetensors layout: each process writes the pieces it
    holds, one file each, with their offsets in the file header, so that any number of processes (one, unsharded,
    included) reads them back (`load_sharded_checkpoint`). The loadable model is written by the main process from
    the gathered trainable and expert weights. Atomic as `save_checkpoint`: a temporary folder renamed last."""
    import torch.distributed.checkpoint as dcp

    from .fsdp import full_parameters, saved_by_task

    target = os.path.join(folder, f"checkpoint-{step}")
    tmp = _shared_temporary_folder(folder, f".checkpoint-{step}.", dist)
    try:
        failed: BaseException | None = None
        with full_parameters(task.model, saved_by_task):  # collective; only the main process writes
            if dist.main:
                try:
                    with naming_write_errors(tmp, target, f"; checkpoint-{step} was not saved"):
                        task.save(tmp)
                        if tokenizer is not None:
                            tokenizer.save_pretrained(tmp)
                except Exception as err:  # noqa: BLE001 - raised below, once every process knows
                    failed = err
        # every process learns whether the main one failed, so that none waits in dcp.save for it
        if dist.gather_ints(int(failed is not None))[0]:
            if failed is not None:
                raise failed
            raise OSError(f"checkpoint-{step}: the main process could not write it (its error is in its output)")
        tensors, entries = _sharded_state(task, optimizer)
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(os.path.join(tmp, SHARDED_NAME),
                                                                       save_distributed=dist.world > 1))
        if dist.main:
            groups = optimizer.state_dict()["param_groups"]
            state = {"step": step, "optimizer": {"param_groups": groups, "plain": {}}, "signature": signature,
                     "sharded": {"world_size": dist.world, "entries": entries}}
            with open(os.path.join(tmp, STATE_NAME), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2)
        dist.barrier()
        if dist.main:
            replace_dir(tmp, target)
        dist.barrier()
    finally:
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_sharded_checkpoint(folder: str, task, optimizer: torch.optim.Optimizer, signature: dict[str, Any]) -> int:
    """Load a checkpoint of `save_sharded_checkpoint` into this run, sharded over any number of processes or not
    sharded at all (every process calls it); returns its step. Damage and other settings as `load_checkpoint`."""
    import torch.distributed.checkpoint as dcp

    state = _read_state(folder, signature, optimizer, None)
    entries = state.get("sharded", {}).get("entries") if isinstance(state.get("sharded"), dict) else None
    params = task.trainable()
    path = os.path.join(folder, STATE_NAME)
    if not isinstance(entries, dict) or set(entries) != set(params):
        raise ValueError(f"--resume: {folder} holds other parameters than this model trains")
    targets: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        targets[f"model.{name}"] = p
        if not isinstance(entries[name], dict):
            raise DamagedCheckpoint(path, f"'sharded.entries.{name}' is not the optimizer's entries")
        for key, scalar in entries[name].items():  # AdamW: step (a scalar), exp_avg and exp_avg_sq (p's shape)
            targets[f"optim.{name}.{key}"] = torch.zeros((), dtype=torch.float32) if scalar else \
                torch.zeros_like(p, dtype=torch.float32 if p.dtype.is_floating_point else p.dtype)
    from torch.distributed.checkpoint.api import CheckpointException  # not an Exception: a BaseException

    try:
        with torch.no_grad():
            dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(os.path.join(folder, SHARDED_NAME)))
    except (Exception, CheckpointException) as err:  # a missing or cut-short shard, other shapes
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # the cause, not the ranks' tracebacks
        raise DamagedCheckpoint(os.path.join(folder, SHARDED_NAME), f"cannot be read back ({last})") from None
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    name_of = {id(p): name for name, p in params.items()}
    moments = {i: {key: targets[f"optim.{name_of[id(p)]}.{key}"] for key in entries[name_of[id(p)]]}
               for i, p in enumerate(ordered)}
    optimizer.load_state_dict({"state": {i: m for i, m in moments.items() if m},
                               "param_groups": state["optimizer"]["param_groups"]})
    return int(state["step"])


def _sharded_state(task, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors a sharded checkpoint holds ("model.<name>", "optim.<name>.<entry>", DTensors where the run is
    sharded) and, per parameter, its optimizer entries (true: a scalar)."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, bool]] = {}
    for name, p in task.trainable().items():
        tensors[f"model.{name}"] = p.detach()
        entries[name] = {}
        for key, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value):
                raise NotImplementedError(f"sharded checkpoints hold tensor optimizer state only; {key} is "
                                          f"{type(value).__name__}")
            tensors[f"optim.{name}.{key}"] = value
            entries[name][key] = value.dim() == 0
    return tensors, entries


def _shared_temporary_folder(folder: str, prefix: str, dist) -> str:
    """A fresh temporary folder made by the main process, its name sent to the others (8 random characters)."""
    tail = torch.zeros(8, dtype=torch.uint8)
    if dist.main:
        tmp = tempfile.mkdtemp(prefix=prefix, dir=folder)
        tail = torch.tensor(list(os.path.basename(tmp)[-8:].encode("ascii")), dtype=torch.uint8)
    if dist.world > 1:
        tail = dist.broadcast_(tail)
    return os.path.join(folder, prefix + bytes(tail.tolist()).decode("ascii"))


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
