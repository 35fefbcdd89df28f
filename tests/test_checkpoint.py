"""checkpoint.py: the saved X-LoRA folder written then read back exactly; each file name of the layouts written
once in the package; bad files give one error naming the file and field."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import shutil

import pytest
import torch
from helpers import make_experts, tiny_base

import loramix
from loramix import XLoraConfig, XLoraModel
from loramix.checkpoint import CLASSIFIER_NAME, CONFIG_NAME, read_checkpoint, write_checkpoint
from loramix.cli import main
from loramix.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_expert


# ---- write then read ----------------------------------------------------------------------------------------------
def _files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_then_read_is_an_exact_round_trip(tmp_path, dtype):
    base = tiny_base("llama")
    sources = make_experts(base, "llama", tmp_path / "experts")
    experts = [dataclasses.replace(e, dtype=dtype) for e in
               (load_expert(name, path, base) for name, path in sources.items())]
    config = XLoraConfig(adapters=sources, hidden_size=32, layerwise_scalings=True, xlora_depth=3, xlora_size=16,
                         top_k_lora=2, softmax_temperature=0.5, scaling_pass_value=None, global_scaling_weight=0.7)
    torch.manual_seed(0)
    classifier = {"inner.0.weight": torch.randn(16, 32), "inner.0.bias": torch.randn(16),  # ReLU, Dropout between
                  "inner.3.weight": torch.randn(16, 16), "inner.3.bias": torch.randn(16),
                  "last.weight": torch.randn(3 * 16, 16), "last.bias": torch.randn(3 * 16)}
    write_checkpoint(str(tmp_path / "saved"), config, classifier, experts, base_model_id="some-org/base")

    read = read_checkpoint(str(tmp_path / "saved"))
    assert read.config == dataclasses.replace(config, adapters={e.name: str(tmp_path / "saved" / e.name)
                                                                for e in experts})
    assert read.base == "some-org/base" and not read.peft_layout and not read.peft_layout_experts
    assert read.classifier_state.keys() == classifier.keys()
    assert all(torch.equal(read.classifier_state[k], v) for k, v in classifier.items())
    for written in experts:
        again = load_expert(written.name, read.config.adapters[written.name], base)
        assert (again.config, again.dtype, again.modules.keys()) == (written.config, dtype, written.modules.keys())
        for name, module in written.modules.items():
            other = again.modules[name]
            assert torch.equal(other.lora_A, module.lora_A.to(dtype))
            assert torch.equal(other.lora_B, module.lora_B.to(dtype))
            assert (other.scale, other.embedding) == (module.scale, module.embedding)
    # what was read, written again, gives the same bytes
    write_checkpoint(str(tmp_path / "again"), read.config, read.classifier_state,
                     [load_expert(n, p, base) for n, p in read.config.adapters.items()], base_model_id=read.base)
    assert _files(tmp_path / "again") == _files(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved" / "expert_0")) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_model_saves_through_the_layout(tmp_path, served_checkpoint):
    """save_pretrained of a loaded checkpoint writes back the files it was loaded from."""
    model = XLoraModel.from_pretrained(str(served_checkpoint))
    model.save_pretrained(str(tmp_path / "again"))
    saved = {k: v for k, v in _files(served_checkpoint).items() if k.startswith(("expert_", CONFIG_NAME,
                                                                               CLASSIFIER_NAME, "README.md"))}
    assert _files(tmp_path / "again") == saved


# ---- file names are written once ------------------------------------------------------------------------------
FILE_NAMES = ["xlora_config.json", "xlora_classifier.safetensors", "xlora_ordering.json", "adapter_config.json",
              "adapter_model.safetensors", "base_model.model."]


def _string_constants() -> list[tuple[str, str]]:
    """(module path, text) of every string literal in the package, docstrings left out."""
    found = []
    package = os.path.dirname(loramix.__file__)
    for folder, _, names in os.walk(package):
        for name in (n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            tree = ast.parse(open(path, encoding="utf-8").read())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                          and node.body and isinstance(node.body[0], ast.Expr)
                          and isinstance(node.body[0].value, ast.Constant)}
            found += [(os.path.relpath(path, package), node.value) for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    return found


@pytest.mark.parametrize("file_name", FILE_NAMES)
def test_each_file_name_is_written_once(file_name):
    """Every other module uses the constant (CONFIG_NAME, CLASSIFIER_NAME, ORDERING_NAME, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS, PEFT_PREFIX), also in its messages."""
    where = [path for path, text in _string_constants() if file_name in text]
    assert len(where) == 1, where


# ---- bad checkpoint files ---------------------------------------------------------------------------------------
@pytest.fixture
def saved(served_checkpoint, tmp_path):
    """A copy of the served checkpoint (its base saved beside, recorded by path) that a test may damage."""
    return shutil.copytree(served_checkpoint, tmp_path / "xlora")


def _edit_config(folder, **changes):
    path = folder / "xlora_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "xlora_classifier.safetensors").write_bytes(b""), "xlora_classifier.safetensors: not a readable"),
    (lambda f: (f / "xlora_classifier.safetensors").write_bytes((f / "xlora_classifier.safetensors").read_bytes()[:-9]),
     "xlora_classifier.safetensors: not a readable"),
    (lambda f: (f / "expert_0" / "adapter_model.safetensors").write_bytes(b"\xff" * 64),
     r"expert_0/adapter_model.safetensors: not a readable"),
    (lambda f: (f / "xlora_config.json").write_bytes(b'{"adapters": ["\xe9"]}'), r"xlora_config.json: not UTF-8"),
    (lambda f: (f / "xlora_config.json").write_text("[1, 2]"), r"xlora_config.json: expected a JSON object"),
    (lambda f: _edit_config(f, base_model_id=["base"]), r"xlora_config.json: base_model_id is \['base'\]"),
    (lambda f: _edit_config(f, xlora_size=10**12), r"xlora_classifier.safetensors: inner.0.weight .*xlora_size=10+"),
    (lambda f: _edit_config(f, global_scaling_weight=float("inf")), r"xlora_config.json: global_scaling_weight"),
    (lambda f: (f / "expert_1" / "adapter_config.json").write_text("[]"), r"expert_1/adapter_config.json: expected"),
])
def test_bad_checkpoint_files_name_the_file_and_field(saved, damage, message):
    damage(saved)
    with pytest.raises(ValueError, match=message):
        XLoraModel.from_pretrained(str(saved), base=tiny_base("llama"))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "xlora_classifier.safetensors").write_bytes(b"\x00" * 3), "xlora_classifier.safetensors: not a"),
    (lambda f: _edit_config(f, xlora_size=10**12), "xlora_size=1000000000000"),
    (lambda f: (f / "xlora_config.json").write_bytes(b"\xff\xfe{}"), "xlora_config.json: not UTF-8"),
    (lambda f: _edit_config(f, base_model_id=7), "base_model_id is 7"),
])
def test_bad_checkpoint_via_the_cli_is_one_line(saved, capsys, damage, message):
    damage(saved)
    assert main(["generate", "--model", str(saved), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("loramix generate: ") and message in err, err
