"""loading.py: base model, tokenizer and experts; local paths never reach the hub (the saved X-LoRA folder and its
bad files: test_checkpoint.py)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from helpers import make_experts, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.hub import looks_like_path
from loramix.loading import load_base, load_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    """Every way a name could reach the hub raises; the list records the attempts."""
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise AssertionError(f"sent to the hub: {args[:2]}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    return attempts


@pytest.fixture
def saved(tmp_path):
    """A saved X-LoRA (depth 2, size 16) over a saved tiny base with a tokenizer."""
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    adapters = make_experts(base, "llama", tmp_path, n=2)
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16))
    model.save_pretrained(str(tmp_path / "xlora"))
    return base, tmp_path / "xlora"


# ---- local paths never reach the hub ------------------------------------------------------------------------------
def test_what_looks_like_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for path in ("/abs/model", "./model", "../model", "~/model", "models/missing", "."):
        assert looks_like_path(path), path
    for hub_id in ("owner/repo", "owner/repo/sub/folder", "gpt2"):
        assert not looks_like_path(hub_id), hub_id


@pytest.mark.parametrize("name", ["missing", "./missing", "sub/missing"])
def test_missing_base_path_names_it_and_stays_local(tmp_path, monkeypatch, no_network, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    source = name if name != "missing" else str(tmp_path / "missing")
    config = XLoraConfig(adapters={"a": str(tmp_path / "a")})
    with pytest.raises(FileNotFoundError, match=rf"base model: '{source}' does not exist"):
        XLoraModel.from_base(source, config)
    with pytest.raises(FileNotFoundError, match=rf"tokenizer: '{source}' does not exist"):
        load_tokenizer(source)
    assert no_network == []


def test_missing_expert_folder_of_a_checkpoint_stays_local(saved, no_network):
    base, folder = saved
    shutil.rmtree(folder / "expert_1")
    with pytest.raises(FileNotFoundError, match=r"expert 'expert_1'.*expert_1' does not exist"):
        XLoraModel.from_pretrained(str(folder), base=copy.deepcopy(base))
    with pytest.raises(FileNotFoundError, match=r"X-LoRA checkpoint.*does not exist"):
        XLoraModel.from_pretrained(str(folder) + "-typo", base=copy.deepcopy(base))
    assert no_network == []


# ---- base model options -------------------------------------------------------------------------------------------
def test_placement_options_go_to_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}

    def record(path, **kwargs):
        seen.update(path=path, **kwargs)
        return tiny_base("llama")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    load_base(str(tmp_path), dtype=torch.bfloat16, device_map="auto", max_memory={0: "1GiB"},
              offload_folder=str(tmp_path / "off"))
    assert seen == dict(path=str(tmp_path), trust_remote_code=False, dtype=torch.bfloat16, device_map="auto",
                        max_memory={0: "1GiB"}, offload_folder=str(tmp_path / "off"))


def test_from_pretrained_forwards_placement_options(saved, monkeypatch):
    from transformers import AutoModelForCausalLM

    base, folder = saved
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: seen.update(path=path, **kw) or copy.deepcopy(base))
    model = XLoraModel.from_pretrained(str(folder), device_map={"": "cpu"}, offload_folder="off")
    assert seen["path"] == str(folder.parent / "base") and seen["device_map"] == {"": "cpu"}
    assert seen["offload_folder"] == "off" and model.base_model_id == str(folder.parent / "base")


def test_quantization_is_plumbing_with_clear_errors(tmp_path, monkeypatch):
    import importlib.util

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="quantization: needs the bitsandbytes package"):
        load_base(str(tmp_path), quantization="4bit")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or tiny_base())
    load_base(str(tmp_path), quantization="8bit", device="cpu")
    assert seen["quantization_config"].load_in_8bit and seen["device_map"] == {"": "cpu"}
    mine = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    load_base(str(tmp_path), quantization=mine)
    assert seen["quantization_config"] is mine
    with pytest.raises(ValueError, match="quantization: got '3bit'"):
        load_base(str(tmp_path), quantization="3bit")
    with pytest.raises(ValueError, match="quantization: applies when the base model is loaded by name"):
        load_base(tiny_base(), quantization="4bit")
    with pytest.raises(ValueError, match="device_map: give either device or device_map"):
        load_base(str(tmp_path), device="cpu", device_map="auto")


def test_loaded_module_is_moved_to_dtype_and_records_its_name(saved):
    base, folder = saved
    model = XLoraModel.from_pretrained(str(folder), base=copy.deepcopy(base), dtype=torch.float64)
    assert model.dtype == torch.float64 and model.classifier.last.weight.dtype == torch.float64


# ---- tokenizer ----------------------------------------------------------------------------------------------------
def test_tokenizer_falls_back_in_order_and_takes_a_chat_template(saved, tmp_path):
    _, folder = saved
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}", encoding="utf-8")
    tokenizer = load_tokenizer(str(folder), str(tmp_path / "base"), chat_template_file=str(template))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert load_tokenizer(None, tokenizer) is tokenizer
    with pytest.raises(FileNotFoundError, match=rf"tokenizer: none could be loaded from '{folder}'"):
        load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="tokenizer: nothing to load it from"):
        load_tokenizer(None)
    with pytest.raises(FileNotFoundError, match="chat template: .*nope.jinja' does not exist"):
        load_tokenizer(str(tmp_path / "base"), chat_template_file=str(tmp_path / "nope.jinja"))
