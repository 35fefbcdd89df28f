"""The X-LoRA layout of mistral.rs (a Rust inference engine), written and read.

mistral.rs 0.9.x loads an X-LoRA from one folder plus an ordering file, and is strict about both:
- the ordering file is {"order": [expert, ...], "layers": {module name: index on the LoRA-layer axis},
  "base_model_id": id}; the same `base_model_id` string must be the model id it is given and the one in
  `xlora_config.json`;
- it lists the folder without descending into subfolders and gives each file to the first expert whose name
  the file name contains, so the experts sit flat as `<expert>.adapter_config.json` /
  `<expert>.adapter_model.safetensors`, and no other file name may contain an expert's name;
- each adapter config has one rank `r` and one `lora_alpha` (no rank_pattern, alpha_pattern, rsLoRA) and all
  experts must list the same `target_modules`, which it applies to every module with that last name;
- the classifier's hidden Linear layers are numbered `inner.0, inner.1, ...` (ours keep the positions of the
  ReLU and Dropout between them), it runs the classifier's Dropout even at inference, and it builds the last
  Linear hidden_size wide even after hidden layers (so xlora_size must equal hidden_size when xlora_depth > 1);
- its Llama config needs `rope_theta`, which transformers 5 writes only inside `rope_parameters`.

The export therefore folds each expert's scale into B and pads every expert with zero rows to one rank and to
every LoRA layer (exact: zero rows add nothing), writes the classifier's Dropout as 0, and puts the base model,
with `rope_theta`, in the `base/` subfolder, whose absolute path becomes `base_model_id`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from ..config import CONFIG_NAME, XLoraConfig
from ..experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS

ORDERING_NAME = "xlora_ordering.json"
CLASSIFIER_NAME = "xlora_classifier.safetensors"
BASE_FOLDER = "base"
PEFT_PREFIX = "base_model.model."


@dataclass
class MistralrsCheckpoint:
    config: XLoraConfig
    classifier_state: dict[str, torch.Tensor]  # in loramix's key layout
    adapters: dict[str, str]  # expert name -> PEFT adapter folder (valid inside `read_mistralrs_checkpoint`)
    base_model_id: str | None
    source: str  # the classifier file, for messages


def find_ordering_file(folder: str) -> str | None:
    """The ordering file of a local mistral.rs X-LoRA folder: `xlora_ordering.json`, else the one JSON file
    holding "order" and "layers"; None when there is none (not this layout)."""
    if not os.path.isdir(folder) or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return None
    if os.path.isfile(os.path.join(folder, ORDERING_NAME)):
        return os.path.join(folder, ORDERING_NAME)
    for file in sorted(os.listdir(folder)):
        if file.endswith(".json") and file != CONFIG_NAME:
            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(data, dict) and "order" in data and "layers" in data:
                return os.path.join(folder, file)
    return None


@contextlib.contextmanager
def read_mistralrs_checkpoint(folder: str, ordering_path: str | None = None) -> Iterator[MistralrsCheckpoint]:
    """Read a mistral.rs X-LoRA folder (ordering file + flat `<expert>.adapter_*` files). The adapters are offered
    as PEFT folders of links in a temporary folder that exists only inside the `with` block."""
    ordering_path = ordering_path or find_ordering_file(folder)
    if ordering_path is None:
        raise FileNotFoundError(f"{folder}: no mistral.rs ordering file (a JSON with 'order' and 'layers')")
    with open(ordering_path, encoding="utf-8") as f:
        ordering = json.load(f)
    config, raw = XLoraConfig.from_json_file(os.path.join(folder, CONFIG_NAME))
    order = ordering.get("order")
    if order != config.expert_names:
        raise ValueError(f"{ordering_path}: order {order} differs from {CONFIG_NAME}'s adapters {config.expert_names}")
    classifier_path = os.path.join(folder, CLASSIFIER_NAME)
    if not os.path.isfile(classifier_path):
        raise FileNotFoundError(f"{folder}: no {CLASSIFIER_NAME}")
    state = load_file(classifier_path)
    step = 3 if config.enable_relu_and_dropout else 1  # Linear, ReLU, Dropout per hidden block in ours
    ours = {}
    for key, tensor in state.items():
        head, _, rest = key.partition(".")
        if head == "inner":
            j, _, param = rest.partition(".")
            key = f"inner.{int(j) * step}.{param}"
        ours[key] = tensor
    files = sorted(os.listdir(folder))
    tmp = tempfile.mkdtemp(prefix=".loramix-mistralrs-")
    try:
        adapters = {}
        for name in config.expert_names:
            mine = [f for f in files if next((n for n in config.expert_names if n in f), None) == name]
            for wanted in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                found = [f for f in mine if f.endswith(wanted)]
                if len(found) != 1:
                    raise FileNotFoundError(f"{folder}: expert {name!r} needs one file ending in {wanted} whose name "
                                            f"contains {name!r}, found {found}")
                os.makedirs(os.path.join(tmp, name), exist_ok=True)
                os.symlink(os.path.join(os.path.abspath(folder), found[0]), os.path.join(tmp, name, wanted))
            adapters[name] = os.path.join(tmp, name)
        base_id = raw.get("base_model_id") or ordering.get("base_model_id")
        if os.path.isfile(os.path.join(folder, BASE_FOLDER, "config.json")):
            base_id = os.path.join(os.path.abspath(folder), BASE_FOLDER)  # the base written beside, wherever moved
        yield MistralrsCheckpoint(config, ours, adapters, base_id, classifier_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
