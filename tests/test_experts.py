"""Experts that do not fit the base model fail at load, naming the expert and the module."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from helpers import make_experts, tiny_base
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from loramix import XLoraConfig, XLoraModel


def test_expert_from_another_architecture(tmp_path):
    gpt2 = tiny_base("gpt2")
    adapters = make_experts(gpt2, "gpt2", tmp_path, n=1)
    with pytest.raises(ValueError, match=r"expert 'expert_0'.*module 'transformer.h.0.attn.c_attn'.*no such module"):
        XLoraModel.from_base(tiny_base("llama"), XLoraConfig(adapters=adapters))


def test_expert_with_wrong_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    adapters = make_experts(wide, "llama", tmp_path, n=1)
    with pytest.raises(ValueError, match=r"expert 'expert_0'.*q_proj.*do not fit"):
        XLoraModel.from_base(tiny_base("llama"), XLoraConfig(adapters=adapters))


def test_dora_is_refused(tmp_path):
    base = tiny_base("llama")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match=r"expert 'd'.*DoRA"):
        XLoraModel.from_base(base, XLoraConfig(adapters={"d": str(tmp_path / "dora")}))


def test_pickled_expert_weights_are_refused(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path, n=1)
    folder = adapters["expert_0"]
    os.rename(os.path.join(folder, "adapter_model.safetensors"), os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"expert 'expert_0'.*adapter_model.bin.*never loaded"):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


def test_rank_disagreeing_with_config(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path, n=1)
    path = os.path.join(adapters["expert_0"], "adapter_config.json")
    config = json.load(open(path))
    json.dump({**config, "r": 5}, open(path, "w"))
    with pytest.raises(ValueError, match=r"expert 'expert_0'.*q_proj.*rank 4.*says 5"):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


def test_missing_half_of_a_pair(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path, n=1)
    path = os.path.join(adapters["expert_0"], "adapter_model.safetensors")
    state = {k: v for k, v in load_file(path).items() if not ("layers.1.self_attn.v_proj" in k and "lora_B" in k)}
    save_file(state, path)
    with pytest.raises(ValueError, match=r"layers.1.self_attn.v_proj.*lora_A and lora_B"):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


def test_missing_adapter_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expert 'x'.*adapter_config.json"):
        XLoraModel.from_base(tiny_base("llama"), XLoraConfig(adapters={"x": str(tmp_path)}))


def test_rank_and_alpha_patterns_give_per_module_scales(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path)
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters))
    layers = dict(zip(model.lora_layer_names, model.mixed_layers()))
    up = layers["model.layers.0.mlp.up_proj"]  # expert_2 only, rank_pattern 2, alpha 4
    assert up.lora_A.shape[0] == 2 and torch.allclose(up.scale_of_rank, torch.full((2,), 4 / 2))
    o = layers["model.layers.0.self_attn.o_proj"]  # expert_2, alpha_pattern 12, rank 6
    assert torch.allclose(o.scale_of_rank, torch.full((6,), 12 / 6))
    q = layers["model.layers.0.self_attn.q_proj"]  # expert_0 rank 4 alpha 8; expert_1 rank 8 alpha 16 rsLoRA
    assert q.expert_of_rank.tolist() == [0] * 4 + [1] * 8
    assert torch.allclose(q.scale_of_rank, torch.tensor([2.0] * 4 + [16 / 8 ** 0.5] * 8))


def _one_expert(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path, n=1)
    return base, adapters, os.path.join(adapters["expert_0"], "adapter_config.json")


def _edit(path, **changes):
    raw = json.load(open(path))
    raw.update(changes)
    json.dump(raw, open(path, "w"))


@pytest.mark.parametrize("changes,message", [
    (dict(lora_alpha="16"), r"adapter_config.json: lora_alpha is '16', expected a finite number"),
    (dict(lora_alpha=None), r"adapter_config.json: lora_alpha is None"),
    (dict(lora_alpha=float("nan")), r"adapter_config.json: lora_alpha is nan"),
    (dict(r=0), r"adapter_config.json: r is 0, expected an integer >= 1"),
    (dict(rank_pattern={"q_proj(": 4}), r"adapter_config.json: rank_pattern key 'q_proj\(' is not a valid pattern"),
    (dict(rank_pattern={"(?i)q_proj": 4}), r"rank_pattern key '\(\?i\)q_proj' is not a valid pattern"),
    (dict(alpha_pattern={"q_proj": "big"}), r"alpha_pattern\['q_proj'\] is 'big'"),
    (dict(rank_pattern=[4]), r"rank_pattern is \[4\], expected an object"),
])
def test_bad_adapter_config_fields_name_the_field(tmp_path, changes, message):
    base, adapters, config_path = _one_expert(tmp_path)
    _edit(config_path, **changes)
    with pytest.raises(ValueError, match=message):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "adapter_config.json: expected a JSON object, got a list"),
    (b'{"r": 4, "note": "\xff"}', "adapter_config.json: not UTF-8"),
    (b"{", "adapter_config.json: not valid JSON"),
])
def test_unreadable_adapter_config_names_the_file(tmp_path, content, message):
    base, adapters, config_path = _one_expert(tmp_path)
    open(config_path, "wb").write(content)
    with pytest.raises(ValueError, match=message):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


@pytest.mark.parametrize("cut", [0, 8, -1])
def test_empty_or_truncated_expert_weights_name_the_file(tmp_path, cut):
    base, adapters, _ = _one_expert(tmp_path)
    path = os.path.join(adapters["expert_0"], "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:cut])
    with pytest.raises(ValueError, match=r"expert_0/adapter_model.safetensors: not a readable safetensors file"):
        XLoraModel.from_base(base, XLoraConfig(adapters=adapters))


def test_missing_local_expert_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail(f"sent to the hub: {a}"))
    missing = str(tmp_path / "experts" / "bio")
    with pytest.raises(FileNotFoundError, match=rf"expert 'bio': '{missing}' does not exist"):
        XLoraModel.from_base(tiny_base("llama"), XLoraConfig(adapters={"bio": missing}))
